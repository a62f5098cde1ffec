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
import mlflow.artifacts
import numpy as np
import pytest
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.testing.utilities import prefect_test_harness
from tensorflow_serving.apis import prediction_service_pb2_grpc

from flows.train_and_serve import train_and_serve
from serving.api_client import ModelServer, predict_request, response_scores
from serving.mnist import load_test
from tasks.config import REPO_ROOT, DataConfig
from tasks.data import holdout
from tasks.data.store import DataStore
from tasks.infra_validate import InfraValidationFailed
from tasks.tracking import git_commit
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


def registry_version_of(stack: Stack, run):
    [version] = MlflowClient(stack.tracking_uri).search_model_versions(
        f"run_id = '{run.info.run_id}'"
    )
    return version


def test_first_run_is_recorded_in_mlflow(stack, tmp_path):
    run = latest_run(stack)
    client = MlflowClient(stack.tracking_uri)
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["export_version"] == "1"
    assert tags["gate"] == "passed" and tags["pushed"] == "true"
    assert tags["infra_validation"] == "passed"
    assert 0 < metrics["infra_validation.seconds_to_available"] < 120
    assert tags["device"].endswith("CPU:0")
    assert tags["prefect_flow_run_id"] not in ("", "None")
    assert run.data.params["train.epochs"] == "2"
    assert metrics["val_error_rate"] < 0.12
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2  # one value per epoch
    assert metrics["seconds_to_available.local"] >= 0  # the replica's name, not its address
    assert not [key for key in metrics if ":" in key]
    assert metrics["system/cpu_utilization_percentage"] >= 0  # sampled while training
    assert tags["mlflow.source.name"] == "flows/train_and_serve.py"
    assert tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.git.commit"] == git_commit()
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"saved_model", "plots"} <= artifacts
    [output] = run.outputs.model_outputs  # the runs table's Models column
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and str(logged.status) == "READY"
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=logged.artifact_location,
        dst_path=str(tmp_path),
        tracking_uri=stack.tracking_uri,
    )
    signature = Model.load(local).signature
    assert signature.inputs.input_names() == ["images"]
    assert signature.outputs.input_names() == ["scores"]
    assert (Path(local) / "serving_input_example.json").is_file()
    saved_model = {
        artifact.path for artifact in client.list_artifacts(run.info.run_id, "saved_model")
    }
    assert "saved_model/saved_model.pb" in saved_model
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == run.info.run_id
    assert champion.tags["export_version"] == "1"
    assert champion.tags["gate"] == "passed" and champion.tags["rollout"] == "promoted"
    assert champion.tags["gate_reason"] == tags["gate_reason"]
    assert champion.tags["rollout_reason"].startswith("AVAILABLE on local (127.0.0.1:")
    assert "nothing was serving" in champion.description  # a first push: no comparison
    assert champion.source == logged.artifact_location
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


def latest_artifact(key: str):
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )[0]


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
    for metric in ("gate.difference", "gate.interval_high", "gate.mcnemar_p", "class_error_rate.7"):
        assert metric in run.data.metrics, metric
    assert run.data.metrics["gate.interval_low"] <= run.data.metrics["gate.difference"]
    gate, link = latest_artifact("gate-mnist"), latest_artifact("mlflow-run-mnist")
    table = json.loads(gate.data) if isinstance(gate.data, str) else gate.data
    assert [row["metric"] for row in table][:2] == ["error rate, all digits", "error rate, digit 0"]
    assert len(table) == 12 and all(row["decision"] == "ok" for row in table)
    assert table[-1]["metric"] == "error rate, slice fresh"  # the evaluation batch, paired too
    assert "gate.interval_high.slice_fresh" in run.data.metrics
    assert run.info.run_id in link.data
    timeline = latest_artifact("rollout-mnist")
    assert "version 2 promoted" in timeline.description
    assert "local" in json.dumps(timeline.data)
    assert run.data.tags["training_rows"] == "52000"
    assert run.data.tags["snapshot"] == outcome.snapshot == stack.store.snapshot().id
    assert 0 < run.data.metrics["slice_error_rate.fresh"] < 0.2  # the eval batch, its own slice
    pushed = registry_version_of(stack, run)
    assert pushed.tags["gate"] == "passed" and pushed.tags["rollout"] == "promoted"
    assert f"serving version 1: error rate {outcome.baseline_error_rate:.4f}" in pushed.description
    assert "95% interval [" in pushed.description and "McNemar p = " in pushed.description


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
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        [validate_run] = [
            run
            for run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if run.name.startswith("validate")
        ]
        flow_run = client.read_flow_run(flow_run_id)
    # A failed gate is an outcome, not a crash: the validate task itself is Failed, with the
    # reason, and so is the flow run, with the same words.
    assert validate_run.state.is_failed()
    assert validate_run.state.message == state.message
    assert state.message.startswith("gate failed for mnist version 3: error rate")
    assert {"model:softmax", "outcome:gate-failed"} <= set(flow_run.tags)
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
    rejected = registry_version_of(stack, run)  # registered, and plainly not pushed
    assert rejected.tags["gate"] == "failed" and rejected.tags["rollout"] == "gate_failed"
    assert "validate.max_error_rate" in rejected.tags["gate_reason"]
    assert rejected.tags["rollout_reason"] == rejected.tags["gate_reason"]
    assert rejected.description.startswith("**gate failed**")
    assert "serving version 2: error rate " in rejected.description


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


def test_a_candidate_failing_in_the_sandbox_server_is_not_pushed(stack, tmp_path):
    # The latest snapshot again: the candidate is the serving version's twin, so the gate passes;
    # a sandbox server that cannot start must still stop it before push.
    binary = tmp_path / "tensorflow_model_server"
    binary.write_text("#!/bin/sh\necho 'cannot start: no accelerator'\nexit 1\n")
    binary.chmod(0o755)
    store = stack.root / "models" / MODEL
    published = sorted(p.name for p in store.iterdir()) if store.exists() else []
    with ModelServer(stack.server.grpc_address, MODEL) as server:
        serving = server.serving_version()
    state = train_and_serve(
        overrides=stack.overrides(f"validate.infra.server_binary={binary}"),
        force=True,
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(InfraValidationFailed, match="cannot start: no accelerator") as failed:
        state.result()
    assert failed.value.check == "available"
    assert (sorted(p.name for p in store.iterdir()) if store.exists() else []) == published
    with ModelServer(stack.server.grpc_address, MODEL) as server:
        assert server.serving_version() == serving
    run = latest_run(stack)
    assert run.data.tags["gate"] == "passed" and run.data.tags["infra_validation"] == "failed"
    assert run.data.tags["pushed"] == "false"


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
