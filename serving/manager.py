"""Version manager: the lifecycle of every model version, and request routing to loaded versions.

Shape of TF Serving's ``AspiredVersionsManager``: a source says which versions *should* be served
(aspired); a background loader thread makes it so, availability-preserving:

* a new version is loaded and warmed up (START -> LOADING -> AVAILABLE) before any old version
  leaves routing (UNLOADING) -- there is never a moment with nothing to serve;
* an old version is closed (END) only once the requests that hold it have finished (refcount);
* a version that fails to load ends as END with its error; whatever served before keeps serving,
  and the failure is not retried on every poll -- only when its directory changes;
* if the newest version disappears from disk, the next newest becomes aspired again and is loaded
  before the removed one is unloaded (rollback without a gap);
* a model removed from the config has all its versions unloaded, then is forgotten (NOT_FOUND);
* version labels (set from the config, checked there) are resolved here, at routing time.

After each unload the freed memory is handed back to the OS (``gc.collect`` + glibc
``malloc_trim``): without it the server's RSS grows by ~0.3 MiB with every version swap, because
glibc keeps the freed small blocks of the unloaded graph in its arenas (TF Serving likewise releases
memory to the OS after unloads).

Loads run one at a time on the loader thread so they never run on the request path, and so that
on a small machine one load competes with serving rather than several at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from serving import metrics
from serving.errors import ServingError, invalid, not_found
from serving.servable import Servable, load_servable
from serving.source import VersionDir

log = logging.getLogger("serving.manager")


class State(enum.IntEnum):
    """Same numbers as ``tensorflow.serving.ModelVersionStatus.State``."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class VersionStatus:
    """A snapshot of one version's state for GetModelStatus / REST status."""

    version: int
    state: State
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


@dataclass
class _Version:
    version: int
    directory: VersionDir
    state: State = State.START
    error: ServingError | None = None
    servable: Servable | None = None
    refcount: int = 0


@dataclass
class _Model:
    name: str
    aspired: dict[int, VersionDir] = field(default_factory=dict)
    versions: dict[int, _Version] = field(default_factory=dict)
    failed: dict[int, tuple[int, int]] = field(default_factory=dict)  # version -> dir fingerprint
    labels: dict[str, int] = field(default_factory=dict)  # version label -> version
    removed: bool = False  # dropped from the config: forget it once every version has ended


class Handle:
    """A reference to an AVAILABLE servable that keeps it from being closed until released."""

    def __init__(self, manager: "Manager", entry: _Version) -> None:
        self._manager = manager
        self._entry = entry
        assert entry.servable is not None
        self.servable: Servable = entry.servable
        self.version = entry.version

    def release(self) -> None:
        if self._entry is not None:
            self._manager._release(self._entry)
            self._entry = None

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


LoadFn = Callable[[str, int, str, bool], Servable]


