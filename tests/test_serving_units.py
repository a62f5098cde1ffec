"""In-process tests of the server's parts: flags, filesystem source, manager with real SavedModels,
the session callable's fallback, REST's JSON codec, deadlines, the workers' restart policy."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.errors import ServingError  # noqa: E402
from serving.model_format import version_of_dir  # noqa: E402
from serving.signatures import SignatureInfo, TensorInfo  # noqa: E402
from serving.source import VersionPolicy, list_versions  # noqa: E402
from tests import saved_models  # noqa: E402

pytestmark = pytest.mark.timeout(120)


# -- source ----------------------------------------------------------------------------------------


def test_version_of_dir():
    assert version_of_dir("1") == 1
    assert version_of_dir("00000001") == 1
    assert version_of_dir("1732500000") == 1732500000
    for bad in ("0", "-1", "+1", " 1", "1_000", "1.0", "abc", ".tmp1", str(2**63), "", "12\n"):
        assert version_of_dir(bad) is None, bad


def test_list_versions_filters_entries(tmp_path):
    assert list_versions(tmp_path / "missing") == {}
    for name in ("1", "00000002", "3", ".tmp-4", "+5", "0", "abc", "7"):
        (tmp_path / name).mkdir()
    for name in ("1", "00000002", ".tmp-4", "+5", "0", "abc"):
        (tmp_path / name / "saved_model.pb").write_bytes(b"x")
    (tmp_path / "6").write_text("a file")
    found = list_versions(tmp_path)
    assert sorted(found) == [1, 2]  # 3 and 7 lack saved_model.pb
    assert found[2].path.endswith("00000002")
    assert sorted(VersionPolicy().select(found)) == [2]
    assert sorted(VersionPolicy(num_versions=2).select(found)) == [1, 2]


def test_fingerprint_changes_when_directory_replaced(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"x")
    before = list_versions(tmp_path)[1].fingerprint
    shutil.rmtree(tmp_path / "1")
    os.makedirs(tmp_path / ".new")
    (tmp_path / ".new" / "saved_model.pb").write_bytes(b"y")
    os.utime(tmp_path / ".new", ns=(1, 1))
    os.rename(tmp_path / ".new", tmp_path / "1")
    assert list_versions(tmp_path)[1].fingerprint != before


# -- manager with real SavedModels -----------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return saved_models.make_template(tmp_path_factory.mktemp("tpl") / "m", 6, warmup_records=2)


class OneWorkerInProcess:
    """The manager's load function over one routing table in this process: what the worker
    processes do (load, then route; unload on close), without the processes."""

    def __init__(self) -> None:
        from serving.routing import RoutingTable

        self.routing = RoutingTable()
        self.attempts: list[tuple[str, int]] = []  # every load asked for, failed ones too

    def load(self, name: str, version: int, path: str, warmup: bool):
        from serving.servable import load_servable

        self.attempts.append((name, version))
        self.routing.add(name, load_servable(name, version, path, warmup))
        return Unload(lambda: self.routing.remove(name, version))


class Unload:
    def __init__(self, close) -> None:
        self.close = close


def test_manager_failed_version_keeps_old_and_retries_only_on_change(tmp_path, template):
    from serving.manager import Manager
    from serving.types import State

    base = tmp_path / "m"
    saved_models.copy_version(template, base, 1)
    worker = OneWorkerInProcess()
    manager = Manager(worker.load, enable_warmup=True)
    manager.start()
    try:

        def apply() -> dict[int, State]:
            manager.set_aspired_versions("m", VersionPolicy().select(list_versions(base)))
            assert manager.wait_until_idle(timeout=60)
            return {s.version: s.state for s in manager.statuses("m")}

        assert apply() == {1: State.AVAILABLE}
        with worker.routing.acquire("m") as handle:
            sig = handle.servable.signature("")
            x = {"images": np.zeros((2, 784), np.float32)}
            out = handle.servable.run(sig, x, handle.servable.validate(sig, x))
            assert out["classes"].tolist() == [6, 6]

        saved_models.write_broken_version(base, 2)
        assert apply() == {1: State.AVAILABLE, 2: State.END}
        status = manager.statuses("m", 2)[0]
        assert status.error_code != grpc.StatusCode.OK and "saved_model.pb" in status.error_message
        with worker.routing.acquire("m") as handle:
            assert handle.version == 1  # old version still routed
        attempts = worker.attempts.count(("m", 2))
        assert apply() == {1: State.AVAILABLE, 2: State.END}
        assert worker.attempts.count(("m", 2)) == attempts  # not retried: dir unchanged

        # Replace the broken directory by a good one: it is retried and takes over.
        shutil.rmtree(base / "2")
        saved_models.copy_version(template, base, 2)
        assert apply() == {1: State.END, 2: State.AVAILABLE}

        with pytest.raises(ServingError) as info:
            worker.routing.acquire("m", 1)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert info.value.message == "Servable not found for request: Specific(m, 1)"
    finally:
        manager.stop()


def test_unload_waits_for_in_flight_requests(tmp_path, template):
    from serving.manager import Manager
    from serving.types import State

    base = tmp_path / "m"
    saved_models.copy_version(template, base, 1)
    worker = OneWorkerInProcess()
    manager = Manager(worker.load, enable_warmup=False)
    manager.start()
    try:
        manager.set_aspired_versions("m", VersionPolicy().select(list_versions(base)))
        manager.wait_until_idle(60)
        handle = worker.routing.acquire("m")  # an in-flight request on version 1
        saved_models.copy_version(template, base, 2)
        manager.set_aspired_versions("m", VersionPolicy().select(list_versions(base)))
        import time

        deadline = time.monotonic() + 30
        while manager.statuses("m", 1)[0].state != State.UNLOADING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert manager.statuses("m", 1)[0].state == State.UNLOADING
        with worker.routing.acquire("m") as new:
            assert new.version == 2  # new requests go to 2 already
        sig = handle.servable.signature("serving_default")
        x = {"images": np.zeros((1, 784), np.float32)}
        assert handle.servable.run(sig, x, ("classes",))["classes"].tolist() == [6]
        handle.release()
        assert manager.wait_until_idle(30)
        assert manager.statuses("m", 1)[0].state == State.END
    finally:
        manager.stop()


def test_warmup_runs_unless_disabled(tmp_path):
    """A broken warmup file fails the load with warmup on; --enable_model_warmup=false skips it."""
    from serving.servable import load_servable

    path = saved_models.write_version(tmp_path, 1, bias_class=3)
    warmup_file = path / "assets.extra" / "tf_serving_warmup_requests"
    warmup_file.parent.mkdir(parents=True, exist_ok=True)
    warmup_file.write_bytes(b"not a TFRecord of PredictionLogs")
    with pytest.raises(ValueError, match="not a TFRecord file"):
        load_servable("m", 1, str(path), warmup=True)
    servable = load_servable("m", 1, str(path), warmup=False)
    try:
        assert "serving_default" in servable.signatures
    finally:
        servable.close()


# -- worker restarts: the crash-loop policy --------------------------------------------------------


def test_restart_backoff_doubles_in_a_crash_loop_up_to_its_cap_and_resets_after_a_stable_run():
    from serving.workers import RestartBackoff

    backoff = RestartBackoff(first_s=1.0, max_s=8.0, stable_s=60.0)
    assert [backoff.delay(lived_s=2.0) for _ in range(6)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff.in_a_row == 6
    assert backoff.delay(lived_s=60.0) == 0.0  # it ran long enough: no crash loop
    assert backoff.delay(lived_s=0.5) == 1.0


# -- load settings: retries, parallel loads, tags, warmup iterations -------------------------------


def _publish_without_variables_index(template: Path, base: Path, version: int) -> Path:
    """A copy of ``template`` as ``<base>/<version>`` whose variables index is kept aside (beside
    the base path): its loads fail until ``_restore_index`` puts it back, which leaves the version
    directory itself, and so its fingerprint, unchanged."""
    staging = base.parent / f".staging-{version}"
    shutil.copytree(template, staging)
    os.rename(staging / "variables" / "variables.index", base.parent / f"index-{version}")
    base.mkdir(parents=True, exist_ok=True)
    os.rename(staging, base / str(version))
    return base / str(version)


def _restore_index(base: Path, version: int) -> None:
    os.rename(
        base.parent / f"index-{version}", base / str(version) / "variables" / "variables.index"
    )


def _states(manager, name: str):
    return {s.version: s.state for s in manager.statuses(name)}


def test_manager_retries_a_failed_load_until_it_loads(tmp_path, template):
    from serving.manager import Manager
    from serving.types import State

    base = tmp_path / "m"
    _publish_without_variables_index(template, base, 1)
    worker = OneWorkerInProcess()
    manager = Manager(worker.load, max_load_retries=5, load_retry_interval_s=0.3)
    manager.start()
    try:
        manager.set_aspired_versions("m", list_versions(base))
        deadline = time.monotonic() + 60
        while worker.attempts.count(("m", 1)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _states(manager, "m") == {1: State.LOADING}  # retrying, not END
        _restore_index(base, 1)
        assert manager.wait_until_idle(timeout=60)
        assert _states(manager, "m") == {1: State.AVAILABLE}
        assert 2 <= worker.attempts.count(("m", 1)) <= 6
    finally:
        manager.stop()


def test_manager_gives_up_after_the_retries_or_when_no_longer_aspired(tmp_path, template):
    from serving.manager import Manager
    from serving.types import State

    base = tmp_path / "m"
    _publish_without_variables_index(template, base, 1)
    worker = OneWorkerInProcess()
    manager = Manager(worker.load, max_load_retries=2, load_retry_interval_s=0.0)
    manager.start()
    try:
        manager.set_aspired_versions("m", list_versions(base))
        assert manager.wait_until_idle(timeout=60)
        assert _states(manager, "m") == {1: State.END}
        assert worker.attempts.count(("m", 1)) == 3  # the first attempt and two retries
        assert "variables" in manager.statuses("m", 1)[0].error_message
    finally:
        manager.stop()

    # A minute between retries: the retries end as soon as the version is no longer aspired,
    # and a stop does not wait for them either.
    for cancel in ("unaspire", "stop"):
        worker = OneWorkerInProcess()
        manager = Manager(worker.load, max_load_retries=5, load_retry_interval_s=60.0)
        manager.start()
        start = time.monotonic()
        try:
            manager.set_aspired_versions("m", list_versions(base))
            while not worker.attempts and time.monotonic() - start < 30:
                time.sleep(0.02)
            if cancel == "unaspire":
                manager.set_aspired_versions("m", {})
                assert manager.wait_until_idle(timeout=30)
                assert _states(manager, "m") == {1: State.END}
        finally:
            manager.stop()
        assert worker.attempts.count(("m", 1)) == 1
        assert time.monotonic() - start < 30, cancel


def test_manager_loads_models_in_parallel_with_load_threads(tmp_path, template):
    """With ``load_threads=2`` two models' loads run at once: each waits for the other to start."""
    from serving.manager import Manager
    from serving.types import State

    worker = OneWorkerInProcess()
    both_loading = threading.Barrier(2, timeout=20)

    def load(name: str, version: int, path: str, warmup: bool):
        both_loading.wait()
        return worker.load(name, version, path, warmup)

    manager = Manager(load, load_threads=2)
    for name in ("a", "b"):  # both known before the first pass
        saved_models.copy_version(template, tmp_path / name, 1)
        manager.set_aspired_versions(name, list_versions(tmp_path / name))
    manager.start()
    try:
        assert manager.wait_until_idle(timeout=60)
        assert _states(manager, "a") == _states(manager, "b") == {1: State.AVAILABLE}
    finally:
        manager.stop()


