"""push without a healthy server: it refuses a failed verdict, publishes atomically, publishes
nothing when a replica does not answer, and plans its stages."""

from pathlib import Path

import numpy as np
import pytest

from tasks.config import PushConfig, ReplicaConfig
from tasks.export import ExportResult
from tasks.model_store import LocalStore, VersionExists
from tasks.push import PushError, plan_stages, push
from tasks.validate import Judgement, Verdict
from tests.processes import free_port


def verdict(
    passed: bool, canary_scores: np.ndarray | None = None, baseline_version: int | None = None
) -> Verdict:
    """A verdict as validate returns it, against ``baseline_version``; the canary images are
    zeros, and push expects the server to answer them with ``canary_scores``."""
    scores = np.full((2, 10), 0.1, np.float32) if canary_scores is None else canary_scores
    return Verdict(
        error_rate=0.08,
        baseline_version=baseline_version,
        judgement=Judgement(passed, "test", (), {}),
        confusion=np.zeros((10, 10), np.int64),
        canary_images=np.zeros((len(scores), 784), np.float32),
        canary_scores=scores,
        slice_error_rates={},
    )


def fake_export(tmp_path: Path, version: int) -> ExportResult:
    path = tmp_path / "exports" / "mnist" / str(version)
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"not read by push")
    return ExportResult(model_name="mnist", version=version, path=path)


def store_entries(store: Path) -> list[str]:
    return sorted(entry.name for entry in (store / "mnist").iterdir())


def store_versions(store: Path) -> list[str]:
    """What a server would see: the store's entries but the hidden ones (the rollout lock)."""
    if not (store / "mnist").exists():
        return []
    return [name for name in store_entries(store) if not name.startswith(".")]


def test_a_failed_verdict_is_never_published(tmp_path):
    store = tmp_path / "models"
    cfg = PushConfig(model_base_path=store, replicas=[{"name": "a", "grpc": "127.0.0.1:1"}])
    with pytest.raises(PushError, match="gate failed"):
        push.fn(fake_export(tmp_path, 1), verdict(False), cfg)
    assert not (store / "mnist").exists()


def test_a_version_is_published_atomically_and_only_once(tmp_path):
    store, export = tmp_path / "models", fake_export(tmp_path, 4)
    LocalStore(store, "mnist").publish(export.path, 4)
    assert (store / "mnist" / "4" / "saved_model.pb").read_bytes() == b"not read by push"
    assert store_entries(store) == ["4"]  # no staging directory left behind
    assert LocalStore(store, "mnist").versions() == {4}
    with pytest.raises(VersionExists, match="already exists"):
        LocalStore(store, "mnist").publish(export.path, 4)


def test_an_unreachable_replica_fails_the_push_before_anything_is_published(tmp_path):
    store = tmp_path / "models"
    cfg = PushConfig(
        model_base_path=store,
        replicas=[{"name": "gone", "grpc": f"127.0.0.1:{free_port()}"}],
        timeout_s=1,
    )
    with pytest.raises(
        PushError, match=r"did not answer GetModelStatus within push.timeout_s=1 s .*nothing pushed"
    ):
        push.fn(fake_export(tmp_path, 3), verdict(True), cfg)
    assert store_versions(store) == []


def test_stages_take_replicas_in_order_and_those_sharing_a_store_together(tmp_path):
    def replica(name: str, store: str) -> ReplicaConfig:
        return ReplicaConfig(name=name, grpc=f"{name}:1", model_base_path=tmp_path / store)

    a, b, c, d = replica("a", "s1"), replica("b", "s2"), replica("c", "s2"), replica("d", "s3")
    assert plan_stages([a, b, c, d], [1, "all"]) == [[a], [b, c, d]]
    assert plan_stages([a, b, c, d], [2, 3, "all"]) == [[a, b, c], [d]]  # c comes with b
    assert plan_stages([a], [1, "all"]) == [[a]]
    assert plan_stages([b, c], [1, "all"]) == [[b, c]]
