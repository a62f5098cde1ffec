"""MLflow bookkeeping for one flow run: the run itself, and what each stage records into it.

Tasks and the flow get a ``RunTracker`` as a typed argument instead of relying on MLflow's
thread-local "active run" and process-global tracking URI, so a record lands in the right run
whichever thread Prefect runs it in and whatever else the process tracks.

What MLflow's UI builds on is recorded the way MLflow itself would: experiments tagged as model
training (not GenAI), runs with source tags, the model as a logged model with a signature and an
input example (the runs table's Models column), system metrics while training. A registry version
carries where it stands: ``gate`` (passed/failed), ``gate_reason`` and the gate's numbers in its
description, ``rollout`` (``set_rollout``) with ``rollout_reason``.

``require_tracking_server`` is the flow's quick check that the tracking server answers, at the
start of a run and again before its push: MLflow's own client retries a dead server for about a
minute before it raises, and a push whose champion alias cannot move must not happen.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModel,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_MODEL_VERSIONS,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from tasks.config import REPO_ROOT, MlflowConfig
from tasks.data.store import AddResult, Snapshot, Span

if TYPE_CHECKING:  # tasks.validate imports TensorFlow; this module stays TF-free (flows.report)
    from tasks.validate import Verdict

CHAMPION = "champion"  # registry alias of the version the servers serve
MODEL_ARTIFACT = "model"  # name of the logged model in its run

# MLflow's experiment kind: "custom_model_development" is model training (the runs table), as
# opposed to "genai_development" (traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI decides the view by its GenAI / Machine learning switch (the sidebar; kept in the
# browser), which a link sets with this query parameter; the tag above is what the API and the
# UI without that switch read.
UI_QUERY = "?workflowType=machine_learning"

RolloutState = Literal["canary", "promoted", "rolled_back", "gate_failed"]

PREVIOUS_CHAMPION = "previous_champion"  # the champion before it: what flows.rollback restores


PROBE_TIMEOUT_S = 3.0


class TrackingServerDown(RuntimeError):
    """The tracking server does not answer; the message names its URI and the key that sets it."""


def require_tracking_server(tracking_uri: str, consequence: str) -> None:
    """Return if the tracking server answers ``/health`` within ``PROBE_TIMEOUT_S`` (any HTTP
    status: it is up), or if the URI names no server (``sqlite:``, ``file:``, a path); else
    raise ``TrackingServerDown`` saying ``consequence``."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S)
        return
    except urllib.error.HTTPError:
        return
    except urllib.error.URLError as error:
        if isinstance(error.reason, ssl.SSLError):
            return  # a TLS server answered: its certificate is for MLflow's client to judge
        reason = error.reason
    except OSError as error:  # a timeout
        reason = error
    raise TrackingServerDown(
        f"the MLflow tracking server {tracking_uri} (mlflow.tracking_uri) does not answer "
        f"({reason}): {consequence}"
    )


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

    def end(self, status: str) -> None:
        """End the run now (e.g. FAILED for a rejected version that raised nothing)."""
        self.client.set_terminated(self.run_id, status)

    @cached_property
    def web_url(self) -> str | None:
        """The run's page in the MLflow UI; None when the tracking URI is no server."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return f"{self.tracking_uri}/#/experiments/{experiment}/runs/{self.run_id}"

    def log_inputs(self, *inputs: DatasetInput) -> None:
        self.client.log_inputs(self.run_id, datasets=list(inputs))


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if missing; tagged as model training either way."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # created before the tag; a user's choice stays
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def run_url(tracking_uri: str, experiment: str, run_id: str) -> str:
    """The run's page in MLflow's UI, in its model training view."""
    return f"{tracking_uri}/#/experiments/{experiment}/runs/{run_id}{UI_QUERY}"


def git_commit() -> str | None:
    """The repository's HEAD commit, or None outside a git checkout (or without git)."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() if found.returncode == 0 else None


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's source tags (the runs table's Source column): ``entry_point`` and the commit."""
    tags = {MLFLOW_SOURCE_NAME: entry_point, MLFLOW_SOURCE_TYPE: "JOB"}
    commit = git_commit()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def metric_key(prefix: str, label: object) -> str:
    """``prefix.label`` as a valid MLflow metric name on every platform: a label from outside (a
    batch's name) keeps letters, digits, ``_``, ``-`` and ``.``; anything else becomes ``_``."""
    return f"{prefix}.{re.sub(r'[^A-Za-z0-9_.-]', '_', str(label))}"


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
    tags = {
        **source_tags("tasks/data"),
        "verdict": result.verdict,
        "anomalies": ", ".join(a.kind for a in result.anomalies) or "none",
        "kind": report["kind"],
    }
    if result.span is not None:
        tags["span"] = result.span.digest
    run = client.create_run(
        experiment_id(client, cfg.data_experiment, cfg.artifact_location),
        run_name=f"add {report['name']}",
        tags=tags,
    )
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
    """An MLflow run that ends FINISHED, or FAILED when the body raises or ends it so."""
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    run = client.create_run(
        experiment_id(client, cfg.experiment, cfg.artifact_location), run_name=run_name, tags=tags
    )
    tracker = RunTracker(cfg.tracking_uri, run.info.run_id)
    client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in params.items()])
    try:
        yield tracker
    except TrackingServerDown:
        raise  # nothing can tell it the run failed: the run stays RUNNING there
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    if client.get_run(run.info.run_id).info.status == "RUNNING":  # unless the body ended it
        client.set_terminated(run.info.run_id, "FINISHED")


