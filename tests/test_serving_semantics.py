"""What our answers hold, as TF Serving's: response tensors in the typed fields (``tensor_content``
with ``--enable_serialization_as_tensor_content``), Predict feeding a tensor of any shape to the
graph, Classify / Regress / MultiInference taking any signature of the right shape unless
``--enable_signature_method_name_check``, and REST ``/metadata`` printed with every default.

Two servers over real sockets, each serving five models from one config file: TF Serving's
half_plus_two (TF1 graph, ``x`` [-1,1]), its TF2 twin (``tf.saved_model.save``: every signature
marked predict, each with its own input tensor), a Keras ``Sequential``, the same Keras model with
a method name of its own, and the pipeline's MNIST-shaped model. ``plain`` runs with TF Serving's
defaults, ``strict`` with both flags on. The calls copy upstream's tensorflow_model_server_test.py
(``VerifyPredictRequest``, ``testClassifyTf2``, ``testRegressTf2``, ``testMultiInferenceTf2``).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

from serving.api_client import ModelServer
from serving.model_format import CLASSIFY_METHOD, REGRESS_METHOD
from tests import saved_models
from tests.servers import (
    Server,
    classify_request,
    config_text,
    model_entry,
    multi_request,
    regress_request,
    rpc_error,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CUSTOM_METHOD = "keras/custom"
MNIST_CLASS = 3


def _set_method_name(version_dir: Path, signature: str, method: str) -> None:
    """Rewrite one signature's method_name in ``saved_model.pb`` (a SavedModel of another
    exporter's making)."""
    pb = version_dir / "saved_model.pb"
    model = saved_model_pb2.SavedModel.FromString(pb.read_bytes())
    model.meta_graphs[0].signature_def[signature].method_name = method
    pb.write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    saved_models.write_half_plus_two(root / "half", 1, warmup=False)
    saved_models.write_half_plus_two_tf2(root / "tf2", 1)
    saved_models.write_keras_sequential(root / "keras", 1)
    _set_method_name(
        saved_models.write_keras_sequential(root / "custom", 1), "serve", CUSTOM_METHOD
    )
    saved_models.write_version(root / "mnist", 1, MNIST_CLASS)
    config = root / "models.config"
    names = ("half", "tf2", "keras", "custom", "mnist")
    config.write_text(config_text(*(model_entry(name, root / name) for name in names)))
    return config


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    """``plain`` and ``strict`` (both flags), started together."""
    flags = {
        "plain": [],
        "strict": [
            "--enable_serialization_as_tensor_content=true",
            "--enable_signature_method_name_check=true",
        ],
    }
    started = {}
    try:
        for name, extra in flags.items():
            directory = tmp_path_factory.mktemp(name)
            started[name] = Server(
                directory,
                directory / "server.log",
                model_name="ignored",
                extra=[f"--model_config_file={models}", *extra],
            )
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def plain(servers) -> Server:
    return servers["plain"]


@pytest.fixture(scope="module")
def strict(servers) -> Server:
    return servers["strict"]


def predict(server: Server, model: str, tensors: dict, signature: str = "", output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for alias, value in tensors.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return server.predict_stub.Predict(request, timeout=10)


def keras_answer(features: np.ndarray) -> np.ndarray:
    return features @ saved_models.KERAS_WEIGHTS + saved_models.KERAS_BIAS


# -- Predict: shapes are the graph's to check -----------------------------------------------------


def test_predict_feeds_a_tensor_of_another_shape_as_it_came(plain):
    # Upstream's VerifyPredictRequest: x = float_val [2.0], shape [1], to the [-1,1] signature.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half"
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].float_val.append(2.0)
    request.inputs["x"].tensor_shape.dim.add().size = 1
    request.output_filter.append("y")
    response = plain.predict_stub.Predict(request, timeout=10)
    y = response.outputs["y"]
    assert (y.dtype, list(y.float_val), [d.size for d in y.tensor_shape.dim]) == (
        types_pb2.DT_FLOAT,
        [3.0],
        [1],
    )
    assert not y.tensor_content
    assert (response.model_spec.name, response.model_spec.version.value) == ("half", 1)
    assert response.model_spec.signature_name == "serving_default"
    # The TF2 export's predict signature is [1]: three values go through it as well.
    response = predict(plain, "tf2", {"x": np.array([2.0, 3.0, 4.0], np.float32)})
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [3.0, 3.5, 4.0]


