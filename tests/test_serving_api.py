"""TF Serving's request APIs end to end: Predict / Classify / Regress / MultiInference over gRPC
(official stubs) and REST (plain HTTP JSON), against a real ``python -m serving`` subprocess.

Two module-scoped servers: "half" serves a half_plus_two model like TF Serving's own test model
(y = 0.5 x + 2, with predict, classify, regress and an every-dtype ``mixed`` signature, and one
warmup record of each kind); "mnist" serves a real export of ``tasks.export`` (tiny untrained
model) whose warmup data holds a classify record, with a 1 ms REST deadline.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import tensor_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    predict_pb2,
    regression_pb2,
)

from serving.model_format import CLASSIFY_METHOD, REGRESS_METHOD  # noqa: E402
from tests import saved_models  # noqa: E402
from tests.servers import (  # noqa: E402  # noqa: E402
    Server,
    classify_request,
    multi_request,
    regress_request,
    rpc_error,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    saved_models.write_half_plus_two(root / "half", 1)
    with Server(root / "half", root / "server.log", model_name="half") as server:
        yield server


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    from tasks.config import ExportConfig, ModelConfig
    from tasks.export import export
    from tasks.train import build_model

    root = tmp_path_factory.mktemp("mnist")
    images = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    cfg = ExportConfig(base_path=root / "exports", model_name="mnist", warmup_requests=2)
    result = export.fn(build_model(ModelConfig()), cfg, root / "serving", images)
    with Server(
        result.path.parent, root / "server.log", extra=["--rest_api_timeout_in_ms=1"]
    ) as server:
        yield server


def raw_http(server: Server, path: str, text: str) -> tuple[int, str]:
    """POST ``text`` as is (for NaN / Infinity, which ``json.dumps`` would also write, but
    explicitly) and return the undecoded answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.rest_port}{path}", data=text.encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# -- REST: TF Serving's documented examples, unchanged ---------------------------------------------


def test_rest_documented_predict_row_and_columnar(half):
    assert half.http("POST", "/v1/models/half:predict", {"instances": [1.0, 2.0, 5.0]}) == (
        200,
        {"predictions": [2.5, 3.0, 4.5]},
    )
    assert half.http(
        "POST",
        "/v1/models/half/versions/1:predict",
        {"signature_name": "serving_default", "inputs": [1.0, 2.0, 5.0]},
    ) == (200, {"outputs": [2.5, 3.0, 4.5]})
    assert half.http("POST", "/v1/models/half:predict", {"inputs": {"x": [1.0, 2.0]}}) == (
        200,
        {"outputs": [2.5, 3.0]},
    )


def test_rest_documented_classify_and_regress(half):
    body = {"examples": [{"x": 1.0}, {"x": 2.0}]}
    assert half.http(
        "POST", "/v1/models/half:classify", {"signature_name": "classify_x_to_y", **body}
    ) == (200, {"results": [[["", 2.5]], [["", 3.0]]]})
    assert half.http(
        "POST", "/v1/models/half:classify", {"signature_name": "classify_with_labels", **body}
    ) == (200, {"results": [[["half_plus_two", 2.5]], [["half_plus_two", 3.0]]]})
    assert half.http(
        "POST", "/v1/models/half/versions/1:regress", {"signature_name": "regress_x_to_y", **body}
    ) == (200, {"results": [2.5, 3.0]})


def test_rest_context_is_merged_into_every_example(half):
    # The example's own value wins over the context's, as protobuf merging does in TF Serving.
    status, body = half.http(
        "POST",
        "/v1/models/half:regress",
        {"signature_name": "regress_x_to_y", "context": {"x": 1.0}, "examples": [{}, {"x": 4.0}]},
    )
    assert (status, body) == (200, {"results": [2.5, 4.0]})


def test_rest_nan_infinity_and_compact_floats(half):
    status, text = raw_http(
        half, "/v1/models/half:predict", '{"instances": [NaN, Infinity, -Infinity, 0.1]}'
    )
    assert status == 200, text
    predictions = json.loads(text)["predictions"]
    assert math.isnan(predictions[0]) and predictions[1:3] == [math.inf, -math.inf]
    # float32 printed with float32 precision, as TF Serving does: 2.05, not 2.049999952316284.
    assert text.replace(" ", "").endswith("2.05]}"), text


