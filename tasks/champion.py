"""The registry aliases ``champion`` and ``previous_champion``: moved after a push, restored when
the push's transaction rolls back, and rolled back to on request.

``promote`` is the flow's last step, inside the same Prefect transaction as ``push``: should it
fail, its own aliases are put back and the transaction's rollback takes the version out of the
replicas' stores again (``tasks.push``'s hook); should a later step of the transaction fail, its
``on_rollback`` hook puts the aliases back.

``roll_back_champion`` (``python -m flows.rollback``, deployment ``rollback``) returns every
replica to the previous champion: checks that each replica's store still holds its version,
takes every newer version out of the stores (holding their rollout locks), waits until every
replica serves it, then moves ``champion`` back to it and drops ``previous_champion`` (there is no
champion before it to keep). With ``to=champion`` it returns them to the champion itself and
changes no alias: what a rollout killed before its promote left serving unverified goes.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from serving.api_client import ModelServer
from serving.model_format import version_of_dir
from tasks.config import PipelineConfig
from tasks.logs import logger
from tasks.push import PushError, describe, rollout_lock, wait_until_serving, withdraw
from tasks.tracking import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    RunTracker,
    alias_version,
    promote_champion,
)

Aliases = dict[str, str | None]  # alias -> registry version (None: not set)


def aliases(client: MlflowClient, model_name: str) -> Aliases:
    return {a: alias_version(client, model_name, a) for a in (CHAMPION, PREVIOUS_CHAMPION)}


def restore(client: MlflowClient, model_name: str, before: Aliases) -> None:
    for alias, version in before.items():
        if version is not None:
            client.set_registered_model_alias(model_name, alias, version)
        elif alias_version(client, model_name, alias) is not None:
            client.delete_registered_model_alias(model_name, alias)


@task(cache_policy=NO_CACHE)
def promote(tracker: RunTracker, model_name: str, registry_version: str, reason: str) -> None:
    before = aliases(tracker.client, model_name)
    transaction = get_transaction()
    if transaction is not None:  # for the on_rollback hook
        transaction.set("aliases", (tracker, model_name, before))
    try:
        promote_champion(tracker, model_name, registry_version, reason)
    except Exception:  # a failed task's own hook does not run: undo half a move here
        restore(tracker.client, model_name, before)
        raise


@promote.on_rollback
def _restore_aliases(transaction: Transaction) -> None:
    tracker, model_name, before = transaction.get("aliases")
    restore(tracker.client, model_name, before)
    logger().warning("registry aliases of %s restored: %s", model_name, before)


def export_version(client: MlflowClient, model_name: str, registry_version: str) -> int:
    return int(client.get_model_version(model_name, registry_version).tags["export_version"])


@task(cache_policy=NO_CACHE)
def roll_back_champion(cfg: PipelineConfig, to: str = PREVIOUS_CHAMPION) -> str:
    """Every replica back to the version alias ``to`` names; returns what was done."""
    model_name = cfg.export.model_name
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    before = aliases(client, model_name)
    if before[to] is None:
        raise PushError(f"{model_name} has no {to} alias: nothing to roll back to")
    target = export_version(client, model_name, before[to])
    stores = sorted({r.model_base_path / model_name for r in cfg.push.replicas})
    with rollout_lock(stores, cfg.push.timeout_s):
        return_stores_to(stores, target)
        wait_until_all_serve(cfg, target)
    if to == PREVIOUS_CHAMPION:
        client.set_registered_model_alias(model_name, CHAMPION, before[PREVIOUS_CHAMPION])
        client.delete_registered_model_alias(model_name, PREVIOUS_CHAMPION)
    done = (
        f"{model_name} version {target} (registry version {before[to]}) serves on "
        f"{', '.join(r.name for r in cfg.push.replicas)} again and is the {CHAMPION}"
    )
    logger().info(done)
    return done


def return_stores_to(stores: list[Path], target: int) -> None:
    """Withdraw every version above ``target``; nothing changes unless every store holds it."""
    missing = sorted(str(store) for store in stores if not (store / str(target)).is_dir())
    if missing:
        raise PushError(f"version {target} is no longer in {', '.join(missing)}: nothing changed")
    for store in stores:
        for entry in store.iterdir():
            if (version_of_dir(entry.name) or 0) > target:
                withdraw(entry)


def wait_until_all_serve(cfg: PipelineConfig, target: int) -> None:
    failures = []
    for replica in cfg.push.replicas:
        try:
            with ModelServer(replica.grpc, cfg.export.model_name) as server:
                wait_until_serving(server, target, cfg.push.timeout_s)
        except Exception as error:
            failures.append(f"{replica.name} ({replica.grpc}): {describe(error)}")
    if failures:
        raise PushError(
            f"newer versions withdrawn, but not every replica serves version {target}: "
            + "; ".join(failures)
        )
