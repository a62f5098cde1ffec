"""tasks.tracking against a real MLflow store (SQLite, local artifacts; no server): experiment
kind, source tags, the logged model, registry tags, system metrics, metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from serving.mnist import load_test
from tasks.comparison import Comparison
from tasks.config import REPO_ROOT, MlflowConfig, ModelConfig
from tasks.tracking import (
    CHAMPION,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    experiment_id,
    git_commit,
    metric_key,
    promote_champion,
    record_gate,
    register_model,
    set_rollout,
    source_tags,
    system_metrics,
    tracked_run,
)
from tasks.train import build_model
from tasks.validate import Judgement, PairedCheck, Verdict

MODEL = "mnist"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> MlflowConfig:
    root = tmp_path_factory.mktemp("mlflow")
    return MlflowConfig(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment="tracking-test",
        artifact_location=(root / "artifacts").as_uri(),
    )


@pytest.fixture(scope="module")
def client(cfg) -> MlflowClient:
    return MlflowClient(cfg.tracking_uri)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_test(REPO_ROOT / "data" / "mnist").images[:3]


@pytest.fixture(scope="module")
def registered(cfg, images):
    """A softmax model (untrained: its weights do not matter here) logged and registered."""
    keras_model = build_model(ModelConfig(kind="softmax"))
    with tracked_run(cfg, "test", {}, source_tags("tests/test_tracking.py")) as tracker:
        version = register_model(tracker, keras_model, MODEL, {"export_version": "7"}, images)
    return tracker, keras_model, version


def test_experiments_open_on_training_runs(cfg, client):
    created = experiment_id(client, "fresh", cfg.artifact_location)
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    older = client.create_experiment("older", artifact_location=cfg.artifact_location)
    assert experiment_id(client, "older", None) == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    experiment_id(client, "chosen", None)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_source_tags_name_the_entry_point_and_the_commit(monkeypatch):
    tags = source_tags("flows/train_and_serve.py")
    assert tags["mlflow.source.name"] == "flows/train_and_serve.py"
    assert tags["mlflow.source.type"] == "JOB"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    monkeypatch.setenv("PATH", "")  # no git: no commit tag, no error
    assert git_commit() is None
    assert "mlflow.source.git.commit" not in source_tags("x")


def test_the_model_is_a_logged_model_of_its_run_with_signature_and_example(
    registered, client, images, tmp_path
):
    tracker, keras_model, version = registered
    run = client.get_run(tracker.run_id)
    [output] = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "model" and logged.source_run_id == tracker.run_id
    assert str(logged.status) == "READY"
    assert logged.tags["mlflow.source.name"] == "tests/test_tracking.py"
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=logged.artifact_location, dst_path=str(tmp_path)
    )
    signature = Model.load(local).signature
    specs = signature.inputs.inputs + signature.outputs.inputs
    tensors = [(t.name, t.type, t.shape) for t in specs]
    assert tensors == [("images", np.float32, (-1, 784)), ("scores", np.float32, (-1, 10))]
    assert (Path(local) / "serving_input_example.json").is_file()
    requirements = (Path(local) / "requirements.txt").read_text()
    assert "tensorflow==" in requirements and "keras==" in requirements
    scores = mlflow.pyfunc.load_model(local).predict({"images": images})
    expected = keras_model.predict({"images": images}, verbose=0)
    np.testing.assert_allclose(scores, expected, atol=1e-6)

    model_version = client.get_model_version(MODEL, version)
    assert model_version.source == logged.artifact_location
    assert model_version.run_id == tracker.run_id
    assert model_version.tags == {"export_version": "7", "gate": "not evaluated"}
    versions = client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"]
    assert json.loads(versions) == [{"name": MODEL, "version": version}]


def verdict(passed: bool, overall: Comparison | None) -> Verdict:
    reason = "within bounds" if passed else "error rate 0.0800 > validate.max_error_rate 0.0"
    return Verdict(
        error_rate=0.08,
        baseline_version=None if overall is None else 1,
        judgement=Judgement(
            passed,
            reason,
            () if overall is None else (PairedCheck("all digits", overall, 0.01, "m"),),
            {},
        ),
        confusion=np.zeros((10, 10)),
        canary_images=np.zeros((0, 784), np.float32),
        canary_scores=np.zeros((0, 10), np.float32),
        slice_error_rates={},
    )


def test_a_versions_gate_and_rollout_are_tagged_with_the_numbers(registered, client):
    tracker, _, version = registered
    comparison = Comparison(10_000, 0.08, 0.0812, 40, 52, 0.25, -0.0031, 0.0007)
    record_gate(tracker, MODEL, version, verdict(True, comparison), 0.95)
    passed = client.get_model_version(MODEL, version)
    assert passed.tags["gate"] == "passed" and passed.tags["gate_reason"] == "within bounds"
    assert "rollout" not in passed.tags  # nothing pushed yet
    for number in ("0.0800", "0.0812", "-0.0012", "95% interval [-0.0031, +0.0007]", "p = 0.25"):
        assert number in passed.description, number
    promote_champion(tracker, MODEL, version, "AVAILABLE on replica_1")
    champion = client.get_model_version_by_alias(MODEL, CHAMPION)
    assert champion.version == version and champion.tags["rollout"] == "promoted"
    assert champion.tags["rollout_reason"] == "AVAILABLE on replica_1"
    set_rollout(client, MODEL, version, "rolled_back", "canary errors")
    assert client.get_model_version(MODEL, version).tags["rollout"] == "rolled_back"
    with pytest.raises(ValueError, match="'pushed'"):
        set_rollout(client, MODEL, version, "pushed", "")

    record_gate(tracker, MODEL, version, verdict(False, None), 0.95)
    failed = client.get_model_version(MODEL, version)
    assert failed.tags["gate"] == "failed" and failed.tags["rollout"] == "gate_failed"
    assert failed.tags["rollout_reason"] == failed.tags["gate_reason"]
    assert "nothing was serving" in failed.description


def test_system_metrics_are_recorded_even_for_a_short_body(cfg, client):
    with tracked_run(cfg, "system", {}, {}) as tracker:
        with system_metrics(tracker, interval_s=60):
            pass  # ends long before the monitor's first interval
    metrics = client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_metric_names_from_outside_are_valid_and_readable(cfg, client):
    keys = [
        metric_key("seconds_to_available", "replica_1"),
        metric_key("slice_error_rate", "fresh"),
        metric_key("slice_error_rate", "new batch: ../2024/x?"),
    ]
    assert keys[:2] == ["seconds_to_available.replica_1", "slice_error_rate.fresh"]
    with tracked_run(cfg, "names", {}, {}) as tracker:
        tracker.log_metrics(dict.fromkeys(keys, 1.0))  # MLflow validates each name
    assert set(keys) <= set(client.get_run(tracker.run_id).data.metrics)
    assert re.fullmatch(r"[\w.-]+", keys[2])  # Windows' rule too: no colon, space or slash
