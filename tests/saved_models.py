"""Tiny SavedModels with the pipeline's ``serving_default`` signature, written the way a pusher does.

``write_version(base, version, bias_class)`` writes ``<base>/<version>/`` atomically (hidden temp dir
beside it, then ``os.rename``), so a polling server never sees a half-written version. The model is
``scores = softmax(images @ W + b)``, ``classes = argmax(scores)`` with ``W = 0`` and a large ``b`` at
``bias_class``: every input is classified as ``bias_class``, so a test can tell versions apart by the
answer. ``write_broken_version`` writes a directory whose ``saved_model.pb`` is garbage.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

IMAGE_PIXELS = 784
NUM_CLASSES = 10


def expected_scores(bias_class: int, batch: int = 1) -> np.ndarray:
    """The scores the model written with ``bias_class`` returns for any input."""
    logits = np.zeros(NUM_CLASSES, dtype=np.float64)
    logits[bias_class] = 5.0
    e = np.exp(logits - logits.max())
    return np.tile((e / e.sum()).astype(np.float32), (batch, 1))


def _export(path: Path, bias_class: int) -> None:
    import tensorflow as tf

    bias = np.zeros(NUM_CLASSES, dtype=np.float32)
    bias[bias_class] = 5.0

    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.zeros([IMAGE_PIXELS, NUM_CLASSES]), name="w")
            self.b = tf.Variable(bias, name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_PIXELS], tf.float32, name="images")])
        def serve(self, images):
            scores = tf.nn.softmax(tf.matmul(images, self.w) + self.b)
            return {"scores": scores, "classes": tf.argmax(scores, axis=1)}

    model = Model()
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve})


def _write_warmup(path: Path, num_records: int) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    extra = path / "assets.extra"
    extra.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / "tf_serving_warmup_requests")) as writer:
        for _ in range(num_records):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "mnist"
            request.model_spec.signature_name = "serving_default"
            request.inputs["images"].CopyFrom(
                tf.make_tensor_proto(np.zeros((1, IMAGE_PIXELS), dtype=np.float32))
            )
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def _publish(base: Path, version: int | str, fill) -> Path:
    """Build the version in a hidden temp dir beside the target, then rename it into place."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        fill(tmp / "model")
        target = base / str(version)
        os.rename(tmp / "model", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_version(
    base: str | Path, version: int | str, bias_class: int, warmup_records: int = 0
) -> Path:
    """Write a working version that classifies everything as ``bias_class``; return its path."""

    def fill(path: Path) -> None:
        _export(path, bias_class)
        if warmup_records:
            _write_warmup(path, warmup_records)

    return _publish(Path(base), version, fill)


def write_broken_version(base: str | Path, version: int | str) -> Path:
    """Write a version whose ``saved_model.pb`` is not a SavedModel."""

    def fill(path: Path) -> None:
        (path / "variables").mkdir(parents=True)
        (path / "saved_model.pb").write_bytes(b"this is not a saved model\x00\xff")

    return _publish(Path(base), version, fill)


def make_template(directory: str | Path, bias_class: int, warmup_records: int = 0) -> Path:
    """Export once into ``directory`` so tests can copy it (exporting costs ~1 s each time)."""
    directory = Path(directory)
    _export(directory, bias_class)
    if warmup_records:
        _write_warmup(directory, warmup_records)
    return directory


def copy_version(template: str | Path, base: str | Path, version: int | str) -> Path:
    """Publish a copy of an exported template as ``<base>/<version>`` atomically."""
    return _publish(Path(base), version, lambda path: shutil.copytree(template, path))
