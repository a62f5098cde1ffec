"""tasks.infra_validate against real sandbox servers: a version trained, exported by the export
task and judged by the validate task passes every check; one that answers other scores, one that
does not load and a server binary that exits at once fail, naming the check; no sandbox outlives
the task."""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path

import keras
import pytest

from serving import mnist
from serving.mnist import Split
from tasks.config import DataConfig, ExportConfig, InfraConfig, ModelConfig, ValidateConfig
from tasks.export import ExportResult, export
from tasks.infra_validate import CHECKS, InfraValidationFailed, infra_validate
from tasks.train import build_model
from tasks.validate import Verdict, validate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CFG = InfraConfig(timeout_s=120)


@pytest.fixture(scope="module")
def digits() -> Split:
    return mnist.load_test(DataConfig().dir)


def trained_export(root: Path, digits: Split, seed: int) -> ExportResult:
    """Softmax regression fitted in a second on the first 8,000 test images, exported."""
    keras.utils.set_random_seed(seed)
    model = build_model(ModelConfig(kind="softmax"))
    model.fit(digits.images[:8000], digits.labels[:8000], epochs=2, batch_size=100, verbose=0)
    cfg = ExportConfig(base_path=root / "exports", model_name="mnist", warmup_requests=2)
    return export.fn(model, cfg, root / "serving", digits.images[:4])


@pytest.fixture(scope="module")
def candidate(
    digits: Split, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExportResult, Verdict]:
    """Version 1 and the verdict validate gives it on the other 2,000 test images."""
    exported = trained_export(tmp_path_factory.mktemp("candidate"), digits, seed=5)
    held_out = Split(digits.images[8000:], digits.labels[8000:])
    verdict = validate.fn(exported, held_out, ValidateConfig(), servers=[])
    assert verdict.passed, verdict.reason
    return exported, verdict


def assert_stopped(server_pid: int) -> None:
    """No process of the sandbox's process group (the server, its workers) is alive.

    A zombie is dead: one whose parent (the server) died first waits for init to reap it."""
    alive = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, group = fields[0], int(fields[2])
        if group == server_pid and state != "Z":
            alive.append(stat_file.parent.name)
    assert alive == [], f"sandbox processes still running: {alive}"


def test_the_candidate_passes_every_check(candidate):
    exported, verdict = candidate
    result = infra_validate.fn(exported, verdict, CFG)
    assert (result.model_name, result.version) == ("mnist", 1)
    assert result.checks_passed == CHECKS
    assert 0 < result.seconds_to_available < CFG.timeout_s
    assert_stopped(result.server_pid)
    # The sandbox served a copy: the export is untouched and nothing was left beside it.
    assert sorted(p.name for p in exported.path.parent.iterdir()) == ["1"]


def test_a_version_with_other_scores_fails_at_predict(candidate, digits, tmp_path):
    _, verdict = candidate
    other = trained_export(tmp_path, digits, seed=6)
    with pytest.raises(InfraValidationFailed, match="other scores") as failed:
        infra_validate.fn(other, verdict, CFG)
    assert failed.value.check == "predict"
    assert "sandbox server log" in str(failed.value)
    assert_stopped(failed.value.server_pid)


def test_a_version_that_does_not_load_fails_at_available(candidate, tmp_path):
    exported, verdict = candidate
    broken = tmp_path / "mnist" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    with pytest.raises(InfraValidationFailed, match="failed to load") as failed:
        infra_validate.fn(replace(exported, path=broken), verdict, CFG)
    assert failed.value.check == "available"
    assert_stopped(failed.value.server_pid)


def test_a_server_binary_that_exits_at_once_fails_with_its_log(candidate, tmp_path):
    exported, verdict = candidate
    binary = tmp_path / "tensorflow_model_server"
    binary.write_text('#!/bin/sh\necho "refusing to start: $*"\nexit 3\n')
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    cfg = InfraConfig(timeout_s=60, server_binary=binary)
    with pytest.raises(InfraValidationFailed, match="exited with status 3") as failed:
        infra_validate.fn(exported, verdict, cfg)
    assert failed.value.check == "available"
    # Its log, which shows it got TF Serving's flags for the candidate alone.
    assert "refusing to start: --port=" in str(failed.value)
    assert "--model_name=mnist" in str(failed.value)
    assert_stopped(failed.value.server_pid)
