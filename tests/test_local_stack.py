"""The local stack of ``make run`` (``flows/local_stack.py``), up for real in a directory of its
own on free ports (``LOCAL_STACK_*``): its supervisor restarts a service killed with SIGKILL and
one that hangs (SIGSTOP), ``up`` again creates nothing twice (the automation for silent
runs among what it creates), ``status`` restarts one when the supervisor is dead too, and every
socket its processes listen on is a loopback one. One ``up`` for the module: ~100 s on 2 busy
cores (the Prefect server, the deployments' import of TensorFlow).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from flows.local_stack import CRASH_SILENT_RUNS, START_TIMEOUT_S
from tasks.config import REPO_ROOT
from tasks.processes import free_port
from tests.prefect_stack import prefect_client

pytestmark = pytest.mark.slow

RESTART_BOUND_S = 180.0  # until it answers again: 11-25 s measured; 65 s at a load of 14
UNANSWERED_S = 10  # the test stack's: a service silent this long after answering hangs


def free_port_pair() -> int:
    """A free port whose next one is free too (a model server's gRPC and REST ports)."""
    while True:
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class LocalStack:
    root: Path
    env: dict[str, str]
    ports: dict[str, int]

    def cli(self, *args: str, timeout_s: float = 2 * START_TIMEOUT_S) -> str:
        """``python -m flows.local_stack *args`` on this stack; its output, once it exited 0."""
        result = subprocess.run(
            [sys.executable, "-m", "flows.local_stack", *args],
            cwd=REPO_ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stderr}"
        return result.stdout

    def pid(self, service: str) -> int:
        return int((self.root / "run" / f"{service}.pid").read_text())

    def status_line(self, status: str, service: str) -> str:
        """The table's line of ``service`` (the last: what was restarted is said above it)."""
        return [line for line in status.splitlines() if line.split()[0] == service][-1]

    def url(self, service: str) -> str:
        return {
            "mlflow": f"http://127.0.0.1:{self.ports['mlflow']}/health",
            "model-server": f"http://127.0.0.1:{self.ports['rest']}/v1/models/mnist",
        }[service]

    def wait_restarted(
        self, service: str, dead_pid: int, bound_s: float = RESTART_BOUND_S
    ) -> float:
        """Seconds until ``service`` has a new pid and answers; fails past ``bound_s``."""
        started = time.monotonic()
        while time.monotonic() - started < bound_s:
            if self.pid(service) != dead_pid and answers(self.url(service)):
                return time.monotonic() - started
            time.sleep(0.2)
        log = (self.root / "logs" / "supervisor.log").read_text()
        pytest.fail(f"{service} not answering again within {bound_s} s:\n{log}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("stack")
    ports = {"prefect": free_port(), "mlflow": free_port(), "grpc": free_port_pair()}
    ports["rest"] = ports["grpc"] + 1
    env = {
        "LOCAL_STACK_DIR": str(root),
        "LOCAL_STACK_PREFECT_PORT": str(ports["prefect"]),
        "LOCAL_STACK_MLFLOW_PORT": str(ports["mlflow"]),
        "LOCAL_STACK_SERVING_PORT": str(ports["grpc"]),
        "LOCAL_STACK_UNANSWERED_S": str(UNANSWERED_S),
        "PREFECT_SERVER_UI_ENABLED": "false",  # nothing to build or serve: starts faster
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    local = LocalStack(root, env, ports)
    try:
        local.cli("up", timeout_s=600)
        yield local
    finally:
        subprocess.run(
            [sys.executable, "-m", "flows.local_stack", "down"],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            timeout=120,
        )


def test_up_creates_the_automation_for_silent_runs_once(stack: LocalStack) -> None:
    stack.cli("up")  # a second ``make run``: nothing is created twice
    with prefect_client(f"http://127.0.0.1:{stack.ports['prefect']}/api") as client:
        found = client.read_automations_by_name(CRASH_SILENT_RUNS)
    assert len(found) == 1, found
    (automation,) = found
    assert automation.enabled and automation.trigger.posture == "Proactive"
    assert automation.actions[0].state == "CRASHED"


def test_supervisor_restarts_a_killed_model_server(stack: LocalStack) -> None:
    dead = stack.pid("model-server")
    os.kill(dead, signal.SIGKILL)  # the leader only: its workers hold the ports until killed

    seconds = stack.wait_restarted("model-server", dead)

    line = stack.status_line(stack.cli("status"), "model-server")
    assert f"running (pid {stack.pid('model-server')})" in line, line
    assert "answering" in line and "restarts 1" in line, line
    log = (stack.root / "logs" / "supervisor.log").read_text()
    assert f"model-server (pid {dead}) had died: restarted" in log, log
    print(f"model server answering again {seconds:.1f} s after SIGKILL")


def test_supervisor_restarts_a_hung_service(stack: LocalStack) -> None:
    hung = stack.pid("mlflow")
    os.killpg(hung, signal.SIGSTOP)  # alive, and answers nothing

    seconds = stack.wait_restarted("mlflow", hung, UNANSWERED_S + RESTART_BOUND_S)

    assert seconds > UNANSWERED_S
    log = (stack.root / "logs" / "supervisor.log").read_text()
    assert f"mlflow (pid {hung}) has not answered" in log, log
    assert f"mlflow (pid {hung}) had died: restarted" in log, log
    print(f"MLflow answering again {seconds:.1f} s after SIGSTOP")


def test_status_restarts_a_dead_service_when_the_supervisor_is_dead(stack: LocalStack) -> None:
    supervisor, mlflow = stack.pid("supervisor"), stack.pid("mlflow")
    os.kill(supervisor, signal.SIGKILL)
    os.kill(mlflow, signal.SIGKILL)
    while psutil.pid_exists(mlflow) and psutil.Process(mlflow).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.1)

    status = stack.cli("status")

    assert f"mlflow died (pid {mlflow}) and no supervisor runs" in status, status
    assert stack.pid("mlflow") != mlflow and answers(stack.url("mlflow"))
    line = stack.status_line(status, "mlflow")
    assert f"running (pid {stack.pid('mlflow')})" in line and "restarts 2" in line, line
    line = stack.status_line(status, "supervisor")
    assert stack.pid("supervisor") != supervisor and "running" in line, line


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def test_every_listening_socket_is_loopback(stack: LocalStack) -> None:
    """The sockets of every process of the stack (each service's group, the restarted ones'
    included: the tests above ran first)."""
    listening: set[tuple[str, int, str]] = set()
    for pid_file in (stack.root / "run").glob("*.pid"):
        leader = psutil.Process(int(pid_file.read_text()))
        for process in [leader, *leader.children(recursive=True)]:
            try:
                connections = process.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            for c in connections:
                if c.status == psutil.CONN_LISTEN:
                    listening.add((c.laddr.ip, c.laddr.port, pid_file.stem))

    wider = sorted(entry for entry in listening if not loopback(entry[0]))
    assert not wider, f"listening beyond loopback: {wider}"
    ports = {port for _, port, _ in listening}
    assert set(stack.ports.values()) <= ports, f"{stack.ports} not all among {sorted(listening)}"
