"""Several worker processes behind one server (``--num_workers``): every worker serves, a version
is AVAILABLE only once every worker routes it, swaps and reloads fail no request whichever worker
answers, metrics are the whole server's, and workers do not outlive their supervisor (a lost
worker is replaced: tests/test_serving_heal.py).

Each test opens many TCP connections (a fresh gRPC channel or HTTP connection each): the kernel
spreads new connections over the workers' shared listening sockets, so a behaviour that holds
for every one of them holds for every worker.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from serving.worker import LOAD_NICENESS  # noqa: E402
from tests import saved_models  # noqa: E402
from tests.processes import connections_per_worker, free_port, worker_pids  # noqa: E402
from tests.prometheus import parse_exposition, value  # noqa: E402
from tests.servers import (  # noqa: E402  # noqa: E402
    AVAILABLE,  # noqa: E402
    END,
    PYTHON,
    REPO,
    Load,
    Server,
    config_text,
    model_entry,
    predict_on_fresh_connection,
    reload,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WORKERS = 2
CONNECTIONS = 24  # all on one worker by chance: 2 * 2^-24


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {c: saved_models.make_template(root / f"c{c}", c) for c in (3, 5)}


def thread_niceness(pid: int) -> dict[int, int]:
    """Each thread of a process -> its nice value (/proc/<pid>/task/<tid>/stat, field 19)."""
    niceness = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        niceness[int(task.name)] = int(fields[16])
    return niceness


@pytest.fixture
def server(tmp_path, templates):
    base = tmp_path / "mnist"
    saved_models.copy_version(templates[3], base, 1)
    config = tmp_path / "monitoring.config"
    config.write_text('prometheus_config { enable: true path: "/metrics" }\n')
    with Server(
        base,
        tmp_path / "server.log",
        extra=[f"--num_workers={WORKERS}", f"--monitoring_config_file={config}"],
    ) as server:
        yield server


def test_every_worker_serves_the_shared_ports(server):
    workers = worker_pids(server.proc.pid)
    assert len(workers) == WORKERS, server.log()
    per_worker = connections_per_worker(f"127.0.0.1:{server.port}", workers, CONNECTIONS)
    assert sum(per_worker) >= CONNECTIONS  # and the fixture's own channel
    assert min(per_worker) > 0, per_worker


def test_swap_is_available_only_when_every_worker_serves_it(server, templates):
    with Load(server) as load:
        load.wait_for_answer((1, 3))
        saved_models.copy_version(templates[5], server.base_path, 2)
        server.wait_for(lambda s: s.get(2, (0,))[0] == AVAILABLE, "version 2 AVAILABLE")
        # AVAILABLE in the status: every worker routes it, on whichever connection.
        answers = [predict_on_fresh_connection(server.port, version=2) for _ in range(CONNECTIONS)]
        assert answers == [(2, 5)] * CONNECTIONS
        server.wait_for(lambda s: s.get(1, (0,))[0] == END, "version 1 unloaded")
        time.sleep(0.3)
    assert load.failures == []
    assert {v for v, _ in load.answers} == {1, 2}
    latest = {predict_on_fresh_connection(server.port) for _ in range(CONNECTIONS)}
    assert latest == {(2, 5)}
    # Each worker loaded and unloaded its own copy; the supervisor logged each step once.
    log = server.log()
    assert log.count("model mnist version 2: loaded from") == WORKERS
    assert log.count("model mnist version 1: unloaded") == WORKERS
    assert log.count("model mnist version 2: AVAILABLE") == 1
    # Loads ran at a lower CPU priority than the threads that serve.
    for pid in worker_pids(server.proc.pid):
        niceness = thread_niceness(pid)
        assert niceness[pid] == 0
        assert LOAD_NICENESS in niceness.values(), niceness


def test_reload_through_any_worker_reaches_all(server, tmp_path, templates):
    other = tmp_path / "other"
    saved_models.copy_version(templates[5], other, 7)
    reload(server, config_text(model_entry("mnist", server.base_path), model_entry("other", other)))
    answers = {predict_on_fresh_connection(server.port, "other") for _ in range(CONNECTIONS)}
    assert answers == {(7, 5)}
    reload(server, config_text(model_entry("mnist", server.base_path)))
    answers = {predict_on_fresh_connection(server.port, "other") for _ in range(CONNECTIONS)}
    assert answers == {grpc.StatusCode.NOT_FOUND}


def test_metrics_page_sums_all_workers(server):
    answers = [predict_on_fresh_connection(server.port) for _ in range(CONNECTIONS)]
    assert answers == [(1, 3)] * CONNECTIONS
    # Scraped several times, on fresh connections: any worker gives the whole server's page.
    for _ in range(4):
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.rest_port}/metrics", timeout=10
        ) as response:
            page = response.read().decode()
        samples = parse_exposition(page)
        assert (
            value(samples, ":tensorflow:serving:request_count", model_name="mnist", status="OK")
            == CONNECTIONS
        )
        path = str(server.base_path / "1")
        assert (
            value(
                samples,
                ":tensorflow:cc:saved_model:load_attempt_count",
                model_path=path,
                status="success",
            )
            == WORKERS
        )


def test_workers_exit_when_the_supervisor_is_killed(server):
    workers = worker_pids(server.proc.pid)
    server.proc.kill()
    server.proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; init reaps it


def test_port_taken_by_another_program_exits_nonzero(tmp_path, templates):
    base = tmp_path / "mnist"
    saved_models.copy_version(templates[3], base, 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                PYTHON,
                "-m",
                "serving",
                f"--port={port}",
                "--model_name=mnist",
                f"--model_base_path={base}",
                f"--rest_api_port={free_port()}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot bind gRPC server to 127.0.0.1:{port}" in result.stderr


def test_a_signal_during_startup_stops_the_server_at_once(tmp_path, templates):
    base = tmp_path / "mnist"
    saved_models.copy_version(templates[3], base, 1)
    server = Server(base, tmp_path / "server.log", extra=[f"--num_workers={WORKERS}"])
    deadline = time.monotonic() + 30
    while len(worker_pids(server.proc.pid)) < WORKERS and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = worker_pids(server.proc.pid)
    assert len(workers) == WORKERS  # started, still importing TensorFlow: not serving yet
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 15  # not the 20 s kill of Server.stop
    log = server.log()
    assert "stopped during startup" in log and "server ready" not in log
    assert not any(_alive(pid) for pid in workers)