def test_rest_instances_of_another_shape(plain):
    assert plain.http("POST", "/v1/models/half:predict", {"instances": [2.0, 3.0, 4.0]}) == (
        200,
        {"predictions": [3.0, 3.5, 4.0]},
    )
    assert plain.http("POST", "/v1/models/half:predict", {"instances": [[2.0], [3.0]]}) == (
        200,
        {"predictions": [[3.0], [3.5]]},
    )


def test_a_shape_the_graph_cannot_take_is_tensorflows_invalid_argument(plain):
    wrong = np.ones((1, 4), np.float32)  # the Dense layer takes 3 features
    e = rpc_error(predict, plain, "keras", {"features": wrong})
    assert e.code() == INVALID and "Matrix size-incompatible: In[0]: [1,4]" in e.details()
    status, body = plain.http("POST", "/v1/models/keras:predict", {"instances": wrong.tolist()})
    assert status == 400 and "Matrix size-incompatible" in body["error"], body
    # and the server goes on serving
    features = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], np.float32)
    response = predict(plain, "keras", {"features": features})
    np.testing.assert_allclose(
        tf.make_ndarray(response.outputs["output_0"]), keras_answer(features), rtol=1e-6
    )
    status, body = plain.http("POST", "/v1/models/keras:predict", {"instances": features.tolist()})
    assert status == 200
    np.testing.assert_allclose(body["predictions"], keras_answer(features), rtol=1e-6)


def test_dtypes_and_names_are_still_checked(plain):
    e = rpc_error(predict, plain, "half", {"x": np.array([2.0])})  # float64
    assert (e.code(), e.details()) == (INVALID, 'Input "x" expects dtype float32 but got float64')
    e = rpc_error(predict, plain, "half", {"y": np.array([2.0], np.float32)})
    assert e.code() == INVALID and "Sent extra: {y}. Missing but required: {x}." in e.details()


# -- response tensors ------------------------------------------------------------------------------

# output alias -> the typed field TF's AsProtoField writes it in
MIXED_FIELDS = {
    "total": "double_val",
    "i64_twice": "int64_val",
    "not_bool": "bool_val",
    "s_upper": "string_val",
    "s_bytes": "string_val",
}


def test_response_tensors_are_in_the_typed_fields(plain):
    response = predict(plain, "half", saved_models.MIXED_INPUTS, signature="mixed")
    for alias, field in MIXED_FIELDS.items():
        tensor = response.outputs[alias]
        assert not tensor.tensor_content, alias
        assert len(getattr(tensor, field)) == 2 and [d.size for d in tensor.tensor_shape.dim] == [2]
    out = {alias: tf.make_ndarray(t) for alias, t in response.outputs.items()}
    assert out["total"].tolist() == [1.5 + 0.25 + 2 + 2**40, -1 + 0 + 3 - 5]
    assert out["i64_twice"].tolist() == [2**41, -10]
    assert out["not_bool"].tolist() == [False, True]
    assert out["s_upper"].tolist() == [b"AB", b"\xff"]


def test_tensor_content_with_the_flag(strict):
    response = predict(strict, "half", saved_models.MIXED_INPUTS, signature="mixed")
    for alias, field in MIXED_FIELDS.items():
        tensor = response.outputs[alias]
        if field == "string_val":  # TF writes strings in string_val either way
            assert len(tensor.string_val) == 2 and not tensor.tensor_content
        else:
            assert tensor.tensor_content and not getattr(tensor, field), alias
    out = {alias: tf.make_ndarray(t) for alias, t in response.outputs.items()}
    assert out["total"].tolist() == [1.5 + 0.25 + 2 + 2**40, -1 + 0 + 3 - 5]
    assert out["not_bool"].tolist() == [False, True]


def test_our_client_reads_both_encodings(plain, strict):
    # validate, push and ``python -m serving.client`` read Predict answers through api_client.
    images = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    for server in (plain, strict):
        with ModelServer(f"127.0.0.1:{server.port}", "mnist") as client:
            scores = client.predict_scores(images)
        np.testing.assert_allclose(scores, saved_models.expected_scores(MNIST_CLASS, 3), rtol=1e-6)


# -- Classify / Regress / MultiInference: TF2 signatures, and the method-name check ---------------


