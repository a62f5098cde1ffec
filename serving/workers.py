"""The supervisor's side of the worker processes: start them, load into all of them, replace the
ones that die, stop them.

``Workers.load`` is the manager's load function: a version is loaded (and warmed up) in every
serving worker in parallel, and only when all have it is it routed in all of them, so the manager
marks it AVAILABLE only once every worker serves it. If any worker fails, the others drop their
copy and the version fails with that worker's error; what served before keeps serving
everywhere. A worker that dies meanwhile fails nothing: its replacement loads the version.
Closing the returned ``LoadedEverywhere`` unloads the version in every worker.

**A worker that dies is replaced** (a crash, a kill, the OOM killer): its exit status is logged
and a new process starts in its slot (same index, so the same ``--grpc_socket_path`` duty) while
the others keep serving; GetModelStatus, answered by the manager here, does not change. The
replacement loads, warms up and routes every version in ``_versions`` (the one record of what
the workers hold, routed or still loading), takes the labels, and only then opens its ports:
the kernel hands it connections once it serves everything the others do. It joins under the
lock under which ``load``, ``unload`` and ``set_labels`` change the record and pick the workers
they reach, and only once what it holds equals the record (else it syncs again), so a version
loaded or unloaded during its start is not missed. Only the requests in flight on the dead
worker fail (its connections are reset). The metrics page sums the serving workers: a dead
worker's counts go with it (Prometheus' ``rate`` reads the drop as a counter reset).

Restart policy (``RestartBackoff``, per slot): at once after a worker that ran ``STABLE_S``,
else 1 s, 2 s, 4 s ... up to ``MAX_BACKOFF_S`` -- a crash loop backs off, each restart is logged.
With every worker dead the supervisor keeps restarting them and nothing listens on the ports
meanwhile (clients get connection refused: UNAVAILABLE); a version loaded then is recorded, and
the replacements load it. A replacement that cannot catch up
(a load that fails only there) is killed and restarted under the same policy. Nothing is
restarted once ``stop`` has begun; a worker lost during startup fails the startup.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import signal
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from serving import metrics, worker
from serving.errors import ServingError
from serving.flags import Options
from serving.ipc import Channel, Handlers

log = logging.getLogger("serving.workers")

START_TIMEOUT_S = 300.0  # importing TensorFlow on a busy small machine can take a while
STOP_TIMEOUT_S = worker.GRACE_S + 15.0
EXIT_STATUS_WAIT_S = 5.0  # the pipe breaks a moment before the process can be reaped
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a worker that lived this long died on its own, not in a crash loop

VersionKey = tuple[str, int]  # (model name, version)


@dataclass(frozen=True)
class _Wanted:
    """A version every worker must hold; ``serial`` tells one load of it from a later one."""

    path: str
    warmup: bool
    serial: int
    routed: bool = False


@dataclass
class _Process:
    """The process in one slot, and the channel to it."""

    index: int
    process: Any
    channel: Channel
    started: float  # time.monotonic()


class RestartBackoff:
    """When to restart a slot's worker after it died: at once after one that ran ``stable_s``,
    else twice the previous wait, from ``first_s`` up to ``max_s``."""

    def __init__(
        self, first_s: float = FIRST_BACKOFF_S, max_s: float = MAX_BACKOFF_S, stable_s=STABLE_S
    ) -> None:
        self._first_s, self._max_s, self._stable_s = first_s, max_s, stable_s
        self.in_a_row = 0  # restarts since the last worker that ran ``stable_s``

    def delay(self, lived_s: float) -> float:
        """The wait before the next restart of a worker that died after ``lived_s``."""
        if lived_s >= self._stable_s:
            self.in_a_row = 0
        delay = 0.0 if self.in_a_row == 0 else self._first_s * 2 ** (self.in_a_row - 1)
        self.in_a_row += 1
        return min(delay, self._max_s)


class Workers:
    """``options.num_workers`` worker processes, a channel to each, and their replacements."""

    def __init__(self, options: Options, handlers: Handlers) -> None:
        self._options = options
        self._handlers = handlers  # what the workers may ask the supervisor
        self._context = multiprocessing.get_context("spawn")  # fresh interpreters: no threads
        self._stopping = threading.Event()
        self._serials = itertools.count()
        self._backoff = [RestartBackoff() for _ in range(options.num_workers)]
        # Everything below changes under this lock, held only for quick calls to workers.
        self._lock = threading.Lock()
        self._processes: dict[int, _Process] = {}  # slot -> its latest process
        self._serving: dict[int, Channel] = {}  # slot -> channel, once it holds every version
        self._versions: dict[VersionKey, _Wanted] = {}
        self._labels: dict[str, dict[str, int]] = {}
        self._ports_open = False

    def start(self) -> None:
        """Start the processes; return once each has imported TensorFlow and answers."""
        started = [self._spawn(index) for index in range(self._options.num_workers)]
        started = [p for p in started if p is not None]
        channels = [p.channel for p in started]
        for future in _answers(channels, "ping", timeout=START_TIMEOUT_S):
            if future.exception() is not None:  # a bad setting, or a worker lost at startup
                raise future.exception()
        with self._lock:
            self._serving.update((p.index, p.channel) for p in started)
        log.info(
            "%d worker process(es) ready (pids %s)",
            len(started),
            ", ".join(str(p.process.pid) for p in started),
        )

    def _spawn(self, index: int) -> _Process | None:
        """Start a worker process in slot ``index`` (None once stopping: it would not be
        stopped)."""
        here, there = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker.main,
            args=(there, self._options, index),
            name=f"serving-worker-{index}",
            daemon=True,
        )
        with self._lock:
            if self._stopping.is_set():
                here.close()
                there.close()
                return None
            process.start()
            there.close()
            channel = Channel(
                here,
                self._handlers,
                name=f"supervisor<->worker {index}",
                on_close=lambda: self._lost(spawned),
            )
            spawned = self._processes[index] = _Process(index, process, channel, time.monotonic())
        channel.start()
        return spawned

    # -- replacing a worker that died ----------------------------------------------------------

    def _lost(self, dead: _Process) -> None:
        """Its pipe broke (on the channel's reader thread): out of the serving set, replaced."""
        if self._stopping.is_set():
            return
        with self._lock:
            if self._serving.get(dead.index) is dead.channel:
                del self._serving[dead.index]
        threading.Thread(
            target=self._replace, args=(dead,), name=f"worker-{dead.index}-restart", daemon=True
        ).start()

    def _replace(self, dead: _Process) -> None:
        lost_at = time.monotonic()
        lived_s = lost_at - dead.started
        with self._lock:  # out of stop()'s reach, before its handle is closed below
            if self._stopping.is_set():
                return  # stop() waits for it
            if self._processes.get(dead.index) is dead:
                del self._processes[dead.index]
        pid, how = dead.process.pid, _reap(dead)
        backoff = self._backoff[dead.index]
        delay = backoff.delay(lived_s)
        log.error(
            "worker %d (pid %d) exited unexpectedly (%s) after %.1f s: restart %d in a row "
            "in %.0f s",
            dead.index,
            pid,
            how,
            lived_s,
            backoff.in_a_row,
            delay,
        )
        while not self._stopping.wait(delay):
            try:
                replacement = self._spawn(dead.index)
            except OSError as e:  # no process, so no loss to restart from: try again here
                delay = backoff.delay(lived_s=0.0)
                log.error(
                    "worker %d: cannot start a process (%s): again in %.0f s", dead.index, e, delay
                )
                continue
            if replacement is not None:  # None: stopping
                self._bring_in(replacement, lost_at)
            return

    def _bring_in(self, replacement: _Process, lost_at: float) -> None:
        try:
            replacement.channel.call("ping", timeout=START_TIMEOUT_S)
            self._catch_up(replacement)
        except ServingError as e:
            self._give_up_on(replacement, e)
            return
        log.info(
            "worker %d replaced by pid %d, serving %d version(s), %.1f s after the loss",
            replacement.index,
            replacement.process.pid,
            len(self._versions),
            time.monotonic() - lost_at,
        )

    def _catch_up(self, new: _Process) -> None:
        """Bring ``new`` to hold what the record says, then let it join (ports open, if the
        server's are)."""
        held: dict[VersionKey, _Wanted] = {}
        while True:
            with self._lock:
                wanted = dict(self._versions)
                if held == wanted:
                    self._join(new)
                    return
            _sync(new.channel, held, wanted)

    def _join(self, new: _Process) -> None:
        """Under the lock: the labels, the ports, then into the serving set."""
        for name, labels in self._labels.items():
            new.channel.call("labels", name, labels)
        if self._ports_open:
            new.channel.call("open")
        self._serving[new.index] = new.channel

    def _give_up_on(self, replacement: _Process, error: ServingError) -> None:
        """A replacement that failed to start or catch up: if it still runs, kill it; its pipe
        then breaks and ``_lost`` restarts the slot, backing off."""
        if self._stopping.is_set() or replacement.channel.closed:
            return  # stopping, or it died: its own loss is being handled
        log.error("worker %d (pid %d): %s", replacement.index, replacement.process.pid, error)
        replacement.process.kill()

    # -- what the manager and the server call --------------------------------------------------

    def load(self, name: str, version: int, path: str, warmup: bool) -> "LoadedEverywhere":
        key = (name, version)
        with self._lock:
            self._versions[key] = _Wanted(path, warmup, next(self._serials))
            channels = list(self._serving.values())
        failed = _first_error(channels, _answers(channels, "load", name, version, path, warmup))
        if failed is not None:
            self.unload(name, version)
            raise failed
        with self._lock:
            self._versions[key] = dataclasses.replace(self._versions[key], routed=True)
            self._all("route", name, version)
        return LoadedEverywhere(self, name, version)

    def unload(self, name: str, version: int) -> None:
        if self._stopping.is_set():  # stopping workers unload everything themselves
            return
        with self._lock:
            self._versions.pop((name, version), None)
            channels = list(self._serving.values())
        for channel in channels:
            _ignore_gone(channel.call, "unload", name, version)

    def set_labels(self, name: str, labels: dict[str, int]) -> None:
        with self._lock:
            self._labels[name] = dict(labels)
            self._all("labels", name, labels)

    def open_ports(self) -> None:
        with self._lock:
            self._ports_open = True
            self._all("open")

    def metrics_page(self) -> str:
        """The Prometheus page of the whole server: every serving worker's values, summed."""
        with self._lock:
            channels = list(self._serving.values())
        futures = _answers(channels, "metrics")
        _raise_first_error(channels, futures)
        return metrics.REGISTRY.exposition([f.result() for f in futures if f.exception() is None])

    def _all(self, method: str, *args: Any) -> None:
        """Under the lock: ``method`` in every serving worker; the first error of one still
        there is raised."""
        channels = list(self._serving.values())
        _raise_first_error(channels, _answers(channels, method, *args))

    def stop(self) -> None:
        """Ask every worker to stop (they drain and unload), wait for them, kill stragglers."""
        with self._lock:
            self._stopping.set()
            processes = list(self._processes.values())
        for p in processes:
            _ignore_gone(p.channel.call, "stop")
        for p in processes:
            p.process.join(STOP_TIMEOUT_S)
            if p.process.is_alive():
                log.warning(
                    "worker %s did not stop in %.0f s: killing it", p.process.pid, STOP_TIMEOUT_S
                )
                p.process.kill()
                p.process.join()
        for p in processes:
            p.channel.close()


class LoadedEverywhere:
    """A version routed in every worker (what ``Manager`` holds while it is AVAILABLE)."""

    def __init__(self, workers: Workers, name: str, version: int) -> None:
        self._workers = workers
        self._name = name
        self._version = version

    def close(self) -> None:
        self._workers.unload(self._name, self._version)


def _sync(channel: Channel, held: dict[VersionKey, _Wanted], wanted: dict[VersionKey, _Wanted]):
    """Make a joining worker hold ``wanted`` (a snapshot of the record); ``held`` follows what
    it holds. Newest versions first, as the manager loads them."""
    for key in [k for k, h in held.items() if k not in wanted or wanted[k].serial != h.serial]:
        channel.call("unload", *key)
        del held[key]
    for key, want in sorted(wanted.items(), reverse=True):
        if key not in held:
            channel.call("load", *key, want.path, want.warmup)
            held[key] = dataclasses.replace(want, routed=False)
        if want.routed and not held[key].routed:
            channel.call("route", *key)
            held[key] = want


def _reap(dead: _Process) -> str:
    """Wait for a lost worker to exit (kill it if its pipe broke but it lives on: it must not
    serve unsupervised), release its pipe and handle; how it ended."""
    dead.channel.close()
    dead.process.join(EXIT_STATUS_WAIT_S)
    if dead.process.exitcode is None:
        dead.process.kill()
        dead.process.join()
    code = dead.process.exitcode
    dead.process.close()  # its sentinel's descriptor, now rather than at a garbage collection
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _answers(
    channels: list[Channel], method: str, *args: Any, timeout: float | None = None
) -> list[Future]:
    """Call ``method`` in every one of ``channels`` at once; the futures once all answered."""
    futures = [c.call_future(method, *args) for c in channels]
    _, pending = wait(futures, timeout)
    if pending:
        raise ServingError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"workers did not answer {method} within {timeout:g} s",
        )
    return futures


def _first_error(channels: list[Channel], futures: list[Future]) -> BaseException | None:
    """The first error of a worker still there: one that died is no error (it is replaced,
    and its replacement catches up)."""
    return next(
        (f.exception() for c, f in zip(channels, futures) if f.exception() and not c.closed),
        None,
    )


def _raise_first_error(channels: list[Channel], futures: list[Future]) -> None:
    failed = _first_error(channels, futures)
    if failed is not None:
        raise failed


def _ignore_gone(call: Callable[..., Any], *args: Any) -> None:
    """A call to a worker that may be gone already (then there is nothing left to unload)."""
    try:
        call(*args)
    except ServingError as e:
        if e.code != grpc.StatusCode.UNAVAILABLE:
            log.warning("%s", e.message)
