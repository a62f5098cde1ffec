"""The served model list: TF Serving's ``ModelServerConfig`` parsed, checked and applied.

One path for every way the list can change -- single-model flags, ``--model_config_file`` at
startup, re-reads of that file every ``--model_config_file_poll_wait_seconds``, and the
``ModelService/HandleReloadConfigRequest`` RPC:

1. ``model_configs`` turns the proto into ``ModelConfig`` values and rejects a malformed list
   (INVALID_ARGUMENT) before anything changes;
2. ``ModelConfigController`` checks the version labels against what is loaded (FAILED_PRECONDITION,
   as TF Serving: "Request to assign label to version ..."), again before anything changes;
3. it applies exactly the new list: one ``StoragePathSource`` per model, models left out are removed
   from the manager (unloaded, then NOT_FOUND), new and changed ones get their aspired versions;
4. a reload then waits -- bounded, unlike TF Serving, which hangs forever when a load fails -- until
   the manager has acted and reports every version of the new list that failed to load.

The proto modules of ``tensorflow_serving.config`` do not import TensorFlow, so a bad config file is
reported in well under a second.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field

import grpc
from tensorflow_serving.config import model_server_config_pb2

from serving import textproto
from serving.errors import ServingError, invalid
from serving.manager import Manager
from serving.object_store import VersionCache, is_s3
from serving.source import DEFAULT_POLICY, StoragePathSource, VersionPolicy
from serving.types import State

log = logging.getLogger("serving.model_config")

ModelServerConfig = model_server_config_pb2.ModelServerConfig

SUPPORTED_PLATFORMS = ("", "tensorflow")  # empty: TF Serving's default platform


@dataclass(frozen=True)
class ModelConfig:
    """One ``model_config_list.config`` entry, validated."""

    name: str
    base_path: str
    policy: VersionPolicy = DEFAULT_POLICY
    labels: dict[str, int] = field(default_factory=dict)


def single_model(name: str, base_path: str) -> list[ModelConfig]:
    """The list that ``--model_name``/``--model_base_path`` stand for."""
    return [ModelConfig(name, base_path)]


def read_file(path: str) -> ModelServerConfig:
    """Read, parse and validate ``--model_config_file``; INVALID_ARGUMENT naming the flag, the file
    and the problem (unreadable, not a text-format ModelServerConfig, an invalid model list)."""
    try:
        config = textproto.read(path, ModelServerConfig())
    except ValueError as e:
        raise invalid(f"--model_config_file: {e}") from None
    try:
        model_configs(config)
    except ServingError as e:
        raise invalid(f"--model_config_file: {path}: {e.message}") from None
    return config


def model_configs(config: ModelServerConfig) -> list[ModelConfig] | None:
    """The validated model list, or None when ``config`` sets no list (TF Serving takes no action
    then). INVALID_ARGUMENT naming the model and the problem otherwise."""
    which = config.WhichOneof("config")
    if which is None:
        return None
    if which != "model_config_list":
        raise invalid(f"{which} is not supported (only model_config_list)")
    result: list[ModelConfig] = []
    seen: set[str] = set()
    for entry in config.model_config_list.config:
        name = entry.name
        if not name or "/" in name or ":" in name:
            raise invalid(f"invalid model name {name!r} in model_config_list")
        if name in seen:
            raise invalid(f"model {name} is configured more than once")
        seen.add(name)
        if not entry.base_path:
            raise invalid(f"model {name}: base_path is empty")
        if entry.model_platform not in SUPPORTED_PLATFORMS:
            raise invalid(
                f"model {name}: unsupported model_platform {entry.model_platform!r} "
                f"(only 'tensorflow')"
            )
        for label, version in entry.version_labels.items():
            if not label or version <= 0:
                raise invalid(f"model {name}: invalid version label {label!r} -> {version}")
        result.append(
            ModelConfig(name, entry.base_path, _policy(name, entry), dict(entry.version_labels))
        )
    return result


def _policy(name: str, entry: model_server_config_pb2.ModelConfig) -> VersionPolicy:
    policy = entry.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy("all")
    if which == "specific":
        versions = frozenset(policy.specific.versions)
        if not versions or min(versions) <= 0:
            raise invalid(f"model {name}: specific version policy needs positive versions")
        return VersionPolicy("specific", versions=versions)
    # latest{} without num_versions (0) means TF Serving's default: 1.
    return VersionPolicy("latest", num_versions=policy.latest.num_versions or 1)


class ModelConfigController:
    """Owns the sources of the configured models and applies new model lists to the manager.

    Thread-safe: reloads (RPC, file poll) and the model list are serialised by one lock. A
    source's polls run outside it, one at a time under the source's own lock: polling an
    ``s3://`` base path downloads versions, which must not hold up a reload.
    """

    def __init__(
        self,
        manager: Manager,
        allow_labels_for_unavailable: bool = False,
        poll_filesystem: bool = True,
    ) -> None:
        self._manager = manager
        self._allow_unavailable = allow_labels_for_unavailable
        self._poll_filesystem = poll_filesystem  # False: --file_system_poll_wait_seconds < 0
        self._lock = threading.Lock()
        self._sources: dict[str, StoragePathSource] = {}
        self._configs: dict[str, ModelConfig] = {}
        self._cache: VersionCache | None = None  # for s3:// base paths, made on first use

    def close(self) -> None:
        """Delete the local copies of remote versions (loaded versions no longer need them)."""
        if self._cache is not None:
            shutil.rmtree(self._cache.root, ignore_errors=True)

    def start(self, configs: list[ModelConfig]) -> None:
        """Startup: load the first list fully, then check and set its labels.

        Unlike a reload, labels are checked after the loads, so that a label may point at a
        version loaded at startup. FAILED_PRECONDITION when one does not; the server exits then.
        """
        with self._lock:
            added = self._apply(configs, with_labels=False)
        self._poll(added)
        self._manager.wait_until_idle()
        with self._lock:
            self._check_labels(configs)
            for config in configs:
                self._manager.set_labels(config.name, config.labels)
                self._configs[config.name] = config

    def reload(self, config: ModelServerConfig, timeout_s: float) -> None:
        """Apply ``config``; return once its versions are AVAILABLE, raise ServingError otherwise.

        INVALID_ARGUMENT / FAILED_PRECONDITION: the list was refused and nothing changed.
        DEADLINE_EXCEEDED: loads still running after ``timeout_s`` (they go on in the background).
        Else the first failed load's code, with every failed model version in the message.
        """
        configs = model_configs(config)
        if configs is None:
            log.info("model config sets no model list: taking no action")
            return
        with self._lock:
            self._check_labels(configs)
            added = self._apply(configs, with_labels=True)
        self._poll(added)
        if not self._manager.wait_until_idle(timeout_s):
            raise ServingError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"models still loading after {timeout_s:.0f} s: "
                + ", ".join(c.name for c in configs),
            )
        self._raise_load_failures(configs)

    def poll_sources(self) -> None:
        """One filesystem poll of every configured model (``--file_system_poll_wait_seconds``)."""
        with self._lock:
            sources = dict(self._sources)
        self._poll(sources)

    def _poll(self, sources: dict[str, StoragePathSource]) -> None:
        """Poll ``sources`` and give the manager their aspired versions, but not a source that a
        reload replaced or removed meanwhile."""
        for name, source in sources.items():
            with source.polling:  # taken before _lock: its answer is given before its next poll
                aspired = source.poll()
                with self._lock:
                    if self._sources.get(name) is source:
                        self._manager.set_aspired_versions(name, aspired)

    # -- internals (callers hold _lock) --------------------------------------------------------

    def _apply(self, configs: list[ModelConfig], with_labels: bool) -> dict[str, StoragePathSource]:
        """Make the model list ``configs``; returns the new sources, for the caller to poll
        (unless the filesystem is never polled) once it has released _lock."""
        new, added = {c.name: c for c in configs}, {}
        for name in [n for n in self._sources if n not in new]:
            del self._sources[name]
            self._configs.pop(name, None)
            self._manager.remove_model(name)
        for config in configs:
            if self._configs.get(config.name) == config:
                continue
            verb = "updated" if config.name in self._sources else "added"
            log.info(
                "model %s: %s (base path %s, policy %s)",
                config.name,
                verb,
                config.base_path,
                config.policy,
            )
            if is_s3(config.base_path) and self._cache is None:
                self._cache = VersionCache.temporary()
            source = StoragePathSource(config.name, config.base_path, config.policy, self._cache)
            self._sources[config.name] = source
            self._manager.add_model(config.name)
            if with_labels:
                self._manager.set_labels(config.name, config.labels)
                self._configs[config.name] = config
            if self._poll_filesystem:
                added[config.name] = source
        return added

    def _check_labels(self, configs: list[ModelConfig]) -> None:
        """FAILED_PRECONDITION unless every label points at an AVAILABLE version.

        With ``--allow_version_labels_for_unavailable_models`` a *new* label may point anywhere,
        but moving an existing label still needs an AVAILABLE target (TF Serving's rule: a label
        in use must never route to a version that cannot serve).
        """
        for config in configs:
            available = self._available(config.name)
            current = self._configs.get(config.name)
            for label, version in sorted(config.labels.items()):
                if version in available:
                    continue
                moved = current is not None and current.labels.get(label, version) != version
                if self._allow_unavailable and not moved:
                    continue
                raise ServingError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Request to assign label {label} to version {version} of model "
                    f"{config.name}, which is not currently available for inference",
                )

    def _available(self, name: str) -> set[int]:
        try:
            return {s.version for s in self._manager.statuses(name) if s.state == State.AVAILABLE}
        except ServingError:  # model unknown or without versions yet
            return set()

    def _raise_load_failures(self, configs: list[ModelConfig]) -> None:
        failures: list[ServingError] = []
        for config in configs:
            with self._lock:
                source = self._sources.get(config.name)
            if source is None:
                continue  # replaced by a later reload meanwhile
            aspired = set(source.last_aspired)
            try:
                statuses = self._manager.statuses(config.name)
            except ServingError:
                continue
            for s in statuses:
                if s.version in aspired and s.state == State.END and s.error_message:
                    failures.append(
                        ServingError(
                            s.error_code,
                            f"model {config.name} version {s.version} failed to load: "
                            f"{s.error_message}",
                        )
                    )
        if failures:
            raise ServingError(failures[0].code, "; ".join(f.message for f in failures))


class ConfigFileWatcher:
    """Re-reads ``--model_config_file``; a bad or refused file is logged, the current list kept.

    Each distinct content is tried once: a refused file is reported once, not on every poll.
    """

    def __init__(
        self,
        path: str,
        controller: ModelConfigController,
        applied: ModelServerConfig,
        timeout_s: float,
    ) -> None:
        self.path = path
        self._controller = controller
        self._last = applied
        self._last_error = ""
        self._timeout_s = timeout_s

    def poll(self) -> None:
        try:
            config = read_file(self.path)
        except ServingError as e:
            if e.message != self._last_error:
                log.error("%s; keeping the current models", e.message)
            self._last_error = e.message
            return
        self._last_error = ""
        if config == self._last:
            return
        self._last = config
        log.info("model config file %s changed: reloading", self.path)
        start = time.monotonic()
        try:
            self._controller.reload(config, self._timeout_s)
        except ServingError as e:
            log.error(
                "model config file %s: reload failed: %s: %s", self.path, e.code.name, e.message
            )
            return
        log.info("model config file %s applied (%.2f s)", self.path, time.monotonic() - start)
