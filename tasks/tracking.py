"""MLflow bookkeeping for one flow run: the run itself, and what each stage records into it.

Tasks and the flow get a ``RunTracker`` as a typed argument instead of relying on MLflow's
thread-local "active run" and process-global tracking URI, so a record lands in the right run
whichever thread Prefect runs it in and whatever else the process tracks.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import MlflowConfig
from tasks.data.store import AddResult, Snapshot, Span

CHAMPION = "champion"  # registry alias of the version the servers serve
PREVIOUS_CHAMPION = "previous_champion"  # the champion before it: what flows.rollback restores


@dataclass(frozen=True)
class RunTracker:
    tracking_uri: str
    run_id: str

    @cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """All of ``metrics`` in one call (one request to a tracking server, not one per metric)."""
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, float(value), now, step or 0) for key, value in metrics.items()],
        )

    def set_tags(self, tags: dict[str, object]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_inputs(self, *inputs: DatasetInput) -> None:
        self.client.log_inputs(self.run_id, datasets=list(inputs))


# MLflow's own dataset schema format (what mlflow.data.from_numpy writes), so its UI shows it.
_TENSOR_SCHEMA = json.dumps(
    {
        "mlflow_tensorspec": {
            "features": json.dumps(
                [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, 28, 28]}}]
            ),
            "targets": json.dumps(
                [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1]}}]
            ),
        }
    }
)


def dataset_input(name: str, digest: str, source: str, profile: dict, context: str) -> DatasetInput:
    """A dataset as ``mlflow.log_input`` records it, with our digest rather than MLflow's hash."""
    return DatasetInput(
        Dataset(
            name, digest, "local", json.dumps({"uri": source}), _TENSOR_SCHEMA, json.dumps(profile)
        ),
        tags=[InputTag("mlflow.data.context", context)],
    )


def snapshot_inputs(snapshot: Snapshot, store: Path, test_source: str) -> list[DatasetInput]:
    """The training snapshot, the fixed test set and the evaluation slices, as run inputs."""
    spans = [{"name": s.name, "digest": s.digest, "rows": s.rows} for s in snapshot.spans]
    inputs = [
        dataset_input(
            f"snapshot-{snapshot.id}",
            snapshot.id,
            str(store / "snapshots" / f"{snapshot.id}.json"),
            {
                "num_rows": snapshot.rows,
                "class_counts": list(snapshot.class_counts),
                "spans": spans,
            },
            "training",
        ),
        dataset_input(
            "mnist-t10k", test_source[:16], "data/mnist t10k", {"num_rows": 10_000}, "evaluation"
        ),
    ]
    inputs += [_span_input(span, store, "evaluation") for span in snapshot.eval_spans]
    return inputs


def _span_input(span: Span, store: Path, context: str) -> DatasetInput:
    profile = {"num_rows": span.rows, "class_counts": list(span.class_counts), "kind": span.kind}
    return dataset_input(
        span.name, span.digest[:16], str(store / "spans" / span.digest), profile, context
    )


def record_batch(cfg: MlflowConfig, store: Path, result: AddResult) -> str:
    """One run in ``mlflow.data_experiment`` per verdict on a batch: its statistics, anomalies and
    report; a FAILED run for a quarantined batch. Returns the run id."""
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    report = result.report
    experiment = client.get_experiment_by_name(cfg.data_experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(cfg.data_experiment, artifact_location=cfg.artifact_location)
    )
    tags = {
        "verdict": result.verdict,
        "anomalies": ", ".join(a.kind for a in result.anomalies) or "none",
        "kind": report["kind"],
    }
    if result.span is not None:
        tags["span"] = result.span.digest
    run = client.create_run(experiment_id, run_name=f"add {report['name']}", tags=tags)
    tracker = RunTracker(cfg.tracking_uri, run.info.run_id)
    stats = report.get("statistics")
    if stats:
        tracker.log_metrics(
            {
                "rows": stats["rows"],
                "pixel_mean": stats["pixel_mean"],
                "pixel_std": stats["pixel_std"],
            }
        )
    if result.span is not None:
        tracker.log_inputs(_span_input(result.span, store, "batch"))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "report.json"
        path.write_text(json.dumps(report, indent=2))
        tracker.log_artifact(path, "validation")
    client.set_terminated(
        run.info.run_id, "FAILED" if result.verdict == "quarantined" else "FINISHED"
    )
    return run.info.run_id


@contextmanager
def tracked_run(
    cfg: MlflowConfig, run_name: str, params: dict[str, str], tags: dict[str, str]
) -> Iterator[RunTracker]:
    """An MLflow run that ends FINISHED, or FAILED when the body raises."""
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        experiment_id = client.create_experiment(
            cfg.experiment, artifact_location=cfg.artifact_location
        )
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    tracker = RunTracker(cfg.tracking_uri, run.info.run_id)
    client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in params.items()])
    try:
        yield tracker
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def register_model(
    tracker: RunTracker, keras_model: object, model_name: str, tags: dict[str, str]
) -> str:
    """Log the model in MLflow's Keras format (servable by ``mlflow models serve``) and register it.

    Returns the registry version. Requirements are given, not inferred: inference re-imports the
    model in a subprocess (slow) and must not reach for the network.
    """
    import keras
    import mlflow.keras
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "model"
        mlflow.keras.save_model(
            keras_model,
            str(local),
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
        )
        tracker.log_artifact(local, "model")
    client = tracker.client
    try:
        client.create_registered_model(model_name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        model_name,
        source=f"runs:/{tracker.run_id}/model",
        run_id=tracker.run_id,
        tags=tags,
    )
    return version.version


def alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """The registry version ``alias`` names, or None (no such model or alias)."""
    try:
        return client.get_model_version_by_alias(model_name, alias).version
    except MlflowException:
        return None


def promote_champion(tracker: RunTracker, model_name: str, registry_version: str) -> None:
    """Move ``champion`` to ``registry_version``; the champion it replaces becomes
    ``previous_champion`` first."""
    client = tracker.client
    replaced = alias_version(client, model_name, CHAMPION)
    if replaced not in (None, registry_version):
        client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, replaced)
    client.set_registered_model_alias(model_name, CHAMPION, registry_version)
