"""tasks.train: device resolution (pure, fake device lists), real short training runs, the
MirroredStrategy path on two logical CPUs (in a subprocess), and per-epoch metrics in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from serving.mnist import Mnist, Split, load
from tasks.config import ModelConfig, TrainConfig
from tasks.tracking import RunTracker
from tasks.train import (
    DeviceError,
    DevicePlan,
    build_model,
    resolve_devices,
    train,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = REPO_ROOT / "data" / "mnist"
TWO_GPUS = ["/GPU:0", "/GPU:1"]


@pytest.fixture(scope="module")
def small_mnist() -> Mnist:
    """3,000 training and 1,000 test images: enough to learn well above chance in one epoch."""
    full = load(MNIST_DIR)
    return Mnist(
        train=Split(full.train.images[:3000], full.train.labels[:3000]),
        test=Split(full.test.images[:1000], full.test.labels[:1000]),
    )


# --- device resolution -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "gpus", "devices", "description"),
    [
        ("auto", [], ("/CPU:0",), "/CPU:0"),
        ("auto", ["/GPU:0"], ("/GPU:0",), "/GPU:0"),
        ("auto", TWO_GPUS, ("/GPU:0",), "/GPU:0"),  # auto never distributes
        ("cpu", [], ("/CPU:0",), "/CPU:0"),
        ("cpu", TWO_GPUS, ("/CPU:0",), "/CPU:0"),
        ("gpu", ["/GPU:0"], ("/GPU:0",), "/GPU:0"),
        ("gpu", TWO_GPUS, ("/GPU:0", "/GPU:1"), "MirroredStrategy(/GPU:0,/GPU:1)"),
        ("gpu:0", TWO_GPUS, ("/GPU:0",), "/GPU:0"),
        ("gpu:1", TWO_GPUS, ("/GPU:1",), "/GPU:1"),
    ],
)
def test_resolve_devices(
    requested: str, gpus: list[str], devices: tuple[str, ...], description: str
) -> None:
    plan = resolve_devices(requested, gpus)
    assert plan.devices == devices
    assert plan.description == description


@pytest.mark.parametrize(
    ("requested", "gpus", "expected"),
    [
        ("gpu", [], r"train\.device=gpu: this machine has no GPU"),
        ("gpu:0", [], r"train\.device=gpu:0: no such GPU, this machine has no GPU"),
        ("gpu:2", TWO_GPUS, r"train\.device=gpu:2: no such GPU, this machine has /GPU:0, /GPU:1"),
        ("tpu", TWO_GPUS, r"train\.device='tpu'"),
    ],
)
def test_resolve_devices_rejects_missing_devices(
    requested: str, gpus: list[str], expected: str
) -> None:
    with pytest.raises(DeviceError, match=expected):
        resolve_devices(requested, gpus)


def test_strategy_matches_plan() -> None:
    assert isinstance(DevicePlan(("/CPU:0",)).strategy(), tf.distribute.OneDeviceStrategy)


def test_auto_trains_on_the_first_gpu_if_there_is_one_else_the_cpu(small_mnist: Mnist) -> None:
    few = Mnist(
        train=Split(small_mnist.train.images[:200], small_mnist.train.labels[:200]),
        test=Split(small_mnist.test.images[:100], small_mnist.test.labels[:100]),
    )
    result = train.fn(few, ModelConfig(), TrainConfig(epochs=1, device="auto"))
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    assert result.device == ("/GPU:0" if has_gpu else "/CPU:0")


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="this machine has a GPU")
def test_train_task_fails_before_training_when_the_gpu_is_missing(small_mnist: Mnist) -> None:
    with pytest.raises(DeviceError, match=r"train\.device=gpu:0"):
        train.fn(small_mnist, ModelConfig(), TrainConfig(device="gpu:0"))


# --- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "mlp", "cnn"])
def test_build_model_maps_images_to_class_probabilities(kind: str) -> None:
    model = build_model(ModelConfig(kind=kind, hidden_units=8))
    assert model.input_shape == (None, 784)
    assert model.output_shape == (None, 10)
    scores = model.predict(np.random.default_rng(0).random((3, 784), dtype=np.float32), verbose=0)
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    assert model.loss == "sparse_categorical_crossentropy"
    assert float(model.optimizer.learning_rate) == pytest.approx(0.5)


# --- training ------------------------------------------------------------------------------------


def test_train_learns_and_is_reproducible(small_mnist: Mnist) -> None:
    cfg = TrainConfig(epochs=1, batch_size=100, learning_rate=0.5, device="cpu", seed=7)
    first = train.fn(small_mnist, ModelConfig(kind="softmax"), cfg)
    assert first.device == "/CPU:0"
    assert set(first.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(values) == 1 for values in first.history.values())
    # Chance is 10%; softmax regression reaches ~85% on the held-out images after one such epoch.
    assert first.history["val_accuracy"][0] > 0.75
    assert first.seconds > 0
    predicted = first.model.predict(small_mnist.test.images, verbose=0).argmax(axis=1)
    test_accuracy = np.mean(predicted == small_mnist.test.labels)
    assert test_accuracy == pytest.approx(first.history["val_accuracy"][0], abs=1e-3)

    again = train.fn(small_mnist, ModelConfig(kind="softmax"), cfg)
    for a, b in zip(first.model.get_weights(), again.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_logs_one_value_per_epoch_to_mlflow(small_mnist: Mnist, tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(
        "train-test", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    run_id = client.create_run(experiment_id).info.run_id
    tracker = RunTracker(tracking_uri=tracking_uri, run_id=run_id)
    data = Mnist(
        train=Split(small_mnist.train.images[:1000], small_mnist.train.labels[:1000]),
        test=small_mnist.test,
    )

    result = train.fn(data, ModelConfig(), TrainConfig(epochs=2, device="cpu"), tracker=tracker)

    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)
        assert [metric.step for metric in history] == [1, 2], key
        assert [metric.value for metric in history] == pytest.approx(result.history[key]), key


# --- several devices -----------------------------------------------------------------------------

_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import tensorflow as tf

    # Must happen before TensorFlow initialises its devices, hence a fresh process.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

    from tasks.config import ModelConfig, TrainConfig
    from serving.mnist import Mnist, Split, load
    from tasks.train import fit, resolve_devices

    full = load(sys.argv[1])
    data = Mnist(Split(full.train.images[:2000], full.train.labels[:2000]),
                 Split(full.test.images[:1000], full.test.labels[:1000]))
    logical = [f"/CPU:{i}" for i, _ in enumerate(tf.config.list_logical_devices("CPU"))]
    # The logical CPUs stand in for GPUs: "gpu" means "all of them".
    plan = resolve_devices("gpu", logical)
    cfg = TrainConfig(epochs=1, batch_size=100, device="gpu", log_device_placement=True)
    result = fit(data, ModelConfig(kind="mlp", hidden_units=32), cfg, plan)
    images = data.test.images[:8]

    # The pipeline exports what it trained: mirrored variables must serve through the TF1 loader.
    from pathlib import Path
    from tasks.config import ExportConfig
    from tasks.export import export
    exported = export.fn(
        result.model, ExportConfig(base_path=Path(sys.argv[2])), Path(sys.argv[2]), images
    )
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(exported.path))
        signature = meta_graph.signature_def["serving_default"]
        served = session.run(
            signature.outputs["scores"].name, {signature.inputs["images"].name: images}
        )

    print("RESULT " + json.dumps({
        "device": result.device,
        "val_accuracy": result.history["val_accuracy"][-1],
        "variable_types": sorted({type(v.value).__name__ for v in result.model.variables}),
        "scores": result.model.predict(images, verbose=0).tolist(),
        "placement_logged": tf.debugging.get_log_device_placement(),
        "served_scores": served.tolist(),
    }))
    """
)


@pytest.mark.slow  # a subprocess with two logical CPUs: imports TensorFlow afresh
def test_mirrored_strategy_over_two_logical_cpus_then_export(tmp_path: Path) -> None:
    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED_SCRIPT)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), str(MNIST_DIR), str(tmp_path / "exports")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(
        next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:]
    )
    assert result["device"] == "MirroredStrategy(/CPU:0,/CPU:1)"
    assert result["variable_types"] == ["MirroredVariable"]
    assert result["val_accuracy"] > 0.6
    assert np.allclose(np.sum(result["scores"], axis=1), 1.0, atol=1e-5)
    # Variable placement goes to the task log, one line per variable, listing both replicas.
    placement = [line for line in proc.stdout.splitlines() if line.startswith("variable ")]
    assert len(placement) == 4, proc.stdout[-3000:]
    assert all("CPU:0" in line and "CPU:1" in line for line in placement)
    np.testing.assert_allclose(result["served_scores"], result["scores"], rtol=1e-5, atol=1e-6)
    # The process-wide placement logging is switched back off after training.
    assert result["placement_logged"] is False
