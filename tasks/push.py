"""push: roll a blessed version out to the model servers in stages, and roll it back on any failure.

Like TFX's Pusher, push copies into the stores the servers poll; a replica in ``mode: store``
(the default) swaps versions itself (loads and warms the new one, then unloads the old), so the
old version serves throughout. Everything else goes through TF Serving's public API
(GetModelStatus, Predict, HandleReloadConfigRequest, the Prometheus page), so the replicas may be
``tensorflow_model_server``.

The replicas (``push.replicas``) change in stages (``push.stages``, e.g. ``[1, all]``: one canary,
then the rest; replicas that share a store change together). Per stage: publish into the stores of
its replicas (copy under a hidden name, then rename), wait until each makes the version AVAILABLE
within ``push.timeout_s``, check that a Predict pinned to it returns the scores validate computed,
then bake: for ``push.bake_s`` compare the stage's live traffic with the replicas still on the old
version (``tasks.rollout_checks``). A failed check, one still inconclusive at
``push.bake_deadline_s``, a replica that stops answering, or any other error rolls back every
replica changed so far: the version is taken out of each of their stores, and each must serve its
previous version again. The task then fails with a message that names the stage, the replica and
the reason.

A replica in ``mode: labels`` runs with ``--model_config_file`` and is rolled out by moving the
version labels of that file's entry for the model (TF Serving's canary pattern, serving_config.md;
``tasks.version_labels`` reads, edits and writes the file, and every change is written first,
then sent whole by ``HandleReloadConfigRequest``, so that a restarted server comes back the
same). Its stage: publish into its store (its ``specific`` policy ignores the new directory);
serve ``{old, new}`` with ``stable`` and ``canary`` on old, which answers once new is AVAILABLE;
``canary`` onto new, whose canary Predict goes through the label; bake; then ``stable`` onto new.
The old version stays loaded (``{old, new}``) after the rollout, so that undoing it -- this
rollout's rollback, the transaction's, ``python -m flows.rollback`` -- only moves labels back,
with no load; the next rollout unloads it. A rollback writes back and sends the file as it was
before the rollout, then withdraws the version directory, and checks that ``stable`` answers
with the old version. Only clients that ask for ``stable`` are isolated from the canary: TF
Serving answers a request that names neither a version nor a label with the newest loaded
version, which is the new one from the stage's start. The bake's live check compares replicas as
in store mode: TF Serving's metrics have no version label, so a labels canary's numbers are its
whole traffic (``stable``, ``canary`` and unlabelled requests together).

In a flow, push runs with ``timeout_seconds=push_timeout_s(cfg)``, a backstop above every bounded
wait; should it fire (Prefect raises it into the task), the rollout rolls back, then lets it
through. No retries (see ``push``).

One rollout at a time per store: push holds an exclusive ``flock`` on each store's lock file
(``.rollout.lock`` in a directory store; for an S3 store a file in this host's temporary directory,
so one per host) for the whole rollout (waiting up to ``push.timeout_s`` for another run's), and
pushes nothing when the first replica no longer serves the version the gate compared with (another
run's rollout came between): the verdict is about another baseline. A publish that fails, a full
disk among others (``tasks.staging.DiskFull``), leaves nothing in the store.

``push`` returns a ``RolloutReport`` (per replica: stage, previous version, outcome, seconds to
AVAILABLE; and the timeline); a ``PushError`` carries the same report of a rolled-back rollout.
Inside a Prefect transaction, the push task's ``on_rollback`` hook takes the version out of every
store again when a later step fails (``tasks.champion.promote``).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import grpc
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from serving.api_client import RPC_TIMEOUT_S, ModelServer, wait_for_available
from tasks.config import ALL, PushConfig, ReplicaConfig
from tasks.export import ExportResult
from tasks.logs import logger
from tasks.model_store import ModelStore, VersionExists, model_store
from tasks.rollout_checks import Traffic, judge, read_traffic
from tasks.validate import Verdict, canary_mismatch
from tasks.version_labels import (
    CANARY,
    STABLE,
    LabelsError,
    ModelServerConfig,
    entry_of,
    labelled,
    read_config,
    stable_version,
    write_config,
)

POLL_INTERVAL_S = 0.2
BAKE_POLL_S = 0.5
# The bounded waits of one replica's part in a rollout: answering before it, the version AVAILABLE
# (a labels replica: a reload), its canary (labels: a reload), its promotion (labels: a reload).
WAITS_PER_REPLICA = 4
PROBE_IMAGE = np.zeros(784, np.float32)  # what a label's version is read with (any image does)
LOCK_FILE = ".rollout.lock"

Outcome = Literal["promoted", "rolled_back", "unverified", "untouched"]


@dataclass(frozen=True)
class RolloutEvent:
    seconds: float  # since the rollout began
    replica: str
    event: str


@dataclass(frozen=True)
class ReplicaOutcome:
    name: str
    address: str
    stage: int | None  # 1-based; None: the rollout stopped before its stage
    previous_version: int | None  # what it served before the rollout
    # promoted: serves the version; rolled_back: serves previous_version again; unverified:
    # withdrawn from its store, but it did not confirm (it stopped answering); untouched.
    outcome: Outcome
    seconds_to_available: float | None  # from the publish into its store


@dataclass(frozen=True)
class RolloutReport:
    model_name: str
    version: int
    replicas: tuple[ReplicaOutcome, ...]
    timeline: tuple[RolloutEvent, ...]

    @property
    def seconds_to_available(self) -> dict[str, float]:
        """Per replica name, for those that made the version AVAILABLE."""
        return {
            r.name: r.seconds_to_available
            for r in self.replicas
            if r.seconds_to_available is not None
        }


class PushError(RuntimeError):
    """The version could not be published or a replica did not serve it correctly; rolled back.
    ``report`` says what happened on each replica (None: refused before anything changed)."""

    def __init__(self, message: str, report: RolloutReport | None = None):
        super().__init__(message)
        self.report = report


@contextmanager
def rollout_lock(stores: list[ModelStore], timeout_s: float) -> Iterator[None]:
    """One rollout at a time into each of ``stores``: an exclusive ``flock`` on each store's
    lock file (``ModelStore.lock_path``), taken in path order (two rollouts over overlapping stores
    cannot deadlock), waited for up to ``timeout_s``. The kernel drops it when its process dies,
    even by SIGKILL."""
    deadline = time.monotonic() + timeout_s
    with ExitStack() as held:
        for store in sorted(stores, key=str):
            path = store.lock_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = held.enter_context(path.open("a+"))
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        lock.seek(0)
                        raise PushError(
                            f"another rollout into {store} still runs after push.timeout_s="
                            f"{timeout_s:g} s (holder: {lock.read().strip() or 'unknown'}): "
                            "nothing pushed"
                        ) from None
                    time.sleep(POLL_INTERVAL_S)
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
        yield


def stores_of(replicas: list[ReplicaConfig], model_name: str) -> list[ModelStore]:
    """The distinct stores the replicas serve from, in the order of the replicas."""
    bases = dict.fromkeys(replica.model_base_path for replica in replicas)
    return [model_store(base, model_name) for base in bases]


def wait_until_available(server: ModelServer, version: int, timeout_s: float) -> None:
    def status():
        return {status.version: status for status in server.version_statuses()}.get(version)

    problem = wait_for_available(status, timeout_s, POLL_INTERVAL_S)
    if problem is not None:
        raise PushError(f"{server.address} version {version}: {problem} (push.timeout_s)")


def wait_until_serving(server: ModelServer, version: int | None, timeout_s: float) -> None:
    """Until unpinned requests go to ``version`` (None: to no version at all)."""
    deadline = time.monotonic() + timeout_s
    while True:
        serving = server.serving_version()  # raises when the server does not answer
        if serving == version:
            return
        if time.monotonic() >= deadline:
            raise PushError(
                f"{server.address} serves version {serving}, not {version}, after "
                f"push.timeout_s={timeout_s:g} s"
            )
        time.sleep(POLL_INTERVAL_S)


def serving_before(server: ModelServer, timeout_s: float) -> int | None:
    """The version a replica serves before the rollout; it must answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return server.serving_version()
        except Exception as error:
            if time.monotonic() >= deadline:
                raise PushError(
                    f"{server.address} did not answer GetModelStatus within "
                    f"push.timeout_s={timeout_s:g} s ({error.__class__.__name__}): nothing pushed"
                ) from error
        time.sleep(POLL_INTERVAL_S)


