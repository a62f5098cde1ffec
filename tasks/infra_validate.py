"""infra_validate: load and query the candidate in a sandbox model server before push (TFX's
InfraValidator, mode LOAD_AND_QUERY).

The gate (validate) judges the SavedModel through TensorFlow in this process; this task judges it
as a model server will serve it. It starts a sandbox server on free 127.0.0.1 ports whose model
base path, a temporary directory, holds a copy of this version alone (never the serving store):
``python -m serving`` (one worker, no load retries), or the ``tensorflow_model_server`` binary of
``validate.infra.server_binary``, on the same flags. The version must pass, in order:

* ``available``: AVAILABLE (GetModelStatus) within ``validate.infra.timeout_s`` of the start;
* ``warmup``: its warmup records replayed, as the server's Prometheus metrics report it;
* ``predict``: gRPC Predict (``serving_default``) of validate's canary images answers the scores
  validate computed from the export (``Verdict.canary_scores``, within push's tolerance);
* ``classify``: gRPC Classify (``classify``) of the same images as ``tf.Example``s, the same scores;
* ``rest_predict``: REST ``:predict`` of the same images, the same scores.

The sandbox is stopped (its whole process group) whatever happens. A failed check raises
``InfraValidationFailed``, naming the check and the reason, with the tail of the server's log; the
flow then pushes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from serving.api_client import ModelServer, ReportedVersionStatus, wait_for_available
from serving.model_format import DEFAULT_SIGNATURE, WARMUP_FILE
from tasks.config import REPO_ROOT, InfraConfig
from tasks.export import CLASS_LABELS, CLASSIFY_SIGNATURE, ExportResult, image_example
from tasks.logs import logger
from tasks.processes import free_port, stop_group
from tasks.validate import Verdict, canary_mismatch

CHECKS = ("available", "warmup", "predict", "classify", "rest_predict")
METRICS_PATH = "/monitoring/prometheus/metrics"
POLL_INTERVAL_S = 0.2
RPC_TIMEOUT_S = 30.0
# How long the server may take to stop on SIGTERM before its process group is killed.
STOP_GRACE_S = 20.0
LOG_TAIL_LINES = 40
# TF Serving's warmup histogram (saved_model_warmup_util.cc), which ours exports too: one sample
# per version path and status, recorded once a version's warmup records have all run. Both
# servers fail the load when a record fails, so a sample with status OK means every record ran;
# the number of records shows only in the log, which is the server's own wording, not an API.
_WARMUP_OK = re.compile(
    r'^:tensorflow:serving:model_warmup_latency_count\{[^}]*status="OK"[^}]*\} (\S+)$', re.M
)


class InfraValidationFailed(RuntimeError):
    """The candidate failed a check in the sandbox server; nothing may be pushed."""

    def __init__(self, check: str, reason: str, log_tail: str, server_pid: int):
        self.check = check
        self.reason = reason
        self.log_tail = log_tail
        self.server_pid = server_pid
        super().__init__(
            f"infra validation failed at check {check!r}: {reason}\n"
            f"--- sandbox server log (last {LOG_TAIL_LINES} lines) ---\n{log_tail}"
        )

    def __reduce__(self):  # Prefect pickles a run's exception: rebuild it from its fields
        return type(self), (self.check, self.reason, self.log_tail, self.server_pid)


@dataclass(frozen=True)
class InfraResult:
    model_name: str
    version: int
    seconds_to_available: float  # from the sandbox's start
    checks_passed: tuple[str, ...]  # CHECKS, in order
    server_pid: int  # the sandbox's process (group leader), stopped before the task returned


class _Rejected(RuntimeError):
    """What a check found wrong (its message is the reason)."""


class _CheckFailed(Exception):
    def __init__(self, check: str, reason: str):
        super().__init__(reason)
        self.check, self.reason = check, reason


def sandbox_command(
    server_binary: Path | None,
    grpc_port: int,
    rest_port: int,
    model_name: str,
    model_base_path: Path,
    monitoring_config: Path,
) -> list[str]:
    """The sandbox's command line: TF Serving's flags, for ``python -m serving`` (the default)
    or a ``tensorflow_model_server`` binary alike. Ours listens on 127.0.0.1 only; TF Serving
    has no flag for that (its gRPC port listens on every interface)."""
    flags = [
        f"--port={grpc_port}",
        f"--rest_api_port={rest_port}",
        f"--model_name={model_name}",
        f"--model_base_path={model_base_path}",
        f"--monitoring_config_file={monitoring_config}",
        # A version that cannot load fails now, not after TF Serving's 5 retries a minute apart.
        "--max_num_load_retries=0",
    ]
    if server_binary is None:
        # One worker is enough to load and query; TF Serving refuses this flag (it is ours).
        return [sys.executable, "-m", "serving", *flags, "--num_workers=1"]
    return [str(server_binary), *flags]


@dataclass(frozen=True)
class _Sandbox:
    process: subprocess.Popen
    grpc_address: str
    rest_url: str
    log: Path
    started: float  # time.monotonic() at its start

    def log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty)"


@contextmanager
def sandbox(export: ExportResult, server_binary: Path | None, scratch: Path) -> Iterator[_Sandbox]:
    """A server of ``export`` alone, from a copy under ``scratch``; stopped on leaving."""
    base_path = scratch / "models" / export.model_name
    shutil.copytree(export.path, base_path / str(export.version))
    monitoring = scratch / "monitoring.config"
    monitoring.write_text(f'prometheus_config {{ enable: true, path: "{METRICS_PATH}" }}\n')
    grpc_port, rest_port = free_port(), free_port()
    command = sandbox_command(
        server_binary, grpc_port, rest_port, export.model_name, base_path, monitoring
    )
    log = scratch / "server.log"
    logger().info("infra validation sandbox: %s", " ".join(command))
    started = time.monotonic()
    with log.open("wb") as out:
        # Its own session: one process group to stop, workers included.
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield _Sandbox(
            process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{rest_port}", log, started
        )
    finally:
        # SIGTERM to the group (our workers ignore it: the server stops them), then SIGKILL to
        # whatever is left: nothing of the sandbox outlives the task.
        stop_group(process, STOP_GRACE_S)


@contextmanager
def _check(name: str) -> Iterator[None]:
    """Any error inside is check ``name`` failing, for that reason."""
    try:
        yield
    except _Rejected as error:
        raise _CheckFailed(name, str(error)) from error
    except grpc.RpcError as error:
        raise _CheckFailed(name, f"{error.code().name}: {error.details()}") from error
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")[:500]
        raise _CheckFailed(name, f"HTTP {error.code}: {body}") from error
    except Exception as error:
        raise _CheckFailed(name, f"{error.__class__.__name__}: {error}") from error


def _version_status(box: _Sandbox, model_name: str, version: int) -> ReportedVersionStatus | None:
    # A channel of its own each time: a channel that found the port closed waits out gRPC's
    # reconnect backoff (seconds) after the server is up, which would count as load time.
    with ModelServer(box.grpc_address, model_name, RPC_TIMEOUT_S) as server:
        statuses = {status.version: status for status in server.version_statuses()}
    return statuses.get(version)


def _wait_available(box: _Sandbox, model_name: str, version: int, timeout_s: float) -> None:
    def exited() -> str | None:
        code = box.process.poll()
        return None if code is None else f"the server exited with status {code} first"

    problem = wait_for_available(
        lambda: _version_status(box, model_name, version), timeout_s, POLL_INTERVAL_S, exited
    )
    if problem is not None:
        raise _Rejected(f"version {version}: {problem} (validate.infra.timeout_s)")


def _check_warmed_up(box: _Sandbox, export: ExportResult) -> None:
    if not (export.path / WARMUP_FILE).is_file():
        raise _Rejected(f"the export has no {WARMUP_FILE}")
    with urllib.request.urlopen(box.rest_url + METRICS_PATH, timeout=RPC_TIMEOUT_S) as response:
        page = response.read().decode()
    if not sum(float(count) for count in _WARMUP_OK.findall(page)):
        raise _Rejected(
            f"the server reports no warmup of the version that succeeded (no "
            f':tensorflow:serving:model_warmup_latency sample with status="OK" on {METRICS_PATH})'
        )


def _classify_scores(server: ModelServer, version: int, images: np.ndarray) -> np.ndarray:
    rows = server.classify([image_example(image) for image in images], CLASSIFY_SIGNATURE, version)
    for row in rows:
        if sorted(row) != sorted(CLASS_LABELS):
            raise _Rejected(f"classes {sorted(row)}, expected {list(CLASS_LABELS)}")
    return np.array([[row[label] for label in CLASS_LABELS] for row in rows], np.float32)


def _rest_scores(box: _Sandbox, export: ExportResult, images: np.ndarray) -> np.ndarray:
    body = {"signature_name": DEFAULT_SIGNATURE, "inputs": {"images": images.tolist()}}
    request = urllib.request.Request(
        f"{box.rest_url}/v1/models/{export.model_name}/versions/{export.version}:predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S) as response:
        return np.asarray(json.load(response)["outputs"]["scores"], np.float32)


def _check_scores(served: np.ndarray, verdict: Verdict) -> None:
    mismatch = canary_mismatch(served, verdict)
    if mismatch is not None:
        raise _Rejected(f"the canary images answered with {mismatch}")


def _run_checks(box: _Sandbox, export: ExportResult, verdict: Verdict, timeout_s: float) -> float:
    """Every check, in order; returns the seconds from the start to AVAILABLE."""
    images, version = verdict.canary_images, export.version
    with _check("available"):
        _wait_available(box, export.model_name, version, timeout_s)
    seconds = time.monotonic() - box.started
    with ModelServer(box.grpc_address, export.model_name, RPC_TIMEOUT_S) as server:
        with _check("warmup"):
            _check_warmed_up(box, export)
        answers = {
            "predict": lambda: server.predict_scores(images, version=version),
            "classify": lambda: _classify_scores(server, version, images),
            "rest_predict": lambda: _rest_scores(box, export, images),
        }
        for name, answer in answers.items():
            with _check(name):
                _check_scores(answer(), verdict)
    return seconds


def infra_timeout_s(cfg: InfraConfig) -> float:
    """The task's timeout (``infra_validate.with_options(timeout_seconds=...)``): the version
    AVAILABLE within ``validate.infra.timeout_s``, each check's call at its deadline, the stop.
    A backstop: each wait fails first, naming its check. No retries: the sandbox is this task's
    own, so what fails in it is the candidate's."""
    return cfg.timeout_s + len(CHECKS) * RPC_TIMEOUT_S + STOP_GRACE_S


@task(name="infra_validate", cache_policy=NO_CACHE)
def infra_validate(export: ExportResult, verdict: Verdict, cfg: InfraConfig) -> InfraResult:
    log = logger()
    failure: _CheckFailed | None = None
    with tempfile.TemporaryDirectory(prefix="infra-validate-") as scratch:
        with sandbox(export, cfg.server_binary, Path(scratch)) as box:
            try:
                seconds = _run_checks(box, export, verdict, cfg.timeout_s)
            except _CheckFailed as failed:
                failure = failed
        # Out of the sandbox: the server has stopped and its log is complete.
        if failure is not None:
            log.error("infra validation failed at %s: %s", failure.check, failure.reason)
            raise InfraValidationFailed(
                failure.check, failure.reason, box.log_tail(), box.process.pid
            ) from failure
    log.info(
        "%s version %d passed infra validation (AVAILABLE after %.1f s; %s)",
        export.model_name,
        export.version,
        seconds,
        ", ".join(CHECKS),
    )
    return InfraResult(export.model_name, export.version, seconds, CHECKS, box.process.pid)
