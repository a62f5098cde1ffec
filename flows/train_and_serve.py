"""The flow ``train-and-serve``: data → train → export → validate → infra_validate → push.

One run at a time trains and pushes (the global concurrency limit ``train-and-serve``, which
every deployment shares; a run that finds it taken waits). A run whose snapshot, configuration
and code are the serving champion's ends Completed without training ("nothing new since version
N"), unless ``force``. One MLflow run per training run records what each stage did. A failed gate
ends the flow run Failed, with the reason as its message, and pushes nothing; so does a candidate
that fails in the sandbox server (``validate.infra``).

A run started by new data (deployment ``on-new-data``) gets ``landed_at``, when the first batch
landed, and first waits until ``landing_window_s`` after it, so that the batches of one burst,
which the trigger coalesces into this run, are all in its snapshot.

    python -m flows.train_and_serve [--config FILE] [--set section.key=value ...] [--force]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow, get_client
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.transactions import transaction

from serving import mnist
from serving.api_client import ModelServer
from tasks import data, lineage, plots
from tasks.champion import promote
from tasks.config import (
    CONCURRENCY_LIMIT,
    ConfigError,
    InfraConfig,
    PipelineConfig,
    load_config,
)
from tasks.data.store import Snapshot
from tasks.export import ExportResult, export
from tasks.infra_validate import InfraValidationFailed, infra_timeout_s, infra_validate
from tasks.logs import artifact_key, logger
from tasks.push import PushError, RolloutReport, push, push_timeout_s
from tasks.tracking import (
    RunTracker,
    TrackingServerDown,
    metric_key,
    record_gate,
    register_model,
    require_tracking_server,
    set_rollout,
    snapshot_inputs,
    source_tags,
    system_metrics,
    tracked_run,
)
from tasks.train import train
from tasks.validate import Verdict, validate

LEASE_S = 60  # how long a crashed run can hold the concurrency slot


@dataclass(frozen=True)
class Outcome:
    model_name: str
    version: int
    error_rate: float
    baseline_error_rate: float | None
    mlflow_run_id: str
    registry_version: str
    snapshot: str


def wait_for_landing_window(landed_at: str, landing_window_s: float) -> None:
    """Sleep until ``landing_window_s`` after ``landed_at`` (ISO 8601): batches landing meanwhile
    start no run of their own (the trigger fires once per window) and must be in this one."""
    landed = datetime.fromisoformat(landed_at)
    landed = landed if landed.tzinfo else landed.replace(tzinfo=UTC)
    until = landed + timedelta(seconds=landing_window_s)
    remaining = min((until - datetime.now(UTC)).total_seconds(), landing_window_s)
    if remaining > 0:
        logger().info(
            "new data landed at %s: waiting %.0f s, until %s, for the rest of its batches",
            landed.isoformat(timespec="seconds"),
            remaining,
            until.isoformat(timespec="seconds"),
        )
        time.sleep(remaining)


def tag_flow_run(*tags: str) -> None:
    """Add tags to this flow run: the Prefect UI filters runs by model kind and outcome."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags
        client.update_flow_run(run_id, tags=sorted({*current, *tags}))


def serving_version(servers: list[str], model_name: str) -> int | None:
    try:
        with ModelServer(servers[0], model_name) as server:
            return server.serving_version()
    except Exception:  # unreachable: nothing to skip for; the run reports it at validate
        return None


@flow(name="train-and-serve")
def train_and_serve(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    landed_at: str | None = None,
    landing_window_s: float = 0.0,
) -> Outcome | State:
    cfg = load_config(config_path, overrides or [])
    tag_flow_run(f"model:{cfg.model.kind}")
    try:
        require_tracking_server(cfg.mlflow.tracking_uri, "the run stops before it starts")
    except TrackingServerDown as error:
        return untracked(error)
    if landed_at:
        wait_for_landing_window(landed_at, landing_window_s)
    # The slot is a lease the run renews while it lives: a crashed run frees it when it lapses.
    with concurrency(CONCURRENCY_LIMIT, occupy=1, lease_duration=LEASE_S):
        taken = data.snapshot(cfg.data)
        inputs = lineage.training_inputs(cfg, taken)
        champion = lineage.champion_tags(cfg.mlflow.tracking_uri, cfg.export.model_name)
        unchanged = lineage.nothing_new(
            inputs, champion, serving_version(cfg.push.servers, cfg.export.model_name)
        )
        if unchanged and not force:
            logger().info("%s: not training (force=true retrains anyway)", unchanged)
            tag_flow_run("outcome:skipped")
            return Completed(message=unchanged)
        try:
            return train_and_push(cfg, taken, inputs, champion)
        except TrackingServerDown as error:
            return untracked(error)


def untracked(error: TrackingServerDown) -> State:
    """A run without its tracking server ends Failed with the reason, no traceback."""
    logger().error("%s", error)
    tag_flow_run("outcome:tracking-down")
    return Failed(message=str(error))


