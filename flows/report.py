"""What the last flow run did, for a person at a terminal: ``python -m flows.report``.

Reads the record MLflow keeps (the newest run of the experiment) and asks the model server what it
serves, then prints the outcome and where to look further.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request

from mlflow.tracking import MlflowClient

from tasks.config import load_config

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rest", default="http://127.0.0.1:8501", help="the model server's REST address"
    )
    args = parser.parse_args(argv)
    cfg = load_config()
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = (
        client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)
        if experiment
        else []
    )
    print()
    if not runs:
        print(f"no run in MLflow experiment {cfg.mlflow.experiment!r} yet")
    else:
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
        print(
            f"MLflow run: {cfg.mlflow.tracking_uri}/#/experiments/{run.info.experiment_id}"
            f"/runs/{run.info.run_id}"
        )
    rest_url = f"{args.rest}/v1/models/{cfg.export.model_name}"
    print(f"Model server: {serving_status(rest_url)}  ({rest_url})")
    print(f"Prefect UI:   {PREFECT_UI}")
    print(f"MLflow UI:    {cfg.mlflow.tracking_uri}")


if __name__ == "__main__":
    main()