class Manager:
    """Owns all models' versions. Thread-safe; ``start()`` launches the loader thread."""

    def __init__(self, enable_warmup: bool = True, load_fn: LoadFn = load_servable) -> None:
        self._enable_warmup = enable_warmup
        self._load_fn = load_fn
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)  # notified when a refcount hits 0
        self._work = threading.Condition(threading.Lock())
        self._requested = 0  # generation counter of aspired-version updates
        self._done = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="version-loader", daemon=True)

    # -- source side ---------------------------------------------------------------------------

    def add_model(self, name: str) -> None:
        """Make ``name`` known (so status calls answer for it even before any version exists)."""
        with self._lock:
            self._models.setdefault(name, _Model(name)).removed = False

    def remove_model(self, name: str) -> None:
        """Unload every version of ``name`` (on the loader thread), then forget the model."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                return
            model.removed = True
            model.aspired = {}
            model.labels = {}
        log.info("model %s: removed from the config, unloading all its versions", name)
        self._kick()

    def set_labels(self, name: str, labels: dict[str, int]) -> None:
        """Replace the version labels of ``name`` (the config checked them beforehand)."""
        with self._lock:
            model = self._models.setdefault(name, _Model(name))
            if model.labels != labels:
                log.info("model %s: version labels %s", name,
                         ", ".join(f"{k}->{v}" for k, v in sorted(labels.items())) or "none")
            model.labels = dict(labels)

    def set_aspired_versions(self, name: str, aspired: dict[int, VersionDir]) -> None:
        """Called by the source after each poll; returns at once, the loader thread acts."""
        with self._lock:
            model = self._models.setdefault(name, _Model(name))
            model.aspired = dict(aspired)
        self._kick()

    def _kick(self) -> None:
        """Ask the loader thread for another pass (a new generation for ``wait_until_idle``)."""
        with self._work:
            self._requested += 1
            self._work.notify_all()

    def start(self) -> None:
        self._thread.start()

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until every update given so far has been acted on (loads finished or failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._work:
            target = self._requested
            while self._done < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._work.wait(remaining)
        return True

    def stop(self) -> None:
        """Stop the loader and close every servable (waiting briefly for in-flight requests)."""
        with self._work:
            self._stopping = True
            self._work.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        with self._lock:
            entries = [e for m in self._models.values() for e in m.versions.values()
                       if e.state in (State.AVAILABLE, State.UNLOADING)]
            for e in entries:
                e.state = State.UNLOADING
        for e in entries:
            self._finish_unload(e, wait_s=5.0)
        _release_memory()

    # -- request side --------------------------------------------------------------------------

    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> Handle:
        """Route a ModelSpec to an AVAILABLE version: ``version``, else the version ``label``
        points at, else the latest. NOT_FOUND when that version is not AVAILABLE; INVALID_ARGUMENT
        for a label the model's config does not define."""
        with self._lock:
            version = self._resolve(name, version, label)
            model = self._models.get(name)
            entry: _Version | None = None
            if model is not None:
                if version is None:
                    available = [e for e in model.versions.values() if e.state == State.AVAILABLE]
                    if available:
                        entry = max(available, key=lambda e: e.version)
                else:
                    candidate = model.versions.get(version)
                    if candidate is not None and candidate.state == State.AVAILABLE:
                        entry = candidate
            if entry is None:
                raise not_found(name, version)
            entry.refcount += 1
            return Handle(self, entry)

    def _release(self, entry: _Version) -> None:
        with self._lock:
            entry.refcount -= 1
            if entry.refcount == 0:
                self._released.notify_all()

    def _resolve(self, name: str, version: int | None, label: str | None) -> int | None:
        """The version a (version, label) pair names; the caller holds ``_lock``."""
        if version is not None or not label:
            return version
        model = self._models.get(name)
        if model is None or label not in model.labels:
            # TF Serving answers INVALID_ARGUMENT (not NOT_FOUND) even for an unknown model.
            raise invalid(f"Unrecognized servable version label: {label}")
        return model.labels[label]

    def statuses(self, name: str, version: int | None = None,
                 label: str | None = None) -> list[VersionStatus]:
        """States of all known versions of ``name`` (or just the one ``version`` or ``label``
        names), ascending by version."""
        with self._lock:
            version = self._resolve(name, version, label)
            model = self._models.get(name)
            if model is None or not model.versions:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find any versions of model {name}")
            if version is not None and version not in model.versions:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find version {version} of model {name}")
            entries = [model.versions[version]] if version is not None else [
                model.versions[v] for v in sorted(model.versions)]
            return [
                VersionStatus(e.version, e.state,
                              e.error.code if e.error else grpc.StatusCode.OK,
                              e.error.message if e.error else "")
                for e in entries
            ]

    # -- loader thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._work:
                while self._done >= self._requested and not self._stopping:
                    self._work.wait()
                if self._stopping:
                    return
                generation = self._requested
            with self._lock:
                names = list(self._models)
            for name in names:
                try:
                    self._reconcile(name)
                except Exception:  # a bug here must not kill the loader thread
                    log.exception("model %s: error while applying aspired versions", name)
            with self._work:
                self._done = max(self._done, generation)
                self._work.notify_all()

    def _reconcile(self, name: str) -> None:
        with self._lock:
            model = self._models[name]
            aspired = dict(model.aspired)
        # 1. Load what should be served and is not, newest first.
        for version in sorted(aspired, reverse=True):
            if self._stopping:
                return
            directory = aspired[version]
            with self._lock:
                entry = model.versions.get(version)
                if entry is not None and entry.state in (State.AVAILABLE, State.LOADING):
                    continue
                if model.failed.get(version) == directory.fingerprint:
                    continue  # failed before, directory unchanged: do not retry every poll
                if entry is not None and entry.state == State.UNLOADING:
                    continue  # being unloaded right now; the next poll loads it afresh
                entry = _Version(version, directory)
                model.versions[version] = entry
            self._load(model, entry)
        # 2. Unload what is no longer aspired -- only once something aspired can serve, so that a
        #    failed new version never takes the old one down (unless nothing is on disk at all).
        with self._lock:
            aspired_up = any(
                model.versions[v].state == State.AVAILABLE for v in aspired if v in model.versions
            )
            doomed = [e for v, e in model.versions.items()
                      if v not in aspired and e.state == State.AVAILABLE]
            if doomed and (aspired_up or not aspired):
                for e in doomed:
                    e.state = State.UNLOADING  # out of routing from here on
            else:
                doomed = []
        for e in doomed:
            log.info("model %s version %d: UNLOADING (no longer aspired)", name, e.version)
            self._finish_unload(e, wait_s=None)
        if doomed:
            _release_memory()
        with self._lock:
            if model.removed and all(e.state == State.END for e in model.versions.values()):
                del self._models[name]
                log.info("model %s: all versions unloaded, model removed", name)

    def _load(self, model: _Model, entry: _Version) -> None:
        name, version = model.name, entry.version
        log.info("model %s version %d: LOADING from %s", name, version, entry.directory.path)
        with self._lock:
            entry.state = State.LOADING
        start = time.monotonic()
        try:
            servable = self._load_fn(name, version, entry.directory.path, self._enable_warmup)
        except Exception as e:  # noqa: BLE001 -- any load failure is reported, never raised
            error = e if isinstance(e, ServingError) else ServingError(
                grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}".strip())
            with self._lock:
                entry.state = State.END
                entry.error = error
                model.failed[version] = entry.directory.fingerprint
            log.error("model %s version %d: load FAILED after %.2f s: %s", name, version,
                      time.monotonic() - start, error.message)
            return
        with self._lock:
            entry.servable = servable
            entry.state = State.AVAILABLE
            model.failed.pop(version, None)
        log.info("model %s version %d: AVAILABLE (%.2f s)", name, version, time.monotonic() - start)

    def _finish_unload(self, entry: _Version, wait_s: float | None) -> None:
        """Wait for in-flight requests on an UNLOADING version, then close it -> END."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        with self._lock:
            while entry.refcount > 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    log.warning("version %d: closing with %d request(s) still in flight",
                                entry.version, entry.refcount)
                    break
                self._released.wait(remaining)
            servable, entry.servable = entry.servable, None
        if servable is not None:
            servable.close()
            metrics.MODEL_UNLOAD_COUNT.inc(servable.path)
        with self._lock:
            entry.state = State.END
        log.info("model %s version %d: END (unloaded)",
                 servable.model_name if servable else "?", entry.version)


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def _release_memory() -> None:
    """Give the memory of just-closed servables back to the OS.

    ``gc.collect`` breaks the reference cycles that keep a closed session's graph alive;
    ``malloc_trim(0)`` returns the now-free pages glibc would otherwise keep cached.
    """
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