def gate_metrics(verdict: Verdict) -> dict[str, float]:
    """The numbers behind the gate's decision, as MLflow metrics."""
    judgement = verdict.judgement
    metrics = {f"class_error_rate.{k}": rate for k, rate in judgement.class_error_rates.items()}
    for check in judgement.checks:
        c = check.comparison
        numbers = {"difference": c.difference, "interval_low": c.low, "interval_high": c.high}
        numbers["mcnemar_p"] = c.p_value
        group = check.group.replace(" ", "_")  # "digit_7", "slice_fresh"
        for name, value in numbers.items():
            key = f"gate.{name}"
            metrics[key if check.group == "all digits" else metric_key(key, group)] = value
    return metrics


def record_verdict(
    tracker: RunTracker, verdict: Verdict, champion: dict[str, str] | None, scratch: Path
) -> None:
    """The gate's numbers, decision and confusion plot into the MLflow run; a serving version
    that is not the registry's champion is reported, never silently taken as the baseline."""
    tracker.log_metrics({"val_error_rate": verdict.error_rate, **gate_metrics(verdict)})
    tracker.log_metrics(
        {
            metric_key("slice_error_rate", name): rate
            for name, rate in verdict.slice_error_rates.items()
        }
    )
    if verdict.baseline_error_rate is not None:
        tracker.log_metrics({"baseline_error_rate": verdict.baseline_error_rate})
        tracker.set_tags({"baseline_version": verdict.baseline_version})
    registered = champion.get("export_version") if champion else None
    if verdict.baseline_version is not None and str(verdict.baseline_version) != registered:
        mismatch = (
            f"the servers serve version {verdict.baseline_version}, the registry's champion is "
            f"{registered or 'none'}: the gate compared with what serves"
        )
        logger().warning(mismatch)
        tracker.set_tags({"baseline_mismatch": mismatch})
    tracker.set_tags(
        {"gate": "passed" if verdict.passed else "failed", "gate_reason": verdict.reason}
    )
    confusion_png = plots.confusion_matrix(
        verdict.confusion, verdict.error_rate, scratch / "confusion.png"
    )
    tracker.log_artifact(confusion_png, "plots")


def check_in_sandbox(
    exported: ExportResult, verdict: Verdict, cfg: InfraConfig, tracker: RunTracker
) -> None:
    """Infra validation, recorded in the MLflow run; a failed check raises and blocks the push."""
    timeout_s = infra_timeout_s(cfg)
    try:
        infra = infra_validate.with_options(timeout_seconds=timeout_s)(exported, verdict, cfg)
    except InfraValidationFailed:
        tracker.set_tags({"infra_validation": "failed"})
        raise
    tracker.set_tags({"infra_validation": "passed"})
    tracker.log_metrics({"infra_validation.seconds_to_available": infra.seconds_to_available})


def rollout_table(report: RolloutReport) -> list[dict[str, str]]:
    """The rollout's timeline, one row per event, for a person to read in the Prefect UI."""
    return [
        {"at": f"{event.seconds:.1f} s", "replica": event.replica, "event": event.event}
        for event in report.timeline
    ]


def roll_out(
    exported: ExportResult,
    verdict: Verdict,
    cfg: PipelineConfig,
    tracker: RunTracker,
    registry_version: str,
) -> RolloutReport:
    """Push and promote in one Prefect transaction: a failure after the publish, the alias move
    included, rolls both back (their on_rollback hooks). The registry version's ``rollout`` tag
    and the timeline artifact say how it went. With the tracking server down nothing is pushed:
    the champion alias must name what serves, and it cannot move."""
    model_name = exported.model_name
    require_tracking_server(
        tracker.tracking_uri,
        f"{model_name} version {exported.version} is not pushed; what serves, and the champion "
        "alias, stay as they were",
    )
    timeout_s = push_timeout_s(cfg.push)
    try:
        with transaction():
            pushed = push.with_options(timeout_seconds=timeout_s)(exported, verdict, cfg.push)
            serving_on = ", ".join(f"{r.name} ({r.address})" for r in pushed.replicas)
            promote(tracker, model_name, registry_version, f"AVAILABLE on {serving_on}")
    except PushError as error:
        set_rollout(tracker, model_name, registry_version, "rolled_back", str(error))
        if error.report is not None:
            publish_timeline(error.report, f"rolled back: {error}")
        raise
    publish_timeline(pushed, f"version {pushed.version} promoted on every replica")
    return pushed


def publish_timeline(report: RolloutReport, outcome: str) -> None:
    create_table_artifact(
        key=artifact_key("rollout", report.model_name),
        table=rollout_table(report),
        description=f"{report.model_name} version {report.version}: {outcome}",
    )


