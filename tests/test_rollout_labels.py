"""The rollout by version labels on two real replicas, each a ``python -m serving`` started with
``--model_config_file`` (its own store, its Prometheus page) and a client thread that asks for the
label ``stable`` throughout.

The tests run in order and share the replicas, which start on version 1 labelled ``stable``:
version 2 rolls out; version 3's canary answers wrong and is rolled back; version 4 rolls out and
is undone as a transaction's rollback undoes it; the rollback command's label move goes to 1 and
back to 2; version 5 runs into a task timeout; the last test
kills a replica in the middle of a rollout.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.utilities.timeout import timeout

from serving.api_client import ModelServer
from tasks.push import PushError, Rollout, move_stable, push
from tasks.version_labels import CANARY, STABLE, read_config
from tests import saved_models
from tests.servers import AVAILABLE, Load, Server, config_text, model_entry
from tests.test_rollout import MODEL, Stack, blessed, in_background, kill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@dataclass
class LabelledStack(Stack):
    def config_file(self, replica: int) -> Path:
        return self.root / f"r{replica}.config"

    def replicas(self) -> list[dict[str, str]]:
        return [
            {**replica, "mode": "labels", "model_config_file": str(self.config_file(i))}
            for i, replica in enumerate(super().replicas(), start=1)
        ]

    def labels(self, replica: int) -> tuple[list[int], dict[str, int]]:
        """What its config file says: the versions served, the labels."""
        (entry,) = read_config(self.config_file(replica)).model_config_list.config
        return list(entry.model_version_policy.specific.versions), dict(entry.version_labels)

    def stable(self, servers: list[Server] | None = None) -> list[int]:
        versions = []
        for server in servers or self.servers:
            with ModelServer(f"127.0.0.1:{server.port}", MODEL) as client:
                versions.append(client.version_behind(STABLE, blessed(1, None).canary_images[0]))
        return versions


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> LabelledStack:
    root = tmp_path_factory.mktemp("labels")
    monitoring = root / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }\n")
    with ExitStack() as started:
        servers = []
        for replica in (1, 2):
            store = root / f"store-{replica}" / MODEL
            saved_models.write_version(store, 1, 1)
            config = root / f"r{replica}.config"
            config.write_text(
                config_text(model_entry(MODEL, store, "specific { versions: 1 }", {STABLE: 1}))
            )
            servers.append(
                Server(
                    store,
                    root / f"r{replica}.log",
                    extra=[
                        f"--model_config_file={config}",
                        f"--monitoring_config_file={monitoring}",
                        "--num_workers=1",
                    ],
                )
            )
            started.callback(servers[-1].stop)
        for server in servers:
            server.wait_ready(timeout=90)
            server.wait_for(lambda states: states.get(1, (0,))[0] == AVAILABLE, "version 1")
        loads = [started.enter_context(Load(server, label=STABLE)) for server in servers]
        yield LabelledStack(root, "", servers, loads)


def moved_once(answers: list[tuple[int, int]], old: int, new: int) -> bool:
    """Through ``stable`` the client saw the old version, then only the new one, each answering
    as itself."""
    versions = [version for version, _ in answers]
    return (
        all(version == answer for version, answer in answers)
        and versions == sorted(versions)
        and set(versions) == {old, new}
    )


def test_a_labels_rollout_moves_stable_only_once_the_canary_label_has_baked(stack):
    seen = [len(load.answers) for load in stack.loads]
    report = push.fn(stack.export(2), blessed(2, 1), stack.cfg())
    assert stack.stable() == [2, 2]
    assert [stack.labels(i) for i in (1, 2)] == [([1, 2], {STABLE: 2, CANARY: 2})] * 2
    assert [(r.name, r.stage, r.previous_version, r.outcome) for r in report.replicas] == [
        ("r1", 1, 1, "promoted"),
        ("r2", 2, 1, "promoted"),
    ]
    events = [(e.replica, e.event) for e in report.timeline]
    r1 = [event for replica, event in events if replica == "r1"]
    assert r1[1].endswith("canary Predict matches (through label canary)"), r1
    assert r1[2].startswith("baked"), r1
    assert r1[3] == "stable moved to version 2 (version 1 stays loaded)"
    # r2 changed only once r1's stable label had moved
    assert events.index(("r1", r1[3])) < events.index(("r2", "stage 2: version 2 published"))
    for load, before in zip(stack.loads, seen, strict=True):
        load.wait_for_answer((2, 2))
        assert not load.failures
        assert moved_once(load.answers[before:], 1, 2), load.answers[before:][-5:]


def test_a_canary_label_that_answers_wrong_is_rolled_back_with_the_config_file(stack):
    before = [stack.config_file(i).read_text() for i in (1, 2)]
    with pytest.raises(PushError) as failed:
        push.fn(stack.export(3), blessed(2, 2), stack.cfg())  # validate scored another model
    message = str(failed.value)
    assert re.search(
        r"failed at stage 1 of 2 \(r1\): replica r1: \S+ label canary answers the canary images",
        message,
    ), message
    assert message.endswith("rolled back: r1 stable on version 2 again, config file restored")
    assert [stack.config_file(i).read_text() for i in (1, 2)] == before
    assert stack.stable() == [2, 2]
    assert not (stack.store(1) / "3").exists()
    assert stack.servers[0].states().get(3, (None,))[0] != AVAILABLE  # unloaded again
    assert [r.outcome for r in failed.value.report.replicas] == ["rolled_back", "untouched"]
    assert not any(load.failures for load in stack.loads)


def test_a_finished_labels_rollout_is_undone_by_moving_the_labels_back(stack):
    """What the push task's on_rollback hook does when a later step of its transaction fails."""
    before = [stack.config_file(i).read_text() for i in (1, 2)]
    rollout = Rollout(stack.export(4), stack.cfg(stages=["all"], bake_s=0))
    rollout.run(blessed(4, 2))
    assert stack.stable() == [4, 4]
    assert rollout.roll_back("transaction rolled back") == (
        "r1 stable on version 2 again, config file restored; "
        "r2 stable on version 2 again, config file restored"
    )
    assert [stack.config_file(i).read_text() for i in (1, 2)] == before
    assert stack.stable() == [2, 2]
    assert not any((stack.store(i) / "4").exists() for i in (1, 2))
    assert not any(load.failures for load in stack.loads)


