"""The whole flow against real parts: a Prefect test API, an MLflow server on SQLite, our model
server.

The tests run in order and share one stack, as a user's successive runs would: the first run pushes
version 1 trained on the base snapshot, a run with nothing new skips, a batch lands and the next run
hot-swaps to version 2 under load, a run with an impossible bound fails the gate and leaves version
2 serving, and the report shows each version's lineage.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from tensorflow_serving.apis import prediction_service_pb2_grpc

from flows.train_and_serve import GateFailed, train_and_serve
from serving.api_client import ModelServer, predict_request, response_scores
from serving.mnist import load_test
from tasks.config import REPO_ROOT, DataConfig
from tasks.data import holdout
from tasks.data.store import DataStore
from tests.processes import ModelServerProcess, mlflow_server, model_server

MODEL = "mnist"


@dataclass(frozen=True)
class Stack:
    root: Path
    tracking_uri: str
    server: ModelServerProcess

    def overrides(self, *extra: str) -> list[str]:
        return [
            f"export.base_path={self.root / 'exports'}",
            f"push.model_base_path={self.root / 'models'}",
            f'push.replicas=[{{name: local, grpc: "{self.server.grpc_address}"}}]',
            "push.timeout_s=60",
            f"mlflow.tracking_uri={self.tracking_uri}",
            f"data.store={self.root / 'data'}",
            "train.epochs=2",
            *extra,
        ]

    def run(self, *extra: str, force: bool = False):
        return train_and_serve(overrides=self.overrides(*extra), force=force)

    @property
    def store(self) -> DataStore:
        return DataStore(DataConfig(store=self.root / "data"))

    def report(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "flows.report", *args]
            + [f"--set={o}" for o in self.overrides()],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    root = tmp_path_factory.mktemp("stack")
    with mlflow_server(root) as tracking_uri, prefect_test_harness(server_startup_timeout=180):
        with model_server(root / "models" / MODEL, MODEL, root / "model-server.log") as server:
            yield Stack(root, tracking_uri, server)


@pytest.fixture(scope="module")
def test_images():
    return load_test(REPO_ROOT / "data" / "mnist")


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> list[Path]:
    """MNIST's held-back training rows, as the batches that arrive after the first run."""
    out = tmp_path_factory.mktemp("batches")
    return [path for path, _ in holdout.write_batches(DataConfig(), out, 5)]


def latest_run(stack: Stack):
    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("train-and-serve")
    return client.search_runs(
        [experiment.experiment_id], order_by=["start_time DESC"], max_results=1
    )[0]


def exported_scores(path: Path, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return loaded.signatures["serving_default"](images=tf.constant(images))["scores"].numpy()


def rest_predict(stack: Stack, images: np.ndarray, version: int) -> np.ndarray:
    body = json.dumps({"instances": images.tolist()}).encode()
    url = f"{stack.server.rest_url}/v1/models/{MODEL}/versions/{version}:predict"
    with urllib.request.urlopen(
        urllib.request.Request(url, data=body, method="POST"), timeout=30
    ) as response:
        predictions = json.load(response)["predictions"]
    return np.array([prediction["scores"] for prediction in predictions], np.float32)


def test_first_run_pushes_a_version_that_serves_the_validated_scores(stack, test_images):
    outcome = stack.run()
    assert outcome.version == 1
    assert (
        outcome.baseline_error_rate is None
    )  # nothing was serving: only the absolute bound applied
    assert outcome.error_rate < 0.12

    images = test_images.images[:20]
    expected = exported_scores(stack.root / "exports" / MODEL / "1", images)
    with ModelServer(stack.server.grpc_address, MODEL) as server:
        assert server.serving_version() == 1
        np.testing.assert_allclose(server.predict_scores(images, version=1), expected, atol=1e-5)
    np.testing.assert_allclose(rest_predict(stack, images, 1), expected, atol=1e-5)
    assert (stack.root / "models" / MODEL / "1" / "saved_model.pb").is_file()


def test_first_run_is_recorded_in_mlflow(stack):
    run = latest_run(stack)
    client = MlflowClient(stack.tracking_uri)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["export_version"] == "1"
    assert tags["gate"] == "passed" and tags["pushed"] == "true"
    assert tags["device"].endswith("CPU:0")
    assert tags["prefect_flow_run_id"] not in ("", "None")
    assert run.data.params["train.epochs"] == "2"
    assert metrics["val_error_rate"] < 0.12
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2  # one value per epoch
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"saved_model", "model", "plots"} <= artifacts
    saved_model = {
        artifact.path for artifact in client.list_artifacts(run.info.run_id, "saved_model")
    }
    assert "saved_model/saved_model.pb" in saved_model
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == run.info.run_id
    assert champion.tags["export_version"] == "1"
    snapshot = stack.store.snapshot()
    assert [span.name for span in snapshot.spans] == ["base"]
    assert tags["snapshot"] == champion.tags["snapshot"] == snapshot.id
    assert tags["training_rows"] == champion.tags["training_rows"] == "50000"
    assert champion.tags["prefect_flow_run_id"] == tags["prefect_flow_run_id"]
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    training = inputs[f"snapshot-{snapshot.id}"]
    assert training.dataset.digest == snapshot.id
    assert {t.key: t.value for t in training.tags}["mlflow.data.context"] == "training"
    assert json.loads(training.dataset.profile)["num_rows"] == 50000
    assert {t.key: t.value for t in inputs["mnist-t10k"].tags}["mlflow.data.context"] == (
        "evaluation"
    )


