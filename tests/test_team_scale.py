"""The team profile: a whole flow run with MLflow's tracking server on PostgreSQL (Debian's
``postgresql``), its artifacts, the exports and the serving model store on S3 (moto's server),
our model server polling ``s3://``; all real processes on loopback."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.train_and_serve import train_and_serve
from serving import object_store
from serving.api_client import ModelServer
from serving.mnist import load_test
from serving.object_store import S3Url
from tasks.config import REPO_ROOT
from tasks.model_store import S3Store
from tests.processes import mlflow_server, model_server, postgres_server, s3_server

pytestmark = pytest.mark.slow

MODEL = "mnist"


def keys(bucket: str, prefix: str) -> list[str]:
    pages = object_store.client().get_paginator("list_objects_v2")
    return [o["Key"] for p in pages.paginate(Bucket=bucket, Prefix=prefix) for o in p["Contents"]]


def test_a_flow_run_records_in_postgres_and_s3_and_pushes_into_an_s3_store(tmp_path, monkeypatch):
    with s3_server(tmp_path) as s3, postgres_server(tmp_path) as database:
        for bucket in ("models", "mlflow", "exports"):
            object_store.client().create_bucket(Bucket=bucket)
        with (
            mlflow_server(tmp_path, database, "s3://mlflow/artifacts") as tracking_uri,
            prefect_test_harness(server_startup_timeout=180),
            model_server(f"s3://models/{MODEL}", MODEL, tmp_path / "server.log") as server,
        ):
            # The exports' local copies (set now: PostgreSQL's user cannot enter tmp_path).
            monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
            outcome = train_and_serve(
                overrides=[
                    "export.base_path=s3://exports/team",
                    "push.model_base_path=s3://models",
                    f'push.replicas=[{{name: local, grpc: "{server.grpc_address}"}}]',
                    f"mlflow.tracking_uri={tracking_uri}",
                    f"data.store={tmp_path / 'data'}",
                    "train.epochs=1",
                ]
            )
            assert outcome.version == 1
            images = load_test(REPO_ROOT / "data" / "mnist").images[:5]
            with ModelServer(server.grpc_address, MODEL) as client:
                assert client.serving_version() == 1
                assert np.argmax(client.predict_scores(images), axis=1).shape == (5,)
            assert list(object_store.list_versions(S3Url("models", MODEL))) == [1]
            exported = keys("exports", f"team/{MODEL}/1/")
            assert {"saved_model.pb", "variables/variables.index", ".claim"} <= {
                key.removeprefix(f"team/{MODEL}/1/") for key in exported
            }
            local = S3Store("s3://exports/team", MODEL).local_dir() / "1"
            assert local.is_relative_to(tmp_path) and (local / "saved_model.pb").is_file()

            tracking = MlflowClient(tracking_uri)
            experiment = tracking.get_experiment_by_name("train-and-serve")
            [run] = tracking.search_runs([experiment.experiment_id])
            assert run.data.params["train.epochs"] == "1"
            assert run.data.metrics["val_error_rate"] < 0.2
            assert run.data.tags["pushed"] == "true"
            champion = tracking.get_model_version_by_alias(MODEL, "champion")
            assert champion.run_id == run.info.run_id
            assert champion.tags["rollout"] == "promoted"
            # The artifacts are objects in the bucket, the runs rows in PostgreSQL.
            stored = keys("mlflow", "artifacts/")
            assert any(key.endswith("saved_model/saved_model.pb") for key in stored)
            assert any("/plots/" in key for key in stored)
        engine = sqlalchemy.create_engine(database)
        with engine.connect() as connection:
            rows = connection.execute(sqlalchemy.text("SELECT run_uuid FROM runs")).all()
            versions = connection.execute(
                sqlalchemy.text("SELECT version FROM model_versions WHERE name = :n"), {"n": MODEL}
            ).all()
        engine.dispose()
        assert [row[0] for row in rows] == [run.info.run_id]
        assert [row[0] for row in versions] == [int(champion.version)]
        assert s3.endpoint.startswith("http://127.0.0.1:")