def test_rest_several_named_inputs_every_dtype_and_b64(half):
    row = {"f": 1.5, "d": 0.25, "i32": 2, "i64": 2**40, "s": {"b64": "aGk="}, "bool": True}
    status, body = half.http(
        "POST",
        "/v1/models/half:predict",
        {"signature_name": "mixed", "instances": [row, dict(row, s="x\u00e9")]},
    )
    assert status == 200, body
    first, second = body["predictions"]
    assert first["total"] == 1.5 + 0.25 + 2 + 2**40 and first["i64_twice"] == 2**41
    assert first["s_upper"] == "HI" and first["s_bytes"] == {"b64": "aGk="}
    assert first["not_bool"] is False
    assert second["s_bytes"] == {"b64": "eMOp"} and second["s_upper"] == "Xé"  # upper: ASCII only
    status, body = half.http(
        "POST",
        "/v1/models/half:predict",
        {
            "signature_name": "mixed",
            "inputs": {"f": [1.0], "d": [2.0], "i32": [3], "i64": [4], "s": ["a"], "bool": [False]},
        },
    )
    assert status == 200, body
    assert body["outputs"]["total"] == [10.0] and body["outputs"]["not_bool"] == [True]


def test_rest_status_and_metadata_with_version(half):
    status, body = half.http("GET", "/v1/models/half/versions/1")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    status, body = half.http("GET", "/v1/models/half/versions/1/metadata")
    assert status == 200, body
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert sigs["classify_x_to_y"]["method_name"] == CLASSIFY_METHOD


# -- gRPC: Predict ---------------------------------------------------------------------------------