def test_a_run_with_nothing_new_trains_nothing(stack):
    runs_before = len(all_runs(stack))
    state = train_and_serve(overrides=stack.overrides(), return_state=True)
    assert state.is_completed()
    assert state.message.startswith("nothing new since version 1 (snapshot ")
    assert len(all_runs(stack)) == runs_before  # no MLflow run, no training, no export
    assert not (stack.root / "exports" / MODEL / "2").exists()


def all_runs(stack: Stack) -> list:
    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("train-and-serve")
    return client.search_runs([experiment.experiment_id])


def test_a_landed_batch_is_trained_on_and_hot_swapped_with_zero_failed_requests(
    stack, test_images, batches
):
    assert stack.store.add(batches[0], "batch-1").verdict == "accepted"
    assert stack.store.add(batches[4], "fresh", kind="eval").verdict == "accepted"
    stop = threading.Event()
    results = {"ok": 0, "failed": [], "versions": set()}
    image = test_images.images[:1]

    def send_continuously():
        with grpc.insecure_channel(stack.server.grpc_address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                request = predict_request(MODEL, image)
                try:
                    response = stub.Predict(request, timeout=10)
                    assert response_scores(response).shape == (1, 10)
                    results["ok"] += 1
                    results["versions"].add(response.model_spec.version.value)
                except Exception as error:  # every failure is a test failure, reported below
                    results["failed"].append(repr(error))

    client = threading.Thread(target=send_continuously)
    client.start()
    try:
        outcome = stack.run()
    finally:
        stop.set()
        client.join()
    assert outcome.version == 2
    assert outcome.baseline_error_rate is not None  # judged against version 1 through the server
    assert results["failed"] == []
    assert results["ok"] > 50
    assert results["versions"] == {1, 2}
    with ModelServer(stack.server.grpc_address, MODEL) as server:
        assert server.serving_version() == 2
    run = latest_run(stack)
    assert run.data.metrics["baseline_error_rate"] == pytest.approx(outcome.baseline_error_rate)
    assert run.data.tags["training_rows"] == "52000"
    assert run.data.tags["snapshot"] == outcome.snapshot == stack.store.snapshot().id
    assert 0 < run.data.metrics["slice_error_rate.fresh"] < 0.2  # the eval batch, its own slice


def test_failed_gate_pushes_nothing_and_the_old_version_keeps_serving(stack):
    # A pinned snapshot (version 1's) reproduces an old run; force: nothing else changed.
    first = stack.store.snapshot(all_runs(stack)[-1].data.tags["snapshot"])
    state = train_and_serve(
        overrides=stack.overrides("validate.max_error_rate=0.0", f"data.snapshot={first.id}"),
        force=True,
        return_state=True,
    )
    assert state.is_failed()
    assert "validate.max_error_rate" in state.message
    with pytest.raises(GateFailed):
        state.result()
    assert sorted(
        p.name for p in (stack.root / "models" / MODEL).iterdir() if not p.name.startswith(".")
    ) == ["1", "2"]
    with ModelServer(stack.server.grpc_address, MODEL) as server:
        assert server.serving_version() == 2
    run = latest_run(stack)
    assert run.data.tags["gate"] == "failed" and run.data.tags["pushed"] == "false"
    assert run.data.tags["snapshot"] == first.id and run.data.tags["training_rows"] == "50000"
    assert run.info.status == "FAILED"
    champion = MlflowClient(stack.tracking_uri).get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["export_version"] == "2"


def test_the_report_shows_a_versions_lineage_and_a_snapshots_versions(stack):
    champion = MlflowClient(stack.tracking_uri).get_model_version_by_alias(MODEL, "champion")
    lineage = stack.report("--version", "2")
    assert "version 2" in lineage and "(champion)" in lineage
    assert f"trained on snapshot {champion.tags['snapshot']}: 52000 rows" in lineage
    assert "base" in lineage and "batch-1" in lineage and "fresh" in lineage
    assert "gate passed" in lineage
    assert f"/runs/flow-run/{champion.tags['prefect_flow_run_id']}" in lineage
    versions = stack.report("--snapshot", champion.tags["snapshot"])
    assert "1 version(s)" in versions and "version 2 " in versions


def test_bad_configuration_key_fails_at_once_naming_it():
    result = subprocess.run(
        [sys.executable, "-m", "flows.train_and_serve", "--set", "train.epoch=3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "train.epoch: unknown key" in result.stderr
