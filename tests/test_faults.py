"""Faults in a run, against one real ``python -m serving`` that polls its store under continuous
Predict load: the old version serves throughout and nothing half-written is ever served.

* a step SIGKILLed (``tests/fault_driver.py`` in a process of its own) during export, during
  publish and during the rollout; the next run cleans up what it left;
* corrupt versions in the store, and a push of one;
* a full disk (RLIMIT_FSIZE) while exporting and while publishing;
* two runs at once: one rollout at a time, each gated against what serves (two exports at once
  get distinct versions: ``tests/test_export.py``).

The tests run in order and share the server and its store, which start on version 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tasks.champion import roll_back_champion
from tasks.config import ExportConfig, MlflowConfig, ModelConfig, PipelineConfig, PushConfig
from tasks.export import ExportResult, export
from tasks.model_store import ROLLOUT_LOCK, LocalStore
from tasks.push import PushError, push, rollout_lock
from tasks.staging import EXPORT, staging_path
from tasks.tracking import CHAMPION, alias_version
from tests import saved_models
from tests.servers import AVAILABLE, END, REPO, Load, Server
from tests.test_push import verdict

pytestmark = pytest.mark.slow

MODEL = "mnist"
METRICS = "/monitoring/prometheus/metrics"
DATA_LOSS, UNKNOWN = grpc.StatusCode.DATA_LOSS.value[0], grpc.StatusCode.UNKNOWN.value[0]
SIZE_LIMIT = 16 * 1024  # bytes: the tiny models' variables (31 KiB) do not fit


@dataclass
class Stack:
    root: Path
    server: Server

    @property
    def base(self) -> Path:  # push.model_base_path: the store is base/mnist
        return self.root / "serving"

    @property
    def store(self) -> Path:
        return self.base / MODEL

    @property
    def model_store(self) -> LocalStore:
        return LocalStore(self.base, MODEL)

    @property
    def exports(self) -> Path:
        return self.root / "exports" / MODEL

    def export(self, version: int) -> ExportResult:
        """Version ``version`` classifies everything as ``version % 10``."""
        path = saved_models.write_version(self.exports, version, version % 10)
        return ExportResult(MODEL, version, path)

    def cfg(self, **keys: object) -> PushConfig:
        replica = {
            "name": "local",
            "grpc": f"127.0.0.1:{self.server.port}",
            "model_base_path": str(self.base),
            "metrics_url": f"http://127.0.0.1:{self.server.rest_port}{METRICS}",
        }
        return PushConfig(replicas=[replica], **keys)

    def serving(self) -> int | None:
        available = [v for v, (state, _, _) in self.server.states().items() if state == AVAILABLE]
        return max(available) if available else None

    def wait_serving(self, version: int) -> None:
        self.server.wait_for(lambda _: self.serving() == version, f"version {version} serving")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    root = tmp_path_factory.mktemp("faults")
    monitoring = root / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }\n")
    saved_models.write_version(root / "serving" / MODEL, 1, 1)
    extra = [f"--monitoring_config_file={monitoring}", "--num_workers=1"]
    server = Server(root / "serving" / MODEL, root / "server.log", extra=extra)
    try:
        server.wait_ready(timeout=180)  # a loaded machine
        result = Stack(root, server)
        result.wait_serving(1)
        yield result
    finally:
        server.stop()


def blessed(version: int, baseline: int | None):
    return verdict(True, saved_models.expected_scores(version % 10, 2), baseline)


def start_driver(action: str, **args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fault_driver", action, json.dumps(args, default=str)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_push(stack: Stack, version: int, baseline: int, **keys: object) -> subprocess.Popen:
    """A push of ``stack.export(version)``, blessed against ``baseline``, in its own process."""
    exported, cfg = stack.export(version), stack.cfg(**keys)
    push_keys = json.loads(cfg.model_dump_json())
    return start_driver(
        "push", export_path=exported.path, version=version, baseline=baseline, push=push_keys
    )


def result_of(driver: subprocess.Popen, timeout_s: float = 180) -> tuple[int, dict]:
    out, err = driver.communicate(timeout=timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no result from the driver (rc {driver.returncode}):\n{out}\n{err[-3000:]}"
    return driver.returncode, json.loads(lines[-1])


def kill9(driver: subprocess.Popen) -> None:
    driver.send_signal(signal.SIGKILL)
    driver.wait()  # reaped: a zombie's pid would still look alive
    assert driver.returncode == -signal.SIGKILL


def wait_for_path(directory: Path, pattern: str, timeout_s: float = 120) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.05)
    raise TimeoutError(f"no {pattern} under {directory} after {timeout_s} s")


def hidden(directory: Path) -> list[str]:
    return (
        sorted(p.name for p in directory.iterdir() if p.name.startswith("."))
        if directory.exists()
        else []
    )


def versions(directory: Path) -> list[int]:
    return (
        sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        if directory.exists()
        else []
    )


def only_version_served(load: Load, version: int) -> None:
    assert load.failures == []
    assert load.answers and {v for v, _ in load.answers} == {version}


# -- kill -9 ---------------------------------------------------------------------------------------


def test_an_export_killed_midway_leaves_no_version_and_the_next_cleans_up(stack, tmp_path):
    exports = tmp_path / "exports"
    driver = start_driver("export", base_path=exports, serving_base_path=stack.base, pause_s=300)
    staging = wait_for_path(exports / MODEL, ".tmp@*/saved_model.pb").parent
    kill9(driver)
    assert hidden(exports / MODEL) == [staging.name] and versions(exports / MODEL) == []

    live = staging_path(exports / MODEL, EXPORT)  # a run of this process, still writing
    live.mkdir()
    foreign, stale = (
        exports / MODEL / ".tmp@elsewhere:7:ab",
        exports / MODEL / ".tmp@elsewhere:8:cd",
    )
    foreign.mkdir(), stale.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))

    import keras

    from tasks.train import build_model

    keras.utils.set_random_seed(1)
    model = build_model(ModelConfig(kind="mlp", hidden_units=16))
    cfg = ExportConfig(base_path=exports, warmup_requests=1)
    done = export.fn(model, cfg, stack.base, np.zeros((1, 784), np.float32))
    assert done.version == 2  # above the store's version 1
    assert versions(exports / MODEL) == [2]
    assert hidden(exports / MODEL) == sorted(
        [live.name, foreign.name]
    )  # the dead and the stale went
    assert stack.serving() == 1


def test_a_publish_killed_midway_is_never_served_and_the_next_cleans_up(stack):
    exported = stack.export(2)
    with Load(stack.server) as load:
        driver = start_driver(
            "publish", export_path=exported.path, version=2, model_base_path=stack.base, pause_s=300
        )
        staging = wait_for_path(stack.store, ".push-2@*/*")
        kill9(driver)
        time.sleep(1.5)  # several polls of the store
        assert set(stack.server.states()) == {1}  # no version 2, broken or not, ever reported
    only_version_served(load, 1)
    assert versions(stack.store) == [1] and staging.parent.name in hidden(stack.store)

    stack.model_store.publish(exported.path, exported.version)
    assert hidden(stack.store) == []
    stack.wait_serving(2)


def test_a_rollout_killed_after_its_publish_leaves_the_version_serving_unverified(stack):
    with Load(stack.server) as load:
        driver = start_push(stack, 3, baseline=2, bake_s=120, bake_deadline_s=120)
        stack.server.wait_for(lambda s: s.get(3, (0,))[0] == AVAILABLE, "version 3", 120)
        kill9(driver)  # mid-bake: nothing verified the version's live traffic, nothing promoted
    assert load.failures == []
    assert versions(stack.store) == [1, 2, 3] and stack.serving() == 3
    # the kernel dropped the dead rollout's lock
    with rollout_lock([stack.model_store], timeout_s=1):
        pass
    # A run validated against version 2 before the kill must not push on top of it.
    with pytest.raises(PushError, match=r"compared it with version 2, but local serves 3 now"):
        push.fn(stack.export(4), blessed(4, 2), stack.cfg())
    assert versions(stack.store) == [1, 2, 3]

    # `python -m flows.rollback --to champion`: the registry's champion is still version 2.
    registry = f"sqlite:///{stack.root / 'mlflow.db'}"
    client = MlflowClient(registry)
    client.create_registered_model(MODEL)
    for export_version in (1, 2, 3):
        client.create_model_version(
            MODEL, "file:///nowhere", tags={"export_version": export_version}
        )
    client.set_registered_model_alias(MODEL, CHAMPION, "2")
    cfg = PipelineConfig(push=stack.cfg(), mlflow=MlflowConfig(tracking_uri=registry))
    done = roll_back_champion.fn(cfg, to=CHAMPION)
    assert done == "mnist version 2 (registry version 2) serves on local again and is the champion"
    assert versions(stack.store) == [1, 2] and stack.serving() == 2
    assert str(alias_version(client, MODEL, CHAMPION)) == "2"  # unchanged (SQLite: an int)


# -- corrupt versions ------------------------------------------------------------------------------


def test_corrupt_versions_end_with_their_error_and_the_old_one_serves(stack):
    template = saved_models.write_version(stack.root / "templates", 6, 6)
    with Load(stack.server) as load:
        saved_models.write_broken_version(stack.store, 5)
        stack.server.wait_for(lambda s: s.get(5, (0,))[0] == END, "version 5 END")
        shutil.rmtree(template / "variables")
        saved_models.copy_version(template, stack.store, 6)
        stack.server.wait_for(lambda s: s.get(6, (0,))[0] == END, "version 6 END")
    only_version_served(load, 2)
    states = stack.server.states()
    pb = stack.store / "5" / "saved_model.pb"
    assert states[5] == (END, DATA_LOSS, f"Can't parse {pb} as binary proto")  # TF Serving's
    assert states[6][:2] == (END, UNKNOWN) and "not a valid checkpoint" in states[6][2], states[6]
    for version in (5, 6):
        stack.model_store.withdraw(version)


def test_a_push_of_a_corrupt_version_fails_fast_and_rolls_back(stack):
    broken = saved_models.write_broken_version(stack.exports, 7)
    began = time.monotonic()
    with Load(stack.server) as load, pytest.raises(PushError) as failed:
        push.fn(ExportResult(MODEL, 7, broken), blessed(7, 2), stack.cfg(timeout_s=60))
    took = time.monotonic() - began
    message = str(failed.value)
    assert "version 7: failed to load:" in message and "serves version 2 again" in message
    assert took < 30, took  # the END state ends the wait, not push.timeout_s
    assert versions(stack.store) == [1, 2]
    only_version_served(load, 2)


# -- a full disk -----------------------------------------------------------------------------------


def test_an_export_onto_a_full_disk_fails_clearly_and_leaves_nothing(stack, tmp_path):
    exports = tmp_path / "exports"
    driver = start_driver(
        "export", base_path=exports, serving_base_path=stack.base, file_size_limit=SIZE_LIMIT
    )
    rc, result = result_of(driver)
    assert (rc, result["error"]) == (1, "DiskFull"), result
    assert result["message"].startswith(f"disk full writing {exports / MODEL}: "), result
    assert "File too large" in result["message"]
    assert list((exports / MODEL).iterdir()) == []


def test_a_publish_onto_a_full_disk_fails_clearly_and_leaves_the_store_intact(stack):
    exported = stack.export(8)
    with Load(stack.server) as load:
        driver = start_driver(
            "publish",
            export_path=exported.path,
            version=8,
            model_base_path=stack.base,
            file_size_limit=SIZE_LIMIT,
        )
        rc, result = result_of(driver)
    assert (rc, result["error"]) == (1, "DiskFull"), result
    assert result["message"].startswith(f"disk full writing {stack.store}/.push-8@"), result
    assert "File too large" in result["message"]
    assert versions(stack.store) == [1, 2] and hidden(stack.store) == [ROLLOUT_LOCK]
    only_version_served(load, 2)


# -- two runs at once ------------------------------------------------------------------------------


def test_one_rollout_at_a_time_each_against_what_serves(stack):
    with Load(stack.server) as load:
        driver = start_push(stack, 9, baseline=2, bake_s=3, bake_deadline_s=60, min_requests=5)
        lock = stack.store / ROLLOUT_LOCK
        deadline = time.monotonic() + 120
        while f"pid {driver.pid} " not in (lock.read_text() if lock.exists() else ""):
            assert time.monotonic() < deadline and driver.poll() is None, "no lock taken"
            time.sleep(0.05)
        second = stack.export(10)
        with pytest.raises(PushError, match=rf"still runs after .* \(holder: pid {driver.pid} on "):
            push.fn(second, blessed(10, 2), stack.cfg(timeout_s=1))
        assert 10 not in versions(stack.store)
        with pytest.raises(PushError, match=r"compared it with version 2, but local serves 9 now"):
            push.fn(second, blessed(10, 2), stack.cfg(timeout_s=120))  # waits for the first
        assert result_of(driver) == (0, {"version": 9})
        report = push.fn(second, blessed(10, 9), stack.cfg())  # validated again, against 9
    assert report.replicas[0].previous_version == 9 and stack.serving() == 10
    assert load.failures == []
