"""The staged rollout on three real replicas, each a ``python -m serving`` with its own store and
Prometheus page and under continuous Predict load; the Prefect transaction around push and
promote; the rollback to the previous champion (a real MLflow server, Prefect's test API).

The tests run in order and share the replicas, which start on version 1: version 2 rolls out;
versions 3 and 4 fail their live check and are rolled back; a failed promote withdraws version 5
again; the rollback command returns every replica to version 1; the last test kills a replica in
the middle of a rollout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.testing.utilities import prefect_test_harness
from prefect.transactions import transaction

from flows.rollback import main as rollback_main
from serving.api_client import ModelServer
from tasks.champion import promote
from tasks.config import PushConfig
from tasks.export import ExportResult
from tasks.push import PushError, Rollout, push
from tasks.tracking import CHAMPION, PREVIOUS_CHAMPION, RunTracker, alias_version, promote_champion
from tests import saved_models
from tests.processes import descendants, mlflow_server
from tests.servers import AVAILABLE, Load, Server
from tests.test_push import verdict

pytestmark = pytest.mark.slow

MODEL = "mnist"
METRICS = "/monitoring/prometheus/metrics"


@dataclass
class Stack:
    root: Path
    tracking_uri: str
    servers: list[Server]
    loads: list[Load]

    def replicas(self) -> list[dict[str, str]]:
        return [
            {
                "name": f"r{i}",
                "grpc": f"127.0.0.1:{server.port}",
                "model_base_path": str(self.root / f"store-{i}"),
                "metrics_url": f"http://127.0.0.1:{server.rest_port}{METRICS}",
            }
            for i, server in enumerate(self.servers, start=1)
        ]

    def cfg(self, **keys: object) -> PushConfig:
        """Stages [1, all], a one-second bake on at least 20 requests a side; a lenient p99 ratio,
        since three replicas share two cores."""
        defaults = {"bake_s": 1, "bake_deadline_s": 30, "min_requests": 20, "max_p99_ratio": 50}
        return PushConfig(replicas=self.replicas(), **{**defaults, **keys})

    def export(self, version: int) -> ExportResult:
        """Version ``version`` classifies everything as ``version``."""
        path = saved_models.write_version(self.root / "exports" / MODEL, version, version)
        return ExportResult(MODEL, version, path)

    def store(self, replica: int) -> Path:
        return self.root / f"store-{replica}" / MODEL

    def serving(self, servers: list[Server] | None = None) -> list[int | None]:
        versions = []
        for server in servers or self.servers:
            with ModelServer(f"127.0.0.1:{server.port}", MODEL) as client:
                versions.append(client.serving_version())
        return versions


def blessed(version: int, baseline: int | None):
    """Version ``version`` passed the gate against ``baseline``, which the replicas serve."""
    return verdict(True, saved_models.expected_scores(version, 2), baseline)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    root = tmp_path_factory.mktemp("rollout")
    monitoring = root / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }\n")
    for replica in (1, 2, 3):
        saved_models.write_version(root / f"store-{replica}" / MODEL, 1, 1)
    with ExitStack() as started:
        servers = []
        for replica in (1, 2, 3):  # they boot while MLflow and Prefect start
            servers.append(
                Server(
                    root / f"store-{replica}" / MODEL,
                    root / f"r{replica}.log",
                    extra=[f"--monitoring_config_file={monitoring}", "--num_workers=1"],
                )
            )
            started.callback(servers[-1].stop)
        tracking_uri = started.enter_context(mlflow_server(root))
        started.enter_context(prefect_test_harness(server_startup_timeout=180))
        for server in servers:
            server.wait_ready(timeout=180)
            server.wait_for(lambda states: states.get(1, (0,))[0] == AVAILABLE, "version 1")
        loads = [started.enter_context(Load(server)) for server in servers]
        yield Stack(root, tracking_uri, servers, loads)


def test_a_staged_rollout_changes_one_canary_then_the_rest(stack):
    report = push.fn(stack.export(2), blessed(2, 1), stack.cfg())
    assert stack.serving() == [2, 2, 2]
    assert [(r.name, r.stage, r.previous_version, r.outcome) for r in report.replicas] == [
        ("r1", 1, 1, "promoted"),
        ("r2", 2, 1, "promoted"),
        ("r3", 2, 1, "promoted"),
    ]
    events = [(e.replica, e.event) for e in report.timeline]
    baked = events.index(next(e for e in events if e[0] == "r1" and e[1].startswith("baked")))
    published = events.index(("r2", "stage 2: version 2 published"))
    assert baked < published  # the rest changed only once the canary had baked
    assert set(report.seconds_to_available) == {"r1", "r2", "r3"}
    assert all(not load.failures for load in stack.loads)


@pytest.mark.parametrize(
    ("version", "keys", "reason"),
    [
        (3, {"max_p99_ratio": 0.01}, r"live check failed after .* push.max_p99_ratio=0.01"),
        (
            4,
            {"min_requests": 10**9, "bake_deadline_s": 2},
            r"live check still inconclusive at push.bake_deadline_s=2: .*min_requests=1000000000",
        ),
    ],
    ids=["p99-ratio", "inconclusive"],
)
def test_a_canary_that_fails_its_live_check_is_rolled_back(stack, version, keys, reason):
    with pytest.raises(PushError) as failed:
        push.fn(stack.export(version), blessed(version, 2), stack.cfg(**keys))
    message = str(failed.value)
    assert re.search(rf"failed at stage 1 of 2 \(r1\): {reason}", message), message
    assert message.endswith("rolled back: r1 serves version 2 again"), message
    assert stack.serving() == [2, 2, 2]
    assert not (stack.store(1) / str(version)).exists()
    outcomes = [r.outcome for r in failed.value.report.replicas]
    assert outcomes == ["rolled_back", "untouched", "untouched"]


@flow
def push_and_promote(export: ExportResult, cfg: PushConfig, tracker: RunTracker, registry: str):
    """The flow's last steps, as ``flows.train_and_serve`` runs them."""
    with transaction():
        push(export, blessed(export.version, 2), cfg)  # version 2 serves when it runs
        promote(tracker, MODEL, registry, "test")


