"""Export a trained Keras model as a TF Serving SavedModel under the next free version number.

Layout: ``<export.base_path>/<model_name>/<version>/`` with
  * ``serving_default``: ``images`` float32 [None, 784] in 0..1 -> ``scores`` float32 [None, 10]
    (softmax), ``classes`` int64 [None] (argmax), for TF Serving's Predict API;
  * ``predict_images``: ``images`` -> ``scores`` alone, the Predict signature TF Serving's MNIST
    tutorial exports and its ``mnist_client.py`` asks for by name (docs/tf-serving-compat.md);
  * ``classify``: ``inputs`` string [None] of serialized ``tf.Example`` with a float feature
    ``image`` of 784 values -> ``classes`` string [None, 10] ("0".."9") and ``scores`` float32
    [None, 10], with method name ``tensorflow/serving/classify`` so TF Serving's Classify API
    accepts it;
  * ``assets.extra/tf_serving_warmup_requests``: PredictionLog records TF Serving replays on load,
    so the first real request does not pay for graph initialisation.

Versions are never reused: the new one is above every version in the export base *and* in the
serving store (a version pushed earlier and since deleted from the exports must not be shadowed),
and the SavedModel appears under its number only when complete, so neither a concurrent export nor
a model server ever sees half a model. It is written under a hidden temporary name
(``.tmp@<owner>``, ``tasks.staging``) in a local directory, then its number is claimed: one loop
for both kinds of base (``claim_next_version``), which tries the next free number and, when
another export took it meanwhile, the one after.
* A directory: the claim is the rename of the finished SavedModel to ``<n>``.
* ``s3://bucket/prefix``: the claim is ``<n>/.claim``, created by a conditional PUT; then the
  SavedModel is uploaded, ``saved_model.pb`` last (a failed upload is deleted, the number stays
  claimed). The local copy, which validate, infra_validate and push read, is renamed to ``<n>``
  in ``S3Store.local_dir()``, under this host's temporary directory.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from prefect import task
from prefect.cache_policies import NO_CACHE
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import classification_pb2, predict_pb2, prediction_log_pb2

from serving.mnist import IMAGE_PIXELS, NUM_CLASSES
from serving.model_format import (
    CLASSIFY_METHOD,
    DEFAULT_SIGNATURE,
    SAVED_MODEL_FILE,
    WARMUP_FILE,
)
from tasks.config import ExportConfig
from tasks.logs import logger as _logger
from tasks.model_store import LocalStore, ModelStore, S3Store, model_store
from tasks.staging import EXPORT, DiskFull, discard, disk_full, staging_path, sweep

CLASSIFY_SIGNATURE = "classify"
TUTORIAL_SIGNATURE = "predict_images"
IMAGE_FEATURE = "image"
CLASS_LABELS = tuple(str(digit) for digit in range(NUM_CLASSES))

# rename(2) of a directory onto an existing one fails with one of these when the target is taken
# (a non-empty directory) or is not a directory at all.
_TAKEN = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR}
# Each failed claim means another export just took a version; this many in a row means something
# else is wrong (e.g. a directory that cannot be renamed into), not contention.
_MAX_ATTEMPTS = 100


@dataclass(frozen=True)
class ExportResult:
    model_name: str
    version: int
    # <export.base_path>/<model_name>/<version>, or for an s3:// base its local copy
    path: Path


def next_version(*stores: ModelStore) -> int:
    """One above the highest version in any of ``stores``; 1 when there is none. Versions being
    written, or claimed, count."""
    return max(set().union(*(store.versions() for store in stores)), default=0) + 1


def claim_next_version(take: Callable[[int], bool], *stores: ModelStore) -> int:
    """The first free version number above every version of ``stores`` that ``take`` gets:
    ``take(n)`` claims ``n`` atomically, or returns False when another export holds it."""
    candidate = next_version(*stores)
    for _ in range(_MAX_ATTEMPTS):
        if take(candidate):
            return candidate
        # Rescan too: a concurrent export may have pushed the highest version further than +1.
        candidate = max(candidate + 1, next_version(*stores))
    raise RuntimeError(f"no free version under {stores[0]} after {_MAX_ATTEMPTS} attempts")


def _renamed(staging: Path, target: Path) -> bool:
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno not in _TAKEN:
            raise
        return False
    return True


def claim_in_directory(
    staging: Path, exports: LocalStore, serving_store: ModelStore
) -> tuple[int, Path]:
    """Rename the finished SavedModel ``staging`` (in ``exports``: rename is atomic only within
    a file system) to the next free version; returns the version and its directory."""
    version = claim_next_version(
        lambda n: _renamed(staging, exports.root / str(n)), exports, serving_store
    )
    return version, exports.root / str(version)


def claim_in_s3(staging: Path, exports: S3Store, serving_store: ModelStore) -> tuple[int, Path]:
    """Claim the next free version in ``exports``, upload ``staging`` as it, and rename
    ``staging`` to its local copy ``<local_dir>/<n>``; returns the version and that copy."""
    version = claim_next_version(exports.claim, exports, serving_store)
    exports.upload(staging, version)
    local = staging.parent / str(version)
    discard(local, version)  # a copy of an earlier store's version n (a bucket emptied since)
    staging.rename(local)
    return version, local


class _ServingModule(tf.Module):
    """The serving signatures, as ``tf.function``s over the Keras model.

    It tracks the model's underlying ``tf.Variable``s, not the Keras model: a Keras 3 model tracked
    as an attribute exports its variables twice (keras-team/keras#20095), and the TF1 loader that
    TF Serving uses then restores one copy while the signatures read the other, uninitialised one.
    """

    def __init__(self, model: keras.Model) -> None:
        super().__init__(name="mnist_serving")
        self._model = _Untracked(model)
        self.model_variables = [variable.value for variable in model.variables]

    def _scores(self, images: tf.Tensor) -> tf.Tensor:
        return tf.cast(self._model.value(images, training=False), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_PIXELS], tf.float32, name="images")])
    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        scores = self._scores(images)
        return {"scores": scores, "classes": tf.argmax(scores, axis=1, output_type=tf.int64)}

    @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_PIXELS], tf.float32, name="images")])
    def predict_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"scores": self._scores(images)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        features = tf.io.parse_example(
            inputs, {IMAGE_FEATURE: tf.io.FixedLenFeature([IMAGE_PIXELS], tf.float32)}
        )
        scores = self._scores(features[IMAGE_FEATURE])
        # TF Serving's Classify pairs every score with a class label, row by row.
        labels = tf.constant([CLASS_LABELS], dtype=tf.string)
        classes = tf.tile(labels, [tf.shape(scores)[0], 1])
        return {"classes": classes, "scores": scores}


class _Untracked:
    """Holds an object out of sight of tf.Module's automatic dependency tracking."""

    def __init__(self, value: keras.Model) -> None:
        self.value = value


def _set_classify_method_name(saved_model_dir: Path) -> None:
    """TF2's ``tf.saved_model.save`` marks every signature as Predict; TF Serving's Classify API
    only accepts a signature whose method name is ``tensorflow/serving/classify``."""
    pb_path = saved_model_dir / SAVED_MODEL_FILE
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString(pb_path.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if CLASSIFY_SIGNATURE in meta_graph.signature_def:
            meta_graph.signature_def[CLASSIFY_SIGNATURE].method_name = CLASSIFY_METHOD
    pb_path.write_bytes(saved_model.SerializeToString())
    try:
        # fingerprint.pb holds a checksum of saved_model.pb; recompute it so it describes the
        # patched file. Private API, and nothing fails on a stale fingerprint, hence best effort.
        from tensorflow.python.saved_model import fingerprinting_utils

        fingerprinting_utils.write_fingerprint(str(saved_model_dir))
    except (ImportError, AttributeError):
        pass


def image_example(image: np.ndarray) -> tf.train.Example:
    """The ``tf.Example`` the ``classify`` signature parses: a float feature ``image`` of 784
    values."""
    values = np.asarray(image, dtype=np.float32).reshape(IMAGE_PIXELS)
    feature = tf.train.Feature(float_list=tf.train.FloatList(value=values.tolist()))
    return tf.train.Example(features=tf.train.Features(feature={IMAGE_FEATURE: feature}))


def warmup_records(
    model_name: str, images: np.ndarray, num_predict: int
) -> list[prediction_log_pb2.PredictionLog]:
    """``num_predict`` Predict requests (cycling through ``images``) and one Classify request."""
    records = []
    for index in range(num_predict):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = DEFAULT_SIGNATURE
        image = images[index % len(images)].reshape(1, IMAGE_PIXELS)
        request.inputs["images"].CopyFrom(
            tf.make_tensor_proto(image, dtype=tf.float32, shape=[1, IMAGE_PIXELS])
        )
        records.append(
            prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
        )
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = model_name
    classify.model_spec.signature_name = CLASSIFY_SIGNATURE
    classify.input.example_list.examples.add().CopyFrom(image_example(images[0]))
    records.append(
        prediction_log_pb2.PredictionLog(
            classify_log=prediction_log_pb2.ClassifyLog(request=classify)
        )
    )
    return records


def _write_warmup(saved_model_dir: Path, records: list[prediction_log_pb2.PredictionLog]) -> Path:
    path = saved_model_dir / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return path


def _check_images(warmup_images: np.ndarray) -> np.ndarray:
    images = np.asarray(warmup_images, dtype=np.float32)
    if images.ndim != 2 or images.shape[1] != IMAGE_PIXELS or len(images) == 0:
        raise ValueError(
            f"warmup_images: expected float32 [N>=1, {IMAGE_PIXELS}], got shape {images.shape}"
        )
    return images


def _write_saved_model(
    model: keras.Model, path: Path, model_name: str, images: np.ndarray, warmup_requests: int
) -> None:
    module = _ServingModule(model)
    tf.saved_model.save(
        module,
        str(path),
        signatures={
            DEFAULT_SIGNATURE: module.serve,
            TUTORIAL_SIGNATURE: module.predict_images,
            CLASSIFY_SIGNATURE: module.classify,
        },
    )
    _set_classify_method_name(path)
    _write_warmup(path, warmup_records(model_name, images, warmup_requests))


@task(name="export", cache_policy=NO_CACHE)
def export(
    model: keras.Model,
    cfg: ExportConfig,
    serving_base_path: str,
    warmup_images: np.ndarray,
) -> ExportResult:
    """Write ``model`` as the next version of ``cfg.model_name`` under ``cfg.base_path``."""
    logger = _logger()
    images = _check_images(warmup_images)
    exports = model_store(cfg.base_path, cfg.model_name)
    serving_store = model_store(serving_base_path, cfg.model_name)
    work_dir = exports.local_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    sweep(work_dir)
    # Hidden, and in the same directory as the final version so the rename is atomic.
    staging = staging_path(work_dir, EXPORT)
    claim = claim_in_s3 if isinstance(exports, S3Store) else claim_in_directory
    try:
        _write_saved_model(model, staging, cfg.model_name, images, cfg.warmup_requests)
        version, path = claim(staging, exports, serving_store)
    except Exception as error:
        if disk_full(error):
            raise DiskFull(work_dir, error) from error
        raise
    finally:
        # Only left when something failed before or during the rename.
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "exported %s version %d to %s (warmup: %d predict + 1 classify requests)",
        cfg.model_name,
        version,
        exports,
        cfg.warmup_requests,
    )
    return ExportResult(model_name=cfg.model_name, version=version, path=path)