def train_and_export(
    cfg: PipelineConfig,
    loaded: data.TrainingData,
    inputs: lineage.TrainingInputs,
    tracker: RunTracker,
    scratch: Path,
) -> tuple[ExportResult, str]:
    """Train, export the next version and register it; returns the export and registry version."""
    with system_metrics(tracker, cfg.mlflow.system_metrics_interval_s):
        trained = train(loaded.mnist, cfg.model, cfg.train, tracker)
    tracker.set_tags({"device": trained.device})
    tracker.log_artifact(plots.training_curves(trained.history, scratch / "training.png"), "plots")
    exported = export(trained.model, cfg.export, cfg.push.model_base_path, loaded.mnist.test.images)
    tracker.set_tags({"export_version": exported.version})
    tracker.log_artifact(exported.path, "saved_model")
    registry_version = register_model(
        tracker,
        trained.model,
        exported.model_name,
        {
            "export_version": str(exported.version),
            "prefect_flow_run_id": str(flow_run.get_id()),
            **inputs.tags(),
        },
        loaded.mnist.test.images[:3],
    )
    return exported, registry_version


def gate(
    cfg: PipelineConfig,
    exported: ExportResult,
    loaded: data.TrainingData,
    champion: dict[str, str] | None,
    tracker: RunTracker,
    registry_version: str,
    scratch: Path,
) -> Verdict | State:
    """validate, recorded on the run and the registry version: the verdict, or the Failed state
    of a rejected version (its message the reason)."""
    judged = validate(
        exported,
        loaded.mnist.test,
        cfg.validate_,
        cfg.push.servers,
        loaded.slices,
        return_state=True,
    )
    verdict = judged.result(raise_on_failure=False)
    if not isinstance(verdict, Verdict):
        raise verdict  # the gate could not be evaluated: an error, with its traceback
    record_verdict(tracker, verdict, champion, scratch)
    record_gate(tracker, exported.model_name, registry_version, verdict, cfg.validate_.confidence)
    return verdict if verdict.passed else judged


def train_and_push(
    cfg: PipelineConfig,
    taken: Snapshot,
    inputs: lineage.TrainingInputs,
    champion: dict[str, str] | None,
) -> Outcome | State:
    run_name = f"{cfg.export.model_name}-{flow_run.get_name() or 'local'}"
    tags = {
        **source_tags("flows/train_and_serve.py"),
        "prefect_flow_run_id": str(flow_run.get_id()),
        "gate": "not evaluated",
        "pushed": "false",
        **inputs.tags(),
    }
    with (
        tracked_run(cfg.mlflow, run_name, cfg.flat(), tags) as tracker,
        tempfile.TemporaryDirectory() as scratch,
    ):
        if tracker.web_url:
            create_link_artifact(
                key=artifact_key("mlflow-run", cfg.export.model_name),
                link=tracker.web_url,
                link_text=f"MLflow run {run_name}",
            )
        tracker.log_inputs(*snapshot_inputs(taken, cfg.data.store, mnist.source_digest("t10k")))
        loaded = data.load(cfg.data, taken)

        exported, registry_version = train_and_export(cfg, loaded, inputs, tracker, Path(scratch))
        verdict = gate(cfg, exported, loaded, champion, tracker, registry_version, Path(scratch))
        if isinstance(verdict, State):
            # An expected outcome, not a crash: the flow run ends Failed with the gate's reason.
            tracker.end("FAILED")
            tag_flow_run("outcome:gate-failed")
            return Failed(message=verdict.message)
        if cfg.validate_.infra.enabled:
            check_in_sandbox(exported, verdict, cfg.validate_.infra, tracker)
        pushed = roll_out(exported, verdict, cfg, tracker, registry_version)

        tracker.set_tags({"pushed": "true", "pushed_version": pushed.version})
        tracker.log_metrics(
            {
                metric_key("seconds_to_available", n): s
                for n, s in pushed.seconds_to_available.items()
            }
        )
        tag_flow_run("outcome:pushed")
        logger().info(
            "%s version %d is serving on %s (snapshot %s, %d training rows)",
            pushed.model_name,
            pushed.version,
            ", ".join(replica.name for replica in pushed.replicas),
            taken.id,
            taken.rows,
        )
        return Outcome(
            model_name=pushed.model_name,
            version=pushed.version,
            error_rate=verdict.error_rate,
            baseline_error_rate=verdict.baseline_error_rate,
            mlflow_run_id=tracker.run_id,
            registry_version=registry_version,
            snapshot=taken.id,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.train_and_serve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", help="YAML configuration (default: configs/mnist.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument(
        "--force", action="store_true", help="train even when nothing changed since the champion"
    )
    args = parser.parse_args(argv)
    try:
        load_config(args.config, args.overrides)  # fail on a bad key before any run starts
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = train_and_serve(args.config, args.overrides, force=args.force, return_state=True)
    if state.is_failed():  # a failed gate, or an error Prefect has logged with its traceback
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    outcome = state.result()
    if outcome is None:  # a skip: Completed, with the reason as its message
        print(state.message)
    else:
        print(
            f"{outcome.model_name} version {outcome.version} is serving "
            f"(error rate {outcome.error_rate:.4f}, snapshot {outcome.snapshot})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