def test_a_failed_promote_rolls_the_push_back_in_the_same_transaction(stack):
    tracker = RunTracker(stack.tracking_uri, "no-run")
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):  # no registered model
        push_and_promote(stack.export(5), stack.cfg(stages=["all"], bake_s=0), tracker, "99")
    assert stack.serving() == [2, 2, 2]
    assert not any((stack.store(replica) / "5").exists() for replica in (1, 2, 3))


def test_the_rollback_command_restores_the_previous_champion_everywhere(stack, capsys):
    client = MlflowClient(stack.tracking_uri)
    client.create_registered_model(MODEL)
    run_id = client.create_run("0").info.run_id
    for export in (1, 2):
        client.create_model_version(
            MODEL, f"runs:/{run_id}/model", run_id, {"export_version": str(export)}
        )
    tracker = RunTracker(stack.tracking_uri, run_id)
    promote_champion(tracker, MODEL, "1", "test")
    promote_champion(tracker, MODEL, "2", "test")
    assert alias_version(client, MODEL, PREVIOUS_CHAMPION) == "1"

    overrides = [f"push.replicas={json.dumps(stack.replicas())}"]
    overrides.append(f"mlflow.tracking_uri={stack.tracking_uri}")
    argv = [f"--set={override}" for override in overrides]
    assert rollback_main(argv) == 0
    assert stack.serving() == [1, 1, 1]
    assert not any((stack.store(replica) / "2").exists() for replica in (1, 2, 3))
    assert alias_version(client, MODEL, CHAMPION) == "1"
    assert alias_version(client, MODEL, PREVIOUS_CHAMPION) is None
    assert rollback_main(argv) == 1
    assert "no previous_champion alias" in capsys.readouterr().err


def kill(server: Server) -> None:
    """SIGKILL the server and its worker processes: nothing of it answers any more."""
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    server.proc.wait()


def in_background(
    rollout: Rollout, version: int, baseline: int
) -> tuple[threading.Thread, list[PushError]]:
    """The rollout of ``version``, blessed against ``baseline``, started on a thread; its
    PushError lands in the list."""
    failures: list[PushError] = []

    def run() -> None:
        try:
            rollout.run(blessed(version, baseline))
        except PushError as error:
            failures.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, failures


def test_a_replica_killed_mid_rollout_fails_it_naming_the_replica(stack):
    rollout = Rollout(stack.export(6), stack.cfg(bake_s=60, bake_deadline_s=60))
    thread, failures = in_background(rollout, 6, 1)
    stack.servers[0].wait_for(
        lambda _: any("canary Predict matches" in e.event for e in rollout.timeline),
        "r1 serving version 6",
    )
    stack.loads[0].__exit__()
    kill(stack.servers[0])
    thread.join(timeout=120)
    message = str(failures[0])
    assert re.search(r"at stage 1 of 2 \(r1\): replica r1 \(\S+\) stopped answering", message)
    assert message.endswith("rolled back: r1 withdrawn, not verified: it stopped answering")
    assert stack.serving(stack.servers[1:]) == [1, 1]
    assert not (stack.store(1) / "6").exists()
    assert [r.outcome for r in failures[0].report.replicas] == [
        "unverified",
        "untouched",
        "untouched",
    ]
