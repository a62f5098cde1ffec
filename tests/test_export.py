"""tasks.export: version numbering, claiming a version atomically under concurrency, and the
exported SavedModel read back from disk with TF2's loader and with the TF1 loader TF Serving
uses."""

from __future__ import annotations

import os
import threading
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

import tasks.export as export_module
from serving.model_format import CLASSIFY_METHOD, WARMUP_FILE
from tasks.config import ExportConfig, ModelConfig
from tasks.export import (
    TUTORIAL_SIGNATURE,
    ExportResult,
    claim_in_directory,
    export,
    image_example,
    next_version,
)
from tasks.model_store import LocalStore
from tasks.train import build_model

LABELS = [str(digit).encode() for digit in range(10)]


def _version_dirs(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "saved_model.pb").write_bytes(b"x")  # non-empty, like a real version


def _leftovers(model_dir: Path) -> list[str]:
    return sorted(path.name for path in model_dir.iterdir() if path.name.startswith("."))


# --- version numbers ---------------------------------------------------------------------------


def _stores(tmp_path: Path) -> tuple[LocalStore, LocalStore]:
    return LocalStore(tmp_path / "exports", "mnist"), LocalStore(tmp_path / "serving", "mnist")


def test_next_version_of_nothing_is_1(tmp_path: Path) -> None:
    exports, serving = _stores(tmp_path)
    assert next_version(exports, serving) == 1
    exports.root.mkdir(parents=True)
    assert next_version(exports, serving) == 1


def test_next_version_is_above_both_stores(tmp_path: Path) -> None:
    exports, serving = _stores(tmp_path)
    _version_dirs(exports.root, ["1", "3"])
    _version_dirs(serving.root, ["2", "7"])
    assert next_version(exports, serving) == 8
    assert next_version(serving, exports) == 8


def test_next_version_ignores_what_is_not_a_version(tmp_path: Path) -> None:
    exports, serving = _stores(tmp_path)
    _version_dirs(exports.root, ["2", "latest", "v9", ".tmp-0123", ".12", "0", "-4", "1.5"])
    serving.root.mkdir(parents=True)
    (serving.root / "40").write_text("a file, not a version directory")
    assert next_version(exports, serving) == 3


def test_claim_retries_when_the_version_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports, serving = _stores(tmp_path)
    _version_dirs(exports.root, ["1", "2", "3"])
    staging = exports.root / ".tmp-a"
    _version_dirs(exports.root, [staging.name])
    # A scan that is always stale: as if other exports took each version between scan and rename.
    monkeypatch.setattr(export_module, "next_version", lambda *stores: 1)
    version, path = claim_in_directory(staging, exports, serving)
    assert (version, path) == (4, exports.root / "4")
    assert (path / "saved_model.pb").read_bytes() == b"x"
    assert not staging.exists()
    assert all((exports.root / name / "saved_model.pb").exists() for name in ("1", "2", "3"))


def test_concurrent_claims_get_distinct_versions(tmp_path: Path) -> None:
    exports, serving = tmp_path / "exports" / "mnist", tmp_path / "serving" / "mnist"
    _version_dirs(serving, ["5"])
    stagings = [exports / f".tmp-{i}" for i in range(8)]
    for staging in stagings:
        _version_dirs(exports, [staging.name])
        (staging / "id").write_text(staging.name)
    start = threading.Barrier(len(stagings))
    results: dict[str, int] = {}

    def run(staging: Path) -> None:
        start.wait()
        stores = LocalStore(exports.parent, "mnist"), LocalStore(serving.parent, "mnist")
        results[staging.name] = claim_in_directory(staging, *stores)[0]

    threads = [threading.Thread(target=run, args=(staging,)) for staging in stagings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.values()) == list(range(6, 14))
    for name, version in results.items():  # each staging directory became exactly its own version
        assert (exports / str(version) / "id").read_text() == name
    assert _leftovers(exports) == []


# --- the exported SavedModel ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(3)
    return build_model(ModelConfig(kind="mlp", hidden_units=16))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).random((6, 784), dtype=np.float32)