def check_canary(
    server: ModelServer, verdict: Verdict, version: int | None = None, label: str | None = None
) -> None:
    """The scores of the version pinned by number or by label are validate's."""
    scores = server.predict_scores(verdict.canary_images, version=version, label=label)
    mismatch = canary_mismatch(scores, verdict)
    if mismatch is not None:
        pinned = f"version {version}" if label is None else f"label {label}"
        raise PushError(f"{server.address} {pinned} answers the canary images with {mismatch}")


def check_label(server: ModelServer, label: str, version: int) -> None:
    answered = server.version_behind(label, PROBE_IMAGE)
    if answered != version:
        raise PushError(f"{server.address} label {label} answers version {answered}, not {version}")


def move_stable(replica: ReplicaConfig, model_name: str, version: int, timeout_s: float) -> None:
    """A labels replica's ``stable`` and ``canary`` onto ``version``, which then serves alone
    (the rollback command). A label moves only onto an AVAILABLE version: one not loaded is
    first loaded next to the others, as TF Serving's docs prescribe."""
    path = replica.model_config_file
    config = read_config(path)
    stable_version(config, model_name, path)  # a config push can move (LabelsError otherwise)
    with ModelServer(replica.grpc, model_name) as server:
        loaded = {s.version for s in server.version_statuses() if s.state == "AVAILABLE"}
        if version not in loaded:
            entry = entry_of(config, model_name)
            served = set(entry.model_version_policy.specific.versions) | {version}
            config = labelled(config, model_name, served, dict(entry.version_labels))
            write_config(path, config)
            server.reload_config(config, timeout_s)
            wait_until_available(server, version, timeout_s)
        config = labelled(config, model_name, {version}, {STABLE: version, CANARY: version})
        write_config(path, config)
        server.reload_config(config, timeout_s)
        check_label(server, STABLE, version)


