"""The registry aliases ``champion`` and ``previous_champion``: moved after a push, restored when
the push's transaction rolls back, and rolled back to on request.

``promote`` is the flow's last step, inside the same Prefect transaction as ``push``: should it
fail, its own aliases are put back and the transaction's rollback takes the version out of the
replicas' stores again (``tasks.push``'s hook); should a later step of the transaction fail, its
``on_rollback`` hook puts the aliases back.

``roll_back_champion`` (``python -m flows.rollback``, deployment ``rollback``) returns every
replica to the previous champion: checks that each replica's store still holds its version,
moves the labels of every labels replica onto it (``tasks.push.move_stable``; nothing is
withdrawn unless all moved), takes every newer version out of the stores (holding their rollout
locks), waits until every replica serves it, then moves ``champion`` back to it and drops
``previous_champion`` (there is no champion before it to keep). With ``to=champion`` it returns
them to the champion itself and changes no alias: what a rollout killed before its promote left
serving unverified goes.
"""

from __future__ import annotations

from collections.abc import Callable

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from serving.api_client import ModelServer
from tasks.config import PipelineConfig, ReplicaConfig
from tasks.logs import logger
from tasks.model_store import ModelStore
from tasks.push import (
    PushError,
    describe,
    move_stable,
    rollout_lock,
    stores_of,
    wait_until_serving,
)
from tasks.tracking import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    RunTracker,
    alias_version,
    promote_champion,
)
from tasks.version_labels import STABLE

Aliases = dict[str, str | None]  # alias -> registry version (None: not set)


def aliases(client: MlflowClient, model_name: str) -> Aliases:
    return {a: alias_version(client, model_name, a) for a in (CHAMPION, PREVIOUS_CHAMPION)}


def restore(client: MlflowClient, model_name: str, before: Aliases) -> None:
    for alias, version in before.items():
        if version is not None:
            client.set_registered_model_alias(model_name, alias, version)
        elif alias_version(client, model_name, alias) is not None:
            client.delete_registered_model_alias(model_name, alias)


# Alias moves are a few MLflow calls (the client retries a failed one itself, for minutes): a
# hung tracking server fails the promote, and with it the transaction, which withdraws the push.
PROMOTE_TIMEOUT_S = 120


@task(cache_policy=NO_CACHE, timeout_seconds=PROMOTE_TIMEOUT_S)
def promote(tracker: RunTracker, model_name: str, registry_version: str, reason: str) -> None:
    before = aliases(tracker.client, model_name)
    transaction = get_transaction()
    if transaction is not None:  # for the on_rollback hook
        transaction.set("aliases", (tracker, model_name, before))
    try:
        promote_champion(tracker, model_name, registry_version, reason)
    except BaseException:  # its own hook does not run when it fails (a timeout too): undo here
        restore(tracker.client, model_name, before)
        raise


@promote.on_rollback
def _restore_aliases(transaction: Transaction) -> None:
    tracker, model_name, before = transaction.get("aliases")
    restore(tracker.client, model_name, before)
    logger().warning("registry aliases of %s restored: %s", model_name, before)


def export_version(client: MlflowClient, model_name: str, registry_version: str) -> int:
    return int(client.get_model_version(model_name, registry_version).tags["export_version"])


def on_each(replicas: list[ReplicaConfig], action: Callable[[ReplicaConfig], None]) -> list[str]:
    """``action`` on every replica; one line per replica where it failed."""
    failures = []
    for replica in replicas:
        try:
            action(replica)
        except Exception as error:
            failures.append(f"{replica.name} ({replica.grpc}): {describe(error)}")
    return failures


@task(cache_policy=NO_CACHE)
def roll_back_champion(cfg: PipelineConfig, to: str = PREVIOUS_CHAMPION) -> str:
    """Every replica back to the version alias ``to`` names; returns what was done."""
    model_name = cfg.export.model_name
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    before = aliases(client, model_name)
    if before[to] is None:
        raise PushError(f"{model_name} has no {to} alias: nothing to roll back to")
    target = export_version(client, model_name, before[to])
    stores = stores_of(cfg.push.replicas, model_name)
    with rollout_lock(stores, cfg.push.timeout_s):
        return_replicas_to(cfg, stores, target)
    if to == PREVIOUS_CHAMPION:
        client.set_registered_model_alias(model_name, CHAMPION, before[PREVIOUS_CHAMPION])
        client.delete_registered_model_alias(model_name, PREVIOUS_CHAMPION)
    done = (
        f"{model_name} version {target} (registry version {before[to]}) serves on "
        f"{', '.join(r.name for r in cfg.push.replicas)} again and is the {CHAMPION}"
    )
    logger().info(done)
    return done


def return_replicas_to(cfg: PipelineConfig, stores: list[ModelStore], target: int) -> None:
    """Labels onto ``target``, every newer version withdrawn, every replica serving it; nothing
    changes unless every store holds it."""
    model_name, timeout_s = cfg.export.model_name, cfg.push.timeout_s
    missing = sorted(str(store) for store in stores if not store.has_complete(target))
    if missing:
        raise PushError(f"version {target} is no longer in {', '.join(missing)}: nothing changed")

    def serves_target(replica: ReplicaConfig) -> None:
        with ModelServer(replica.grpc, model_name) as server:
            wait_until_serving(server, target, timeout_s)

    # Labels first: the versions their labels name must not leave the stores before they move.
    labelled = [r for r in cfg.push.replicas if r.mode == "labels"]
    unmoved = on_each(labelled, lambda r: move_stable(r, model_name, target, timeout_s))
    if unmoved:
        raise PushError(
            f"the {STABLE} label is not on version {target} on every labels replica: "
            + "; ".join(unmoved)
            + ": nothing withdrawn"
        )
    for store in stores:
        for version in store.versions():
            if version > target:
                store.withdraw(version)
    # move_stable checked the labels replicas
    failures = on_each([r for r in cfg.push.replicas if r.mode == "store"], serves_target)
    if failures:
        raise PushError(
            f"newer versions withdrawn, but not every replica serves version {target}: "
            + "; ".join(failures)
        )
