"""Tiny SavedModels with the pipeline's ``serving_default`` signature, written the way a pusher
does, and TF Serving's half_plus_two test model.

``write_version(base, version, bias_class)`` writes ``<base>/<version>/`` atomically (hidden temp
dir beside it, then ``os.rename``), so a polling server never sees a half-written version. The
model is ``scores = softmax(images @ W + b)``, ``classes = argmax(scores)`` with ``W = 0`` and a
large ``b`` at ``bias_class``: every input is classified as ``bias_class``, so a test can tell
versions apart by the answer. ``write_broken_version`` writes a directory whose
``saved_model.pb`` is garbage. ``extra_mib`` adds an unused variable of that size, so that a
leaked version shows in the RSS.
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


def _export(path: Path, bias_class: int, extra_mib: int = 0) -> None:
    import tensorflow as tf

    bias = np.zeros(NUM_CLASSES, dtype=np.float32)
    bias[bias_class] = 5.0

    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.zeros([IMAGE_PIXELS, NUM_CLASSES]), name="w")
            self.b = tf.Variable(bias, name="b")
            if extra_mib:  # random: neither the checkpoint nor the loaded tensor can be sparse
                self.ballast = tf.Variable(
                    np.random.default_rng(bias_class).random(extra_mib * 2**18, dtype=np.float32),
                    name="ballast",
                )

        @tf.function(
            input_signature=[tf.TensorSpec([None, IMAGE_PIXELS], tf.float32, name="images")]
        )
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


def make_template(
    directory: str | Path, bias_class: int, warmup_records: int = 0, extra_mib: int = 0
) -> Path:
    """Export once into ``directory`` so tests can copy it (exporting costs ~1 s each time)."""
    directory = Path(directory)
    _export(directory, bias_class, extra_mib)
    if warmup_records:
        _write_warmup(directory, warmup_records)
    return directory


def copy_version(template: str | Path, base: str | Path, version: int | str) -> Path:
    """Publish a copy of an exported template as ``<base>/<version>`` atomically."""
    return _publish(Path(base), version, lambda path: shutil.copytree(template, path))


# -- TF Serving's "half_plus_two" test model, and a predict signature over every dtype -------------


def _export_half_plus_two(path: Path) -> None:
    """``y = 0.5 * x + 2`` the way TF Serving's own test model is built (a TF1 graph through
    ``SavedModelBuilder``): ``x`` [-1,1] is parsed from the ``tf_example`` placeholder that every
    example signature reads, and Predict feeds it directly.

    Signatures: ``serving_default`` (predict, ``x`` float [-1,1] -> ``y``), ``classify_x_to_y``
    (classify, scores only), ``classify_with_labels`` (classes + scores), ``regress_x_to_y``
    (regress), ``mixed`` (predict over float, double, int32, int64, string and bool inputs).
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        a = v1.Variable(0.5, name="a")
        b = v1.Variable(2.0, name="b")
        serialized = v1.placeholder(tf.string, [None], name="tf_example")
        parsed = tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})
        x = tf.identity(parsed["x"], name="x")  # [-1, 1]
        y = tf.add(a * x, b, name="y")
        labels = tf.tile(tf.constant([["half_plus_two"]]), [tf.shape(y)[0], 1])
        mixed = {
            "f": v1.placeholder(tf.float32, [None], name="f"),
            "d": v1.placeholder(tf.float64, [None], name="d"),
            "i32": v1.placeholder(tf.int32, [None], name="i32"),
            "i64": v1.placeholder(tf.int64, [None], name="i64"),
            "s": v1.placeholder(tf.string, [None], name="s"),
            "bool": v1.placeholder(tf.bool, [None], name="bool"),
        }
        total = (
            tf.cast(mixed["f"], tf.float64)
            + mixed["d"]
            + tf.cast(mixed["i32"], tf.float64)
            + tf.cast(mixed["i64"], tf.float64)
        )
        mixed_out = {
            "total": total,
            "s_upper": tf.strings.upper(mixed["s"]),
            "s_bytes": tf.identity(mixed["s"]),
            "not_bool": tf.logical_not(mixed["bool"]),
            "i64_twice": mixed["i64"] * 2,
        }
        sigs = v1.saved_model.signature_def_utils
        signature_defs = {
            "serving_default": sigs.predict_signature_def({"x": x}, {"y": y}),
            "classify_x_to_y": sigs.classification_signature_def(serialized, None, y),
            "classify_with_labels": sigs.classification_signature_def(serialized, labels, y),
            "regress_x_to_y": sigs.regression_signature_def(serialized, y),
            "mixed": sigs.predict_signature_def(mixed, mixed_out),
        }
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(
                session, ["serve"], signature_def_map=signature_defs
            )
            builder.save()


# A request's values for half_plus_two's ``mixed`` signature: two of each of its input dtypes.
MIXED_INPUTS = {
    "f": np.array([1.5, -1], np.float32),
    "d": np.array([0.25, 0], np.float64),
    "i32": np.array([2, 3], np.int32),
    "i64": np.array([2**40, -5], np.int64),
    "s": np.array([b"ab", b"\xff"], object),
    "bool": np.array([True, False]),
}


def x_example(value: float):
    """A tf.Example with the float feature ``x`` the example signatures parse."""
    import tensorflow as tf

    return tf.train.Example(
        features=tf.train.Features(
            feature={"x": tf.train.Feature(float_list=tf.train.FloatList(value=[value]))}
        )
    )


