"""The deployments of ``prefect.yaml`` on a real Prefect server (``tests/prefect_stack.py``).

- The ``on-new-data`` trigger: ``prefect deploy`` turns it into an automation, and two
  ``train-and-serve.data.landed`` events sent by ``tasks.events`` a second apart start exactly one
  flow run (the reactive trigger's 60 s window coalesces them), with ``landed_at`` (the first
  event's time) and ``landing_window_s`` among its parameters. No worker: the run stays Scheduled.
- The worker fixture: a process worker picks up an ``on-demand`` run within seconds and runs the
  flow from this checkout; ``train.epochs=0`` is a config error, so the run ends Failed before it
  trains.

One server for the module (~11 s to start); each deploy imports the flow (TensorFlow, ~12 s).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from tasks.config import CONCURRENCY_LIMIT
from tasks.events import DATA_LANDED, SPAN_RESOURCE_PREFIX
from tests.prefect_stack import WORK_POOL, PrefectServer, prefect_server

pytestmark = pytest.mark.slow

LANDING_WINDOW_S = 60  # prefect.yaml's definitions.landing_window_s


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with prefect_server(tmp_path_factory.mktemp("prefect")) as server:
        server.create_work_pool(WORK_POOL)
        server.create_concurrency_limit(CONCURRENCY_LIMIT, 1)
        yield server


def test_data_landed_events_in_one_window_start_one_run(server: PrefectServer):
    deployment = server.deploy("on-new-data", {"overrides": ["train.epochs=1"]})
    assert deployment.parameters == {"overrides": ["train.epochs=1"]}

    [automation] = server.automations("on-new-data")
    trigger = automation.trigger
    assert trigger.expect == {DATA_LANDED}
    assert trigger.match.model_dump() == {"prefect.resource.id": f"{SPAN_RESOURCE_PREFIX}*"}
    assert (trigger.posture, trigger.threshold) == ("Reactive", 1)
    assert trigger.within == timedelta(seconds=LANDING_WINDOW_S)
    [action] = automation.actions
    assert (action.type, action.deployment_id) == ("run-deployment", deployment.id)

    started = datetime.now(timezone.utc)
    try:
        server.emit_data_landed("a" * 16, "batch-a", rows=10)
        time.sleep(1)
        server.emit_data_landed("b" * 16, "batch-b", rows=20)
        # Both arrived (stored), and the trigger has had time to act on the second one.
        events = server.wait_for_events(DATA_LANDED, 2)
        time.sleep(2)
        runs = server.flow_runs("on-new-data")

        assert len(runs) == 1, ([(run.name, run.parameters) for run in runs], server.log_tail())
        [run] = runs
        assert run.state.is_scheduled()
        # The deployment's parameters, then the trigger's.
        assert set(run.parameters) == {"overrides", "landed_at", "landing_window_s"}
        assert run.parameters["overrides"] == ["train.epochs=1"]
        assert run.parameters["landing_window_s"] == LANDING_WINDOW_S
        landed_at = datetime.fromisoformat(run.parameters["landed_at"])
        assert started - timedelta(seconds=5) < landed_at < datetime.now(timezone.utc)
        first = min(events, key=lambda event: event["occurred"])
        assert first["resource"]["prefect.resource.name"] == "batch-a"
        assert first["payload"] == {"rows": 10}
        assert landed_at == datetime.fromisoformat(first["occurred"])
    finally:
        server.delete_flow_runs("on-new-data")  # no worker started later runs it


def test_worker_runs_a_deployment(server: PrefectServer):
    server.deploy("on-demand", {"overrides": ["train.epochs=0"]})
    with server.worker(WORK_POOL) as worker:
        scheduled = server.run_deployment("on-demand")
        run = server.wait_for_flow_run(scheduled.id, timeout_s=120)
    output = server.flow_run_logs(run.id)
    assert run.state.is_failed(), (run.state, output[-3000:], worker.log.read_text()[-3000:])
    assert "train.epochs" in output  # the ConfigError, from this checkout's flow