def plan_stages(
    replicas: list[ReplicaConfig], stages: list[int | str]
) -> list[list[ReplicaConfig]]:
    """The replicas each stage changes, in config order; a replica brings along every replica that
    polls its store (they swap together); stages with nothing left to change are dropped."""
    remaining, planned, changed = list(replicas), [], 0
    for stage in stages:
        target = len(replicas) if stage == ALL else min(int(stage), len(replicas))
        group: list[ReplicaConfig] = []
        while changed + len(group) < target:
            store = remaining[0].model_base_path
            group += [r for r in remaining if r.model_base_path == store]
            remaining = [r for r in remaining if r.model_base_path != store]
        if group:
            planned.append(group)
            changed += len(group)
    return planned


def describe(error: Exception) -> str:
    """One line for a failed call (a gRPC error's own text spans lines)."""
    if isinstance(error, grpc.RpcError):
        return f"gRPC {error.code().name}"
    if isinstance(error, PushError):
        return str(error)
    return f"{error.__class__.__name__}: {error}"


class Rollout:
    """One rollout's state: what changed where, and the timeline; ``roll_back`` undoes it."""

    def __init__(self, export: ExportResult, cfg: PushConfig):
        self.export, self.cfg = export, cfg
        self.version = export.version
        self.plan = plan_stages(cfg.replicas, cfg.stages)
        self.started = time.monotonic()
        self.timeline: list[RolloutEvent] = []
        self.outcomes = {
            r.name: ReplicaOutcome(r.name, r.grpc, None, None, "untouched", None)
            for r in cfg.replicas
        }
        self.published: dict[str, tuple[ModelStore, float]] = {}  # base path -> (store, when)
        self.stopped: set[str] = set()
        self.configs: dict[str, ModelServerConfig] = {}  # labels replica -> its config before

    def server(self, replica: ReplicaConfig) -> ModelServer:
        return ModelServer(replica.grpc, self.export.model_name)

    def note(self, replica: str, event: str) -> None:
        self.timeline.append(RolloutEvent(time.monotonic() - self.started, replica, event))
        logger().info("%s: %s", replica, event)

    def set(self, replica: str, **changes: object) -> None:
        self.outcomes[replica] = replace(self.outcomes[replica], **changes)

    def report(self) -> RolloutReport:
        return RolloutReport(
            self.export.model_name,
            self.version,
            tuple(self.outcomes.values()),
            tuple(self.timeline),
        )

    def run(self, verdict: Verdict) -> RolloutReport:
        for replica in self.cfg.replicas:
            self.set(replica.name, previous_version=self.previous(replica))
        self.check_baseline(verdict)
        for number, group in enumerate(self.plan, start=1):
            try:
                self.stage(number, group, verdict)
            except Exception as error:
                raise self.failed(number, error) from error
            except BaseException:  # the task's timeout (Prefect raises it in here), Ctrl-C
                self.roll_back(f"stage {number} interrupted")
                raise
        for replica in self.cfg.replicas:
            self.set(replica.name, outcome="promoted")
        return self.report()

    def check_baseline(self, verdict: Verdict) -> None:
        """The gate compared the candidate with what the first replica served at validate time; if
        another rollout changed that since, the verdict is about another baseline: push nothing."""
        first = self.cfg.replicas[0]
        serving = self.outcomes[first.name].previous_version
        if serving != verdict.baseline_version:
            raise PushError(
                f"refusing to push {self.export.model_name} version {self.version}: the gate "
                f"compared it with version {verdict.baseline_version}, but {first.name} serves "
                f"{serving} now (another rollout since): nothing pushed, validate it again"
            )

    def previous(self, replica: ReplicaConfig) -> int | None:
        """What the replica serves before the rollout: its newest version, or what its label
        ``stable`` names (the config file says so, and the server agrees)."""
        if replica.mode == "labels":
            try:
                config = read_config(replica.model_config_file)
                stable = stable_version(config, self.export.model_name, replica.model_config_file)
            except LabelsError as error:
                raise PushError(f"replica {replica.name}: {error}: nothing pushed") from None
        with self.server(replica) as server:
            serving = serving_before(server, self.cfg.timeout_s)
            if replica.mode == "store":
                return serving
            try:
                check_label(server, STABLE, stable)
            except (PushError, grpc.RpcError) as error:
                raise PushError(
                    f"replica {replica.name}: {describe(error)} ({replica.model_config_file} "
                    f"puts {STABLE} on version {stable}): nothing pushed"
                ) from error
        self.configs[replica.name] = config
        return stable

    def relabel(self, replica: ReplicaConfig, versions: set[int], labels: dict[str, int]) -> None:
        """The replica's config file with this model serving ``versions`` under ``labels``,
        written, then sent (HandleReloadConfigRequest); the labels must name AVAILABLE versions."""
        config = labelled(self.configs[replica.name], self.export.model_name, versions, labels)
        write_config(replica.model_config_file, config)
        with self.server(replica) as server:
            server.reload_config(config, self.cfg.timeout_s)

    def stage(self, number: int, group: list[ReplicaConfig], verdict: Verdict) -> None:
        for replica in group:
            self.set(replica.name, stage=number)
            if replica.model_base_path not in self.published:
                store = model_store(replica.model_base_path, self.export.model_name)
                try:
                    store.publish(self.export.path, self.version)
                except VersionExists as error:
                    raise PushError(str(error)) from error
                self.published[replica.model_base_path] = (store, time.monotonic())
            self.note(replica.name, f"stage {number}: version {self.version} published")
        for replica in group:
            try:
                self.serves_new(replica, verdict)
            except Exception as error:
                raise PushError(f"replica {replica.name}: {describe(error)}") from error
        old = [r for r in self.cfg.replicas if self.outcomes[r.name].stage is None]
        self.bake(group, old)
        for replica in group:
            if replica.mode == "labels":
                self.promote_label(replica)

    def serves_new(self, replica: ReplicaConfig, verdict: Verdict) -> None:
        """Store: the server loads the version by itself. Labels: loaded next to the old one by
        a reload (TF Serving answers it at once for a model it serves: AVAILABLE is waited for
        here, in both modes), then labelled ``canary``; the canary Predict goes through it."""
        old, new = self.outcomes[replica.name].previous_version, self.version
        if replica.mode == "labels":
            self.relabel(replica, {old, new}, {STABLE: old, CANARY: old})
        with self.server(replica) as server:
            wait_until_available(server, new, self.cfg.timeout_s)
            seconds = time.monotonic() - self.published[replica.model_base_path][1]
            self.set(replica.name, seconds_to_available=seconds)
            if replica.mode == "labels":
                self.relabel(replica, {old, new}, {STABLE: old, CANARY: new})
                check_label(server, CANARY, new)
                check_canary(server, verdict, label=CANARY)
            else:
                check_canary(server, verdict, version=new)
        through = f" (through label {CANARY})" if replica.mode == "labels" else ""
        self.note(replica.name, f"AVAILABLE after {seconds:.1f} s, canary Predict matches{through}")

    def promote_label(self, replica: ReplicaConfig) -> None:
        """``stable`` onto the new version; the old one stays loaded, so that a rollback (this
        rollout's, its transaction's) only moves labels; the next rollout unloads it."""
        old, new = self.outcomes[replica.name].previous_version, self.version
        self.relabel(replica, {old, new}, {STABLE: new, CANARY: new})
        with self.server(replica) as server:
            check_label(server, STABLE, new)
        self.note(replica.name, f"{STABLE} moved to version {new} (version {old} stays loaded)")

    def scrape(self, replica: ReplicaConfig) -> Traffic:
        try:
            with urllib.request.urlopen(replica.metrics_url, timeout=10) as page:
                return read_traffic(page.read().decode(), self.export.model_name)
        except urllib.error.HTTPError as error:  # it answers, but has no metrics page there
            raise PushError(
                f"replica {replica.name}: {replica.metrics_url} answers HTTP {error.code} "
                "(a server started without --monitoring_config_file answers 404)"
            ) from error
        except OSError as error:
            self.stopped.add(replica.name)
            raise PushError(
                f"replica {replica.name} ({replica.grpc}) stopped answering at "
                f"{replica.metrics_url}: {describe(error)}"
            ) from error

    def bake(self, canaries: list[ReplicaConfig], old: list[ReplicaConfig]) -> None:
        if self.cfg.bake_s == 0:
            return
        watched = canaries + old
        before = {r.name: self.scrape(r) for r in watched}
        began = time.monotonic()
        while True:
            time.sleep(BAKE_POLL_S)
            since = {r.name: self.scrape(r).since(before[r.name]) for r in watched}
            canary = sum((since[r.name] for r in canaries), Traffic())
            baseline = sum((since[r.name] for r in old), Traffic()) if old else None
            check = judge(canary, baseline, self.cfg)
            elapsed = time.monotonic() - began
            if check.state == "failed":
                raise PushError(f"live check failed after {elapsed:.1f} s: {check.reason}")
            if elapsed >= self.cfg.bake_s and check.state == "passed":
                for replica in canaries:
                    self.note(replica.name, f"baked {elapsed:.1f} s: {check.reason}")
                return
            if elapsed >= self.cfg.bake_deadline_s:
                raise PushError(
                    f"live check still inconclusive at push.bake_deadline_s="
                    f"{self.cfg.bake_deadline_s:g}: {check.reason}"
                )

    def failed(self, number: int, error: Exception) -> PushError:
        """Roll back, and the error that says where, why and what was undone."""
        names = [r.name for r in self.plan[number - 1]]
        undone = self.roll_back(f"stage {number} failed")
        return PushError(
            f"rollout of {self.export.model_name} version {self.version} failed at stage "
            f"{number} of {len(self.plan)} ({', '.join(names)}): {error}; rolled back: {undone}",
            self.report(),
        )

    def roll_back(self, why: str) -> str:
        """Put back the config file of every changed labels replica (its labels back on the old
        version before that version's directory goes), withdraw the version from every store it
        was published into, and confirm that each changed replica serves its previous version
        again. Returns what happened, per replica."""
        changed = [r for r in self.cfg.replicas if self.outcomes[r.name].stage is not None]
        refused = {r.name: self.put_config_back(r) for r in changed if r.mode == "labels"}
        for store, _ in self.published.values():
            store.withdraw(self.version)
        results = []
        for replica in changed:
            result = self.restore(replica, refused.get(replica.name))
            self.note(replica.name, f"{why}: {result}")
            results.append(f"{replica.name} {result}")
        return "; ".join(results) or "nothing had changed"

    def put_config_back(self, replica: ReplicaConfig) -> str | None:
        """The config file as it was, and sent to the server (one reload: the old version is
        still loaded, so the labels may move onto it). None, or why the server did not take it;
        a server that stopped answering reads the file when it starts again."""
        original = self.configs[replica.name]
        write_config(replica.model_config_file, original)
        if replica.name in self.stopped:
            return None
        try:
            with self.server(replica) as server:
                server.reload_config(original, self.cfg.timeout_s)
        except Exception as error:
            return describe(error)
        return None

    def restore(self, replica: ReplicaConfig, refused: str | None) -> str:
        previous = self.outcomes[replica.name].previous_version
        problem = "it stopped answering" if replica.name in self.stopped else refused
        if problem is None:
            try:
                with self.server(replica) as server:
                    if replica.mode == "labels":
                        check_label(server, STABLE, previous)
                    else:
                        wait_until_serving(server, previous, self.cfg.timeout_s)
            except Exception as error:
                problem = describe(error)
        if problem is not None:
            self.set(replica.name, outcome="unverified")
            return f"withdrawn, not verified: {problem}"
        self.set(replica.name, outcome="rolled_back")
        if replica.mode == "labels":
            return f"{STABLE} on version {previous} again, config file restored"
        return f"serves version {previous} again" if previous else "serves no version again"


