"""The supervisor's side of the worker processes: start them, load into all of them, stop them.

``Workers.load`` is the manager's load function: a version is loaded (and warmed up) in every
worker in parallel, and only when all have it is it routed in all of them, so the manager marks
it AVAILABLE only once every worker serves it. If any worker fails, the others drop their copy
and the version fails with that worker's error; what served before keeps serving everywhere.
Closing the returned ``LoadedEverywhere`` unloads the version in every worker.

A worker that exits on its own (a crash, a kill) stops the whole server with an error rather
than leaving it serving from fewer processes than it was asked to: a supervisor such as systemd
or Kubernetes then restarts it whole.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import Future, wait
from typing import Any, Callable

import grpc

from serving import metrics, worker
from serving.errors import ServingError
from serving.flags import Options
from serving.ipc import Channel, Handlers

log = logging.getLogger("serving.workers")

START_TIMEOUT_S = 300.0  # importing TensorFlow on a busy small machine can take a while
STOP_TIMEOUT_S = worker.GRACE_S + 15.0


class Workers:
    """``options.num_workers`` worker processes and a channel to each."""

    def __init__(self, options: Options, handlers: Handlers, on_lost: Callable[[], None]) -> None:
        self._options = options
        self._handlers = handlers  # what the workers may ask the supervisor
        self._on_lost = on_lost
        self._stopping = threading.Event()
        self._processes: list[Any] = []
        self._channels: list[Channel] = []

    def start(self) -> None:
        """Start the processes; return once each has imported TensorFlow and answers."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads
        for index in range(self._options.num_workers):
            here, there = context.Pipe(duplex=True)
            process = context.Process(
                target=worker.main,
                args=(there, self._options, index),
                name=f"serving-worker-{index}",
                daemon=True,
            )
            process.start()
            there.close()
            self._processes.append(process)
            self._channels.append(
                Channel(
                    here,
                    self._handlers,
                    name=f"supervisor<->worker {index}",
                    on_close=self._lost(index),
                ).start()
            )
        self._all("ping", timeout=START_TIMEOUT_S)
        log.info(
            "%d worker process(es) ready (pids %s)",
            len(self._processes),
            ", ".join(str(p.pid) for p in self._processes),
        )

    def _lost(self, index: int) -> Callable[[], None]:
        def lost() -> None:
            if not self._stopping.is_set():
                log.error("worker %d exited unexpectedly: stopping the server", index)
                self._on_lost()

        return lost

    def _answers(self, method: str, *args: Any, timeout: float | None = None) -> list[Future]:
        """Call ``method`` in every worker at once; the futures once all have answered."""
        futures = [c.call_future(method, *args) for c in self._channels]
        _, pending = wait(futures, timeout)
        if pending:
            raise ServingError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"workers did not answer {method} within {timeout:g} s",
            )
        return futures

    def _all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Call ``method`` in every worker at once; raise the first error after all answered."""
        futures = self._answers(method, *args, timeout=timeout)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        return [f.result() for f in futures]

    # -- what the manager and the server call --------------------------------------------------

    def load(self, name: str, version: int, path: str, warmup: bool) -> "LoadedEverywhere":
        errors = [f.exception() for f in self._answers("load", name, version, path, warmup)]
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            for channel, error in zip(self._channels, errors):
                if error is None:
                    _ignore_gone(channel.call, "unload", name, version)
            raise failed
        self._all("route", name, version)
        return LoadedEverywhere(self, name, version)

    def unload(self, name: str, version: int) -> None:
        if not self._stopping.is_set():  # stopping workers unload everything themselves
            for channel in self._channels:
                _ignore_gone(channel.call, "unload", name, version)

    def set_labels(self, name: str, labels: dict[str, int]) -> None:
        self._all("labels", name, labels)

    def open_ports(self) -> None:
        self._all("open")

    def metrics_page(self) -> str:
        """The Prometheus page of the whole server: every worker's values, summed."""
        return metrics.REGISTRY.exposition(self._all("metrics"))

    def stop(self) -> None:
        """Ask every worker to stop (they drain and unload), wait for them, kill stragglers."""
        self._stopping.set()
        for channel in self._channels:
            _ignore_gone(channel.call, "stop")
        for process in self._processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                log.warning(
                    "worker %s did not stop in %.0f s: killing it", process.pid, STOP_TIMEOUT_S
                )
                process.kill()
                process.join()
        for channel in self._channels:
            channel.close()


class LoadedEverywhere:
    """A version routed in every worker (what ``Manager`` holds while it is AVAILABLE)."""

    def __init__(self, workers: Workers, name: str, version: int) -> None:
        self._workers = workers
        self._name = name
        self._version = version

    def close(self) -> None:
        self._workers.unload(self._name, self._version)


def _ignore_gone(call: Callable[..., Any], *args: Any) -> None:
    """A call to a worker that may be gone already (then there is nothing left to unload)."""
    try:
        call(*args)
    except ServingError as e:
        if e.code != grpc.StatusCode.UNAVAILABLE:
            log.warning("%s", e.message)
