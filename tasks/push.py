"""push: publish a blessed version to the serving model store and confirm every server serves it.

Like TFX's Pusher, it only copies into the store the servers poll; the servers swap versions
themselves (load and warm the new one, then unload the old), so the old version serves throughout.
The task then checks each server through TF Serving's public API: the version must become
AVAILABLE within ``push.timeout_s`` and a canary Predict pinned to it must return the scores
validate computed from disk. On any failure the version is taken out of the store again, the
servers fall back to the previous version, and the task fails saying what went wrong.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from serving.api_client import ModelServer
from tasks.config import PushConfig
from tasks.export import ExportResult
from tasks.logs import logger
from tasks.validate import Verdict

POLL_INTERVAL_S = 0.2
# Scores that differ by more than float32 round-off mean the server runs another model.
CANARY_TOLERANCE = 1e-5


class PushError(RuntimeError):
    """The version could not be published or a server did not serve it correctly; rolled back."""


@dataclass(frozen=True)
class PushResult:
    model_name: str
    version: int
    path: Path
    servers: list[str]
    seconds_to_available: dict[str, float]  # per server, from the rename into the store


def publish(export: ExportResult, model_base_path: Path) -> Path:
    """Copy the version into the store under a hidden name, then rename: servers never see it
    half-copied."""
    store = model_base_path / export.model_name
    store.mkdir(parents=True, exist_ok=True)
    target = store / str(export.version)
    if target.exists():
        raise PushError(f"{target} already exists: version {export.version} was pushed before")
    staging = store / f".push-{export.version}-{uuid.uuid4().hex}"
    shutil.copytree(export.path, staging)
    staging.rename(target)
    return target


def withdraw(target: Path) -> None:
    """Take a version out of the store atomically (rename away first), then delete it."""
    if target.exists():
        trash = target.with_name(f".rollback-{target.name}-{uuid.uuid4().hex}")
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def wait_until_available(server: ModelServer, version: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last_state = "not reported"
    while True:
        try:
            statuses = {status.version: status for status in server.version_statuses()}
        except Exception as error:  # an unreachable server is retried until the deadline
            statuses, last_state = {}, f"unreachable ({error.__class__.__name__})"
        status = statuses.get(version)
        if status is not None:
            if status.state == "AVAILABLE":
                return
            if status.state == "END" and status.error_code != 0:
                raise PushError(
                    f"{server.address} failed to load version {version}: {status.error_message}"
                )
            last_state = status.state
        if time.monotonic() >= deadline:
            raise PushError(
                f"{server.address} did not make version {version} AVAILABLE within "
                f"push.timeout_s={timeout_s:g} s (last state: {last_state})"
            )
        time.sleep(POLL_INTERVAL_S)


def check_canary(server: ModelServer, version: int, verdict: Verdict) -> None:
    served = server.predict_scores(verdict.canary_images, version=version)
    if served.shape != verdict.canary_scores.shape:
        raise PushError(
            f"{server.address} version {version} answers the canary images with scores of shape "
            f"{served.shape}, validate computed {verdict.canary_scores.shape}"
        )
    worst = float(np.max(np.abs(served - verdict.canary_scores)))
    if worst > CANARY_TOLERANCE:
        raise PushError(
            f"{server.address} version {version} answers the canary images with other scores than "
            f"validate computed from the export (max difference {worst:.3g})"
        )


@task(cache_policy=NO_CACHE)
def push(export: ExportResult, verdict: Verdict, cfg: PushConfig) -> PushResult:
    log = logger()
    if not verdict.passed:
        raise PushError(
            f"refusing to push {export.model_name} version {export.version}: "
            f"the gate failed: {verdict.reason}"
        )
    target = publish(export, cfg.model_base_path)
    published_at = time.monotonic()
    log.info("published %s version %d to %s", export.model_name, export.version, target)
    seconds: dict[str, float] = {}
    try:
        for address in cfg.servers:
            with ModelServer(address, export.model_name) as server:
                wait_until_available(server, export.version, cfg.timeout_s)
                seconds[address] = time.monotonic() - published_at
                check_canary(server, export.version, verdict)
            log.info(
                "%s serves version %d (AVAILABLE after %.1f s, canary matches)",
                address,
                export.version,
                seconds[address],
            )
    except Exception as error:
        withdraw(target)
        log.error("rolled back %s version %d: %s", export.model_name, export.version, error)
        if isinstance(error, PushError):
            raise
        raise PushError(
            f"push of version {export.version} failed and was rolled back: {error}"
        ) from error
    return PushResult(
        model_name=export.model_name,
        version=export.version,
        path=target,
        servers=list(cfg.servers),
        seconds_to_available=seconds,
    )