def predict_request(signature: str, tensors: dict, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half"
    request.model_spec.signature_name = signature
    for alias, proto in tensors.items():
        request.inputs[alias].CopyFrom(proto)
    request.output_filter.extend(output_filter)
    return request


def typed(dtype: int, field: str, values: list | bytes, shape: list[int]) -> tensor_pb2.TensorProto:
    """A TensorProto with ``values`` in ``field``: a typed field (``float_val``, ...) or
    ``tensor_content`` (raw bytes)."""
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    if field == "tensor_content":
        proto.tensor_content = values
    else:
        getattr(proto, field).extend(values)
    return proto


def test_grpc_predict_typed_field_content_and_broadcast(half):
    content = tf.make_tensor_proto(np.array([1.0, 2.0, 5.0], np.float32))
    assert content.tensor_content  # numpy arrays travel as tensor_content
    for proto in (content, typed(tf.float32.as_datatype_enum, "float_val", [1.0, 2.0, 5.0], [3])):
        response = half.predict_stub.Predict(predict_request("", {"x": proto}), timeout=10)
        assert tf.make_ndarray(response.outputs["y"]).tolist() == [2.5, 3.0, 4.5]
        assert (
            response.model_spec.name,
            response.model_spec.version.value,
            response.model_spec.signature_name,
        ) == ("half", 1, "serving_default")
    # One value in a typed field fills the whole shape, as TF's Tensor::FromProto does.
    broadcast = typed(tf.float32.as_datatype_enum, "float_val", [3.0], [4])
    response = half.predict_stub.Predict(predict_request("", {"x": broadcast}), timeout=10)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [3.5] * 4


TYPED_FIELDS = {
    "f": "float_val",
    "d": "double_val",
    "i32": "int_val",
    "i64": "int64_val",
    "s": "string_val",
    "bool": "bool_val",
}


@pytest.mark.parametrize("encoding", ["tensor_content", "typed_fields"])
def test_grpc_predict_every_dtype(half, encoding):
    tensors = {}
    for alias, value in saved_models.MIXED_INPUTS.items():
        dtype = tf.as_dtype(value.dtype if value.dtype != object else tf.string)
        if encoding == "typed_fields" or alias == "s":  # strings never use tensor_content
            tensors[alias] = typed(dtype.as_datatype_enum, TYPED_FIELDS[alias], value.tolist(), [2])
        else:
            tensors[alias] = typed(dtype.as_datatype_enum, "tensor_content", value.tobytes(), [2])
    response = half.predict_stub.Predict(predict_request("mixed", tensors), timeout=10)
    out = {alias: tf.make_ndarray(t) for alias, t in response.outputs.items()}
    assert out["total"].dtype == np.float64
    assert out["total"].tolist() == [1.5 + 0.25 + 2 + 2**40, -1 + 0 + 3 - 5]
    assert out["i64_twice"].tolist() == [2**41, -10]
    assert out["s_upper"].tolist() == [b"AB", b"\xff"] and out["s_bytes"].tolist() == [
        b"ab",
        b"\xff",
    ]
    assert out["not_bool"].tolist() == [False, True]
    assert response.model_spec.signature_name == "mixed"


def test_grpc_predict_output_filter(half):
    tensors = {alias: tf.make_tensor_proto(v) for alias, v in saved_models.MIXED_INPUTS.items()}
    response = half.predict_stub.Predict(
        predict_request("mixed", tensors, ["i64_twice", "not_bool"]), timeout=10
    )
    assert sorted(response.outputs) == ["i64_twice", "not_bool"]
    e = rpc_error(half.predict_stub.Predict, predict_request("mixed", tensors, ["nope"]))
    assert e.code() == INVALID
    assert e.details() == (
        "output tensor alias not found in signature: nope Outputs expected to be in the set "
        "{i64_twice,not_bool,s_bytes,s_upper,total}."
    )
    e = rpc_error(half.predict_stub.Predict, predict_request("mixed", tensors, ["total"] * 2))
    assert (e.code(), e.details()) == (INVALID, "duplicate output tensor alias: total")


@pytest.mark.parametrize(
    "tensors, named",
    [
        ({"x": tf.make_tensor_proto(np.zeros(2, np.float64))}, 'Input "x"'),  # wrong dtype
        ({}, "Missing but required: {x}"),
        (
            {
                "x": tf.make_tensor_proto(np.zeros(2, np.float32)),
                "extra": tf.make_tensor_proto(np.zeros(2, np.float32)),
            },
            "Sent extra: {extra}",
        ),
    ],
)
def test_grpc_predict_bad_input_names_it(half, tensors, named):
    e = rpc_error(half.predict_stub.Predict, predict_request("", tensors))
    assert e.code() == INVALID
    assert named in e.details()


def test_grpc_predict_malformed_tensor_content(half):
    proto = tf.make_tensor_proto(np.zeros(3, np.float32))
    proto.tensor_content = proto.tensor_content[:-1]
    e = rpc_error(half.predict_stub.Predict, predict_request("", {"x": proto}))
    assert (e.code(), e.details()) == (INVALID, "tensor parsing error: x")


# -- gRPC: Classify / Regress / MultiInference -----------------------------------------------------


def test_grpc_classify_labels_and_scores(half):
    response = half.predict_stub.Classify(classify_request("classify_with_labels"), timeout=10)
    assert [[(c.label, c.score) for c in r.classes] for r in response.result.classifications] == [
        [("half_plus_two", 2.5)],
        [("half_plus_two", 3.0)],
    ]
    assert (
        response.model_spec.name,
        response.model_spec.version.value,
        response.model_spec.signature_name,
    ) == ("half", 1, "classify_with_labels")
    response = half.predict_stub.Classify(classify_request("classify_x_to_y"), timeout=10)
    assert [[(c.label, c.score) for c in r.classes] for r in response.result.classifications] == [
        [("", 2.5)],
        [("", 3.0)],
    ]


def test_grpc_regress_with_example_list_and_context(half):
    response = half.predict_stub.Regress(regress_request(), timeout=10)
    assert [r.value for r in response.result.regressions] == [2.5, 3.0]
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "half"
    request.model_spec.signature_name = "regress_x_to_y"
    with_context = request.input.example_list_with_context
    with_context.context.CopyFrom(saved_models.x_example(6.0))
    with_context.examples.add()  # takes x from the context
    with_context.examples.add().CopyFrom(saved_models.x_example(4.0))
    response = half.predict_stub.Regress(request, timeout=10)
    assert [r.value for r in response.result.regressions] == [5.0, 4.0]


def test_grpc_multi_inference(half):
    response = half.predict_stub.MultiInference(
        multi_request(
            ("half", "classify_with_labels", CLASSIFY_METHOD),
            ("half", "regress_x_to_y", REGRESS_METHOD),
        ),
        timeout=10,
    )
    first, second = response.results
    assert [
        [(c.label, c.score) for c in r.classes] for r in first.classification_result.classifications
    ] == [[("half_plus_two", 2.5)], [("half_plus_two", 3.0)]]
    assert [r.value for r in second.regression_result.regressions] == [2.5, 3.0]
    assert (
        second.model_spec.name,
        second.model_spec.version.value,
        second.model_spec.signature_name,
    ) == ("half", 1, "regress_x_to_y")


@pytest.mark.parametrize(
    "tasks, code, message",
    [
        (
            (
                ("half", "classify_x_to_y", CLASSIFY_METHOD),
                ("other", "regress_x_to_y", REGRESS_METHOD),
            ),
            INVALID,
            "All ModelSpecs in a MultiInferenceRequest must access the same model name.",
        ),
        (
            (
                ("half", "regress_x_to_y", REGRESS_METHOD),
                ("half", "regress_x_to_y", REGRESS_METHOD),
            ),
            INVALID,
            "Duplicate evaluation of signature: regress_x_to_y",
        ),
        (
            (("half", "nope", CLASSIFY_METHOD),),
            INVALID,
            "Requested signature not found in model graph: nope",
        ),
        (
            (("half", "regress_x_to_y", "tensorflow/serving/predict"),),
            grpc.StatusCode.UNIMPLEMENTED,
            "Unsupported signature method_name: tensorflow/serving/predict",
        ),
        (
            (("half", "regress_x_to_y", CLASSIFY_METHOD),),
            INVALID,
            'Expected classification signature outputs to contain at least one of "classes" or '
            '"scores". Signature was: ',
        ),
        (
            (("nope", "regress_x_to_y", REGRESS_METHOD),),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(nope)",
        ),
    ],
)
def test_grpc_multi_inference_errors(half, tasks, code, message):
    e = rpc_error(half.predict_stub.MultiInference, multi_request(*tasks))
    assert e.code() == code and said(e.details(), message)


def said(details: str, message: str) -> bool:
    """Whether an error's ``details`` are ``message``; one that ends with ": " is TF Serving's
    start of a SignatureDef printed whole (its DebugString), which must follow."""
    if message.endswith(": "):
        return details.startswith(message) and 'method_name: "tensorflow/serving/' in details
    return details == message


@pytest.mark.parametrize(
    "call, code, message",
    [
        (
            lambda s: s.Classify(classify_request("")),
            INVALID,
            "No classification inputs found in SignatureDef: ",
        ),
        (
            lambda s: s.Regress(regress_request("classify_x_to_y")),
            INVALID,
            "No regression outputs found in SignatureDef: ",
        ),
        (
            lambda s: s.Regress(regress_request("mixed")),
            INVALID,
            "Expected one input Tensor.",
        ),
        (
            lambda s: s.Classify(classify_request("nope")),
            INVALID,
            "No signature was found with the name: nope",
        ),
        (lambda s: s.Regress(regress_request(xs=())), INVALID, "Input is empty."),
        (
            lambda s: s.Classify(classify_request("classify_x_to_y", model="nope")),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(nope)",
        ),
    ],
)
def test_grpc_classify_regress_errors(half, call, code, message):
    e = rpc_error(call, half.predict_stub)
    assert e.code() == code and said(e.details(), message)


# -- errors over REST ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        (
            "/v1/models/half:classify",
            {"examples": [{"x": 1.0}]},
            400,
            "No classification inputs found in SignatureDef: ",
        ),
        (
            "/v1/models/half:regress",
            {"signature_name": "nope", "examples": [{"x": 1.0}]},
            400,
            "No signature was found with the name: nope",
        ),
        (
            "/v1/models/half:regress",
            {"signature_name": "regress_x_to_y", "examples": [{"x": [1, 2.0]}]},
            400,
            "Unexpected element type in feature: x expecting type: int64",
        ),
        (
            "/v1/models/half:predict",
            {"signature_name": "nope", "instances": [1.0]},
            400,
            'Serving signature key "nope" not found.',
        ),
        (
            "/v1/models/nope:classify",
            {"examples": [{"x": 1.0}]},
            404,
            "Servable not found for request: Latest(nope)",
        ),
        (
            "/v1/models/half/versions/7:regress",
            {"examples": [{"x": 1.0}]},
            404,
            "Servable not found for request: Specific(half, 7)",
        ),
        (
            "/v1/models/half/labels/stable:predict",
            {"instances": [1.0]},
            400,
            "Unrecognized servable version label: stable",
        ),
    ],
)
def test_rest_errors(half, path, body, status, message):
    got_status, got = half.http("POST", path, body)
    assert got_status == status and set(got) == {"error"} and said(got["error"], message)


