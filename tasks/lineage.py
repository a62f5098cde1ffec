"""Lineage: what a version was trained from, and whether a run has anything new to train on.

A version's *training inputs* are its data snapshot, the configuration that shapes its weights
(``PipelineConfig.training_digest``) and the code that trains and exports it (``code_digest``).
They are tags of the MLflow run and of the registered version. A run whose inputs equal the
champion's, while the champion is what serves, would train the same model again: ``nothing_new``
says so, and the flow ends there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import REPO_ROOT, PipelineConfig
from tasks.data.store import Snapshot
from tasks.tracking import CHAMPION

# The code a trained and exported model depends on: the pipeline's tasks and the data format.
CODE = ("tasks/**/*.py", "serving/mnist.py", "serving/model_format.py")


def code_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted({p for pattern in CODE for p in REPO_ROOT.glob(pattern)}):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TrainingInputs:
    snapshot: str
    rows: int
    config_digest: str
    code_digest: str

    def tags(self) -> dict[str, str]:
        return {
            "snapshot": self.snapshot,
            "training_rows": str(self.rows),
            "config_digest": self.config_digest,
            "code_digest": self.code_digest,
        }


def training_inputs(cfg: PipelineConfig, snapshot: Snapshot) -> TrainingInputs:
    return TrainingInputs(snapshot.id, snapshot.rows, cfg.training_digest(), code_digest())


def champion_tags(tracking_uri: str, model_name: str) -> dict[str, str] | None:
    """The registry tags of the ``champion`` version, or None when there is none yet."""
    try:
        version = MlflowClient(tracking_uri).get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return dict(version.tags)


def nothing_new(
    inputs: TrainingInputs, champion: dict[str, str] | None, serving_version: int | None
) -> str | None:
    """Why this run would retrain the champion unchanged, or None when it has something new."""
    if champion is None or serving_version is None:
        return None
    if str(serving_version) != champion.get("export_version"):
        return None  # the servers do not serve the champion: push one that they will
    if any(champion.get(key) != value for key, value in inputs.tags().items()):
        return None
    return (
        f"nothing new since version {serving_version} (snapshot {inputs.snapshot}, "
        f"config {inputs.config_digest}, code {inputs.code_digest})"
    )
