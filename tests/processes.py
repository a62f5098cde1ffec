"""Real services for tests: our model server and an MLflow server as subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tasks.config import REPO_ROOT
from tasks.processes import free_port

BIN = Path(sys.executable).parent
# Servers under test run this many worker processes whatever the machine's core count (the
# default): the multi-process paths are always exercised and memory stays bounded (each worker
# holds every model). A later --num_workers in extra flags overrides it.
TEST_WORKERS = 2
# Servers under test give up a failed load at once: TF Serving's 5 retries a minute apart would
# hold every test of a broken version for 5 minutes (test_flags_serving covers the retries).
TEST_LOAD_RETRIES = 0


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    """Until ``url`` answers at all (an HTTP error status counts: the server is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[:3]} exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.3)


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs, recursively (Linux /proc)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                pending += children
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def descendants_running(pid: int, marker: bytes) -> list[int]:
    """The descendants of ``pid`` whose command line contains ``marker``."""
    pids = []
    for child in descendants(pid):
        try:
            if marker in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(child)
        except FileNotFoundError:
            continue
    return pids


def worker_pids(server_pid: int) -> list[int]:
    """The worker processes of a ``python -m serving`` (multiprocessing's resource tracker is
    a child too, but serves nothing)."""
    return descendants_running(server_pid, b"multiprocessing.spawn")


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and of all its descendants, KiB (the whole server: its workers too)."""
    total = 0
    for current in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total


@contextmanager
def running(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class ModelServerProcess:
    process: subprocess.Popen
    grpc_address: str
    rest_url: str
    log: Path


def serving_command(
    grpc_port: int,
    rest_port: int,
    model_name: str,
    model_base_path: Path,
    poll_s: float = 0.2,
    extra_flags: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """The command line of a ``python -m serving`` under test (``TEST_WORKERS`` workers,
    ``TEST_LOAD_RETRIES``)."""
    return [
        sys.executable,
        "-m",
        "serving",
        f"--port={grpc_port}",
        f"--rest_api_port={rest_port}",
        f"--model_name={model_name}",
        f"--model_base_path={model_base_path}",
        f"--file_system_poll_wait_seconds={poll_s:g}",
        f"--num_workers={TEST_WORKERS}",
        f"--max_num_load_retries={TEST_LOAD_RETRIES}",
        *extra_flags,
    ]


@contextmanager
def model_server(
    model_base_path: Path,
    model_name: str,
    log: Path,
    poll_s: float = 0.2,
    extra_flags: tuple[str, ...] = (),
) -> Iterator[ModelServerProcess]:
    """``python -m serving`` on free ports, once its REST port answers (tests and benchmarks)."""
    grpc_port, rest_port = free_port(), free_port()
    command = serving_command(
        grpc_port, rest_port, model_name, model_base_path, poll_s, extra_flags
    )
    with running(command, log) as process:
        rest_url = f"http://127.0.0.1:{rest_port}"
        wait_for_http(f"{rest_url}/v1/models/{model_name}", process, log)
        yield ModelServerProcess(process, f"127.0.0.1:{grpc_port}", rest_url, log)


@contextmanager
def mlflow_server(directory: Path) -> Iterator[str]:
    """``mlflow server`` on a SQLite backend with a local artifact store; yields its tracking
    URI."""
    port = free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{directory / 'mlflow.db'}",
        "--artifacts-destination",
        str(directory / "artifacts"),
    ]
    log = directory / "mlflow-server.log"
    with running(command, log) as process:
        uri = f"http://127.0.0.1:{port}"
        wait_for_http(f"{uri}/health", process, log)
        yield uri
