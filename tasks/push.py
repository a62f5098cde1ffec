"""push: roll a blessed version out to the model servers in stages, and roll it back on any failure.

Like TFX's Pusher, push only copies into the stores the servers poll; each server swaps versions
itself (loads and warms the new one, then unloads the old), so the old version serves throughout.
Everything else goes through TF Serving's public API (GetModelStatus, Predict, the Prometheus
page), so the replicas may be ``tensorflow_model_server``.

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

One rollout at a time per store: push holds an exclusive ``flock`` on each store's
``.rollout.lock`` for the whole rollout (waiting up to ``push.timeout_s`` for another run's), and
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
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import grpc
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from serving.api_client import ModelServer, wait_for_available
from tasks.config import ALL, PushConfig, ReplicaConfig
from tasks.export import ExportResult
from tasks.logs import logger
from tasks.rollout_checks import Traffic, judge, read_traffic
from tasks.staging import PUBLISH, WITHDRAW, DiskFull, disk_full, staging_path, sweep
from tasks.validate import Verdict, canary_mismatch

POLL_INTERVAL_S = 0.2
BAKE_POLL_S = 0.5
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


def publish(export: ExportResult, model_base_path: Path) -> Path:
    """Copy the version into the store under a hidden name, then rename: servers never see it
    half-copied. A failed copy (a full disk among others) leaves nothing behind."""
    store = model_base_path / export.model_name
    store.mkdir(parents=True, exist_ok=True)
    sweep(store)
    target = store / str(export.version)
    if target.exists():
        raise PushError(f"{target} already exists: version {export.version} was pushed before")
    staging = staging_path(store, PUBLISH, export.version)
    try:
        shutil.copytree(export.path, staging, copy_function=_copy_or_disk_full)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only there when the copy or rename failed
    return target


def _copy_or_disk_full(source: str, destination: str) -> None:
    try:
        shutil.copy2(source, destination)
    except OSError as error:
        if disk_full(error):
            raise DiskFull(Path(destination).parent, error) from error
        raise


def withdraw(target: Path) -> None:
    """Take a version out of the store atomically (rename away first), then delete it."""
    if target.exists():
        trash = staging_path(target.parent, WITHDRAW, target.name)
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def rollout_lock(stores: list[Path], timeout_s: float) -> Iterator[None]:
    """One rollout at a time into each of ``stores``: an exclusive ``flock`` on each store's
    ``.rollout.lock``, taken in path order (two rollouts over overlapping stores cannot deadlock),
    waited for up to ``timeout_s``. The kernel drops it when its process dies, even by SIGKILL."""
    deadline = time.monotonic() + timeout_s
    with ExitStack() as held:
        for store in sorted(set(stores)):
            store.mkdir(parents=True, exist_ok=True)
            lock = held.enter_context((store / LOCK_FILE).open("a+"))
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


def stores_of(export: ExportResult, cfg: PushConfig) -> list[Path]:
    return [replica.model_base_path / export.model_name for replica in cfg.replicas]


def check_baseline(export: ExportResult, verdict: Verdict, cfg: PushConfig) -> None:
    """The gate compared the candidate with what the first replica served at validate time; if
    another rollout changed that since, the verdict is about another baseline: push nothing."""
    with ModelServer(cfg.replicas[0].grpc, export.model_name) as server:
        serving = serving_before(server, cfg.timeout_s)
    if serving != verdict.baseline_version:
        raise PushError(
            f"refusing to push {export.model_name} version {export.version}: the gate compared it "
            f"with version {verdict.baseline_version}, but {cfg.replicas[0].name} serves "
            f"{serving} now (another rollout since): nothing pushed, validate it again"
        )


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


def check_canary(server: ModelServer, version: int, verdict: Verdict) -> None:
    mismatch = canary_mismatch(
        server.predict_scores(verdict.canary_images, version=version), verdict
    )
    if mismatch is not None:
        raise PushError(
            f"{server.address} version {version} answers the canary images with {mismatch}"
        )


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
        self.published: dict[Path, tuple[Path, float]] = {}  # store -> (version dir, when)
        self.stopped: set[str] = set()

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
            with self.server(replica) as server:
                previous = serving_before(server, self.cfg.timeout_s)
            self.set(replica.name, previous_version=previous)
        for number, group in enumerate(self.plan, start=1):
            try:
                self.stage(number, group, verdict)
            except Exception as error:
                raise self.failed(number, error) from error
        for replica in self.cfg.replicas:
            self.set(replica.name, outcome="promoted")
        return self.report()

    def stage(self, number: int, group: list[ReplicaConfig], verdict: Verdict) -> None:
        for replica in group:
            self.set(replica.name, stage=number)
            if replica.model_base_path not in self.published:
                target = publish(self.export, replica.model_base_path)
                self.published[replica.model_base_path] = (target, time.monotonic())
            self.note(replica.name, f"stage {number}: version {self.version} published")
        for replica in group:
            try:
                self.serves_new(replica, verdict)
            except Exception as error:
                raise PushError(f"replica {replica.name}: {describe(error)}") from error
        old = [r for r in self.cfg.replicas if self.outcomes[r.name].stage is None]
        self.bake(group, old)

    def serves_new(self, replica: ReplicaConfig, verdict: Verdict) -> None:
        with self.server(replica) as server:
            wait_until_available(server, self.version, self.cfg.timeout_s)
            seconds = time.monotonic() - self.published[replica.model_base_path][1]
            self.set(replica.name, seconds_to_available=seconds)
            check_canary(server, self.version, verdict)
        self.note(replica.name, f"AVAILABLE after {seconds:.1f} s, canary Predict matches")

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
        """Withdraw the version from every store it was published into, and confirm that each
        changed replica serves its previous version again. Returns what happened, per replica."""
        for target, _ in self.published.values():
            withdraw(target)
        results = []
        for replica in self.cfg.replicas:
            outcome = self.outcomes[replica.name]
            if outcome.stage is None:
                continue
            result = self.restore(replica, outcome.previous_version)
            self.note(replica.name, f"{why}: {result}")
            results.append(f"{replica.name} {result}")
        return "; ".join(results) or "nothing had changed"

    def restore(self, replica: ReplicaConfig, previous: int | None) -> str:
        if replica.name in self.stopped:
            self.set(replica.name, outcome="unverified")
            return "withdrawn, not verified: it stopped answering"
        try:
            with self.server(replica) as server:
                wait_until_serving(server, previous, self.cfg.timeout_s)
        except Exception as error:
            self.set(replica.name, outcome="unverified")
            return f"withdrawn, not verified: {describe(error)}"
        self.set(replica.name, outcome="rolled_back")
        return f"serves version {previous} again" if previous else "serves no version again"


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
    with rollout_lock(stores_of(export, cfg), cfg.timeout_s):
        check_baseline(export, verdict, cfg)
        return rollout.run(verdict)


@push.on_rollback
def _withdraw_everywhere(transaction: Transaction) -> None:
    """A step after the push failed: every replica goes back to what it served before."""
    rollout: Rollout = transaction.get("rollout")
    with rollout_lock(stores_of(rollout.export, rollout.cfg), rollout.cfg.timeout_s):
        undone = rollout.roll_back("transaction rolled back")
    logger().warning(
        "rolled back %s version %d: %s", rollout.export.model_name, rollout.version, undone
    )
