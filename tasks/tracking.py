"""MLflow bookkeeping for one flow run: the run itself, and what each stage records into it.

Tasks and the flow get a ``RunTracker`` as a typed argument instead of relying on MLflow's
thread-local "active run" and process-global tracking URI, so a record lands in the right run
whichever thread Prefect runs it in and whatever else the process tracks.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import MlflowConfig

CHAMPION = "champion"  # registry alias of the version the servers serve


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
    tracker: RunTracker, keras_model: object, model_name: str, export_version: int
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
        tags={"export_version": str(export_version)},
    )
    return version.version


def promote_champion(tracker: RunTracker, model_name: str, registry_version: str) -> None:
    tracker.client.set_registered_model_alias(model_name, CHAMPION, registry_version)
