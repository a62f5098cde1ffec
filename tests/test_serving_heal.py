"""A self-healing server: a worker process that dies is replaced while the other keeps serving.

Real processes throughout: ``python -m serving --num_workers 2`` under gRPC and REST load from a
client thread pool, a worker SIGKILLed (found as a child process of the server), a version
published while its replacement starts. What must hold: the server keeps answering, only the
requests in flight on the killed worker fail, GetModelStatus says AVAILABLE throughout, the
replacement (a new pid) serves every version before it takes connections, a crash loop backs
off (logged), and after SIGTERM nothing is restarted.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests import saved_models
from tests.processes import TEST_WORKERS, connections_per_worker, worker_pids
from tests.servers import AVAILABLE, END, MixedLoad, Server, predict_on_fresh_connection

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a start takes minutes on a busy machine

CONNECTIONS = 24  # fresh connections all on one worker by chance: 2 * 2^-24


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {c: saved_models.make_template(root / f"c{c}", c) for c in (3, 5)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, templates):
    """One server for the module's tests (each leaves it with two workers serving): a start
    takes most of a minute on a busy 2-core machine."""
    directory = tmp_path_factory.mktemp("heal")
    base = directory / "mnist"
    saved_models.copy_version(templates[3], base, 1)
    server = Server(base, directory / "server.log")  # TEST_WORKERS workers
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()


def wait_until(condition, what: str, server: Server, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}\n{server.log()[-4000:]}")
        time.sleep(0.05)


def summary(failures: list[tuple], since: float) -> dict[tuple[str, str], tuple[int, float, float]]:
    """Failures by (API, error): how many, the first and the last (seconds after ``since``)."""
    by_kind: dict[tuple[str, str], list[float]] = {}
    for at, kind, error, *_ in failures:
        by_kind.setdefault((kind, error), []).append(at - since)
    return {k: (len(t), round(min(t), 2), round(max(t), 2)) for k, t in by_kind.items()}


def replaced(server: Server, times: int) -> bool:
    return server.log().count("replaced by pid") >= times


def test_a_crash_loop_backs_off_while_the_other_worker_serves(server):
    survivor, first = worker_pids(server.proc.pid)
    served = predict_on_fresh_connection(server.port)
    replacements = server.log().count("replaced by pid")
    killed = [first]
    os.kill(first, signal.SIGKILL)
    for restart in (1, 2):  # kill each replacement as soon as it exists: a crash loop
        wait_until(
            lambda: set(worker_pids(server.proc.pid)) - {survivor, *killed},
            f"replacement {restart}",
            server,
        )
        (replacement,) = set(worker_pids(server.proc.pid)) - {survivor, *killed}
        assert predict_on_fresh_connection(server.port) == served  # by the survivor
        os.kill(replacement, signal.SIGKILL)
        killed.append(replacement)
    wait_until(lambda: replaced(server, replacements + 1), "the third replacement serving", server)
    log = server.log()
    restarts = re.findall(r"worker (\d+) .* exited unexpectedly .* in a row in (\d+) s", log)
    assert [int(delay) for _, delay in restarts] == [0, 1, 2], log
    assert len({slot for slot, _ in restarts}) == 1  # one slot, restarted thrice
    now = worker_pids(server.proc.pid)
    assert len(now) == TEST_WORKERS and survivor in now and not set(killed) & set(now)
    answers = {predict_on_fresh_connection(server.port) for _ in range(CONNECTIONS)}
    assert answers == {served}


def test_a_killed_worker_is_replaced_and_serves_every_version(server, templates):
    """Last: it stops the server, to see that nothing is restarted after SIGTERM."""
    workers = worker_pids(server.proc.pid)
    assert len(workers) == TEST_WORKERS
    victim = min(workers)  # the oldest: its slot restarts at once (RestartBackoff)
    replacements = server.log().count("replaced by pid")
    with MixedLoad(f"127.0.0.1:{server.port}", server.rest_port, status=server.status) as load:
        wait_until(lambda: load.answered_since(0) > 50, "answers under load", server)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # Published while the replacement imports TensorFlow: the survivor loads it alone, the
        # replacement must catch up with it (and with version 1 going away).
        saved_models.copy_version(templates[5], server.base_path, 2)
        server.wait_for(lambda s: s.get(1, (0,))[0] == END, "version 1 unloaded")
        wait_until(lambda: replaced(server, replacements + 1), "the replacement", server)
        replaced_at = time.monotonic()
        time.sleep(1.0)
    log = server.log()
    assert "exited unexpectedly (killed by SIGKILL)" in log
    # Only requests in flight on the killed worker failed, when it died (the kernel resets its
    # connections, and those still queued on its listening sockets while it exits: a client may
    # lose two); every other request was answered, before, during and after the replacement.
    failures = load.failures()
    assert len(failures) <= 2 * MixedLoad.CLIENTS, summary(failures, killed_at)
    died = [failure[0] for failure in failures]
    assert not died or (min(died) >= killed_at and max(died) - min(died) < 1.0), summary(
        failures, killed_at
    )
    assert load.answered_since(killed_at) > 50
    # GetModelStatus answered AVAILABLE for a serving version at every poll.
    answered = [states for _, states in load.statuses if isinstance(states, dict)]
    assert len(answered) >= len(load.statuses) - 2, load.statuses
    assert all(AVAILABLE in states.values() for states in answered), answered
    # Two worker processes again, one of them new, and both serve version 2 only.
    now = worker_pids(server.proc.pid)
    assert len(now) == TEST_WORKERS and victim not in now and set(workers) - {victim} <= set(now)
    answers = [predict_on_fresh_connection(server.port) for _ in range(CONNECTIONS)]
    assert answers == [(2, 5)] * CONNECTIONS
    assert min(connections_per_worker(f"127.0.0.1:{server.port}", now, CONNECTIONS)) > 0
    # Each worker loaded version 2 once: the replacement too, although published before it started.
    assert log.count("model mnist version 2: loaded from") == TEST_WORKERS
    assert replaced_at - killed_at < 90
    assert server.stop() == 0
    after_stop = server.log().split("shutting down", 1)[1]
    assert "exited unexpectedly" not in after_stop and "replaced by pid" not in after_stop
