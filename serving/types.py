"""The vocabulary every layer of the server shares: a version's state and status, version labels,
and the time bounds that more than one layer must agree on, and the parameters a version is batched
with (the loader sets them on the servable, the batcher reads them), and the settings of each
version's TensorFlow session (the flags set them, the servable's loader reads them).

It imports nothing of the server, so the control plane (manager, config) and the data plane
(routing, core, front ends) can both use it without importing each other.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import grpc

from serving.errors import invalid

# The longest a HandleReloadConfigRequest (or a config file re-read) waits for its loads; a
# client's deadline may cut it shorter.
RELOAD_TIMEOUT_S = 300.0


class State(enum.IntEnum):
    """Same numbers as ``tensorflow.serving.ModelVersionStatus.State``."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class VersionStatus:
    """A snapshot of one version's state for GetModelStatus / REST status."""

    version: int
    state: State
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


def resolve_label(labels: dict[str, int] | None, label: str) -> int:
    """The version ``label`` points at; INVALID_ARGUMENT when the model defines no such label.

    TF Serving answers INVALID_ARGUMENT (not NOT_FOUND) even for an unknown model."""
    if labels is None or label not in labels:
        raise invalid(f"Unrecognized servable version label: {label}")
    return labels[label]


@dataclass(frozen=True)
class BatchingParameters:
    """``tensorflow.serving.BatchingParameters`` with TF Serving's defaults (SharedBatchScheduler's
    QueueOptions and Options)."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = os.cpu_count() or 1
    thread_pool_name: str = "batch_threads"
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False


@dataclass(frozen=True)
class SessionSettings:
    """What each version's TensorFlow session is configured from: TF Serving's session flags
    (``serving.flags`` sets them, ``tf_runtime.session_config`` builds the ConfigProto).

    Parallelism 0 is TF Serving's "auto"; ``--tensorflow_session_parallelism`` is resolved into
    both values by the flags."""

    config_file: str = ""  # --tensorflow_session_config_file, for messages
    config_text: str = ""  # its text-format ConfigProto, parsed where TensorFlow is imported
    intra_op_parallelism: int = 0
    inter_op_parallelism: int = 0
    per_process_gpu_memory_fraction: float = 0.0


__all__ = [
    "RELOAD_TIMEOUT_S",
    "BatchingParameters",
    "SessionSettings",
    "State",
    "VersionStatus",
    "resolve_label",
]