@pytest.fixture(scope="module")
def exported(
    model: keras.Model, images: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> ExportResult:
    root = tmp_path_factory.mktemp("export")
    cfg = ExportConfig(base_path=root / "exports", model_name="digits", warmup_requests=3)
    return export.fn(model, cfg, root / "serving", images[:2])


def test_export_result(exported: ExportResult) -> None:
    assert exported.model_name == "digits"
    assert exported.version == 1
    assert exported.path == exported.path.parent.parent / "digits" / "1"
    assert (exported.path / "saved_model.pb").is_file()
    assert _leftovers(exported.path.parent) == []


def test_serving_default_matches_keras(
    exported: ExportResult, model: keras.Model, images: np.ndarray
) -> None:
    loaded = tf.saved_model.load(str(exported.path))
    outputs = loaded.signatures["serving_default"](images=tf.constant(images))
    expected = model.predict(images, verbose=0)
    assert outputs["scores"].dtype == tf.float32 and outputs["classes"].dtype == tf.int64
    np.testing.assert_allclose(outputs["scores"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected.argmax(axis=1))


def test_classify_matches_keras(
    exported: ExportResult, model: keras.Model, images: np.ndarray
) -> None:
    loaded = tf.saved_model.load(str(exported.path))
    serialized = tf.constant([image_example(image).SerializeToString() for image in images])
    outputs = loaded.signatures["classify"](inputs=serialized)
    np.testing.assert_allclose(
        outputs["scores"].numpy(), model.predict(images, verbose=0), rtol=1e-5, atol=1e-6
    )
    assert outputs["classes"].numpy().tolist() == [LABELS] * len(images)


def test_signatures_as_tf_serving_sees_them(exported: ExportResult) -> None:
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((exported.path / "saved_model.pb").read_bytes())
    (meta_graph,) = saved_model.meta_graphs
    serving, classify = (
        meta_graph.signature_def["serving_default"],
        meta_graph.signature_def["classify"],
    )
    assert serving.method_name == "tensorflow/serving/predict"
    assert classify.method_name == CLASSIFY_METHOD == "tensorflow/serving/classify"
    assert set(serving.inputs) == {"images"} and set(serving.outputs) == {"scores", "classes"}
    assert serving.inputs["images"].dtype == tf.float32.as_datatype_enum
    assert [dim.size for dim in serving.inputs["images"].tensor_shape.dim] == [-1, 784]
    assert set(classify.inputs) == {"inputs"} and set(classify.outputs) == {"scores", "classes"}
    assert classify.inputs["inputs"].dtype == tf.string.as_datatype_enum
    assert classify.outputs["classes"].dtype == tf.string.as_datatype_enum


def test_tutorial_signature_as_tf_serving_sees_it(exported: ExportResult) -> None:
    """What TF Serving's mnist_saved_model.py exports as ``predict_images`` and its
    mnist_client.py asks for: ``images`` float [-1, 784] -> ``scores`` float [-1, 10]."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((exported.path / "saved_model.pb").read_bytes())
    (meta_graph,) = saved_model.meta_graphs
    assert set(meta_graph.signature_def) >= {"serving_default", "classify", "predict_images"}
    tutorial = meta_graph.signature_def[TUTORIAL_SIGNATURE]
    assert TUTORIAL_SIGNATURE == "predict_images"
    assert tutorial.method_name == "tensorflow/serving/predict"
    assert set(tutorial.inputs) == {"images"} and set(tutorial.outputs) == {"scores"}
    images, scores = tutorial.inputs["images"], tutorial.outputs["scores"]
    assert images.dtype == scores.dtype == tf.float32.as_datatype_enum
    assert [dim.size for dim in images.tensor_shape.dim] == [-1, 784]
    assert [dim.size for dim in scores.tensor_shape.dim] == [-1, 10]


def test_tutorial_signature_answers_like_serving_default(
    exported: ExportResult, images: np.ndarray
) -> None:
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(exported.path))
        serving = meta_graph.signature_def["serving_default"]
        tutorial = meta_graph.signature_def["predict_images"]
        default_scores = session.run(
            serving.outputs["scores"].name, {serving.inputs["images"].name: images}
        )
        tutorial_scores = session.run(
            tutorial.outputs["scores"].name, {tutorial.inputs["images"].name: images}
        )
    np.testing.assert_array_equal(tutorial_scores, default_scores)
    assert tutorial_scores.shape == (len(images), 10)


def test_tf1_loader_serves_both_signatures(
    exported: ExportResult, model: keras.Model, images: np.ndarray
) -> None:
    expected = model.predict(images, verbose=0)
    serialized = [image_example(image).SerializeToString() for image in images]
    # A fresh graph and session, as TF Serving's SavedModel bundle loader does it.
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(exported.path))
        serving = meta_graph.signature_def["serving_default"]
        scores, classes = session.run(
            [serving.outputs["scores"].name, serving.outputs["classes"].name],
            {serving.inputs["images"].name: images},
        )
        classify = meta_graph.signature_def["classify"]
        assert classify.method_name == CLASSIFY_METHOD
        classify_scores, labels = session.run(
            [classify.outputs["scores"].name, classify.outputs["classes"].name],
            {classify.inputs["inputs"].name: serialized},
        )
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(classes, expected.argmax(axis=1))
    np.testing.assert_allclose(classify_scores, expected, rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [LABELS] * len(images)


def test_warmup_requests(exported: ExportResult, images: np.ndarray) -> None:
    raw = list(tf.data.TFRecordDataset(str(exported.path / WARMUP_FILE)).as_numpy_iterator())
    logs = [prediction_log_pb2.PredictionLog.FromString(record) for record in raw]
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * 3 + ["classify_log"]
    for index, log in enumerate(logs[:3]):
        request = log.predict_log.request
        assert request.model_spec.name == "digits"
        assert request.model_spec.signature_name == "serving_default"
        assert set(request.inputs) == {"images"}
        tensor = tf.make_ndarray(request.inputs["images"])
        assert tensor.dtype == np.float32 and tensor.shape == (1, 784)
        np.testing.assert_array_equal(tensor[0], images[index % 2])  # cycles through the 2 given
    classify = logs[3].classify_log.request
    assert classify.model_spec.name == "digits"
    assert classify.model_spec.signature_name == "classify"
    (example,) = classify.input.example_list.examples
    np.testing.assert_array_equal(
        np.array(example.features.feature["image"].float_list.value, np.float32), images[0]
    )


def exports_at_once(
    count: int, model: keras.Model, cfg: ExportConfig, serving: str | Path, images: np.ndarray
) -> list[ExportResult]:
    """``count`` exports started together on threads; their results, once all succeeded."""
    start = threading.Barrier(count)
    results: list[ExportResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        start.wait()
        try:
            results.append(export.fn(model, cfg, serving, images))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_concurrent_exports_get_distinct_versions(
    model: keras.Model, images: np.ndarray, tmp_path: Path
) -> None:
    cfg = ExportConfig(base_path=tmp_path / "exports", model_name="mnist", warmup_requests=1)
    _version_dirs(tmp_path / "serving" / "mnist", ["2"])
    results = exports_at_once(2, model, cfg, tmp_path / "serving", images[:1])
    assert sorted(result.version for result in results) == [3, 4]
    assert all((result.path / "saved_model.pb").is_file() for result in results)
    assert _leftovers(tmp_path / "exports" / "mnist") == []


def test_export_rejects_bad_warmup_images_and_leaves_nothing(
    model: keras.Model, tmp_path: Path
) -> None:
    cfg = ExportConfig(base_path=tmp_path / "exports")
    with pytest.raises(ValueError, match="warmup_images"):
        export.fn(model, cfg, tmp_path / "serving", np.zeros((0, 784), np.float32))
    with pytest.raises(ValueError, match="warmup_images"):
        export.fn(model, cfg, tmp_path / "serving", np.zeros((2, 28, 28), np.float32))
    model_dir = tmp_path / "exports" / "mnist"
    assert not model_dir.exists() or list(model_dir.iterdir()) == []


def test_failed_export_leaves_no_temporary_directory(
    model: keras.Model, images: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_write_warmup", broken)
    with pytest.raises(OSError, match="disk full"):
        export.fn(model, ExportConfig(base_path=tmp_path / "exports"), tmp_path / "serving", images)
    assert list((tmp_path / "exports" / "mnist").iterdir()) == []
