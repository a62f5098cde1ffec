"""New data retrains by itself, end to end, on real parts: ``prefect server start`` with the
deployments of ``prefect.yaml`` and a process worker, an MLflow server, our model server.

Two batches added with ``python -m tasks.data add`` within seconds start ONE run of
``on-new-data`` (the trigger's window), which waits out its landing window, trains on the base
and both batches and pushes a version that then serves. An ``on-demand`` run started while that
one holds the shared concurrency limit waits its turn, then finds nothing new and trains nothing.
A corrupt batch is quarantined with a Prefect artifact and starts nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from serving.api_client import ModelServer
from tasks.config import CONCURRENCY_LIMIT, REPO_ROOT, DataConfig
from tasks.data import holdout
from tasks.data.formats import write_npz
from tasks.data.store import DataStore
from tests.prefect_stack import WORK_POOL, PrefectServer, prefect_server
from tests.processes import ModelServerProcess, mlflow_server, model_server

pytestmark = pytest.mark.slow

MODEL = "mnist"


@dataclass(frozen=True)
class Stack:
    root: Path
    prefect: PrefectServer
    tracking_uri: str
    server: ModelServerProcess

    def overrides(self) -> list[str]:
        return [
            f"data.store={self.root / 'data'}",
            f"export.base_path={self.root / 'exports'}",
            f"push.model_base_path={self.root / 'models'}",
            f'push.replicas=[{{name: local, grpc: "{self.server.grpc_address}"}}]',
            f"mlflow.tracking_uri={self.tracking_uri}",
            "train.epochs=1",
        ]

    def add(self, path: Path) -> subprocess.CompletedProcess:
        """``python -m tasks.data add`` as a user runs it, against this stack."""
        return subprocess.run(
            [sys.executable, "-m", "tasks.data", *(f"--set={o}" for o in self.overrides())]
            + ["add", str(path)],
            cwd=REPO_ROOT,
            env={**os.environ, **self.prefect.env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def concurrency_slots_taken(self) -> int:
        with self.prefect.client() as client:
            return client.read_global_concurrency_limit_by_name(CONCURRENCY_LIMIT).active_slots


@contextmanager
def pipeline_stack(root: Path) -> Iterator[Stack]:
    """MLflow, our model server and a Prefect server with the work pool, the concurrency limit
    and the automations ``make run`` creates; no deployment, no worker yet."""
    with (
        mlflow_server(root) as tracking_uri,
        model_server(root / "models" / MODEL, MODEL, root / "model-server.log") as server,
        prefect_server(root) as prefect,
    ):
        prefect.create_work_pool(WORK_POOL)
        prefect.create_concurrency_limit(CONCURRENCY_LIMIT, 1)
        prefect.create_automations()
        yield Stack(root, prefect, tracking_uri, server)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    with pipeline_stack(tmp_path_factory.mktemp("new-data")) as stack:
        for name in ("on-new-data", "on-demand"):
            stack.prefect.deploy(name, {"overrides": stack.overrides()})
        with stack.prefect.worker(WORK_POOL):
            yield stack


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("batches")
    return [path for path, _ in holdout.write_batches(DataConfig(), out, 5)]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.5)


def test_batches_landing_together_retrain_once_and_the_new_version_serves(stack, batches):
    for batch in batches[:2]:
        added = stack.add(batch)
        assert added.returncode == 0, added.stdout + added.stderr
        assert "announced train-and-serve.data.landed" in added.stdout, added.stdout

    [triggered] = stack.prefect.wait_for_flow_runs("on-new-data", 1, timeout_s=30)
    # It waits out the landing window, then holds the slot while it trains and pushes; an
    # on-demand run started now must wait for it.
    wait_until(lambda: stack.concurrency_slots_taken() == 1, 150, "on-new-data takes the slot")
    waiting = stack.prefect.run_deployment("on-demand")

    finished = stack.prefect.wait_for_flow_run(triggered.id, timeout_s=300)
    assert finished.state.is_completed(), finished.state
    assert len(stack.prefect.flow_runs("on-new-data")) == 1  # two batches, one run

    snapshot = DataStore(DataConfig(store=stack.root / "data")).snapshot()
    assert snapshot.rows == 54_000 and [s.name for s in snapshot.spans][1:] == [
        "batch-1",
        "batch-2",
    ]
    with ModelServer(stack.server.grpc_address, MODEL) as server:
        assert server.serving_version() == 1
        scores = server.predict_scores(np.zeros((1, 784), np.float32), version=1)
        assert scores.shape == (1, 10)
    champion = MlflowClient(stack.tracking_uri).get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["snapshot"] == snapshot.id
    assert champion.tags["training_rows"] == "54000"
    assert champion.tags["prefect_flow_run_id"] == str(triggered.id)

    queued = stack.prefect.wait_for_flow_run(waiting.id, timeout_s=180)
    assert queued.state.is_completed(), queued.state
    assert queued.state.message.startswith("nothing new since version 1"), queued.state.message
    assert queued.start_time >= finished.start_time
    assert queued.end_time > finished.end_time  # it waited for the slot


def test_a_corrupt_batch_is_quarantined_and_starts_nothing(stack, batches, tmp_path):
    with np.load(batches[2]) as batch:
        corrupt = write_npz(tmp_path / "inverted.npz", 255 - batch["images"], batch["labels"])
    runs_before = len(stack.prefect.flow_runs("on-new-data"))
    rejected = stack.add(corrupt)
    assert rejected.returncode == 1, rejected.stdout + rejected.stderr
    assert "pixel_distribution_drift" in rejected.stdout
    with stack.prefect.client() as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-quarantine"]))
        )
    assert artifacts and "pixel_distribution_drift" in artifacts[0].data
    time.sleep(3)
    assert len(stack.prefect.flow_runs("on-new-data")) == runs_before
