"""Real services for tests: our model server and an MLflow server as subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
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


def established_connections(pid: int, port: int) -> int:
    """TCP connections on local ``port`` whose socket ``pid`` holds (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):  # gRPC listens on a v4-mapped IPv6 socket
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:  # ESTABLISHED
                count += 1
    return count


def connections_per_worker(address: str, workers: list[int], count: int) -> list[int]:
    """Open ``count`` new gRPC connections to ``address`` (host:port) at once; how many of them
    each worker process holds (the kernel spreads new connections over the workers' listening
    sockets)."""
    import grpc

    port = int(address.rsplit(":", 1)[1])
    channels = [
        grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        return [established_connections(pid, port) for pid in workers]
    finally:
        for channel in channels:
            channel.close()


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
    start_timeout_s: float = 120.0,
) -> Iterator[ModelServerProcess]:
    """``python -m serving`` on free ports, once its REST port answers (tests and benchmarks)."""
    grpc_port, rest_port = free_port(), free_port()
    command = serving_command(
        grpc_port, rest_port, model_name, model_base_path, poll_s, extra_flags
    )
    with running(command, log) as process:
        rest_url = f"http://127.0.0.1:{rest_port}"
        wait_for_http(f"{rest_url}/v1/models/{model_name}", process, log, start_timeout_s)
        yield ModelServerProcess(process, f"127.0.0.1:{grpc_port}", rest_url, log)


@contextmanager
def mlflow_server(
    directory: Path, backend_store_uri: str | None = None, artifacts_destination: str | None = None
) -> Iterator[str]:
    """``mlflow server``, by default on a SQLite backend with a local artifact store; yields its
    tracking URI."""
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
        backend_store_uri or f"sqlite:///{directory / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts_destination or str(directory / "artifacts"),
    ]
    log = directory / "mlflow-server.log"
    with running(command, log) as process:
        uri = f"http://127.0.0.1:{port}"
        wait_for_http(f"{uri}/health", process, log)
        yield uri


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]  # the AWS variables that point boto3 (and our server) at it


@contextmanager
def s3_server(directory: Path) -> Iterator[S3Server]:
    """moto's S3 API (``moto_server``) on a free loopback port, with dummy credentials; the
    variables are also set in this process for as long as it runs."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,  # MLflow's own name, for its artifact store
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    log = directory / "moto-server.log"
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    saved = {key: os.environ.get(key) for key in env}
    with running(command, log) as process:
        wait_for_http(f"{endpoint}/moto-api/", process, log, timeout_s=60)
        os.environ.update(env)
        try:
            yield S3Server(endpoint, env)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def postgres_binaries() -> Path:
    """The directory of Debian's PostgreSQL server programs (package ``postgresql``)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return found[-1].parent


@contextmanager
def postgres_server(directory: Path) -> Iterator[str]:
    """A PostgreSQL cluster on a free loopback port, with a database ``mlflow``; yields its
    SQLAlchemy URI; its log is ``directory/postgres.log``. PostgreSQL refuses to run as root: as
    root, it runs as the ``postgres`` user the Debian package creates, in a directory of its own
    (the test's directories are root's alone)."""
    binaries, port, log = postgres_binaries(), free_port(), directory / "postgres.log"
    cluster = Path(tempfile.mkdtemp(prefix="postgres-"))
    data, as_owner = cluster / "data", []
    if os.geteuid() == 0:
        as_owner = ["runuser", "-u", "postgres", "--"]
        shutil.chown(cluster, "postgres")
    try:
        yield from _postgres(binaries, port, cluster, data, log, as_owner)
    finally:
        shutil.rmtree(cluster, ignore_errors=True)


def _postgres(
    binaries: Path, port: int, cluster: Path, data: Path, log: Path, as_owner: list[str]
) -> Iterator[str]:
    initdb = subprocess.run(
        [*as_owner, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow"],
        capture_output=True,
        text=True,
    )
    if initdb.returncode:
        raise RuntimeError(f"initdb failed:\n{initdb.stdout}{initdb.stderr}")
    command = [
        *as_owner,
        str(binaries / "postgres"),
        "-D",
        str(data),
        "-p",
        str(port),
        "-k",
        str(cluster),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "fsync=off",
    ]
    with running(command, log) as process:
        deadline = time.monotonic() + 60
        while subprocess.run(
            [str(binaries / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
            capture_output=True,
        ).returncode:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        subprocess.run(
            [str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port)]
            + ["-U", "mlflow", "mlflow"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
