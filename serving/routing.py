"""What one worker process serves: routing of a ModelSpec to a loaded version, with refcounts.

The supervisor's manager (``serving.manager``) decides which versions serve; each worker keeps
the loaded ``Servable``s in a ``RoutingTable`` and is told, through ``serving.worker``, when to
route a version (``add``) and when to take it out (``remove``). A request ``acquire``s a handle,
which keeps its version from being closed until the request is done: ``remove`` takes the version
out of routing at once, then waits for the handles still out before closing it, so a swap never
fails a request in flight.

After each close the freed memory is handed back to the OS (``gc.collect`` + glibc
``malloc_trim``): without it the RSS grows by ~0.3 MiB with every version swap, because glibc
keeps the freed small blocks of the unloaded graph in its arenas (TF Serving likewise releases
memory to the OS after unloads). TensorFlow's own objects are frozen out of the collector before
the first load (``tf_runtime.import_tensorflow_for_serving``), so that this collection takes
about a millisecond instead of stalling every request for a large fraction of a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from serving import metrics
from serving.errors import not_found
from serving.servable import Servable
from serving.types import resolve_label

log = logging.getLogger("serving.routing")


@dataclass
class _Entry:
    version: int
    servable: Servable
    refcount: int = 0


@dataclass
class _Model:
    versions: dict[int, _Entry] = field(default_factory=dict)  # routed versions only
    labels: dict[str, int] = field(default_factory=dict)


class Handle:
    """A reference to a routed servable that keeps it from being closed until released."""

    def __init__(self, table: "RoutingTable", entry: _Entry) -> None:
        self._table = table
        self._entry: _Entry | None = entry
        self.servable: Servable = entry.servable
        self.version = entry.version

    def release(self) -> None:
        if self._entry is not None:
            self._table._release(self._entry)
            self._entry = None

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RoutingTable:
    """Thread-safe: requests acquire on the event loop and pool threads, control calls add and
    remove on the worker's control threads."""

    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)  # notified when a refcount hits 0

    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> Handle:
        """Route a ModelSpec: ``version``, else the version ``label`` points at, else the latest
        routed version. NOT_FOUND when that version is not routed here."""
        with self._lock:
            model = self._models.get(name)
            if version is None and label:
                version = resolve_label(model.labels if model else None, label)
            entry = None
            if model is not None and model.versions:
                entry = (
                    model.versions.get(version)
                    if version is not None
                    else model.versions[max(model.versions)]
                )
            if entry is None:
                raise not_found(name, version)
            entry.refcount += 1
            return Handle(self, entry)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.refcount -= 1
            if entry.refcount == 0:
                self._released.notify_all()

    def add(self, name: str, servable: Servable) -> None:
        """Route requests to ``servable`` (a loaded, warmed-up version of model ``name``)."""
        with self._lock:
            model = self._models.setdefault(name, _Model())
            model.versions[servable.version] = _Entry(servable.version, servable)

    def set_labels(self, name: str, labels: dict[str, int]) -> None:
        with self._lock:
            self._models.setdefault(name, _Model()).labels = dict(labels)

    def remove(self, name: str, version: int, wait_s: float | None = None) -> None:
        """Take a version out of routing, wait (at most ``wait_s``) for the requests that hold
        it, close it and return its memory. Removing a version not routed does nothing."""
        with self._lock:
            model = self._models.get(name)
            entry = model.versions.pop(version, None) if model is not None else None
            if model is not None and not model.versions and not model.labels:
                del self._models[name]
            if entry is None:
                return
            deadline = None if wait_s is None else time.monotonic() + wait_s
            while entry.refcount > 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    log.warning(
                        "model %s version %d: closing with %d request(s) in flight",
                        name,
                        version,
                        entry.refcount,
                    )
                    break
                self._released.wait(remaining)
        close_servable(entry.servable)

    def remove_all(self, wait_s: float) -> None:
        """Shutdown: remove every version (the requests still in flight get ``wait_s``)."""
        with self._lock:
            routed = [(name, v) for name, m in self._models.items() for v in m.versions]
        for name, version in routed:
            self.remove(name, version, wait_s)


def close_servable(servable: Servable) -> None:
    """Close a version no request can reach any more, count it, and return its memory."""
    servable.close()
    metrics.MODEL_UNLOAD_COUNT.inc(servable.path)
    _release_memory()
    log.info("model %s version %d: unloaded", servable.model_name, servable.version)


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def _release_memory() -> None:
    """``gc.collect`` breaks the reference cycles that keep a closed session's graph alive;
    ``malloc_trim(0)`` returns the now-free pages glibc would otherwise keep cached."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