def test_classify_tf2(plain):
    request = classify_request("classify_x_to_y", xs=(2.0,), model="tf2")
    response = plain.predict_stub.Classify(request, timeout=10)
    assert [[c.score for c in r.classes] for r in response.result.classifications] == [[3.0]]
    spec = response.model_spec
    assert (spec.name, spec.signature_name, spec.version.value) == ("tf2", "classify_x_to_y", 1)


def test_regress_tf2(plain):
    request = regress_request("regress_x_to_y", xs=(2.0,))
    request.model_spec.name = "tf2"
    response = plain.predict_stub.Regress(request, timeout=10)
    assert [r.value for r in response.result.regressions] == [3.0]
    spec = response.model_spec
    assert (spec.name, spec.signature_name, spec.version.value) == ("tf2", "regress_x_to_y", 1)


def test_multi_inference_tf2(plain):
    # Two signatures, each with its own input tensor: both are fed the examples.
    request = multi_request(
        ("tf2", "regress_x_to_y", REGRESS_METHOD),
        ("tf2", "classify_x_to_y", CLASSIFY_METHOD),
        xs=(2.0,),
    )
    response = plain.predict_stub.MultiInference(request, timeout=10)
    assert len(response.results) == 2
    assert response.results[0].regression_result.regressions[0].value == 3.0
    assert response.results[1].classification_result.classifications[0].classes[0].score == 3.0
    for result, signature in zip(response.results, ("regress_x_to_y", "classify_x_to_y")):
        spec = result.model_spec
        assert (spec.name, spec.signature_name, spec.version.value) == ("tf2", signature, 1)


def test_rest_classify_and_regress_tf2(plain):
    body = {"examples": [{"x": 2.0}, {"x": 4.0}]}
    assert plain.http(
        "POST", "/v1/models/tf2:classify", {"signature_name": "classify_x_to_y", **body}
    ) == (200, {"results": [[["", 3.0]], [["", 4.0]]]})
    assert plain.http(
        "POST", "/v1/models/tf2:regress", {"signature_name": "regress_x_to_y2", **body}
    ) == (200, {"results": [4.0, 5.0]})


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda stub: stub.Classify(classify_request("", model="tf2")),
            "No classification inputs found in SignatureDef: ",
        ),
        (
            lambda stub: stub.Regress(_on_tf2(regress_request("classify_x_to_y"))),
            "No regression outputs found in SignatureDef: ",
        ),
        (
            lambda stub: stub.Classify(classify_request("regress_x_to_y", model="tf2")),
            'Expected classification signature outputs to contain at least one of "classes" or '
            '"scores". Signature was: ',
        ),
        (
            lambda stub: stub.MultiInference(
                multi_request(("tf2", "regress_x_to_y", CLASSIFY_METHOD))
            ),
            'Expected classification signature outputs to contain at least one of "classes" or '
            '"scores". Signature was: ',
        ),
    ],
)
def test_a_signature_of_the_wrong_shape_is_refused_whatever_the_flag(plain, call, message):
    e = rpc_error(call, plain.predict_stub)
    assert e.code() == INVALID and e.details().startswith(message), e.details()
    assert 'method_name: "tensorflow/serving/predict"' in e.details()  # the SignatureDef printed


def _on_tf2(request):
    request.model_spec.name = "tf2"
    return request


def test_a_signature_not_of_examples_fails_in_tensorflow(plain):
    # regress_x2_to_y3 is shaped for regression but reads floats: the session refuses strings.
    request = _on_tf2(regress_request("regress_x2_to_y3", xs=(2.0,)))
    e = rpc_error(plain.predict_stub.Regress, request)
    assert e.code() == INVALID and "Type mismatch: actual string vs. expect float" in e.details()


@pytest.mark.parametrize(
    "call, kind, method",
    [
        (
            lambda stub: stub.Classify(classify_request("classify_x_to_y", model="tf2")),
            "classification",
            CLASSIFY_METHOD,
        ),
        (
            lambda stub: stub.Regress(_on_tf2(regress_request("regress_x_to_y"))),
            "regression",
            REGRESS_METHOD,
        ),
        (
            lambda stub: stub.MultiInference(
                multi_request(
                    ("tf2", "regress_x_to_y", REGRESS_METHOD),
                    ("tf2", "classify_x_to_y", CLASSIFY_METHOD),
                )
            ),
            "regression",
            REGRESS_METHOD,
        ),
    ],
)
def test_method_name_check_refuses_tf2_signatures(strict, call, kind, method):
    e = rpc_error(call, strict.predict_stub)
    assert (e.code(), e.details()) == (
        INVALID,
        f"Expected {kind} signature method_name to be {method}. Was: tensorflow/serving/predict",
    )


