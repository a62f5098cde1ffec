"""Train an MNIST classifier with Keras on the device(s) the configuration asks for.

``train`` is the Prefect task; its pieces are public so they can be tested without Prefect or a GPU:
``resolve_devices`` turns ``train.device`` plus the list of devices that exist into a ``DevicePlan``
(a pure function), ``build_model`` builds and compiles the network, and ``fit`` trains it under the
plan's distribution strategy, logging one line per epoch and, given a ``RunTracker``, one MLflow
value per metric per epoch.

``train.strategy: multi_worker`` trains in ``tasks.train_worker`` processes instead, under a
``MultiWorkerPlan`` (``tasks.multi_worker`` launches them); the task loads the chief's weights into
a model of its own, so that this process alone logs to MLflow and exports. Every plan trains on
the same batches (``training_batches``): ``train.batch_size`` is the global batch, split between
the replicas, so that one worker or several reach the same weights up to float rounding.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from prefect import task
from prefect.cache_policies import NO_CACHE

from serving.mnist import IMAGE_PIXELS, NUM_CLASSES, Mnist, Split
from tasks import multi_worker
from tasks.config import ModelConfig, TrainConfig
from tasks.logs import logger as _logger
from tasks.processes import free_port
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


class _KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy as Keras 3's ``fit`` calls it (keras-team/keras#20585): its
    ``reduce`` across workers takes neither a nest of values (the first batch, which Keras reduces
    for its shapes) nor ``axis=0`` on scalars (the per-step logs); this one maps over the nest and
    reduces scalars whole."""

    def reduce(self, reduce_op, value, axis):
        def one(replicated):
            rank = self.experimental_local_results(replicated)[0].shape.rank
            return super(_KerasMultiWorkerStrategy, self).reduce(
                reduce_op, replicated, None if rank == 0 else axis
            )

        return tf.nest.map_structure(one, value)


def multi_worker_description(workers: int) -> str:
    return f"MultiWorkerMirroredStrategy({workers} workers)"


@dataclass(frozen=True)
class MultiWorkerPlan:
    """This process as one worker of ``TF_CONFIG``'s cluster, each worker's replicas its own
    devices (its GPUs, else its CPU). Only a ``tasks.train_worker`` process makes one: the strategy
    must exist before TensorFlow does anything else in the process, and only once."""

    workers: int
    distributed: tf.distribute.Strategy

    @classmethod
    def from_tf_config(cls, workers: int) -> MultiWorkerPlan:
        # AUTO: ring all-reduce over gRPC on CPUs, NCCL where there are GPUs.
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        return cls(workers, _KerasMultiWorkerStrategy(communication_options=options))

    @property
    def description(self) -> str:
        return multi_worker_description(self.workers)

    def strategy(self) -> tf.distribute.Strategy:
        return self.distributed


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


def _log_epoch(tracker: RunTracker, epoch: int, logs: dict) -> None:
    """One epoch's metrics into the flow's MLflow run; steps count epochs from 1, as the log lines
    do."""
    metrics = {key: float(logs[key]) for key in EPOCH_METRICS if key in logs}
    tracker.log_metrics(metrics, step=epoch + 1)


class _TrackMetrics(keras.callbacks.Callback):
    def __init__(self, tracker: RunTracker) -> None:
        super().__init__()
        self._tracker = tracker

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        _log_epoch(self._tracker, epoch, logs or {})


def training_batches(split: Split, batch_size: int, shuffle_seed: int | None) -> tf.data.Dataset:
    """``split`` in global batches of ``batch_size``, reshuffled each epoch when given a seed.

    The order is a function of the seed alone, so every worker of a cluster produces the same
    batches; sharding by DATA then gives each replica its slice of every global batch (images
    stay in memory, there are no files to shard by)."""
    labels = split.labels.astype(np.int64, copy=False)  # collective ops take no uint8
    dataset = tf.data.Dataset.from_tensor_slices((split.images, labels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(
            len(split.labels), seed=shuffle_seed, reshuffle_each_iteration=True
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.batch(batch_size).with_options(options)


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
    # e.g. "/CPU:0", "/GPU:0", "MirroredStrategy(/GPU:0,/GPU:1)",
    # "MultiWorkerMirroredStrategy(2 workers)"
    device: str
    seconds: float  # building and fitting, wall time


def fit(
    data: Mnist,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    plan: DevicePlan | MultiWorkerPlan,
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
            training_batches(data.train, train_cfg.batch_size, train_cfg.seed),
            epochs=train_cfg.epochs,
            validation_data=training_batches(data.test, train_cfg.batch_size, None),
            shuffle=False,  # the batches are shuffled already, the same way in every worker
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
    """Train ``model_cfg``'s network on ``data`` on the device ``train_cfg.device`` names, or
    across ``train.workers`` / ``train.cluster`` (``train.strategy: multi_worker``)."""
    logger = _logger()
    if train_cfg.strategy == "multi_worker":
        return train_across_workers(data, model_cfg, train_cfg, tracker=tracker, logger=logger)
    gpus = available_gpus()
    logger.info("train.device=%s; GPUs visible: %s", train_cfg.device, ", ".join(gpus) or "none")
    plan = resolve_devices(train_cfg.device, gpus)
    return fit(data, model_cfg, train_cfg, plan, tracker=tracker, logger=logger)


def train_across_workers(
    data: Mnist,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tracker: RunTracker | None = None,
    logger: Logger | None = None,
) -> TrainResult:
    """``train.workers`` local worker processes, or worker 0 of ``train.cluster`` (whose other
    machines each run ``python -m tasks.train_worker --config``); the chief's weights, loaded here.

    Local workers train on the CPU: several processes on one machine would each take all its GPUs.
    """
    logger = logger or _logger()
    started = time.perf_counter()
    if train_cfg.cluster is None:
        cluster = [f"127.0.0.1:{free_port()}" for _ in range(train_cfg.worker_count)]
        indices, env = range(len(cluster)), {"CUDA_VISIBLE_DEVICES": "-1"}
    else:
        cluster, indices, env = train_cfg.cluster, [0], {}
    with tempfile.TemporaryDirectory(prefix="train-workers-") as scratch:
        job = multi_worker.write_job(Path(scratch), data, model_cfg, train_cfg)
        chief = multi_worker.run_workers(
            job, cluster, indices, train_cfg.worker_timeout_s, logger, env
        )
        model = build_model(model_cfg, train_cfg.learning_rate)
        model.load_weights(chief / multi_worker.WEIGHTS_FILE)
        history = json.loads((chief / multi_worker.HISTORY_FILE).read_text())
    if tracker is not None:
        for epoch in range(train_cfg.epochs):
            _log_epoch(tracker, epoch, {key: values[epoch] for key, values in history.items()})
    seconds = time.perf_counter() - started
    device = multi_worker_description(len(cluster))
    logger.info("trained %s on %s in %.1f s", model.name, device, seconds)
    return TrainResult(model=model, history=history, device=device, seconds=seconds)