def test_rest_error_messages_name_the_problem(half):
    status, body = half.http(
        "POST", "/v1/models/half:regress", {"signature_name": "regress_x_to_y"}
    )
    assert status == 400 and "'examples' is expected" in body["error"]
    status, body = half.http(
        "POST", "/v1/models/half:predict", {"signature_name": "mixed", "inputs": {"f": [1.0]}}
    )
    assert status == 400 and "Missing but required" in body["error"] and "bool" in body["error"]
    assert raw_http(half, "/v1/models/half:predict", "{not json")[0] == 400
    status, text = raw_http(half, "/v1/models/half:predict", '{"instances": [{"b64": "!"}]}')
    assert status == 400 and "x" in json.loads(text)["error"]


def test_grpc_version_label_and_metadata(half):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "half"
    request.model_spec.version.value = 1
    request.metadata_field.append("signature_def")
    assert half.predict_stub.GetModelMetadata(request, timeout=10).model_spec.version.value == 1
    request.model_spec.ClearField("version")
    request.model_spec.version_label = "stable"
    e = rpc_error(half.predict_stub.GetModelMetadata, request)
    assert (e.code(), e.details()) == (INVALID, "Unrecognized servable version label: stable")
    predict = predict_request("", {"x": tf.make_tensor_proto(np.zeros(1, np.float32))})
    predict.model_spec.version_label = "stable"
    e = rpc_error(half.predict_stub.Predict, predict)
    assert (e.code(), e.details()) == (INVALID, "Unrecognized servable version label: stable")


# -- warmup ----------------------------------------------------------------------------------------


def test_warmup_replays_every_record_kind(half):
    # predict, classify, regress and multi-inference records: all four replayed, none skipped.
    assert "warmup replayed 4 request(s)" in half.log()
    assert "skipped" not in half.log()


def test_warmup_replays_the_classify_record_of_our_export(mnist):
    # tasks.export writes 2 predict records (warmup_requests=2) + 1 classify record.
    assert "warmup replayed 3 request(s)" in mnist.log()
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = "classify"
    image = np.zeros(784, np.float32)
    request.input.example_list.examples.add().features.feature["image"].float_list.value.extend(
        image.tolist()
    )
    response = mnist.predict_stub.Classify(request, timeout=10)
    classes = response.result.classifications[0].classes
    assert [c.label for c in classes] == [str(d) for d in range(10)]
    assert abs(sum(c.score for c in classes) - 1.0) < 1e-4


def test_rest_deadline_exceeded_is_504(mnist):
    # A big body cannot be parsed, run and encoded within the server's 1 ms REST deadline.
    body = {"instances": np.zeros((500, 784)).tolist()}
    assert mnist.http("POST", "/v1/models/mnist:predict", body) == (
        504,
        {"error": "Deadline exceeded"},
    )