def test_method_name_check_over_rest(plain, strict):
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}
    assert plain.http("POST", "/v1/models/tf2:classify", body)[0] == 200
    assert strict.http("POST", "/v1/models/tf2:classify", body) == (
        400,
        {
            "error": f"Expected classification signature method_name to be {CLASSIFY_METHOD}. "
            "Was: tensorflow/serving/predict"
        },
    )
    # TF1 signatures of the right method names pass the check.
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}
    assert strict.http("POST", "/v1/models/half:classify", body) == (
        200,
        {"results": [[["", 3.0]]]},
    )


def test_method_name_check_of_predict(plain, strict):
    features = np.array([[1.0, 2.0, 3.0]], np.float32)
    for server in (plain, strict):  # predict, classify and regress signatures all predict
        response = predict(server, "half", {"inputs": _examples(2.0)}, signature="regress_x_to_y")
        assert tf.make_ndarray(response.outputs["outputs"]).tolist() == [[3.0]]
    response = predict(plain, "custom", {"features": features}, signature="serve")
    np.testing.assert_allclose(
        tf.make_ndarray(response.outputs["output_0"]), keras_answer(features), rtol=1e-6
    )
    e = rpc_error(predict, strict, "custom", {"features": features}, signature="serve")
    assert (e.code(), e.details()) == (
        grpc.StatusCode.INTERNAL,
        "Expected prediction signature method_name to be one of {tensorflow/serving/predict, "
        "tensorflow/serving/classify, tensorflow/serving/regress}. Was: keras/custom",
    )
    status, body = strict.http(
        "POST", "/v1/models/custom:predict", {"signature_name": "serve", "instances": [[0, 0, 0]]}
    )
    assert status == 500 and body["error"].endswith("Was: keras/custom")


def _examples(*xs: float) -> np.ndarray:
    return np.array([saved_models.x_example(x).SerializeToString() for x in xs], object)


# -- metadata --------------------------------------------------------------------------------------


def _tensor_info(name: str, dtype: str, dims: list[int]) -> dict:
    """A TensorInfo as TF Serving's REST /metadata prints it: every field, defaults included."""
    return {
        "dtype": dtype,
        "tensor_shape": {
            "dim": [{"size": str(size), "name": ""} for size in dims],
            "unknown_rank": False,
        },
        "name": name,
    }


def test_rest_metadata_prints_every_default_field(plain):
    status, body = plain.http("GET", "/v1/models/half/versions/1/metadata")
    assert status == 200, body
    assert body["model_spec"] == {"name": "half", "signature_name": "", "version": "1"}
    assert set(body["metadata"]) == {"signature_def"}
    signatures = body["metadata"]["signature_def"]
    assert set(signatures) == {"signature_def"}
    signatures = signatures["signature_def"]
    assert signatures["serving_default"] == {
        "inputs": {"x": _tensor_info("x:0", "DT_FLOAT", [-1, 1])},
        "outputs": {"y": _tensor_info("y:0", "DT_FLOAT", [-1, 1])},
        "method_name": "tensorflow/serving/predict",
        "defaults": {},
    }
    assert signatures["regress_x_to_y"] == {
        "inputs": {"inputs": _tensor_info("tf_example:0", "DT_STRING", [-1])},
        "outputs": {"outputs": _tensor_info("y:0", "DT_FLOAT", [-1, 1])},
        "method_name": REGRESS_METHOD,
        "defaults": {},
    }
    assert set(signatures) == {
        "serving_default",
        "classify_x_to_y",
        "classify_with_labels",
        "regress_x_to_y",
        "mixed",
    }


def test_grpc_metadata_without_model_spec(plain):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    e = rpc_error(plain.predict_stub.GetModelMetadata, request)
    assert (e.code(), e.details()) == (INVALID, "Missing ModelSpec")
    request.model_spec.name = "tf2"
    e = rpc_error(plain.predict_stub.GetModelMetadata, request)
    assert (e.code(), e.details()) == (
        INVALID,
        "GetModelMetadataRequest must specify at least one metadata_field",
    )