def test_saved_model_tags_choose_the_meta_graph(tmp_path):
    from serving.servable import LoadSettings, load_servable

    path = saved_models.write_half_plus_two(tmp_path, 1, warmup=False)
    with pytest.raises(RuntimeError, match="tags 'serve', 'gpu' could not be found"):
        load_servable("half", 1, str(path), False, LoadSettings(tags=("serve", "gpu")))
    load_servable("half", 1, str(path), False, LoadSettings(tags=("serve",))).close()


class CountingReplays:
    """A loaded version whose API methods count the calls warmup makes to them."""

    def __init__(self, servable) -> None:
        self._servable = servable
        self.path = servable.path
        self.signature = servable.signature
        self.validate = servable.validate
        self.calls: dict[str, int] = {}
        for api in ("run", "classify", "regress", "multi_inference"):
            setattr(self, api, self._counted(api, getattr(servable, api)))

    def _counted(self, api, method):
        def counted(*args):
            self.calls[api] = self.calls.get(api, 0) + 1
            return method(*args)

        return counted


def test_each_warmup_record_is_replayed_the_given_number_of_times(tmp_path):
    from serving.servable import load_servable
    from serving.warmup import replay_warmup

    path = saved_models.write_half_plus_two(tmp_path, 1)  # one record of each of the 4 kinds
    servable = load_servable("half", 1, str(path), warmup=False)
    try:
        counting = CountingReplays(servable)
        assert replay_warmup(counting, 3) == 4
        assert counting.calls == {"run": 3, "classify": 3, "regress": 3, "multi_inference": 3}
    finally:
        servable.close()


