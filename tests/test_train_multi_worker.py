"""train.strategy: multi_worker: two local worker processes (MultiWorkerMirroredStrategy, ring
all-reduce over 127.0.0.1 on CPU) against single-worker training of the same tiny configuration;
a cluster of two on loopback as the README starts one; the launcher's failure and timeout paths;
the configuration's rules."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from serving.mnist import Mnist, Split, load
from tasks import data
from tasks.config import ConfigError, DataConfig, ModelConfig, TrainConfig, load_config
from tasks.data.store import DataStore
from tasks.multi_worker import WorkerFailed, run_workers, write_job
from tasks.processes import free_port
from tasks.tracking import RunTracker
from tasks.train import train
from tests.processes import descendants_running, running

REPO_ROOT = Path(__file__).resolve().parent.parent
# Two workers training the same global batches reach the same weights up to float rounding (the
# all-reduce sums in another order): measured here |acc_multi - acc_single| = 0.0 and weights
# within 1e-6. The bounds leave room for other machines' float behaviour, no more.
ACCURACY_TOLERANCE = 0.03
WEIGHT_TOLERANCE = 1e-4


def _workers_of_this_process() -> list[int]:
    return descendants_running(os.getpid(), b"tasks.train_worker")


@pytest.fixture(scope="module")
def tiny_mnist() -> Mnist:
    full = load(REPO_ROOT / "data" / "mnist")
    return Mnist(
        train=Split(full.train.images[:4000], full.train.labels[:4000]),
        test=Split(full.test.images[:1000], full.test.labels[:1000]),
    )


@pytest.mark.slow  # two worker processes, each importing TensorFlow
def test_two_workers_match_one(
    tiny_mnist: Mnist, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Softmax, 4,000 images, 2 epochs of global batches of 100, seed 0. Measured (2 shared
    cores, other tests running): val_accuracy 0.8650 single and 0.8650 with two workers, weights
    within 1e-6; ~95 s, most of it the workers' TensorFlow imports."""
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    model_cfg = ModelConfig(kind="softmax")
    settings = {"epochs": 2, "batch_size": 100, "learning_rate": 0.5, "seed": 0}
    single = train.fn(tiny_mnist, model_cfg, TrainConfig(device="cpu", **settings))
    with caplog.at_level(logging.INFO, logger="train_and_serve"):
        multi = train.fn(
            tiny_mnist,
            model_cfg,
            TrainConfig(strategy="multi_worker", workers=2, **settings),
            tracker=RunTracker(tracking_uri=tracking_uri, run_id=run_id),
        )

    assert multi.device == "MultiWorkerMirroredStrategy(2 workers)"
    assert set(multi.history) == set(single.history)
    assert all(len(values) == 2 for values in multi.history.values())
    single_accuracy = single.history["val_accuracy"][-1]
    multi_accuracy = multi.history["val_accuracy"][-1]
    print(f"val_accuracy single {single_accuracy:.4f}, two workers {multi_accuracy:.4f}")
    assert single_accuracy > 0.75
    assert abs(multi_accuracy - single_accuracy) <= ACCURACY_TOLERANCE
    pairs = list(zip(single.model.get_weights(), multi.model.get_weights(), strict=True))
    print("largest weight difference", max(float(np.abs(a - b).max()) for a, b in pairs))
    for a, b in pairs:
        np.testing.assert_allclose(a, b, atol=WEIGHT_TOLERANCE)
    # The task, not a worker, logged the chief's metrics, one value per epoch.
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        logged = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)
        assert [metric.step for metric in logged] == [1, 2], key
        assert [metric.value for metric in logged] == pytest.approx(multi.history[key]), key

    # What the task returns is the chief's trained model, loaded here: its own predictions score
    # what the chief reported.
    predicted = multi.model.predict(tiny_mnist.test.images, verbose=0).argmax(axis=1)
    assert np.mean(predicted == tiny_mnist.test.labels) == pytest.approx(multi_accuracy, abs=1e-3)
    # Both workers trained and logged into the task's log, each line naming its worker.
    messages = [record.getMessage() for record in caplog.records]
    for index in (0, 1):
        assert any(m.startswith(f"worker {index}: epoch 2/2: ") for m in messages), index
    assert any(m.startswith("worker 0: worker 0 done: result in ") for m in messages)
    assert _workers_of_this_process() == []


