"""The flow ``train-and-serve``: train → export → validate → push.

One MLflow run per flow run records what each stage did. A failed gate ends the flow run Failed,
with the reason as its message, and pushes nothing: a nightly run that did not ship is visible.

    python -m flows.train_and_serve [--config FILE] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from serving import mnist
from tasks import plots
from tasks.config import ConfigError, load_config
from tasks.export import export
from tasks.logs import logger
from tasks.push import push
from tasks.tracking import promote_champion, register_model, tracked_run
from tasks.train import train
from tasks.validate import validate


class GateFailed(RuntimeError):
    """The new version did not pass validation; nothing was pushed."""


@dataclass(frozen=True)
class Outcome:
    model_name: str
    version: int
    error_rate: float
    baseline_error_rate: float | None
    mlflow_run_id: str
    registry_version: str


@flow(name="train-and-serve")
def train_and_serve(config_path: str | None = None, overrides: list[str] | None = None) -> Outcome:
    cfg = load_config(config_path, overrides or [])
    log = logger()
    run_name = f"{cfg.export.model_name}-{flow_run.get_name() or 'local'}"
    tags = {
        "prefect_flow_run_id": str(flow_run.get_id()),
        "gate": "not evaluated",
        "pushed": "false",
    }
    with (
        tracked_run(cfg.mlflow, run_name, cfg.flat(), tags) as tracker,
        tempfile.TemporaryDirectory() as scratch,
    ):
        data = mnist.load(cfg.data.dir)

        trained = train(data, cfg.model, cfg.train, tracker)
        tracker.set_tags({"device": trained.device})
        tracker.log_artifact(
            plots.training_curves(trained.history, Path(scratch) / "training.png"), "plots"
        )

        exported = export(trained.model, cfg.export, cfg.push.model_base_path, data.test.images)
        tracker.set_tags({"export_version": exported.version})
        tracker.log_artifact(exported.path, "saved_model")
        registry_version = register_model(
            tracker, trained.model, exported.model_name, exported.version
        )

        verdict = validate(exported, data.test, cfg.validate_, cfg.push.servers)
        tracker.log_metrics({"val_error_rate": verdict.error_rate})
        if verdict.baseline_error_rate is not None:
            tracker.log_metrics({"baseline_error_rate": verdict.baseline_error_rate})
            tracker.set_tags({"baseline_version": verdict.baseline_version})
        tracker.set_tags(
            {"gate": "passed" if verdict.passed else "failed", "gate_reason": verdict.reason}
        )
        confusion_png = plots.confusion_matrix(
            verdict.confusion, verdict.error_rate, Path(scratch) / "confusion.png"
        )
        tracker.log_artifact(confusion_png, "plots")
        if not verdict.passed:
            raise GateFailed(
                f"gate failed for {exported.model_name} version {exported.version}: "
                f"{verdict.reason}"
            )

        pushed = push(exported, verdict, cfg.push)
        tracker.set_tags({"pushed": "true", "pushed_version": pushed.version})
        tracker.log_metrics(
            {
                f"seconds_to_available.{server}": s
                for server, s in pushed.seconds_to_available.items()
            }
        )
        promote_champion(tracker, exported.model_name, registry_version)
        log.info(
            "%s version %d is serving on %s",
            pushed.model_name,
            pushed.version,
            ", ".join(pushed.servers),
        )
        return Outcome(
            model_name=pushed.model_name,
            version=pushed.version,
            error_rate=verdict.error_rate,
            baseline_error_rate=verdict.baseline_error_rate,
            mlflow_run_id=tracker.run_id,
            registry_version=registry_version,
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
    args = parser.parse_args(argv)
    try:
        load_config(args.config, args.overrides)  # fail on a bad key before any run starts
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    outcome = train_and_serve(args.config, args.overrides)
    print(
        f"{outcome.model_name} version {outcome.version} is serving "
        f"(error rate {outcome.error_rate:.4f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
