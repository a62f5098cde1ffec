"""The Prefect side of a run failing under it: the worker, or the Prefect server, restarted while
a deployment's flow run trains. Real ``prefect server start`` (SQLite), a process worker, MLflow
and our model server (``tests/test_new_data.py``'s stack).

* A worker SIGKILLed: its flow run is a process in a session of its own and does not stream its
  output to the worker (``prefect.yaml``: ``stream_output: false``), so it finishes; the next
  worker does not run it again.
* A worker stopped with SIGTERM (as a service manager stops it): it interrupts its flow runs,
  whose processes then end without reporting. The run's heartbeats stop, and the automation of
  ``deploy/prefect/automations.yaml`` marks it Crashed; nothing was pushed, and its concurrency
  slot frees itself when its lease runs out.
* The server stopped and started again on its port and database: the run's API calls are retried
  by Prefect's client until it answers, the run ends Completed, and its concurrency lease is on
  disk (``flows.local_stack.DURABLE_LEASES``), so the slot is given back.

Otherwise: one run, one push, one registry version, the slot free.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import pytest
from mlflow.tracking import MlflowClient

from flows.train_and_serve import LEASE_S
from tasks.model_store import LocalStore
from tests.prefect_stack import WORK_POOL
from tests.test_new_data import MODEL, Stack, pipeline_stack, wait_until

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    with pipeline_stack(tmp_path_factory.mktemp("prefect-restarts")) as stack:
        stack.prefect.deploy("on-demand", {"overrides": stack.overrides(), "force": True})
        yield stack


def wait_until_training(stack: Stack, flow_run_id) -> None:
    def training() -> bool:
        states = stack.prefect.task_run_states(flow_run_id)
        return any(name.startswith("train") and s == "RUNNING" for name, s in states.items())

    wait_until(training, 300, "the flow run's train task running")


class Outcome:
    """What serves and what the registry holds before a run, to compare after it."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.store = LocalStore(stack.root / "models", MODEL)
        self.versions = self.store.versions()
        self.registered = self.registry()

    def registry(self) -> set[str]:
        found = MlflowClient(self.stack.tracking_uri).search_model_versions(f"name='{MODEL}'")
        return {version.version for version in found}

    def assert_one_push(self, flow_run) -> None:
        logs = self.stack.prefect.flow_run_logs(flow_run.id)
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{logs[-4000:]}"
        assert flow_run.run_count == 1  # nothing ran it a second time
        added = self.store.versions() - self.versions
        assert len(added) == 1 and self.versions < self.store.versions(), self.store.versions()
        assert len(self.registry() - self.registered) == 1
        wait_until(lambda: self.stack.concurrency_slots_taken() == 0, 30, "the slot given back")

    def assert_nothing_pushed(self) -> None:
        assert self.store.versions() == self.versions
        assert self.registry() == self.registered


def signal_the_worker_mid_run(stack: Stack, signum: signal.Signals) -> FlowRun:
    """A run of on-demand by a worker that gets ``signum`` (its process group) while the run
    trains; returns the run once the worker exited."""
    with stack.prefect.worker(WORK_POOL) as worker:
        run = stack.prefect.run_deployment("on-demand")
        wait_until_training(stack, run.id)
        os.killpg(worker.process.pid, signum)
        worker.process.wait(timeout=60)
    return run


def test_a_worker_killed_mid_run_lets_its_run_finish_once(stack):
    before = Outcome(stack)
    run = signal_the_worker_mid_run(stack, signal.SIGKILL)
    with stack.prefect.worker(WORK_POOL) as second:
        final = stack.prefect.wait_for_flow_run(run.id, timeout_s=300)
        assert str(run.id) not in second.log.read_text()  # it never submitted the run again
    before.assert_one_push(final)


def test_a_worker_stopped_mid_run_has_its_silent_run_marked_crashed(stack):
    before = Outcome(stack)
    run = signal_the_worker_mid_run(stack, signal.SIGTERM)
    # Three missed heartbeats (90 s), then the automation's next evaluation.
    final = stack.prefect.wait_for_flow_run(run.id, timeout_s=240)
    assert final.state.is_crashed(), final.state
    assert "No heartbeat" in (final.state.message or ""), final.state.message
    before.assert_nothing_pushed()
    wait_until(lambda: stack.concurrency_slots_taken() == 0, LEASE_S + 30, "the lease run out")


def test_a_prefect_server_restarted_mid_run_ends_it_completed_with_its_slot_free(stack):
    before = Outcome(stack)
    with stack.prefect.worker(WORK_POOL):
        run = stack.prefect.run_deployment("on-demand")
        wait_until_training(stack, run.id)
        down_s = stack.prefect.restart(down_s=10)
        assert down_s >= 10
        final = stack.prefect.wait_for_flow_run(run.id, timeout_s=300)
    before.assert_one_push(final)