@pytest.mark.slow  # worker processes
def test_a_failing_worker_fails_the_task_with_its_exit_code_and_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = tmp_path / "job"
    job.mkdir()  # no job.json, no data.npz: every worker exits with a traceback
    cluster = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with caplog.at_level(logging.INFO, logger="test"), pytest.raises(WorkerFailed) as failed:
        run_workers(job, cluster, [0, 1], 120, logging.getLogger("test"))
    assert failed.value.exit_code == 1
    assert "job.json" in failed.value.log_tail
    assert f"training worker {failed.value.index} exited with 1" in str(failed.value)
    logged = [record.getMessage() for record in caplog.records]
    assert any(m.startswith(f"worker {failed.value.index}: FileNotFoundError") for m in logged)
    assert _workers_of_this_process() == []


@pytest.mark.slow  # a worker process importing TensorFlow until it is stopped
def test_workers_past_their_time_are_stopped(tmp_path: Path, tiny_mnist: Mnist) -> None:
    cfg = TrainConfig(strategy="multi_worker", workers=2, epochs=1)
    job = write_job(tmp_path / "job", tiny_mnist, ModelConfig(), cfg)
    # Worker 0 alone of two: it would wait for worker 1 for ever.
    cluster = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with pytest.raises(WorkerFailed, match="training worker 0 timed out") as failed:
        run_workers(job, cluster, [0], 3, logging.getLogger("test"))
    assert failed.value.exit_code is None
    assert _workers_of_this_process() == []


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.strategy=multi_worker"], "exactly one of train.workers"),
        (["train.strategy=multi_worker", "train.workers=1"], "train.workers: "),
        (["train.workers=2"], "train.workers: only with train.strategy=multi_worker"),
        (["train.strategy=multi_worker", "train.workers=2", "train.device=cpu"], "train.device"),
        (
            ["train.strategy=multi_worker", "train.workers=2", "train.cluster=[a:1, b:2]"],
            "exactly one of train.workers",
        ),
        (["train.strategy=multi_worker", "train.cluster=[a:1]"], "train.cluster: "),
        (["train.strategy=multi_worker", "train.cluster=[a, b:2]"], "a: expected host:port"),
        (
            ["train.strategy=multi_worker", "train.cluster=[a:1, b:2]"],
            "train.cluster: needs data.snapshot pinned",
        ),
        (["train.strategy=mirrored"], "train.strategy"),
    ],
)
def test_invalid_multi_worker_settings_name_the_key(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_config(overrides=overrides)


def test_where_it_trains_is_not_what_it_learns() -> None:
    base = load_config().training_digest()
    across = ["train.strategy=multi_worker", "train.workers=3"]
    assert load_config(overrides=across).training_digest() == base


def _cluster_config(tmp_path: Path, snapshot: str, cluster: list[str]) -> Path:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"data:\n  store: {tmp_path / 'store'}\n  base_rows: 3000\n  snapshot: {snapshot}\n"
        f"train:\n  epochs: 1\n  strategy: multi_worker\n  cluster: [{', '.join(cluster)}]\n"
    )
    return config


@pytest.mark.slow  # worker processes
def test_a_cluster_machine_needs_its_place_in_the_cluster(tmp_path: Path) -> None:
    config = _cluster_config(tmp_path, "0123456789abcdef", ["a:1", "b:2", "c:3"])
    for index in ("0", "3"):
        proc = subprocess.run(
            [sys.executable, "-m", "tasks.train_worker", "--config", str(config), "--index", index],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1
        assert "--index: expected 1 to 2" in proc.stderr, proc.stderr


@pytest.mark.slow  # a cluster of two on loopback: the chief's train task and a machine's worker
def test_a_cluster_machine_joins_the_chief_s_train_task(tmp_path: Path) -> None:
    """The README's commands with two "machines" on 127.0.0.1: the second started with
    ``python -m tasks.train_worker --config --index 1``, the first the train task."""
    taken = DataStore(DataConfig(store=tmp_path / "store", base_rows=3000)).snapshot()
    cluster = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    config = _cluster_config(tmp_path, taken.id, cluster)
    cfg = load_config(config)
    peer_log = tmp_path / "peer.log"
    command = [sys.executable, "-m", "tasks.train_worker", "--config", str(config), "--index", "1"]
    with running(command, peer_log) as peer:
        result = train.fn(data.load(cfg.data, taken).mnist, cfg.model, cfg.train)
        assert peer.wait(timeout=120) == 0, peer_log.read_text()[-3000:]
    assert result.device == "MultiWorkerMirroredStrategy(2 workers)"
    assert result.history["val_accuracy"][-1] > 0.75
    assert "worker 1 done" in peer_log.read_text()
