"""Version manager: the lifecycle of every model version, decided once for all worker processes.

Shape of TF Serving's ``AspiredVersionsManager``: a source says which versions *should* be served
(aspired); a background loader thread makes it so, availability-preserving:

* a new version is loaded and warmed up (START -> LOADING -> AVAILABLE) before any old version
  leaves routing (UNLOADING) -- there is never a moment with nothing to serve;
* a load that fails is retried (``max_load_retries`` times, ``load_retry_interval_s`` apart,
  TF Serving's ``--max_num_load_retries`` / ``--load_retry_interval_micros``) while the version
  stays aspired, staying LOADING meanwhile; then it ends as END with its error; whatever served
  before keeps serving, and the failure is not tried again on every poll -- only when its
  directory changes;
* if the newest version disappears from disk, the next newest becomes aspired again and is loaded
  before the removed one is unloaded (rollback without a gap);
* a model removed from the config has all its versions unloaded, then is forgotten (NOT_FOUND);
* version labels (set from the config, checked there) are kept here for status queries and
  published to the workers, which route by them.

The manager runs in the supervisor and loads nothing itself: ``load_fn`` loads a version into
every worker (``serving.workers``) and returns once all of them route it, so AVAILABLE means every
worker serves it; closing what it returned unloads it everywhere, each worker waiting for its own
requests in flight. By default models are reconciled one at a time on the loader thread, so that
on a small machine one load competes with serving rather than several at once;
``load_threads`` > 1 (``--num_load_threads``) reconciles up to that many models at once (each
model's own versions still load in order, newest first).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import grpc

from serving.errors import ServingError
from serving.source import VersionDir
from serving.types import State, VersionStatus, resolve_label

log = logging.getLogger("serving.manager")


class Loaded(Protocol):
    """What ``load_fn`` returns: a version loaded wherever it serves, until ``close``d."""

    def close(self) -> None: ...


# (model name, version, version directory, replay warmup) -> the loaded version
LoadFn = Callable[[str, int, str, bool], Loaded]
LabelsFn = Callable[[str, dict[str, int]], None]


@dataclass
class _Version:
    version: int
    directory: VersionDir
    state: State = State.START
    error: ServingError | None = None
    loaded: Loaded | None = None


@dataclass
class _Model:
    name: str
    aspired: dict[int, VersionDir] = field(default_factory=dict)
    versions: dict[int, _Version] = field(default_factory=dict)
    failed: dict[int, tuple[int, int]] = field(default_factory=dict)  # version -> dir fingerprint
    labels: dict[str, int] = field(default_factory=dict)  # version label -> version
    removed: bool = False  # dropped from the config: forget it once every version has ended


class Manager:
    """Owns all models' versions. Thread-safe; ``start()`` launches the loader thread.

    ``publish_labels`` tells the workers a model's version labels whenever they change. The
    defaults of the load settings are a test's (one attempt); the server passes TF Serving's
    flags.
    """

    def __init__(
        self,
        load_fn: LoadFn,
        enable_warmup: bool = True,
        publish_labels: LabelsFn = lambda name, labels: None,
        *,
        max_load_retries: int = 0,
        load_retry_interval_s: float = 0.0,
        load_threads: int = 1,
    ) -> None:
        self._enable_warmup = enable_warmup
        self._load_fn = load_fn
        self._publish_labels = publish_labels
        self._max_load_retries = max_load_retries
        self._load_retry_interval_s = load_retry_interval_s
        self._pool = (
            ThreadPoolExecutor(load_threads, thread_name_prefix="version-loader")
            if load_threads > 1
            else None
        )
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
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
        self._publish_labels(name, {})
        log.info("model %s: removed from the config, unloading all its versions", name)
        self._kick()

    def set_labels(self, name: str, labels: dict[str, int]) -> None:
        """Replace the version labels of ``name`` (the config checked them beforehand)."""
        with self._lock:
            model = self._models.setdefault(name, _Model(name))
            changed = model.labels != labels
            model.labels = dict(labels)
        if changed:
            log.info(
                "model %s: version labels %s",
                name,
                ", ".join(f"{k}->{v}" for k, v in sorted(labels.items())) or "none",
            )
            self._publish_labels(name, dict(labels))

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
        """Block until every update given so far has been acted on (loads finished or failed),
        or the manager stops."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._work:
            target = self._requested
            while self._done < target and not self._stopping:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._work.wait(remaining)
        return True

    def stop(self) -> None:
        """Stop the loader and unload every version."""
        with self._work:
            self._stopping = True
            self._work.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        with self._lock:
            entries = [
                (m.name, e)
                for m in self._models.values()
                for e in m.versions.values()
                if e.state in (State.AVAILABLE, State.UNLOADING)
            ]
            for _, e in entries:
                e.state = State.UNLOADING
        for name, e in entries:
            self._unload(name, e)

    # -- status --------------------------------------------------------------------------------

    def _resolve(self, name: str, version: int | None, label: str | None) -> int | None:
        """The version a (version, label) pair names; the caller holds ``_lock``."""
        if version is not None or not label:
            return version
        model = self._models.get(name)
        return resolve_label(model.labels if model else None, label)

    def statuses(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[VersionStatus]:
        """States of all known versions of ``name`` (or just the one ``version`` or ``label``
        names), ascending by version."""
        with self._lock:
            version = self._resolve(name, version, label)
            model = self._models.get(name)
            if model is None or not model.versions:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}"
                )
            if version is not None and version not in model.versions:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}"
                )
            entries = (
                [model.versions[version]]
                if version is not None
                else [model.versions[v] for v in sorted(model.versions)]
            )
            return [
                VersionStatus(
                    e.version,
                    e.state,
                    e.error.code if e.error else grpc.StatusCode.OK,
                    e.error.message if e.error else "",
                )
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
            if self._pool is None:
                for name in names:
                    self._reconcile_logging_bugs(name)
            else:  # every model once, up to load_threads at a time, all done before the next pass
                list(self._pool.map(self._reconcile_logging_bugs, names))
            with self._work:
                self._done = max(self._done, generation)
                self._work.notify_all()

    def _reconcile_logging_bugs(self, name: str) -> None:
        try:
            self._reconcile(name)
        except Exception:  # a bug here must not kill the loader thread
            log.exception("model %s: error while applying aspired versions", name)

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
            doomed = [
                e
                for v, e in model.versions.items()
                if v not in aspired and e.state == State.AVAILABLE
            ]
            if doomed and (aspired_up or not aspired):
                for e in doomed:
                    e.state = State.UNLOADING  # out of routing from here on
            else:
                doomed = []
        for e in doomed:
            log.info("model %s version %d: UNLOADING (no longer aspired)", name, e.version)
            self._unload(name, e)
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
        attempt = 0
        while True:
            try:
                loaded = self._load_fn(name, version, entry.directory.path, self._enable_warmup)
                break
            except Exception as e:  # noqa: BLE001 -- any load failure is reported, never raised
                error = (
                    e
                    if isinstance(e, ServingError)
                    else ServingError(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}".strip())
                )
            if attempt >= self._max_load_retries or not self._wait_to_retry(model, entry):
                self._fail(model, entry, error, time.monotonic() - start)
                return
            attempt += 1
            log.warning(
                "model %s version %d: load failed (%s); retry %d of %d",
                name,
                version,
                error.message,
                attempt,
                self._max_load_retries,
            )
        with self._lock:
            entry.loaded = loaded
            entry.state = State.AVAILABLE
            model.failed.pop(version, None)
        log.info("model %s version %d: AVAILABLE (%.2f s)", name, version, time.monotonic() - start)

    def _wait_to_retry(self, model: _Model, entry: _Version) -> bool:
        """Wait the retry interval; False when the load should not be retried: the manager is
        stopping, or the version is no longer aspired from the same directory (TF Serving
        cancels the retries of a version no longer aspired)."""
        deadline = time.monotonic() + self._load_retry_interval_s
        while True:
            with self._lock:
                still_aspired = model.aspired.get(entry.version) == entry.directory
            if self._stopping or model.removed or not still_aspired:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            with self._work:  # woken by any change of aspired versions, or by stop()
                self._work.wait(remaining)

    def _fail(self, model: _Model, entry: _Version, error: ServingError, took_s: float) -> None:
        with self._lock:
            entry.state = State.END
            entry.error = error
            model.failed[entry.version] = entry.directory.fingerprint
        log.error(
            "model %s version %d: load FAILED after %.2f s: %s",
            model.name,
            entry.version,
            took_s,
            error.message,
        )

    def _unload(self, name: str, entry: _Version) -> None:
        """Unload an UNLOADING version everywhere (each worker lets its requests finish) -> END."""
        with self._lock:
            loaded, entry.loaded = entry.loaded, None
        if loaded is not None:
            loaded.close()
        with self._lock:
            entry.state = State.END
        log.info("model %s version %d: END (unloaded)", name, entry.version)