def _write_half_plus_two_warmup(path: Path) -> None:
    """One record of each kind TF Serving replays: predict, classify, regress, multi-inference."""
    import tensorflow as tf
    from tensorflow_serving.apis import (
        classification_pb2,
        inference_pb2,
        predict_pb2,
        prediction_log_pb2,
        regression_pb2,
    )

    predict = predict_pb2.PredictRequest()
    predict.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.signature_name = "classify_x_to_y"
    classify.input.example_list.examples.add().CopyFrom(x_example(1.0))
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.signature_name = "regress_x_to_y"
    regress.input.example_list.examples.add().CopyFrom(x_example(1.0))
    multi = inference_pb2.MultiInferenceRequest()
    for signature, method in (
        ("classify_x_to_y", "tensorflow/serving/classify"),
        ("regress_x_to_y", "tensorflow/serving/regress"),
    ):
        task = multi.tasks.add()
        task.model_spec.name = "half"
        task.model_spec.signature_name = signature
        task.method_name = method
    multi.input.example_list.examples.add().CopyFrom(x_example(1.0))
    logs = [
        prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=predict)
        ),
        prediction_log_pb2.PredictionLog(
            classify_log=prediction_log_pb2.ClassifyLog(request=classify)
        ),
        prediction_log_pb2.PredictionLog(
            regress_log=prediction_log_pb2.RegressLog(request=regress)
        ),
        prediction_log_pb2.PredictionLog(
            multi_inference_log=prediction_log_pb2.MultiInferenceLog(request=multi)
        ),
    ]
    extra = path / "assets.extra"
    extra.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / "tf_serving_warmup_requests")) as writer:
        for log in logs:
            writer.write(log.SerializeToString())


def write_half_plus_two(base: str | Path, version: int | str, warmup: bool = True) -> Path:
    """Publish the half_plus_two model (with one warmup record of each kind) as
    ``<base>/<version>``."""

    def fill(path: Path) -> None:
        _export_half_plus_two(path)
        if warmup:
            _write_half_plus_two_warmup(path)

    return _publish(Path(base), version, fill)


# -- TF2 exports: signatures all marked predict, as tf.saved_model.save marks them -----------------


def _export_half_plus_two_tf2(path: Path) -> None:
    """TF Serving's ``saved_model_half_plus_two_tf2``, written as its test data script writes it:
    a ``tf.Module`` saved by ``tf.saved_model.save``, so every signature's method_name is
    ``tensorflow/serving/predict`` and each has its own input tensor.

    Signatures: ``serving_default`` (``x`` float [1] -> ``y``), ``regress_x_to_y`` /
    ``regress_x_to_y2`` (``inputs`` serialized examples -> ``outputs`` = 0.5 x + 2 / + 3),
    ``classify_x_to_y`` (``inputs`` -> ``scores``), ``regress_x2_to_y3`` (``inputs`` float [1]:
    not examples).
    """
    import tensorflow as tf

    def parse_x(serialized):
        return tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]

    examples_spec = tf.TensorSpec([None], tf.string, name="inputs")

    class HalfPlusTwo(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = tf.Variable(0.5, name="a")
            self.b = tf.Variable(2.0, name="b")
            self.c = tf.Variable(3.0, name="c")

        @tf.function(input_signature=[tf.TensorSpec([1], tf.float32)])
        def predict(self, x):
            return {"y": self.a * x + self.b}

        @tf.function(input_signature=[examples_spec])
        def regress_xy(self, serialized):
            return {"outputs": self.a * parse_x(serialized) + self.b}

        @tf.function(input_signature=[examples_spec])
        def regress_xy2(self, serialized):
            return {"outputs": self.a * parse_x(serialized) + self.c}

        @tf.function(input_signature=[examples_spec])
        def classify_xy(self, serialized):
            return {"scores": self.a * parse_x(serialized) + self.b}

        @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="inputs")])
        def regress_x2y3(self, x2):
            return {"outputs": self.a * x2 + self.c}

    model = HalfPlusTwo()
    tf.saved_model.save(
        model,
        str(path),
        signatures={
            "serving_default": model.predict,
            "regress_x_to_y": model.regress_xy,
            "regress_x_to_y2": model.regress_xy2,
            "classify_x_to_y": model.classify_xy,
            "regress_x2_to_y3": model.regress_x2y3,
        },
    )


def write_half_plus_two_tf2(base: str | Path, version: int | str) -> Path:
    """Publish the TF2 half_plus_two (``_export_half_plus_two_tf2``) as ``<base>/<version>``."""
    return _publish(Path(base), version, _export_half_plus_two_tf2)


KERAS_WEIGHTS = np.array([[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]], np.float32)  # Dense(2) on 3 inputs
KERAS_BIAS = np.array([0.5, -0.5], np.float32)


def _export_keras_sequential(path: Path) -> None:
    """A Keras ``Sequential`` ([-1,3] -> Dense(2) with ``KERAS_WEIGHTS`` and ``KERAS_BIAS``),
    exported the way Keras 3 exports for TF Serving (``model.export``)."""
    import keras

    model = keras.Sequential([keras.Input((3,), name="features"), keras.layers.Dense(2)])
    model.layers[-1].set_weights([KERAS_WEIGHTS, KERAS_BIAS])
    model.export(str(path), format="tf_saved_model", verbose=False)


def write_keras_sequential(base: str | Path, version: int | str) -> Path:
    """Publish the Keras model (``_export_keras_sequential``) as ``<base>/<version>``."""
    return _publish(Path(base), version, _export_keras_sequential)