def push_timeout_s(cfg: PushConfig) -> float:
    """The push task's timeout (``push.with_options(timeout_seconds=...)``): every wait of the
    rollout at its bound, and each stage's bake deadline. Each wait fails first, with a better
    message; this is the backstop for one that has no bound of its own (a copy into a hung
    store). The rollback that follows a timeout runs after it, bounded by its own waits."""
    per_wait = max(cfg.timeout_s, RPC_TIMEOUT_S)
    return len(cfg.replicas) * WAITS_PER_REPLICA * per_wait + len(cfg.stages) * cfg.bake_deadline_s


# No retries: a replica that does not answer yet is waited for (push.timeout_s) before anything
# changes, and a rollout that failed later was rolled back for a reason a rerun would not remove.
@task(cache_policy=NO_CACHE)
def push(export: ExportResult, verdict: Verdict, cfg: PushConfig) -> RolloutReport:
    if not verdict.passed:
        raise PushError(
            f"refusing to push {export.model_name} version {export.version}: "
            f"the gate failed: {verdict.reason}"
        )
    rollout = Rollout(export, cfg)
    transaction = get_transaction()
    if transaction is not None:  # for the on_rollback hook
        transaction.set("rollout", rollout)
    with rollout_lock(stores_of(cfg.replicas, export.model_name), cfg.timeout_s):
        return rollout.run(verdict)


@push.on_rollback
def _withdraw_everywhere(transaction: Transaction) -> None:
    """A step after the push failed: every replica goes back to what it served before."""
    rollout: Rollout = transaction.get("rollout")
    stores = stores_of(rollout.cfg.replicas, rollout.export.model_name)
    with rollout_lock(stores, rollout.cfg.timeout_s):
        undone = rollout.roll_back("transaction rolled back")
    logger().warning(
        "rolled back %s version %d: %s", rollout.export.model_name, rollout.version, undone
    )
