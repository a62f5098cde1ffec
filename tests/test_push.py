"""push without a healthy server: it refuses a failed verdict and rolls back what no server
serves."""

from pathlib import Path

import numpy as np
import pytest

from tasks.config import PushConfig
from tasks.export import ExportResult
from tasks.push import PushError, push
from tasks.validate import Judgement, Verdict
from tests.processes import free_port


def verdict(passed: bool) -> Verdict:
    return Verdict(
        passed=passed,
        reason="test",
        error_rate=0.08,
        baseline_error_rate=None,
        baseline_version=None,
        judgement=Judgement(passed, "test", (), {}),
        confusion=np.zeros((10, 10), np.int64),
        canary_images=np.zeros((2, 784), np.float32),
        canary_scores=np.full((2, 10), 0.1, np.float32),
        slice_error_rates={},
    )


def fake_export(tmp_path: Path, version: int) -> ExportResult:
    path = tmp_path / "exports" / "mnist" / str(version)
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"not read by push")
    return ExportResult(model_name="mnist", version=version, path=path)


def store_entries(store: Path) -> list[str]:
    return sorted(entry.name for entry in (store / "mnist").iterdir())


def test_a_failed_verdict_is_never_published(tmp_path):
    store = tmp_path / "models"
    cfg = PushConfig(model_base_path=store, servers=[], timeout_s=1)
    with pytest.raises(PushError, match="gate failed"):
        push.fn(fake_export(tmp_path, 1), verdict(False), cfg)
    assert not (store / "mnist" / "1").exists()


def test_without_servers_the_version_is_published_atomically(tmp_path):
    store = tmp_path / "models"
    result = push.fn(
        fake_export(tmp_path, 4), verdict(True), PushConfig(model_base_path=store, servers=[])
    )
    assert result.path == store / "mnist" / "4"
    assert (result.path / "saved_model.pb").read_bytes() == b"not read by push"
    assert store_entries(store) == ["4"]  # no staging directory left behind


def test_an_unreachable_server_times_out_and_rolls_back(tmp_path):
    store = tmp_path / "models"
    cfg = PushConfig(model_base_path=store, servers=[f"127.0.0.1:{free_port()}"], timeout_s=1)
    with pytest.raises(
        PushError, match=r"did not make version 3 AVAILABLE within push.timeout_s=1 s .*unreachable"
    ):
        push.fn(fake_export(tmp_path, 3), verdict(True), cfg)
    assert store_entries(store) == []


def test_a_version_pushed_before_is_refused(tmp_path):
    store = tmp_path / "models"
    (store / "mnist" / "5").mkdir(parents=True)
    with pytest.raises(PushError, match="already exists"):
        push.fn(
            fake_export(tmp_path, 5), verdict(True), PushConfig(model_base_path=store, servers=[])
        )