def test_the_rollback_command_s_label_move_loads_the_version_first_when_it_must(stack):
    """``move_stable``, which ``python -m flows.rollback`` runs on each labels replica."""
    replica = stack.cfg().replicas[0]
    seen = len(stack.loads[0].answers)
    move_stable(replica, MODEL, 1, timeout_s=30)  # loaded (the rollouts keep the old one)
    assert (stack.labels(1), stack.stable()) == (([1], {STABLE: 1, CANARY: 1}), [1, 2])
    # 2 is no longer loaded: a label cannot move onto it before it is (FAILED_PRECONDITION)
    move_stable(replica, MODEL, 2, timeout_s=30)
    assert (stack.labels(1), stack.stable()) == (([2], {STABLE: 2, CANARY: 2}), [2, 2])
    stack.loads[0].wait_for_answer((2, 2))
    assert not stack.loads[0].failures
    versions = [version for version, _ in stack.loads[0].answers[seen:]]
    assert [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v] == [2, 1, 2]


def test_a_rollout_cut_short_by_its_task_timeout_is_rolled_back_before_it_ends(stack):
    """Prefect's task timeout raises into the task (``prefect.utilities.timeout``, around every
    task run with ``timeout_seconds``); the rollout rolls back, then lets it through."""
    before = [stack.config_file(i).read_text() for i in (1, 2)]
    rollout = Rollout(stack.export(5), stack.cfg(bake_s=60, bake_deadline_s=60))
    with pytest.raises(TimeoutError), timeout(seconds=4):
        rollout.run(blessed(5, 2))
    assert rollout.timeline[-1].event == (
        "stage 1 interrupted: stable on version 2 again, config file restored"
    )
    assert [stack.config_file(i).read_text() for i in (1, 2)] == before
    assert stack.stable() == [2, 2]
    assert not (stack.store(1) / "5").exists()
    assert not any(load.failures for load in stack.loads)


def test_a_replica_killed_in_a_later_stage_rolls_back_the_labels_of_the_earlier(stack):
    before = [stack.config_file(i).read_text() for i in (1, 2)]
    rollout = Rollout(stack.export(6), stack.cfg(bake_s=2))
    thread, failures = in_background(rollout, 6, 2)
    stack.servers[0].wait_for(
        lambda _: any(e.event.startswith("stable moved") for e in rollout.timeline),
        "r1's stable label on version 6",
    )
    stack.loads[1].__exit__()
    kill(stack.servers[1])
    thread.join(timeout=90)
    message = str(failures[0])
    assert "failed at stage 2 of 2 (r2): " in message, message
    assert re.search(
        r"rolled back: r1 stable on version 2 again, config file restored; "
        r"r2 withdrawn, not verified: (gRPC UNAVAILABLE|replica r2 \(\S+\) stopped answering)",
        message,
    ), message
    assert [stack.config_file(i).read_text() for i in (1, 2)] == before  # r2 restarts on it
    assert stack.stable(stack.servers[:1]) == [2]
    assert not any((stack.store(i) / "6").exists() for i in (1, 2))
    assert [r.outcome for r in failures[0].report.replicas] == ["rolled_back", "unverified"]
    assert not stack.loads[0].failures
