"""The data store's command line: add a batch, list the spans, print the schema, make batches.

    python -m tasks.data add PATH [--name NAME] [--eval]   validate, then publish or quarantine
    python -m tasks.data list                              spans and quarantined batches
    python -m tasks.data schema                            the schema batches are checked against
    python -m tasks.data holdout OUT [--batches 5]         MNIST's held-back rows as batches

Every command takes ``--config FILE`` and ``--set key=value`` as the flow does. ``add`` exits 0
when the batch is accepted or already in the store, 1 when it is quarantined, 2 on a usage or
configuration error. An accepted training batch is announced to Prefect (the event that starts
the ``on-new-data`` deployment) and every verdict is recorded in MLflow; the store is the record
of truth, so when either service is unreachable the verdict stands and a warning says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.data import holdout
from tasks.data.store import AddResult, DataStore, Span


def _counts(span: Span) -> str:
    return " ".join(str(n) for n in span.class_counts)


def _print_add(result: AddResult, name: str) -> None:
    if result.verdict == "duplicate":
        span = result.span
        print(
            f"{name}: already in the store as span {span.digest[:12]} "
            f"({span.name}, added {span.added}); nothing to do"
        )
        return
    if result.verdict == "quarantined":
        print(f"REJECTED {name}: quarantined in {result.quarantine}")
        for anomaly in result.anomalies:
            print(f"  {anomaly.kind}: {anomaly.detail}")
        return
    span = result.span
    print(
        f"accepted {name} as {span.kind} span {span.digest[:12]}: {span.rows} rows, "
        f"per class {_counts(span)}"
    )
    for warning in span.warnings:
        print(f"  warning (data.drift=warn): {warning}")


def _quarantine_artifact(report: dict) -> None:
    """The report as a Prefect artifact (key ``data-quarantine``: its history lists them all)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise RuntimeError(
            "PREFECT_API_URL is not set (the local stack's: http://127.0.0.1:4200/api)"
        )
    rows = "\n".join(f"| `{a['kind']}` | {a['detail']} |" for a in report["anomalies"])
    # Prefect 3 marks an artifact outside a flow run deprecated, and still keeps it; should it
    # stop, the report remains in quarantine/ and in MLflow.
    warnings.filterwarnings("ignore", "Artifact creation outside", FutureWarning)
    create_markdown_artifact(
        key="data-quarantine",
        markdown=(
            f"# Batch {report['name']} quarantined\n\n"
            f"Source `{report['source']}`, checked {report['checked_at']}, kept in "
            f"`{report['quarantine']}`.\n\n| anomaly | detail |\n|---|---|\n{rows}\n"
        ),
        description=f"{report['name']}: {', '.join(a['kind'] for a in report['anomalies'])}",
    )


def _announce(cfg: PipelineConfig, result: AddResult) -> None:
    """Tell MLflow and, for a new training batch, Prefect; a failure is a warning, not a loss."""
    from tasks import events
    from tasks.tracking import record_batch

    try:
        record_batch(cfg.mlflow, cfg.data.store, result)
    except Exception as error:  # an unreachable tracking server must not undo the verdict
        print(f"warning: not recorded in MLflow ({cfg.mlflow.tracking_uri}): {error}")
    try:
        if result.verdict == "quarantined":
            _quarantine_artifact(result.report)
        elif result.verdict == "accepted" and result.span.kind == "train":
            events.emit_data_landed(result.span.digest, result.span.name, result.span.rows)
            print(f"  announced {events.DATA_LANDED} to Prefect")
    except Exception as error:
        print(f"warning: Prefect not told: {error}")


def _add(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    path = Path(args.path)
    name = args.name or path.stem
    result = DataStore(cfg.data).add(path, name, "eval" if args.eval else "train")
    _print_add(result, name)
    if result.verdict != "duplicate":
        _announce(cfg, result)
    return 1 if result.verdict == "quarantined" else 0


def _list(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    store = DataStore(cfg.data)
    print(f"data store {store.root}")
    print(f"{'name':18s} {'span':12s} {'kind':5s} {'rows':>6s}  per-class counts 0..9        added")
    for span in [store.base_span(), *store.spans()]:
        note = " (drift warned)" if span.warnings else ""
        print(
            f"{span.name[:18]:18s} {span.digest[:12]} {span.kind:5s} {span.rows:6d}  "
            f"{_counts(span):28s} {span.added or '(base)'}  accepted{note}"
        )
    for report in store.quarantined():
        kinds = ", ".join(sorted({anomaly["kind"] for anomaly in report["anomalies"]}))
        print(
            f"{report['name'][:18]:18s} {'-':12s} {report['kind']:5s} {'-':>6s}  "
            f"{'':28s} {report['checked_at']}  quarantined: {kinds}"
        )
    snapshot = store.snapshot()
    print(
        f"latest snapshot {snapshot.id}: "
        f"{snapshot.rows} training rows in {len(snapshot.spans)} spans"
    )
    return 0


def _schema(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    print(json.dumps(DataStore(cfg.data).schema().to_json(), indent=2))
    return 0


def _holdout(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    for path, rows in holdout.write_batches(cfg.data, Path(args.out), args.batches, args.format):
        print(f"wrote {path} ({rows} rows)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", help="YAML configuration (default: configs/mnist.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="validate a batch, then publish or quarantine it")
    add.add_argument("path", help="a .npz (images, labels) or a directory with an IDX pair")
    add.add_argument("--name", help="a name to show (default: the file name)")
    add.add_argument(
        "--eval", action="store_true", help="an evaluation slice, reported, never trained on"
    )
    add.set_defaults(run=_add)
    commands.add_parser("list", help="the spans and the quarantined batches").set_defaults(
        run=_list
    )
    commands.add_parser("schema", help="print the schema").set_defaults(run=_schema)
    hold = commands.add_parser("holdout", help="write the rows after data.base_rows as batches")
    hold.add_argument("out", help="directory to write the batches into")
    hold.add_argument("--batches", type=int, default=5)
    hold.add_argument("--format", choices=["npz", "idx"], default="npz")
    hold.set_defaults(run=_holdout)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return args.run(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
