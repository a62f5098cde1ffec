"""Train an MNIST classifier with Keras on the device(s) the configuration asks for.

``train`` is the Prefect task; its pieces are public so they can be tested without Prefect or a GPU:
``resolve_devices`` turns ``train.device`` plus the list of devices that exist into a ``DevicePlan``
(a pure function), ``build_model`` builds and compiles the network, and ``fit`` trains it under the
plan's distribution strategy, logging one line per epoch and, given a ``RunTracker``, one MLflow
value per metric per epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import tensorflow as tf
from prefect import task
from prefect.cache_policies import NO_CACHE

from serving.mnist import IMAGE_PIXELS, NUM_CLASSES, Mnist
from tasks.config import ModelConfig, TrainConfig
from tasks.logs import logger as _logger
from tasks.tracking import RunTracker

# The metrics Keras reports per epoch with validation data, in the order they are logged.
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")

Logger = logging.Logger | logging.LoggerAdapter


class DeviceError(ValueError):
    """``train.device`` names a device this machine does not have; the message says what exists."""


@dataclass(frozen=True)
class DevicePlan:
    """Where training runs: one device, or several under ``MirroredStrategy``."""

    devices: tuple[str, ...]  # e.g. ("/GPU:0",) or ("/GPU:0", "/GPU:1")

    @property
    def description(self) -> str:
        if len(self.devices) == 1:
            return self.devices[0]
        return f"MirroredStrategy({','.join(self.devices)})"

    def strategy(self) -> tf.distribute.Strategy:
        # OneDeviceStrategy for one device keeps a single code path (build, compile and fit under
        # strategy.scope()) whether or not training is distributed.
        if len(self.devices) == 1:
            return tf.distribute.OneDeviceStrategy(self.devices[0])
        return tf.distribute.MirroredStrategy(list(self.devices))


def resolve_devices(requested: str, accelerators: Sequence[str], cpu: str = "/CPU:0") -> DevicePlan:
    """Map ``train.device`` to the devices to train on.

    ``accelerators`` are the device names that ``gpu``/``gpu:N``/``auto`` choose among, in order:
    normally the machine's GPUs (see ``available_gpus``). Tests pass logical CPU devices here to
    exercise the multi-device path on a machine without GPUs.
    """
    accelerators = tuple(accelerators)
    if requested == "cpu":
        return DevicePlan((cpu,))
    if requested == "auto":
        # The first GPU only: a multi-GPU run is something to ask for ("gpu"), not a surprise.
        return DevicePlan((accelerators[0],) if accelerators else (cpu,))
    exists = (
        f"this machine has {', '.join(accelerators)}" if accelerators else "this machine has no GPU"
    )
    if requested == "gpu":
        if not accelerators:
            raise DeviceError(f"train.device=gpu: {exists}; use train.device=cpu or auto")
        return DevicePlan(accelerators)
    if requested.startswith("gpu:") and requested[4:].isdigit():
        index = int(requested[4:])
        if index >= len(accelerators):
            raise DeviceError(f"train.device={requested}: no such GPU, {exists}")
        return DevicePlan((accelerators[index],))
    raise DeviceError(f"train.device={requested!r}: expected auto, cpu, gpu or gpu:N")


def available_gpus() -> list[str]:
    """The GPUs TensorFlow can see, as device names (``/GPU:0``, ...)."""
    return [f"/GPU:{index}" for index, _ in enumerate(tf.config.list_physical_devices("GPU"))]


def build_model(model_cfg: ModelConfig, learning_rate: float = 0.5) -> keras.Model:
    """The network for ``model.kind``, compiled with SGD and sparse categorical cross-entropy."""
    inputs = keras.Input(shape=(IMAGE_PIXELS,), dtype="float32", name="images")
    if model_cfg.kind == "softmax":
        # Softmax regression, the model of TF Serving's MNIST tutorial.
        hidden = inputs
    elif model_cfg.kind == "mlp":
        hidden = keras.layers.Dense(model_cfg.hidden_units, activation="relu")(inputs)
    elif model_cfg.kind == "cnn":
        x = keras.layers.Reshape((28, 28, 1))(inputs)
        x = keras.layers.Conv2D(32, 3, activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Conv2D(64, 3, activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
        hidden = keras.layers.Flatten()(x)
    else:  # ModelConfig validates kind; this guards against a new kind without a builder.
        raise ValueError(f"model.kind={model_cfg.kind!r}: no builder for it")
    scores = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="scores")(hidden)
    model = keras.Model(inputs, scores, name=f"mnist_{model_cfg.kind}")
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


class _EpochLog(keras.callbacks.Callback):
    """One readable line per epoch (Keras' own progress bar is off: it floods Prefect's logs)."""

    def __init__(self, logger: Logger, epochs: int) -> None:
        super().__init__()
        self._logger = logger
        self._epochs = epochs
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        values = " ".join(f"{key}={logs[key]:.4f}" for key in EPOCH_METRICS if key in logs)
        seconds = time.perf_counter() - self._started
        self._logger.info("epoch %d/%d: %s (%.1f s)", epoch + 1, self._epochs, values, seconds)


class _TrackMetrics(keras.callbacks.Callback):
    """Per-epoch metrics into the flow's MLflow run; steps count epochs from 1, as the log lines
    do."""

    def __init__(self, tracker: RunTracker) -> None:
        super().__init__()
        self._tracker = tracker

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        metrics = {key: float(logs[key]) for key in EPOCH_METRICS if key in logs}
        self._tracker.log_metrics(metrics, step=epoch + 1)


def _variable_devices(variable: keras.Variable) -> str:
    value = variable.value
    replicas = getattr(value, "values", None)  # a MirroredVariable has one copy per device
    if replicas is not None:
        return ", ".join(replica.device for replica in replicas)
    return value.device


@dataclass(frozen=True)
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]  # metric -> one value per epoch
    device: str  # e.g. "/CPU:0", "/GPU:0", "MirroredStrategy(/GPU:0,/GPU:1)"
    seconds: float  # building and fitting, wall time


def fit(
    data: Mnist,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    plan: DevicePlan,
    tracker: RunTracker | None = None,
    logger: Logger | None = None,
) -> TrainResult:
    """Build and train the model on ``plan``'s devices; ``train`` is this plus device resolution."""
    logger = logger or _logger()
    # Seeds Python, NumPy and TensorFlow: same config, same data, same device -> same weights.
    keras.utils.set_random_seed(train_cfg.seed)
    placement_was_logged = tf.debugging.get_log_device_placement()
    if train_cfg.log_device_placement:
        # TensorFlow then logs the device of every op it runs (to stderr), as the TF Serving
        # tutorial's log_device_placement session option did.
        tf.debugging.set_log_device_placement(True)
    started = time.perf_counter()
    try:
        with plan.strategy().scope():
            model = build_model(model_cfg, train_cfg.learning_rate)
        if train_cfg.log_device_placement:
            for variable in model.variables:
                logger.info("variable %s on %s", variable.path, _variable_devices(variable))
        logger.info(
            "training %s (%d parameters) on %s: epochs=%d batch_size=%d SGD learning_rate=%g, "
            "%d train / %d test images",
            model.name,
            model.count_params(),
            plan.description,
            train_cfg.epochs,
            train_cfg.batch_size,
            train_cfg.learning_rate,
            len(data.train.labels),
            len(data.test.labels),
        )
        callbacks: list[keras.callbacks.Callback] = [_EpochLog(logger, train_cfg.epochs)]
        if tracker is not None:
            callbacks.append(_TrackMetrics(tracker))
        history = model.fit(
            data.train.images,
            data.train.labels,
            batch_size=train_cfg.batch_size,
            epochs=train_cfg.epochs,
            validation_data=(data.test.images, data.test.labels),
            shuffle=True,
            callbacks=callbacks,
            verbose=0,
        )
    finally:
        # The setting is process-wide; leave it as found so later tasks in this worker are not
        # flooded.
        tf.debugging.set_log_device_placement(placement_was_logged)
    seconds = time.perf_counter() - started
    metrics = {key: [float(value) for value in values] for key, values in history.history.items()}
    final = metrics.get("val_accuracy", [float("nan")])[-1]
    logger.info(
        "trained %s on %s in %.1f s: val_accuracy %.4f",
        model.name,
        plan.description,
        seconds,
        final,
    )
    return TrainResult(model=model, history=metrics, device=plan.description, seconds=seconds)


@task(name="train", cache_policy=NO_CACHE)
def train(
    data: Mnist,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tracker: RunTracker | None = None,
) -> TrainResult:
    """Train ``model_cfg``'s network on ``data`` on the device ``train_cfg.device`` names."""
    logger = _logger()
    gpus = available_gpus()
    logger.info("train.device=%s; GPUs visible: %s", train_cfg.device, ", ".join(gpus) or "none")
    plan = resolve_devices(train_cfg.device, gpus)
    return fit(data, model_cfg, train_cfg, plan, tracker=tracker, logger=logger)
