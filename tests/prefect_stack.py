"""A real Prefect stack for tests: ``prefect server start`` and ``prefect worker start`` as
subprocesses on 127.0.0.1, set up the way ``make run`` sets up the local one
(``flows/local_stack.py``), but isolated and on a free port.

``prefect_server(root)`` starts a server whose PREFECT_HOME (SQLite database, profiles) is under
``root``, waits for ``/api/health`` and yields a ``PrefectServer``:

- ``api_url``, ``env`` (the variables that point a Prefect CLI, client or worker at this server;
  an overlay on ``os.environ``), ``log`` and ``log_tail()`` (the server's log);
- ``prefect(*args)``: the ``prefect`` CLI against it, from the repository root; a failure raises
  ``PrefectCLIError`` with its output;
- ``create_work_pool(name)``, ``create_concurrency_limit(name, limit)`` (global),
  ``create_automations()`` (``deploy/prefect/automations.yaml``), and
  ``deploy(name, params)``: ``prefect --no-prompt deploy`` of the real ``prefect.yaml``, so
  its triggers become automations exactly as ``make run`` creates them;
- ``worker(pool)``: a process worker polling every ``WORKER_QUERY_S`` s, until the ``with`` ends
  (a ``Worker``: its name, log and process);
- ``flow_runs(deployment)``, ``wait_for_flow_runs(deployment, count)``,
  ``wait_for_flow_run(flow_run_id)``, ``flow_run_logs(flow_run_id)``,
  ``task_run_states(flow_run_id)``, ``run_deployment(deployment)``, ``automations(deployment)``,
  ``delete_flow_runs(deployment)``: the API, through ``prefect_client(api_url)`` (a sync
  ``get_client`` for one server, also for a server this module did not start);
- ``restart(down_s)``: the server stopped (SIGTERM) and started again on its port and database;
- ``emit_data_landed(digest, name, rows)``: ``tasks.events.emit_data_landed`` in a subprocess with
  ``env``, i.e. what ``python -m tasks.data add`` does: the process exits right after the event;
  ``events(name)``, ``wait_for_events(name, count)``: the events the server has stored.

Every process started here runs in its own process group, stopped (SIGTERM, then SIGKILL) when its
``with`` ends, children included; a process that dies or does not get ready raises with the tail
of its log. Deploying imports the flow module (TensorFlow): ~12 s on 2 cores; the server is ready
in ~11 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from uuid import UUID

from flows.local_stack import AUTOMATIONS, DURABLE_LEASES
from tasks.config import REPO_ROOT
from tasks.processes import stop_group
from tests.processes import BIN, free_port, wait_for_http

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import Deployment, FlowRun
    from prefect.events.schemas.automations import Automation

FLOW = "train-and-serve"  # the flow's name: deployments are f"{FLOW}/{name}"
WORK_POOL = "train-and-serve"
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
SERVER_START_TIMEOUT_S = 180.0
# How often a test worker asks for scheduled runs (Prefect's default is 10 s).
WORKER_QUERY_S = 1
# Until SIGKILL after SIGTERM: a worker's shutdown calls the API, a server's drains requests.
STOP_GRACE_S = 10.0
EVENT_FLUSH_S = 0.5


@dataclass(frozen=True)
class Worker:
    name: str
    log: Path
    process: subprocess.Popen  # the leader of its process group


class PrefectCLIError(RuntimeError):
    """A ``prefect`` command failed; the message has its command line, status and output."""


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``command`` from the repository root, in a session (process group) of its own."""
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@contextmanager
def _group(command: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    process = _spawn(command, log, env)
    try:
        yield process
    finally:
        stop_group(process, STOP_GRACE_S)


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


@dataclass
class PrefectServer:
    api_url: str
    env: dict[str, str]
    root: Path
    log: Path
    process: subprocess.Popen
    _workers: int = field(default=0, repr=False)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log: where a failed automation action says why."""
        return _tail(self.log, chars)

    def restart(self, down_s: float = 0.0, timeout_s: float = SERVER_START_TIMEOUT_S) -> float:
        """Stop the server as a service manager does (SIGTERM to its group, SIGKILL after
        ``STOP_GRACE_S``), leave it down ``down_s`` more seconds, start it again on the same
        port with the same PREFECT_HOME (its SQLite database); returns once ``/api/health``
        answers, with the seconds the API did not answer."""
        stopped = time.monotonic()
        stop_group(self.process, STOP_GRACE_S)
        time.sleep(down_s)
        self.process = _start_server(self.env, self.log, timeout_s)
        return time.monotonic() - stopped

    # --- the CLI -------------------------------------------------------------------------------

    def prefect(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
        """``prefect *args`` against this server, from the repository root; raises
        ``PrefectCLIError`` (with stdout and stderr) unless it exits 0."""
        command = [str(BIN / "prefect"), *args]
        result = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise PrefectCLIError(
                f"{' '.join(command)} exited with {result.returncode}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-5000:]}"
            )
        return result

    def create_work_pool(self, name: str = WORK_POOL) -> None:
        self.prefect("work-pool", "create", name, "--type", "process")

    def create_concurrency_limit(self, name: str, limit: int) -> None:
        """A global concurrency limit (``prefect gcl create``), as ``make run`` creates it."""
        self.prefect("gcl", "create", name, "--limit", str(limit))

    def create_automations(self) -> None:
        """The automations of ``deploy/prefect/automations.yaml``, as ``make run`` creates them."""
        self.prefect("automation", "create", "--from-file", str(AUTOMATIONS))

    def deploy(self, name: str, params: dict[str, Any] | None = None) -> Deployment:
        """``prefect --no-prompt deploy`` of the deployment ``name`` of the real ``prefect.yaml``
        (its triggers become automations), from the repository root; returns it as the API has
        it. ``params`` is merged into its yaml ``parameters`` (a shallow ``dict.update``: a key
        given here replaces the yaml's); a trigger's parameters are merged over both when it
        starts a run."""
        args = ["--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--name", name]
        if params is not None:
            args += ["--params", json.dumps(params)]
        self.prefect(*args)
        return self.deployment(name)

    # --- a worker ------------------------------------------------------------------------------

    @contextmanager
    def worker(self, pool: str = WORK_POOL, timeout_s: float = 60.0) -> Iterator[Worker]:
        """``prefect worker start --pool pool --type process``, polling every ``WORKER_QUERY_S``
        s; yields it once the API lists it in the pool, stops its process group when the
        ``with`` ends. Its flow runs inherit ``env`` and run from the directory the deployment
        was deployed from (the repository root: no pull step), each in a session of its own
        (Prefect's choice): stopping the worker's group does not reach them."""
        self._workers += 1
        name = f"test-worker-{self._workers}"
        log = self.root / f"prefect-{name}.log"
        command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
        env = {**self.env, "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_S)}
        with _group([*command, "--name", name], log, env) as process:
            deadline = time.monotonic() + timeout_s
            while not self._worker_registered(pool, name):
                if process.poll() is not None:
                    raise RuntimeError(f"worker exited with {process.returncode}:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker not in pool {pool} in {timeout_s} s:\n{_tail(log)}")
                time.sleep(0.3)
            yield Worker(name, log, process)

    def _worker_registered(self, pool: str, name: str) -> bool:
        from prefect.exceptions import ObjectNotFound

        try:
            with self.client() as client:
                workers = client.read_workers_for_work_pool(pool)
        except ObjectNotFound:
            return False
        return any(worker.name == name for worker in workers)

    # --- the API -------------------------------------------------------------------------------

    def client(self) -> AbstractContextManager[SyncPrefectClient]:
        """``prefect_client`` for this server."""
        return prefect_client(self.api_url)

    def deployment(self, name: str) -> Deployment:
        with self.client() as client:
            return client.read_deployment_by_name(f"{FLOW}/{name}")

    def automations(self, deployment: str) -> list[Automation]:
        """The automations the deployment's triggers created (owned by the deployment)."""
        deployment_id = self.deployment(deployment).id
        with self.client() as client:
            return client.read_resource_related_automations(f"prefect.deployment.{deployment_id}")

    def flow_runs(self, deployment: str) -> list[FlowRun]:
        """The deployment's flow runs (``name``, ``state``, ``parameters``, ...), oldest first."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        deployment_id = self.deployment(deployment).id
        with self.client() as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            )

    def wait_for_flow_runs(
        self, deployment: str, count: int = 1, timeout_s: float = 30.0, poll_s: float = 0.2
    ) -> list[FlowRun]:
        """The deployment's flow runs once there are at least ``count``; TimeoutError if not."""
        deadline = time.monotonic() + timeout_s
        while len(runs := self.flow_runs(deployment)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{FLOW}/{deployment} has {len(runs)} flow runs, not {count}, "
                    f"after {timeout_s} s:\n{_tail(self.log)}"
                )
            time.sleep(poll_s)
        return runs

    def wait_for_flow_run(
        self, flow_run_id: UUID, timeout_s: float = 120.0, poll_s: float = 0.5
    ) -> FlowRun:
        """The flow run once its state is final (Completed, Failed, Crashed, Cancelled);
        TimeoutError naming its last state if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.client() as client:
                run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                state = run.state.type.value if run.state else "no state"
                raise TimeoutError(f"flow run {run.name} still {state} after {timeout_s} s")
            time.sleep(poll_s)

    def flow_run_logs(self, flow_run_id: UUID) -> str:
        """The flow run's log as the API has it, one line per record, oldest first: where its
        output is (the deployments do not stream it to the worker: ``prefect.yaml``)."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        only_this_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        with self.client() as client:
            logs = client.read_logs(log_filter=only_this_run, sort=LogSort.TIMESTAMP_ASC)
        return "\n".join(f"{log.timestamp:%H:%M:%S} {log.name}: {log.message}" for log in logs)

    def task_run_states(self, flow_run_id: UUID) -> dict[str, str]:
        """The flow run's task runs, by name (``train-a1e``), and their state types."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        of_this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        with self.client() as client:
            runs = client.read_task_runs(flow_run_filter=of_this_run)
        return {run.name: run.state.type.value for run in runs if run.state is not None}

    def run_deployment(self, deployment: str, parameters: dict[str, Any] | None = None) -> FlowRun:
        """A flow run of the deployment, scheduled now (``parameters`` merged into the
        deployment's), as ``prefect deployment run`` creates it."""
        deployment_id = self.deployment(deployment).id
        with self.client() as client:
            return client.create_flow_run_from_deployment(deployment_id, parameters=parameters)

    def delete_flow_runs(self, deployment: str) -> None:
        """So that a worker started later does not run them."""
        runs = self.flow_runs(deployment)
        with self.client() as client:
            for run in runs:
                client.delete_flow_run(run.id)

    # --- events --------------------------------------------------------------------------------

    def events(self, event: str) -> list[dict[str, Any]]:
        """The events named ``event`` the server has stored (of the last day), newest first, as
        the API's JSON; stored within ``EVENT_FLUSH_S`` of their arrival."""
        with self.client() as client:
            response = client.request(
                "POST", "/events/filter", json={"filter": {"event": {"name": [event]}}}
            )
        response.raise_for_status()
        return response.json()["events"]

    def wait_for_events(
        self, event: str, count: int, timeout_s: float = 30.0, poll_s: float = 0.2
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(found := self.events(event)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} {event} events, not {count}, after {timeout_s} s")
            time.sleep(poll_s)
        return found

    def emit_data_landed(self, digest: str, name: str, rows: int = 1) -> None:
        """``tasks.events.emit_data_landed`` in a process of its own with ``env`` (as
        ``python -m tasks.data add`` sends it): returns once that process has exited 0."""
        code = (
            "import sys; from tasks.events import emit_data_landed; "
            "emit_data_landed(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, digest, name, str(rows)],
            cwd=REPO_ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"emit_data_landed({digest!r}, {name!r}) failed:\n{result.stderr}")


@contextmanager
def prefect_client(api_url: str) -> Iterator[SyncPrefectClient]:
    """``get_client(sync_client=True)`` for the server at ``api_url`` (whatever this process's
    settings)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            yield client


def server_env(root: Path, port: int) -> dict[str, str]:
    """The variables of a server on 127.0.0.1:``port`` with its home under ``root``, and of
    every CLI, client and worker that talks to it."""
    return {
        "PREFECT_HOME": str(root / "prefect-home"),  # its SQLite database and profiles
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",  # nothing to build or serve: starts faster
        **DURABLE_LEASES,  # as make run's server: a restart keeps the runs' concurrency leases
        # Received events are stored this often (Prefect's default is every 5 s), for events().
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": str(EVENT_FLUSH_S),
        "TF_CPP_MIN_LOG_LEVEL": "2",  # deploys and flow runs import TensorFlow
    }


def _server_command(env: dict[str, str]) -> list[str]:
    host, port = env["PREFECT_SERVER_API_HOST"], env["PREFECT_SERVER_API_PORT"]
    return [str(BIN / "prefect"), "server", "start", "--host", host, "--port", port]


def _start_server(env: dict[str, str], log: Path, timeout_s: float) -> subprocess.Popen:
    """``prefect server start`` in a session of its own, once ``/api/health`` answers."""
    process = _spawn(_server_command(env), log, env)
    try:
        wait_for_http(f"{env['PREFECT_API_URL']}/health", process, log, timeout_s=timeout_s)
    except BaseException:
        stop_group(process, STOP_GRACE_S)
        raise
    return process


@contextmanager
def prefect_server(
    root: Path, timeout_s: float = SERVER_START_TIMEOUT_S
) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free port with its state under ``root``, once
    ``/api/health`` answers; stopped (its process group, whichever process ``restart`` left)
    when the ``with`` ends."""
    root.mkdir(parents=True, exist_ok=True)
    env = server_env(root, free_port())
    log = root / "prefect-server.log"
    server = PrefectServer(
        env["PREFECT_API_URL"], env, root, log, _start_server(env, log, timeout_s)
    )
    try:
        yield server
    finally:
        stop_group(server.process, STOP_GRACE_S)
