"""What the pipeline did, for a person at a terminal.

    python -m flows.report                      the last run, what serves, and where it came from
    python -m flows.report --version N          the lineage of version N
    python -m flows.report --snapshot ID        the versions trained on snapshot ID

Reads MLflow's record (runs, registry versions and their tags), the data store's snapshot
manifests, and asks the model server what it serves. TF-free, so it answers in a second.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from mlflow.tracking import MlflowClient

from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.data.store import DataStore, DataStoreError
from tasks.tracking import CHAMPION, run_url

PREFECT_UI = "http://127.0.0.1:4200"


def serving_status(rest_url: str) -> str:
    try:
        with urllib.request.urlopen(rest_url, timeout=5) as response:
            statuses = json.load(response)["model_version_status"]
    except urllib.error.HTTPError as error:
        return f"{error.code}: {error.read().decode(errors='replace')}"
    except OSError as error:
        return f"unreachable ({error})"
    return (
        ", ".join(f"version {status['version']} {status['state']}" for status in statuses)
        or "no version"
    )


def _run_url(cfg: PipelineConfig, run) -> str:
    return run_url(cfg.mlflow.tracking_uri, run.info.experiment_id, run.info.run_id)


def last_run(cfg: PipelineConfig, client: MlflowClient) -> None:
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = (
        client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)
        if experiment
        else []
    )
    if not runs:
        print(f"no run in MLflow experiment {cfg.mlflow.experiment!r} yet")
        return
    run = runs[0]
    tags, metrics = run.data.tags, run.data.metrics
    version = tags.get("export_version", "?")
    if tags.get("pushed") == "true":
        print(
            f"OUTCOME: {cfg.export.model_name} version {version} pushed and serving; "
            f"{tags.get('gate_reason', '')}"
        )
    elif tags.get("gate") == "failed":
        print(
            f"OUTCOME: gate FAILED for version {version}, nothing pushed: "
            f"{tags.get('gate_reason', '')}"
        )
    else:
        print(
            f"OUTCOME: run {run.info.status} before the push "
            f"(gate: {tags.get('gate', 'not evaluated')})"
        )
    rates = {
        key: metrics[key] for key in ("val_error_rate", "baseline_error_rate") if key in metrics
    }
    if rates:
        print("         " + ", ".join(f"{key} {value:.4f}" for key, value in rates.items()))
    print(f"MLflow run: {_run_url(cfg, run)}")


def _champion(client: MlflowClient, cfg: PipelineConfig):
    """The registry version the ``champion`` alias names, or None (no model or no alias yet)."""
    try:
        return client.get_model_version_by_alias(cfg.export.model_name, CHAMPION)
    except Exception:  # MlflowException: RESOURCE_DOES_NOT_EXIST or INVALID_PARAMETER_VALUE
        return None


def _marked(client: MlflowClient, cfg: PipelineConfig, registered) -> str:
    # Searched versions carry no aliases: ask for the champion itself.
    champion = _champion(client, cfg)
    return " (champion)" if champion and champion.version == registered.version else ""


def _registry_versions(client: MlflowClient, cfg: PipelineConfig, tag: str, value: str) -> list:
    found = client.search_model_versions(
        f"name = '{cfg.export.model_name}' and tags.{tag} = '{value}'"
    )
    return sorted(found, key=lambda version: int(version.tags.get("export_version", 0)))


def lineage(cfg: PipelineConfig, client: MlflowClient, export_version: str) -> bool:
    """Print where ``export_version`` came from; False when the registry does not know it."""
    found = _registry_versions(client, cfg, "export_version", export_version)
    if not found:
        print(f"version {export_version}: not in the registry of {cfg.export.model_name!r}")
        return False
    registered = found[-1]
    tags = registered.tags
    print(
        f"LINEAGE: {cfg.export.model_name} version {export_version}, "
        f"registry version {registered.version}{_marked(client, cfg, registered)}"
    )
    snapshot_id = tags.get("snapshot")
    if snapshot_id is None:
        print("  trained before snapshots were recorded")
    else:
        print(f"  trained on snapshot {snapshot_id}: {tags.get('training_rows', '?')} rows")
        try:
            snapshot = DataStore(cfg.data).snapshot(snapshot_id)
        except DataStoreError:
            print(f"    (its manifest is not in {cfg.data.store})")
        else:
            for span in (*snapshot.spans, *snapshot.eval_spans):
                print(
                    f"    {span.kind:5s} {span.name:18s} {span.digest[:12]} {span.rows:6d} rows  "
                    f"{span.added or span.source}"
                )
        print(f"  config {tags.get('config_digest')}, code {tags.get('code_digest')}")
    run = client.get_run(registered.run_id)
    metrics = run.data.metrics
    gate = run.data.tags.get("gate", "not evaluated")
    print(f"  gate {gate}: {run.data.tags.get('gate_reason', '')}")
    slices = {k: v for k, v in metrics.items() if k.startswith("slice_error_rate.")}
    for key, value in sorted(slices.items()):
        print(f"    {key.removeprefix('slice_error_rate.')}: error rate {value:.4f}")
    print(f"  MLflow run: {_run_url(cfg, run)}")
    flow_run_id = tags.get("prefect_flow_run_id")
    if flow_run_id:
        print(f"  Prefect flow run: {PREFECT_UI}/runs/flow-run/{flow_run_id}")
    return True


def trained_on(cfg: PipelineConfig, client: MlflowClient, snapshot_id: str) -> bool:
    found = _registry_versions(client, cfg, "snapshot", snapshot_id)
    print(f"SNAPSHOT {snapshot_id}: {len(found)} version(s) trained on it")
    for registered in found:
        print(
            f"  version {registered.tags.get('export_version')} "
            f"(registry version {registered.version}){_marked(client, cfg, registered)}"
        )
    return bool(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rest", default="http://127.0.0.1:8501", help="the model server's REST address"
    )
    parser.add_argument("--config", help="YAML configuration (default: configs/mnist.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="show the lineage of this export version")
    which.add_argument("--snapshot", help="list the versions trained on this snapshot")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    client = MlflowClient(cfg.mlflow.tracking_uri)
    if args.version:
        return 0 if lineage(cfg, client, args.version) else 1
    if args.snapshot:
        return 0 if trained_on(cfg, client, args.snapshot) else 1
    print()
    last_run(cfg, client)
    rest_url = f"{args.rest}/v1/models/{cfg.export.model_name}"
    print(f"Model server: {serving_status(rest_url)}  ({rest_url})")
    champion = _champion(client, cfg)
    if champion is not None:
        lineage(cfg, client, champion.tags.get("export_version", "?"))
    print(f"Prefect UI:   {PREFECT_UI}")
    print(f"MLflow UI:    {cfg.mlflow.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
