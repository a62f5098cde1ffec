"""The vocabulary every layer of the server shares: a version's state and status, version labels,
and the time bounds that more than one layer must agree on.

It imports nothing of the server, so the control plane (manager, config) and the data plane
(routing, core, front ends) can both use it without importing each other.
"""

from __future__ import annotations

import enum
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


__all__ = ["RELOAD_TIMEOUT_S", "State", "VersionStatus", "resolve_label"]
