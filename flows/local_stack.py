"""The local stack ``make run`` works against: Prefect server and worker, MLflow server, model
servers, and a supervisor that restarts whichever of them dies.

    python -m flows.local_stack up | down | status | params | supervise [--replicas N]

``up`` starts, in the background, whichever service is not running yet and waits until each
answers, creates the work pool and the concurrency limit the deployments share if missing,
registers the deployments, and starts the supervisor; ``down`` stops the supervisor, then the
services, by pid, and keeps their data. ``--replicas N`` (default 1) runs N model servers, each
with its own store and its Prometheus page (``--monitoring_config_file``); ``params`` prints the
deployment parameters that point a run at them (``push.replicas``). Everything (databases, logs,
pid files, exports, the serving model stores, the data store) lives under ``.stack/``. Every
service listens on 127.0.0.1 only. Deliberately free of TensorFlow so it starts in a second.

Self-healing. The supervisor (``supervise``, started by ``up``; ``.stack/run/supervisor.pid``)
checks every ``CHECK_S`` s each service that has a pid file, i.e. that ``up`` started and
``down`` has not stopped: one whose process has gone is started again, after its old process
group is killed (a dead leader's children still hold its ports), with a back-off that doubles
with each restart (``BACKOFF_S`` up to ``MAX_BACKOFF_S``) and starts over once the service has
run ``STABLE_S`` s. One that answered its health URL and then has not for ``UNANSWERED_S`` s
(hung) is killed, and so restarted; one that has not answered since it started is only reported
(a slow start, Prefect's server takes ~20 s, looks the same). ``.stack/logs/supervisor.log``
says what it did and why. ``status`` shows each service's pid, whether it is alive and answers,
and its restarts; with the supervisor gone, it restarts the dead services itself, then the
supervisor. ``down`` stops the supervisor first, so that nothing it stops comes back.

Why a supervisor of our own rather than systemd units (or launchd, supervisord): the stack must
behave the same on any Linux or macOS clone, without root and without installing anything, from
``make run`` to ``make stop``; a user's systemd is often absent (containers, CI) and macOS has
none. In production each service would be a systemd unit (``Restart=on-failure``) or a
Kubernetes Deployment whose liveness probe is the same health URL.

Where and on which ports (defaults ``.stack/``, Prefect 4200, MLflow 5000, the model servers'
gRPC 8500 and REST 8501, ten more per replica) can be moved with the variables
``LOCAL_STACK_DIR``, ``LOCAL_STACK_PREFECT_PORT``, ``LOCAL_STACK_MLFLOW_PORT`` and
``LOCAL_STACK_SERVING_PORT``, and ``UNANSWERED_S`` with ``LOCAL_STACK_UNANSWERED_S``: tests run a
stack of their own so. The Makefile and ``configs/mnist.yaml`` assume the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

from tasks.config import CONCURRENCY_LIMIT, REPO_ROOT, load_config

DEFAULT_STACK = REPO_ROOT / ".stack"
STACK = Path(os.environ.get("LOCAL_STACK_DIR", DEFAULT_STACK))
PREFECT_PORT = int(os.environ.get("LOCAL_STACK_PREFECT_PORT", "4200"))
MLFLOW_PORT = int(os.environ.get("LOCAL_STACK_MLFLOW_PORT", "5000"))
SERVING_PORT = int(os.environ.get("LOCAL_STACK_SERVING_PORT", "8500"))  # REST: one above
BIN = Path(sys.executable).parent
WORK_POOL = "train-and-serve"
PREFECT_API = f"http://127.0.0.1:{PREFECT_PORT}/api"
# Concurrency-limit leases on disk (under PREFECT_HOME), not in the server's memory: a server
# restarted mid-run would otherwise forget the run's lease, and its slot would stay taken forever.
DURABLE_LEASES = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
        "prefect.server.concurrency.lease_storage.filesystem"
    )
}
# Prefect's zombie-flow detection: a run whose process died without reporting is marked Crashed.
AUTOMATIONS = REPO_ROOT / "deploy" / "prefect" / "automations.yaml"
CRASH_SILENT_RUNS = "crash-silent-flow-runs"  # the automation in it
PREFECT_ENV = {
    "PREFECT_HOME": str(STACK / "prefect"),
    "PREFECT_API_URL": PREFECT_API,
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    "PREFECT_SERVER_API_PORT": str(PREFECT_PORT),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    **DURABLE_LEASES,
}

CHECK_S = 1.0  # how often the supervisor looks
BACKOFF_S = 1.0  # before the second restart in a row; doubles with each next one
MAX_BACKOFF_S = 60.0
STABLE_S = 30.0  # a service that ran this long after a restart starts its back-off over
# A service that answered its health URL and then did not for this long hangs: it is restarted.
UNANSWERED_S = float(os.environ.get("LOCAL_STACK_UNANSWERED_S", "60"))
START_TIMEOUT_S = 180.0  # for `up` and `status`: from the start until it answers (a busy machine)


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
    def restarts_file(self) -> Path:
        return STACK / "run" / f"{self.name}.restarts"

    @property
    def log_file(self) -> Path:
        return STACK / "logs" / f"{self.name}.log"

    def recorded_pid(self) -> int | None:
        """The pid in its pid file, alive or not; None when stopped (no pid file)."""
        try:
            return int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def pid(self) -> int | None:
        """The pid of our running process, or None (stopped, or dead)."""
        pid = self.recorded_pid()
        if pid is None:
            return None
        try:
            process = psutil.Process(pid)
            # A pid recycled since (a reboot, a long uptime) names a process younger than the file.
            ours = process.create_time() <= self.pid_file.stat().st_mtime + 1
            alive = process.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, FileNotFoundError):
            return None
        return pid if ours and alive else None

    def dead(self) -> bool:
        """Started (a pid file) and gone: what the supervisor restarts."""
        return self.recorded_pid() is not None and self.pid() is None

    def answers(self) -> bool:
        return self.ready_url is None or _answers(self.ready_url)

    def restarts(self) -> int:
        try:
            return int(self.restarts_file.read_text())
        except (FileNotFoundError, ValueError):
            return 0


MONITORING_CONFIG = STACK / "monitoring.config"
METRICS_PATH = "/monitoring/prometheus/metrics"


def default_layout() -> bool:
    """Whether the stack is where ``configs/mnist.yaml`` and the Makefile expect it."""
    return STACK == DEFAULT_STACK and SERVING_PORT == 8500


def local_replica(i: int) -> dict[str, str]:
    """Local replica ``i`` (0-based) as a ``push.replicas`` entry: the first is the default
    config's (gRPC 8500, REST 8501, push.model_base_path); each next one ten ports higher, with
    a store of its own, so that a rollout changes the replicas one stage at a time."""
    if i > 0:
        store = STACK / f"models-{i + 1}"
    else:
        store = load_config().push.model_base_path if default_layout() else STACK / "models"
    return {
        "name": "local" if i == 0 else f"local-{i + 1}",
        "grpc": f"127.0.0.1:{SERVING_PORT + 10 * i}",
        "model_base_path": str(store),
        "metrics_url": f"http://127.0.0.1:{SERVING_PORT + 1 + 10 * i}{METRICS_PATH}",
    }


def run_parameters(replicas: int) -> dict[str, list[str]]:
    """The deployment parameters of a run against ``replicas`` local replicas (none for the
    default config's one)."""
    if replicas == 1 and default_layout():
        return {}
    entries = [local_replica(i) for i in range(replicas)]
    return {"overrides": [f"push.replicas={json.dumps(entries)}"]}


def model_server(i: int, model_name: str) -> Service:
    replica = local_replica(i)
    grpc_port, rest_port = SERVING_PORT + 10 * i, SERVING_PORT + 1 + 10 * i
    rest = f"http://127.0.0.1:{rest_port}/v1/models/{model_name}"
    command = [
        sys.executable,
        "-m",
        "serving",
        f"--port={grpc_port}",
        f"--rest_api_port={rest_port}",
        f"--model_name={model_name}",
        f"--model_base_path={Path(replica['model_base_path']) / model_name}",
        f"--monitoring_config_file={MONITORING_CONFIG}",
        # A Profile call would start TensorFlow's profiler server, which listens on every
        # interface (serving/profiler.py): the stack keeps to loopback.
        "--enable_profiler=false",
    ]
    return Service("model-server" if i == 0 else f"model-server-{i + 1}", command, rest, rest)


def started_replicas() -> int:
    """How many local model servers have a pid file (``down`` and ``status`` cover them all)."""
    return max(1, len(list((STACK / "run").glob("model-server*.pid"))))


SUPERVISOR = Service(
    "supervisor",
    [sys.executable, "-m", "flows.local_stack", "supervise"],
    None,
    "restarts a service that dies",
)


def services(replicas: int = 1) -> list[Service]:
    cfg = load_config()
    model_name = cfg.export.model_name
    mlflow_dir = STACK / "mlflow"
    return [
        Service(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start"],
            f"{PREFECT_API}/health",
            f"http://127.0.0.1:{PREFECT_PORT}",
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
                str(MLFLOW_PORT),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                "--artifacts-destination",
                str(mlflow_dir / "artifacts"),
            ],
            f"http://127.0.0.1:{MLFLOW_PORT}/health",
            f"http://127.0.0.1:{MLFLOW_PORT}",
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


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _kill_group(pid: int | None) -> None:
    """SIGKILL what is left of a dead service's process group (each is its session's leader)."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(service: Service) -> subprocess.Popen:
    """Start ``service`` in the background, in a process group of its own (``stop`` stops its
    children too), after what a dead earlier process of it left behind; no wait."""
    for directory in (service.pid_file.parent, service.log_file.parent, STACK / "mlflow"):
        directory.mkdir(parents=True, exist_ok=True)
    if service.dead():
        _kill_group(service.recorded_pid())
    with service.log_file.open("ab") as log:
        process = subprocess.Popen(
            service.command,
            cwd=REPO_ROOT,
            env={**os.environ, **service.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    written = service.pid_file.with_suffix(".tmp")
    written.write_text(str(process.pid))
    written.replace(service.pid_file)  # whoever reads it meanwhile sees the old pid or the new
    return process


def start(service: Service, timeout_s: float = START_TIMEOUT_S) -> None:
    """Start ``service`` and wait until it answers; exits naming its log if it does not."""
    process = spawn(service)
    print(
        f"  started {service.name} (pid {process.pid}), log {_shown(service.log_file)}",
        flush=True,
    )
    deadline = time.monotonic() + timeout_s
    while not service.answers():
        if process.poll() is not None:
            sys.exit(f"{service.name} exited with {process.returncode}; see {service.log_file}")
        if time.monotonic() > deadline:
            sys.exit(
                f"{service.name} did not answer at {service.ready_url} within {timeout_s:.0f} s; "
                f"see {service.log_file}"
            )
        time.sleep(0.5)


def count_restart(service: Service) -> int:
    restarts = service.restarts() + 1
    service.restarts_file.write_text(str(restarts))
    return restarts


def stop(service: Service, grace_s: float = 15.0) -> None:
    pid = service.pid()
    if pid is None:
        _kill_group(service.recorded_pid())
        service.pid_file.unlink(missing_ok=True)
        return
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while service.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_group(pid)
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
    ensure(
        f"automation {CRASH_SILENT_RUNS}",
        ["automation", "inspect", CRASH_SILENT_RUNS],
        ["automation", "create", "--from-file", str(AUTOMATIONS)],
    )
    deployed = prefect("--no-prompt", "deploy", "--all")
    if deployed.returncode != 0:
        sys.exit(f"prefect deploy failed:\n{deployed.stdout}{deployed.stderr}")
    if SUPERVISOR.pid() is None:
        start(SUPERVISOR)
    status(replicas)


def down(replicas: int) -> None:
    # The supervisor first: it would restart what is stopped next.
    for service in [SUPERVISOR, *reversed(services(max(replicas, started_replicas())))]:
        stop(service)
        service.restarts_file.unlink(missing_ok=True)


def status(replicas: int) -> None:
    """One line per service; with the supervisor dead, the dead services and the supervisor are
    restarted first (``make status`` heals what ``make run`` started)."""
    stack = services(max(replicas, started_replicas()))
    if SUPERVISOR.dead():
        for service in (s for s in stack if s.dead()):
            print(f"  {service.name} died (pid {service.recorded_pid()}) and no supervisor runs:")
            count_restart(service)
            start(service)
        count_restart(SUPERVISOR)
        start(SUPERVISOR)
    for service in [*stack, SUPERVISOR]:
        print(f"  {status_line(service)}")


def status_line(service: Service) -> str:
    pid = service.pid()
    if pid is not None:
        state = f"running (pid {pid})"
        answering = "" if service.ready_url is None else "answering"
        if answering and not service.answers():
            answering = "NOT ANSWERING"
    else:
        state = f"DEAD (pid {service.recorded_pid()})" if service.dead() else "stopped"
        answering = ""
    restarts = f"restarts {service.restarts()}"
    return f"{service.name:15s} {state:22s} {answering:13s} {restarts:11s} {service.url}"


@dataclass
class Watch:
    """What the supervisor knows of one service: when it may be restarted next (at once the first
    time, then after a delay that doubles, until it has run ``STABLE_S`` s), and when its process
    last answered."""

    delay_s: float = 0.0
    not_before: float = 0.0
    restarted_at: float = 0.0
    answered_pid: int | None = None
    answered_at: float = 0.0

    def allows(self, now: float) -> bool:
        return now >= self.not_before

    def restarted(self, now: float) -> None:
        self.delay_s = min(max(BACKOFF_S, 2 * self.delay_s), MAX_BACKOFF_S)
        self.not_before = now + self.delay_s
        self.restarted_at = now

    def running(self, now: float) -> None:
        if now - self.restarted_at >= STABLE_S:
            self.delay_s = 0.0

    def silent_s(self, pid: int, answers: bool, now: float) -> float:
        """How long the process ``pid``, having answered since it started, has not; 0 while it
        answers or until it first does (a slow start is not a hang)."""
        if answers:
            self.answered_pid, self.answered_at = pid, now
        return now - self.answered_at if self.answered_pid == pid and not answers else 0.0


def supervise(_replicas: int) -> None:
    """Until SIGTERM: every ``CHECK_S`` s, restart each service that was started and died, and
    kill one that stopped answering for ``UNANSWERED_S`` s (to restart it)."""
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    watches: dict[str, Watch] = {}
    children: list[subprocess.Popen] = []
    note(f"supervising the services of {_shown(STACK)} every {CHECK_S:g} s")
    while not stopping.wait(CHECK_S):
        children = [child for child in children if child.poll() is None]  # reaps the dead
        for service in services(started_replicas()):
            watch = watches.setdefault(service.name, Watch())
            if (process := check(service, watch, time.monotonic())) is not None:
                children.append(process)
    note("stopped")


def check(service: Service, watch: Watch, now: float) -> subprocess.Popen | None:
    """Restart ``service`` if it died (its new process), kill it if it hangs (restarted at the
    next check)."""
    pid = service.pid()
    if pid is not None:
        watch.running(now)
        silent_s = watch.silent_s(pid, service.answers(), now)
        if silent_s > UNANSWERED_S:
            note(
                f"{service.name} (pid {pid}) has not answered {service.ready_url} for "
                f"{silent_s:.0f} s: killed"
            )
            _kill_group(pid)
    elif service.dead() and watch.allows(now):
        watch.restarted(now)
        return restart(service)
    return None


def restart(service: Service) -> subprocess.Popen:
    dead_pid = service.recorded_pid()
    process = spawn(service)
    restarts = count_restart(service)
    note(
        f"{service.name} (pid {dead_pid}) had died: restarted as pid {process.pid} "
        f"(restart {restarts}; its log {_shown(service.log_file)})"
    )
    return process


def note(message: str) -> None:
    print(f"{datetime.now().isoformat(timespec='seconds')} {message}", flush=True)


def params(replicas: int) -> None:
    print(json.dumps(run_parameters(replicas)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.local_stack", description=__doc__.split("\n\n")[0]
    )
    actions = {"up": up, "down": down, "status": status, "params": params, "supervise": supervise}
    parser.add_argument("action", choices=list(actions))
    parser.add_argument("--replicas", type=int, default=1, help="local model servers (default 1)")
    args = parser.parse_args(argv)
    actions[args.action](args.replicas)


if __name__ == "__main__":
    main()