@contextmanager
def system_metrics(tracker: RunTracker, interval_s: float) -> Iterator[None]:
    """MLflow's system metrics of this machine into the run while the body runs: ``system/cpu_*``,
    memory, disk and network (psutil), and GPU ones where ``nvidia-ml-py`` finds an NVIDIA GPU;
    one value per ``interval_s``."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        tracker.run_id, sampling_interval=interval_s, tracking_uri=tracker.tracking_uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # finish() drops what was sampled since the last value it logged: without this, a body
        # shorter than one interval would record nothing.
        last = monitor.aggregate_metrics()
        if last:
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()


def model_signature():
    """The Keras model's signature, as the SavedModel's ``serving_default``: images in, scores
    out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from serving.mnist import IMAGE_PIXELS, NUM_CLASSES

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, IMAGE_PIXELS), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES), "scores")]),
    )


def log_model(tracker: RunTracker, keras_model: object, example_images: object) -> LoggedModel:
    """Log the Keras model as an MLflow logged model of the run (the runs table's Models column),
    servable by ``mlflow models serve``, with ``example_images`` (float32 [N, 784]) as its input
    example.

    MLflow 3's logged-model API through our client, as ``mlflow.keras.log_model`` does it through
    the fluent run and the global tracking URI. Requirements are given, not inferred: inference
    re-imports the model in a subprocess (slow) and must not reach for the network.
    """
    import keras
    import mlflow.keras
    import tensorflow as tf
    from mlflow.models import Model

    client = tracker.client
    run = client.get_run(tracker.run_id)
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=MODEL_ARTIFACT,
        source_run_id=tracker.run_id,
        # The run's source is the model's (fluent logging adds it from the process context).
        tags={k: v for k, v in run.data.tags.items() if k.startswith("mlflow.source.")},
    )
    try:
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / MODEL_ARTIFACT
            # MLflow 3.17's Keras 3 flavour writes the input example before it creates the folder.
            local.mkdir()
            mlflow.keras.save_model(
                keras_model,
                str(local),
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=logged.model_id,
                    run_id=tracker.run_id,
                    model_id=logged.model_id,
                ),
                signature=model_signature(),
                input_example={"images": example_images},  # by name, as the SavedModel takes it
                pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
            )
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(tracker.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged


def register_model(
    tracker: RunTracker,
    keras_model: object,
    model_name: str,
    tags: dict[str, str],
    example_images: object,
) -> str:
    """Log the model (``log_model``) and register it as a new version of ``model_name``, its gate
    not evaluated yet. Returns the registry version."""
    logged = log_model(tracker, keras_model, example_images)
    client = tracker.client
    try:
        client.create_registered_model(model_name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        model_name,
        # Its artifacts, not "models:/<model id>": a SQLite registry would resolve that through
        # the process-global tracking URI.
        source=logged.artifact_location,
        run_id=tracker.run_id,
        tags={**tags, "gate": "not evaluated"},
        model_id=logged.model_id,
    )
    # What mlflow.register_model records on the logged model: its page then links the version.
    client.set_logged_model_tags(
        logged.model_id,
        {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": model_name, "version": version.version}])},
    )
    return version.version


def gate_description(verdict: Verdict, confidence: float) -> str:
    """The gate's decision and its numbers, as a registry version's description (Markdown)."""
    lines = [
        f"**gate {'passed' if verdict.passed else 'failed'}**: {verdict.reason}",
        f"- error rate {verdict.error_rate:.4f}",
    ]
    overall = verdict.judgement.overall
    if overall is None:
        lines.append("- nothing was serving: only the absolute bound applied")
    else:
        lines += [
            f"- serving version {verdict.baseline_version}: "
            f"error rate {overall.champion_error:.4f}",
            f"- difference {overall.difference:+.4f}, {confidence:.0%} interval "
            f"[{overall.low:+.4f}, {overall.high:+.4f}]",
            f"- McNemar p = {overall.p_value:.3g} (serving right and this wrong on {overall.b} "
            f"images, the reverse on {overall.c})",
        ]
    return "\n".join(lines)


def record_gate(
    tracker: RunTracker, model_name: str, registry_version: str, verdict: Verdict, confidence: float
) -> None:
    """The gate's verdict on a registry version: ``gate``, ``gate_reason``, the description; a
    rejected version also ``rollout: gate_failed``."""
    client = tracker.client
    client.set_model_version_tag(
        model_name, registry_version, "gate", "passed" if verdict.passed else "failed"
    )
    client.set_model_version_tag(model_name, registry_version, "gate_reason", verdict.reason)
    client.update_model_version(
        model_name, registry_version, description=gate_description(verdict, confidence)
    )
    if not verdict.passed:
        set_rollout(tracker, model_name, registry_version, "gate_failed", verdict.reason)


def set_rollout(
    tracker_or_client: RunTracker | MlflowClient,
    model_name: str,
    registry_version: str,
    state: RolloutState,
    reason: str,
) -> None:
    """Tag a registry version with where its rollout stands (``rollout``) and why
    (``rollout_reason``)."""
    if state not in get_args(RolloutState):
        raise ValueError(f"rollout state {state!r}: expected one of {get_args(RolloutState)}")
    client = (
        tracker_or_client.client if isinstance(tracker_or_client, RunTracker) else tracker_or_client
    )
    client.set_model_version_tag(model_name, registry_version, "rollout", state)
    client.set_model_version_tag(model_name, registry_version, "rollout_reason", reason)


def alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """The registry version ``alias`` names, or None (no such model or alias)."""
    try:
        return client.get_model_version_by_alias(model_name, alias).version
    except MlflowException:
        return None


def promote_champion(
    tracker: RunTracker, model_name: str, registry_version: str, reason: str
) -> None:
    """Move ``champion`` to the version the servers now serve (``rollout: promoted``); the
    champion it replaces becomes ``previous_champion`` first."""
    client = tracker.client
    replaced = alias_version(client, model_name, CHAMPION)
    if replaced not in (None, registry_version):
        client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, replaced)
    client.set_registered_model_alias(model_name, CHAMPION, registry_version)
    set_rollout(tracker, model_name, registry_version, "promoted", reason)
