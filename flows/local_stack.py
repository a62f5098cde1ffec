"""The local stack ``make run`` works against: Prefect server and worker, MLflow server, model
servers.

    python -m flows.local_stack up | down | status | params [--replicas N]

``up`` starts, in the background, whichever service is not running yet and waits until each
answers, creates the work pool and the concurrency limit the deployments share if missing, and
registers the deployments; ``down`` stops them by pid and keeps their data. ``--replicas N``
(default 1) runs N model servers, each with its own store and its Prometheus page
(``--monitoring_config_file``); ``params`` prints the deployment parameters that point a run at
them (``push.replicas``). Everything (databases, logs, pid files, exports, the serving model
stores, the data store) lives under ``.stack/``. Deliberately free of TensorFlow so it starts in a
second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import CONCURRENCY_LIMIT, REPO_ROOT, load_config

STACK = REPO_ROOT / ".stack"
BIN = Path(sys.executable).parent
WORK_POOL = "train-and-serve"
PREFECT_API = "http://127.0.0.1:4200/api"
PREFECT_ENV = {
    "PREFECT_HOME": str(STACK / "prefect"),
    "PREFECT_API_URL": PREFECT_API,
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    "PREFECT_SERVER_API_PORT": "4200",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    ready_url: str | None  # answers (any HTTP status) once the service is up
    url: str  # what a person opens
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid_file(self) -> Path:
        return STACK / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return STACK / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of our running process, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            self.pid_file.unlink(missing_ok=True)
            return None


MONITORING_CONFIG = STACK / "monitoring.config"
METRICS_PATH = "/monitoring/prometheus/metrics"


def local_replica(i: int) -> dict[str, str]:
    """Local replica ``i`` (0-based) as a ``push.replicas`` entry: the first is the default
    config's (gRPC 8500, REST 8501, push.model_base_path); each next one ten ports higher, with
    a store of its own, so that a rollout changes the replicas one stage at a time."""
    store = load_config().push.model_base_path if i == 0 else STACK / f"models-{i + 1}"
    return {
        "name": "local" if i == 0 else f"local-{i + 1}",
        "grpc": f"127.0.0.1:{8500 + 10 * i}",
        "model_base_path": str(store),
        "metrics_url": f"http://127.0.0.1:{8501 + 10 * i}{METRICS_PATH}",
    }


def run_parameters(replicas: int) -> dict[str, list[str]]:
    """The deployment parameters of a run against ``replicas`` local replicas (none for one:
    the default config's)."""
    if replicas == 1:
        return {}
    entries = [local_replica(i) for i in range(replicas)]
    return {"overrides": [f"push.replicas={json.dumps(entries)}"]}


def model_server(i: int, model_name: str) -> Service:
    replica = local_replica(i)
    rest = f"http://127.0.0.1:{8501 + 10 * i}/v1/models/{model_name}"
    command = [
        sys.executable,
        "-m",
        "serving",
        f"--port={8500 + 10 * i}",
        f"--rest_api_port={8501 + 10 * i}",
        f"--model_name={model_name}",
        f"--model_base_path={Path(replica['model_base_path']) / model_name}",
        f"--monitoring_config_file={MONITORING_CONFIG}",
    ]
    return Service("model-server" if i == 0 else f"model-server-{i + 1}", command, rest, rest)


def started_replicas() -> int:
    """How many local model servers have a pid file (``down`` and ``status`` cover them all)."""
    return max(1, len(list((STACK / "run").glob("model-server*.pid"))))


def services(replicas: int = 1) -> list[Service]:
    cfg = load_config()
    model_name = cfg.export.model_name
    mlflow_dir = STACK / "mlflow"
    return [
        Service(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start"],
            f"{PREFECT_API}/health",
            "http://127.0.0.1:4200",
            PREFECT_ENV,
        ),
        Service(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                "5000",
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                "--artifacts-destination",
                str(mlflow_dir / "artifacts"),
            ],
            "http://127.0.0.1:5000/health",
            "http://127.0.0.1:5000",
        ),
        *(model_server(i, model_name) for i in range(replicas)),
        Service(
            "prefect-worker",
            [str(BIN / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            None,
            f"{WORK_POOL} work pool",
            # A flow run that crashes in native code (TensorFlow) logs its Python stacks.
            {**PREFECT_ENV, "PYTHONFAULTHANDLER": "1"},
        ),
    ]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # it answered, with an error status (e.g. 404: no model yet)
    except OSError:
        return False


def start(service: Service, timeout_s: float = 120.0) -> None:
    for directory in (service.pid_file.parent, service.log_file.parent, STACK / "mlflow"):
        directory.mkdir(parents=True, exist_ok=True)
    with service.log_file.open("ab") as log:
        process = subprocess.Popen(
            service.command,
            cwd=REPO_ROOT,
            env={**os.environ, **service.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # its own group: `down` stops its children too
    service.pid_file.write_text(str(process.pid))
    print(
        f"  started {service.name} (pid {process.pid}), "
        f"log {service.log_file.relative_to(REPO_ROOT)}",
        flush=True,
    )
    if service.ready_url is None:
        return
    deadline = time.monotonic() + timeout_s
    while not _answers(service.ready_url):
        if process.poll() is not None:
            sys.exit(f"{service.name} exited with {process.returncode}; see {service.log_file}")
        if time.monotonic() > deadline:
            sys.exit(
                f"{service.name} did not answer at {service.ready_url} within {timeout_s:.0f} s; "
                f"see {service.log_file}"
            )
        time.sleep(0.5)


def stop(service: Service, grace_s: float = 15.0) -> None:
    pid = service.pid()
    if pid is None:
        return
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while service.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    if service.pid() is not None:
        os.killpg(pid, signal.SIGKILL)
    service.pid_file.unlink(missing_ok=True)
    print(f"  stopped {service.name} (pid {pid})")


def prefect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "prefect"), *args],
        cwd=REPO_ROOT,
        env={**os.environ, **PREFECT_ENV},
        capture_output=True,
        text=True,
    )


def ensure(what: str, inspect: list[str], create: list[str]) -> None:
    """Create a Prefect object (work pool, concurrency limit) unless it exists."""
    if prefect(*inspect).returncode != 0:
        created = prefect(*create)
        if created.returncode != 0:
            sys.exit(f"could not create {what}: {created.stdout}{created.stderr}")


def up(replicas: int) -> None:
    MONITORING_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    MONITORING_CONFIG.write_text(f'prometheus_config {{ enable: true path: "{METRICS_PATH}" }}\n')
    pending = [service for service in services(replicas) if service.pid() is None]
    for service in pending:
        if service.name == "prefect-worker":
            ensure(
                f"work pool {WORK_POOL}",
                ["work-pool", "inspect", WORK_POOL],
                ["work-pool", "create", WORK_POOL, "--type", "process"],
            )
        start(service)
    # The deployments share it: one run at a time trains and pushes, the others wait their turn.
    ensure(
        f"concurrency limit {CONCURRENCY_LIMIT}",
        ["gcl", "inspect", CONCURRENCY_LIMIT],
        ["gcl", "create", CONCURRENCY_LIMIT, "--limit", "1"],
    )
    deployed = prefect("--no-prompt", "deploy", "--all")
    if deployed.returncode != 0:
        sys.exit(f"prefect deploy failed:\n{deployed.stdout}{deployed.stderr}")
    status(replicas)


def down(replicas: int) -> None:
    for service in reversed(services(max(replicas, started_replicas()))):
        stop(service)


def status(replicas: int) -> None:
    for service in services(max(replicas, started_replicas())):
        pid = service.pid()
        state = f"running (pid {pid})" if pid else "stopped"
        print(f"  {service.name:15s} {state:22s} {service.url}")


def params(replicas: int) -> None:
    print(json.dumps(run_parameters(replicas)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.local_stack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=["up", "down", "status", "params"])
    parser.add_argument("--replicas", type=int, default=1, help="local model servers (default 1)")
    args = parser.parse_args(argv)
    {"up": up, "down": down, "status": status, "params": params}[args.action](args.replicas)


if __name__ == "__main__":
    main()
