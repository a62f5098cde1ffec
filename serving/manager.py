"""Version manager: the lifecycle of every model version, and request routing to loaded versions.

Shape of TF Serving's ``AspiredVersionsManager``: a source says which versions *should* be served
(aspired); a background loader thread makes it so, availability-preserving:

* a new version is loaded and warmed up (START -> LOADING -> AVAILABLE) before any old version
  leaves routing (UNLOADING) -- there is never a moment with nothing to serve;
* an old version is closed (END) only once the requests that hold it have finished (refcount);
* a version that fails to load ends as END with its error; whatever served before keeps serving,
  and the failure is not retried on every poll -- only when its directory changes;
* if the newest version disappears from disk, the next newest becomes aspired again and is loaded
  before the removed one is unloaded (rollback without a gap).

Loads run one at a time on the loader thread so they never run on the request path, and so that
on a small machine one load competes with serving rather than several at once.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from serving.errors import ServingError, not_found
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
            self._models.setdefault(name, _Model(name))

    def set_aspired_versions(self, name: str, aspired: dict[int, VersionDir]) -> None:
        """Called by the source after each poll; returns at once, the loader thread acts."""
        with self._lock:
            model = self._models.setdefault(name, _Model(name))
            changed = model.aspired != aspired
            model.aspired = dict(aspired)
        with self._work:
            self._requested += 1
            if changed:
                log.debug("model %s: aspired versions now %s", name, sorted(aspired))
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

    # -- request side --------------------------------------------------------------------------

    def acquire(self, name: str, version: int | None = None) -> Handle:
        """Route a ModelSpec to an AVAILABLE version: latest if ``version`` is None. NOT_FOUND else."""
        with self._lock:
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

    def statuses(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """States of all known versions of ``name`` (or just ``version``), ascending by version."""
        with self._lock:
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

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

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
            if not doomed or not (aspired_up or not aspired):
                return
            for e in doomed:
                e.state = State.UNLOADING  # out of routing from here on
        for e in doomed:
            log.info("model %s version %d: UNLOADING (no longer aspired)", name, e.version)
            self._finish_unload(e, wait_s=None)

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
        with self._lock:
            entry.state = State.END
        log.info("model %s version %d: END (unloaded)",
                 servable.model_name if servable else "?", entry.version)