# -- session callables: the public API fallback ----------------------------------------------------


class PublicApiSession:
    """A TF1 session as a TensorFlow without the private fast path would have it: ``missing``,
    no ``_make_callable_from_options`` at all; ``changed``, one that takes other arguments."""

    def __init__(self, session, private: str) -> None:
        self._session = session
        self.public_callables = 0
        if private == "changed":
            self._make_callable_from_options = lambda: None  # TypeError when called with options

    def make_callable(self, fetches, feed_list):
        self.public_callables += 1
        return self._session.make_callable(fetches, feed_list=feed_list)


@pytest.mark.parametrize("private", ["missing", "changed"])
def test_session_callable_falls_back_to_the_public_api_with_the_same_answers(
    tmp_path, monkeypatch, caplog, private
):
    """A TensorFlow without the private callable API costs speed, not answers: Predict and
    Classify through ``Session.make_callable`` give exactly what the fast path gives -- but for
    a feed whose shape the placeholder does not admit, which ``Session.run`` refuses."""
    from serving import servable as servable_module
    from serving import tf_runtime
    from serving.servable import load_servable

    path = saved_models.write_half_plus_two(tmp_path, 1, warmup=False)
    x = {"x": np.array([[1.0], [2.0], [5.0]], np.float32)}
    examples = [saved_models.x_example(v).SerializeToString() for v in (1.0, 2.0, 5.0)]

    def answers() -> list[np.ndarray]:
        servable = load_servable("half", 1, str(path), warmup=False)
        try:
            sig = servable.signature("serving_default")
            y = servable.run(sig, x, servable.validate(sig, x))["y"]
            try:
                servable.run(sig, {"x": x["x"].ravel()}, ("y",))
                lenient = True
            except ServingError as e:
                assert e.code == grpc.StatusCode.INVALID_ARGUMENT
                lenient = False
            assert lenient == (servable_module.session_callable is tf_runtime.session_callable)
            classified = servable.classify("classify_with_labels", examples)
            return [y, classified.classes, classified.scores]
        finally:
            servable.close()

    fast = answers()
    sessions: list[PublicApiSession] = []

    def public_api_only(session, feeds, fetches):
        sessions.append(PublicApiSession(session, private))
        return tf_runtime.session_callable(sessions[-1], feeds, fetches)

    monkeypatch.setattr(servable_module, "session_callable", public_api_only)
    tf_runtime._log_public_callable_fallback.cache_clear()  # "once": from this test's start
    with caplog.at_level("WARNING", logger="serving.tf_runtime"):
        slow = answers()
    assert sessions and all(s.public_callables == 1 for s in sessions)
    fallbacks = [r for r in caplog.records if r.name == "serving.tf_runtime"]
    assert len(fallbacks) == 1 and fallbacks[0].levelname == "WARNING"
    for want, got in zip(fast, slow, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tolist() == want.tolist()


# -- response tensors ------------------------------------------------------------------------------

# numpy dtype -> the TensorProto field TF's Tensor::AsProtoField writes its values in
AS_PROTO_FIELD = {
    np.float32: "float_val",
    np.float64: "double_val",
    np.int32: "int_val",
    np.int16: "int_val",
    np.int8: "int_val",
    np.uint8: "int_val",
    np.uint16: "int_val",
    np.int64: "int64_val",
    np.uint32: "uint32_val",
    np.uint64: "uint64_val",
    np.float16: "half_val",
    np.bool_: "bool_val",
}


def _extremes(dtype) -> np.ndarray:
    if dtype == np.bool_:
        return np.array([[True, False, True]])
    info = np.finfo(dtype) if np.issubdtype(dtype, np.floating) else np.iinfo(dtype)
    return np.array([[info.min, 0, info.max], [1, 2, 3]], dtype)


@pytest.mark.parametrize("dtype", list(AS_PROTO_FIELD), ids=lambda d: np.dtype(d).name)
def test_response_tensors_in_the_typed_field_or_tensor_content(dtype):
    import tensorflow as tf

    from serving.tensors import to_ndarray, to_tensor_proto

    array = _extremes(dtype)
    proto = to_tensor_proto(array)
    field = AS_PROTO_FIELD[dtype]
    assert [f.name for f, _ in proto.ListFields()] == ["dtype", "tensor_shape", field]
    assert [d.size for d in proto.tensor_shape.dim] == list(array.shape)
    # the same message as one filled value by value (the packed-bytes path for floats and bools)
    expected = type(proto)(dtype=proto.dtype, tensor_shape=proto.tensor_shape)
    values = array.view(np.uint16) if dtype == np.float16 else array
    getattr(expected, field).extend(values.ravel().tolist())
    assert proto == expected
    for encoded in (proto, to_tensor_proto(array, tensor_content=True)):
        for decoded in (tf.make_ndarray(encoded), to_ndarray("x", encoded)):
            assert decoded.dtype == array.dtype and decoded.tolist() == array.tolist()
    assert to_tensor_proto(array, tensor_content=True).ListFields()[-1][0].name == "tensor_content"


def test_response_strings_scalars_and_empty_tensors():
    from serving.tensors import to_tensor_proto

    strings = to_tensor_proto(np.array([b"a", "\u00e9"], object), tensor_content=True)
    assert list(strings.string_val) == [b"a", "\u00e9".encode()] and not strings.tensor_content
    scalar = to_tensor_proto(np.float32(2.5))
    assert scalar.HasField("tensor_shape") and not scalar.tensor_shape.dim
    assert list(scalar.float_val) == [2.5]
    empty = to_tensor_proto(np.zeros((0, 3), np.float32))
    assert [d.size for d in empty.tensor_shape.dim] == [0, 3] and not empty.float_val


def test_api_client_reads_typed_fields_and_tensor_content():
    from tensorflow_serving.apis import predict_pb2

    from serving.api_client import response_scores
    from serving.tensors import fill_tensor_proto

    scores = np.random.default_rng(0).random((4, 10), dtype=np.float32)
    for tensor_content in (False, True):
        response = predict_pb2.PredictResponse()
        fill_tensor_proto(response.outputs["scores"], scores, tensor_content)
        assert response_scores(response).tobytes() == scores.tobytes()


# -- signatures: Predict's checks, the example APIs' tasks ----------------------------------------


def _signatures() -> dict[str, SignatureInfo]:
    """half_plus_two's signatures as TF1 and TF2 exporters mark them (TF2: all predict)."""
    import tensorflow as tf

    from serving.signatures import signature_info

    def info(name: str, dtype, shape) -> object:
        return tf.compat.v1.saved_model.utils.build_tensor_info(
            tf.compat.v1.placeholder(dtype, shape, name=name)
        )

    utils = tf.compat.v1.saved_model.signature_def_utils
    with tf.Graph().as_default():
        examples = info("ex", tf.string, [None])
        x, y = info("x", tf.float32, [None, 1]), info("y", tf.float32, [None, 1])
        protos = {
            "predict": utils.build_signature_def({"x": x}, {"y": y}, "tensorflow/serving/predict"),
            "classify": utils.build_signature_def(
                {"inputs": examples}, {"scores": y}, "tensorflow/serving/classify"
            ),
            "classify_tf2": utils.build_signature_def(
                {"inputs": examples}, {"scores": y}, "tensorflow/serving/predict"
            ),
            "regress_tf2": utils.build_signature_def(
                {"inputs": examples}, {"outputs": y}, "tensorflow/serving/predict"
            ),
        }
    return {name: signature_info(name, proto) for name, proto in protos.items()}


def test_predict_checks_names_and_dtypes_not_shapes():
    from serving.signatures import validate_predict

    sig = _signatures()["predict"]
    for shape in [(3,), (2, 1), (), (1, 7, 2)]:
        assert validate_predict(sig, {"x": np.zeros(shape, np.float32)}) == ("y",)
    with pytest.raises(ServingError, match='Input "x" expects dtype float32 but got float64'):
        validate_predict(sig, {"x": np.zeros(3)})
    x = {"x": np.zeros(3, np.float32)}
    with pytest.raises(ServingError, match="duplicate output tensor alias: y"):
        validate_predict(sig, x, ["y", "y"])
    with pytest.raises(ServingError) as e:
        validate_predict(sig, x, ["z"])
    assert e.value.message == (
        "output tensor alias not found in signature: z Outputs expected to be in the set {y}."
    )


def test_example_tasks_check_method_names_only_when_asked():
    from serving.inference import example_tasks, inference_tensors, multi_inference_tasks
    from serving.model_format import CLASSIFY_METHOD, REGRESS_METHOD

    sigs = _signatures()
    for name in ("classify", "classify_tf2"):
        (task,) = example_tasks(sigs, name, CLASSIFY_METHOD, method_name_check=False)
        assert (task.input_name, task.outputs) == ("ex:0", ("scores",))
    example_tasks(sigs, "classify", CLASSIFY_METHOD, method_name_check=True)
    with pytest.raises(ServingError) as e:
        example_tasks(sigs, "classify_tf2", CLASSIFY_METHOD, method_name_check=True)
    assert (e.value.code, e.value.message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Expected classification signature method_name to be tensorflow/serving/classify. "
        "Was: tensorflow/serving/predict",
    )
    with pytest.raises(ServingError) as e:  # the shape is checked whatever the flag
        example_tasks(sigs, "predict", CLASSIFY_METHOD, method_name_check=False)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith("No classification inputs found in SignatureDef: inputs {")
    tasks = multi_inference_tasks(
        sigs,
        [("regress_tf2", REGRESS_METHOD), ("classify_tf2", CLASSIFY_METHOD)],
        method_name_check=False,
    )
    feeds, fetches = inference_tensors(tasks, [b"e1", b"e2"])
    assert list(feeds) == ["ex:0"] and feeds["ex:0"].tolist() == [b"e1", b"e2"]
    assert fetches == ("y:0", "y:0")


# -- REST /metadata --------------------------------------------------------------------------------


def test_metadata_json_prints_unset_fields_as_tf_serving_does():
    from serving.rest_frontend import _proto_json

    sig = _signatures()["classify"].proto
    sig.inputs["inputs"].tensor_shape.Clear()
    sig.inputs["inputs"].tensor_shape.unknown_rank = True
    assert _proto_json(sig) == {
        "inputs": {
            "inputs": {
                "dtype": "DT_STRING",
                "tensor_shape": {"dim": [], "unknown_rank": True},
                "name": "ex:0",
            }
        },
        "outputs": {
            "scores": {
                "dtype": "DT_FLOAT",
                "tensor_shape": {
                    "dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}],
                    "unknown_rank": False,
                },
                "name": "y:0",
            }
        },
        "method_name": "tensorflow/serving/classify",
        "defaults": {},
    }


# -- REST JSON -------------------------------------------------------------------------------------


def test_rest_json_reads_every_document_as_json_loads():
    import json

    from serving.json_tensor import _loads

    documents = [
        '{"instances": [[0.0, 0.5, 1e-7, -0.0, 3]]}',
        '{"instances": [NaN, Infinity, -Infinity]}',  # json.loads's extension, TF Serving's too
        '{"inputs": [18446744073709551616, -9223372036854775809, 9223372036854775808]}',
        '{"inputs": ["\\ud800", "\\u00e9"], "signature_name": "x", "signature_name": "y"}',
        "[1e308, 12345678901234567890.5]",
    ]
    for text in documents:
        assert repr(_loads(text.encode())) == repr(json.loads(text)), text
    # but a number beyond a double is rapidjson's parse error, where json.loads makes it inf
    with pytest.raises(ServingError, match="Number too big to be stored in double: -1e400"):
        _loads(b"[1.5, -1e400]")
    for text in ('{"instances": [1, 2,]}', "{} x", "01"):
        with pytest.raises(ValueError) as info:
            _loads(text.encode())
        with pytest.raises(ValueError) as expected:
            json.loads(text)
        assert str(info.value) == str(expected.value)


def test_rest_floats_print_as_the_shortest_float32_decimal():
    """The fast path (orjson) writes exactly what numpy's float32 -> str conversion writes, for
    any finite float32 and any array layout; NaN / Infinity still print (the slow path)."""
    import json

    from serving.json_tensor import _floats

    def reference(a: np.ndarray) -> str:
        return json.dumps(a.astype(str).astype(np.float64).tolist())

    rng = np.random.default_rng(7)
    patterns = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    finite = patterns.view(np.float32)[np.isfinite(patterns.view(np.float32))][:300_000]
    cases = [
        finite.reshape(-1, 10),
        finite[:12].reshape(3, 4)[:, ::2],
        np.array(2.5, np.float32),
        np.zeros((2, 0), np.float32),
        np.array([0.0, -0.0, 1e-45, 3.4028235e38], np.float32),
        np.array([[1.5, np.nan, np.inf, -np.inf]], np.float32),
    ]
    for case in cases:
        assert json.dumps(_floats(case)) == reference(case), case.shape
    assert json.dumps(_floats(cases[-1])) == "[[1.5, NaN, Infinity, -Infinity]]"


def _signature(dtype_name: str) -> SignatureInfo:
    dtype = np.dtype(object if dtype_name == "string" else dtype_name)
    x = TensorInfo("x", "x:0", dtype, dtype_name, (-1, -1))
    return SignatureInfo("serving_default", "tensorflow/serving/predict", {"x": x}, {}, True)


def _decoded(body: bytes, dtype_name: str) -> tuple[str, object]:
    """What a :predict body decodes to (signature name, row format, arrays) or its error."""
    from serving.json_tensor import PredictBody

    try:
        predict = PredictBody(body)
        read = predict.read()
        inputs = read.inputs(_signature(dtype_name))
    except ServingError as e:
        return "error", (e.code, e.message)
    return "ok", (
        read.signature_name,
        predict.rows,
        {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in inputs.items()},
    )


def test_rest_numeric_bodies_read_straight_into_numpy_as_any_body_is_read(monkeypatch):
    """simdjson takes the common :predict body (one numeric vector or matrix) straight into
    numpy; it must read it exactly as the general path (``json.loads`` + ``np.asarray``) does,
    and leave every other body, ragged or deeper-nested ones included, to that path."""
    from serving import json_tensor

    straight = [
        '{"instances": [[0.0, 0.5, 1e-7, -0.0, 3]]}',
        '{"instances": [[1, 2], [3, 4]]}',
        '{"inputs": [1.5, 2.5], "signature_name": "serving_default"}',
        '{"signature_name": "", "instances": [[3.4e38, -2]]}',
        '{"instances": [[]]}',
        '{"instances": [[12345678901234567890, 0.1]]}',
        '{"inputs": [[7]]}',
    ]
    general = [
        '{"instances": [[1, 2], [3]]}',
        '{"instances": [[1, [2]], [3, 4]]}',
        '{"instances": [[1, 2], 3]}',
        '{"instances": [[[1], [2]]]}',
        '{"instances": [true, 1]}',
        '{"instances": [1, null]}',
        '{"instances": [1, "2"]}',
        '{"instances": [NaN]}',
        '{"instances": [1e400]}',
        '{"instances": []}',
        '{"instances": 5}',
        '{"instances": [{"x": [1]}]}',
        '{"instances": [[1]], "instances": [[2]]}',
        '{"instances": [[1]], "inputs": [[1]]}',
        '{"signature_name": "a[b", "inputs": [1]}',
        '{"instances": [[1]], "extra": 1}',
        '{"instances": [[123456789012345678901234]]}',
        "[[1, 2]]",
        '{"instances": [[1, 2]]',
        '{"signature_name": 3, "instances": [[1]]}',
        '{"inputs": {"x": [1.0]}}',
        '{"instances": [[1], [2]], "signature_name": "\\u005b"}',
    ]
    for text in straight + general:
        assert (json_tensor._numeric_tensor(text.encode())[0] is not None) == (text in straight), (
            text
        )
    seen = {}
    for dtype_name in ("float32", "float64", "float16", "int32", "string"):
        for text in straight + general:
            seen[dtype_name, text] = _decoded(text.encode(), dtype_name)
    monkeypatch.setattr(json_tensor, "_numeric_tensor", lambda body: (None, False, ""))
    for (dtype_name, text), outcome in seen.items():
        assert outcome == _decoded(text.encode(), dtype_name), (dtype_name, text)
    assert seen["float32", straight[0]][0] == "ok" and seen["float32", general[0]][0] == "error"


def test_rest_predict_answers_read_back_the_same_whichever_writer(monkeypatch):
    """orjson writes float32/float64 and integer outputs (the shortest decimal, as the json
    module writes float32's shortest digits read as float64); the json module writes the rest,
    and any answer in which orjson wrote a NaN or Infinity as null. Every answer must read back to
    the same values whichever writer made it."""
    import json

    from serving import json_tensor
    from serving.core import PredictResult

    def answer(text: bytes, result: PredictResult) -> bytes:
        body = json_tensor.PredictBody(text)
        body.read()
        return body.answer(result)

    rng = np.random.default_rng(11)
    patterns = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    finite = patterns.view(np.float32)[np.isfinite(patterns.view(np.float32))][:100_000]
    cases = [
        {"scores": finite.reshape(-1, 10)},
        {
            "scores": finite[:20].reshape(2, 10),
            "classes": np.array([3, 7], np.int64),
            "best": np.array([0.5, 1e-7], np.float64),
            "ok": np.array([True, False]),
        },
        {"scores": np.array([[1.5, np.nan, np.inf]], np.float32)},
        {"words": np.array([b"a", b"\xff"], object)},
    ]
    for outputs in cases:
        for text in (b'{"instances": [[1.0]]}', b'{"inputs": [[1.0]]}'):
            result = PredictResult(1, "serving_default", outputs)
            answers = [answer(text, result)]
            with monkeypatch.context() as patched:
                patched.setattr(json_tensor, "_orjson_writes_dtype", lambda array: False)
                answers.append(answer(text, result))
            fast, general = answers
            if fast != general:  # else the json module wrote both: NaN, Infinity, strings
                assert json.loads(fast) == json.loads(general)
        assert all(map(json_tensor._orjson_writes_dtype, outputs.values())) == (
            outputs is not cases[3]
        )
    nan = PredictResult(1, "serving_default", cases[2])
    assert answer(b'{"instances": [[1.0]]}', nan) == b'{"predictions":[[1.5,NaN,Infinity]]}'


def test_deadlines_fail_late_requests_only_and_pass_other_cancellations_through():
    """A request past its deadline gets DEADLINE_EXCEEDED within a slot of it; one that ends in
    time keeps its answer; a cancellation from elsewhere (the client went away) stays a
    cancellation; nothing stays registered afterwards: neither a task that answered in time nor
    one whose deadline passed is taken for a request later."""
    import asyncio

    from serving.deadlines import SLOT_S, Deadlines

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(0.05)

        async def answer_after(seconds: float) -> str:
            await asyncio.sleep(seconds)
            return "answer"

        async def timed(seconds: float) -> tuple[object, float]:
            start = loop.time()
            try:
                return await deadlines.run(answer_after(seconds)), loop.time() - start
            except ServingError as e:
                return e.code, loop.time() - start

        (fast, _), (slow, waited) = await asyncio.gather(timed(0.01), timed(1.0))
        assert fast == "answer"
        assert slow == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.05 <= waited < 0.05 + SLOT_S + 0.05  # the slot, plus scheduling slack

        cancelled = asyncio.create_task(timed(1.0))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await asyncio.sleep(0.1)  # every slot timer has fired

        # Nothing of a request stays registered once it has ended: the task that answered in
        # time goes on past its deadline uncancelled ...
        async def answer_then_go_on() -> str:
            assert await deadlines.run(answer_after(0.01)) == "answer"
            await asyncio.sleep(0.1)  # past the deadline of 0.05 s and its slot
            return "went on"

        assert await answer_then_go_on() == "went on"

        # ... and the task whose deadline passed, when its next request is cancelled from
        # elsewhere before that one's deadline, sees that cancellation, not a deadline.
        longer = Deadlines(0.2)
        first_expired = asyncio.Event()

        async def expire_then_request_again() -> None:
            with pytest.raises(ServingError):
                await longer.run(answer_after(1.0))
            first_expired.set()
            await longer.run(answer_after(1.0))

        task = asyncio.create_task(expire_then_request_again())
        await first_expired.wait()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert await Deadlines(None).run(answer_after(0.01)) == "answer"

    asyncio.run(scenario())
