"""Every bad request gets a clean TF Serving error, and the server keeps serving.

One real ``python -m serving`` process (the half_plus_two model, ``tests/saved_models.py``) takes
both kinds of test: focused ones, one per class of bad request that was seen failing (each names
the TF Serving behaviour it holds us to, docs/tf-serving-compat.md), and a property-based suite
(hypothesis) that sends each front end over a thousand generated malformed requests -- names,
dtypes, shapes, sizes, nesting, b64, paths, methods, content types, raw bytes -- and accepts
only answers a client can act on (``GRPC_ACTIONABLE``, ``HTTP_ACTIONABLE`` with a JSON
``{"error": ...}``), checking that a good request still answers right every
``GOOD_REQUEST_EVERY`` requests and after the last.
"""

from __future__ import annotations

import gzip
import http.client
import json
import math
import socket
import string
from typing import Any, Callable

import grpc
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from tests import saved_models
from tests.servers import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
GRPC_ACTIONABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
HTTP_ACTIONABLE = {400, 404, 405, 413, 415, 429, 501}
GOOD_REQUEST_EVERY = 100
EXAMPLES = 1000
PREDICT = "/tensorflow.serving.PredictionService/Predict"


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    saved_models.write_half_plus_two(root / "half", 1)
    with Server(root / "half", root / "server.log", model_name="half") as server:
        yield server


# -- clients that send anything ------------------------------------------------------------------


def http_request(
    server: Server,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection, sent as given: (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def raw_grpc(server: Server, method: str, data: bytes, timeout: float = 30) -> bytes:
    """Send ``data`` as the serialized request of ``method``; the response's bytes."""
    call = server.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return call(data, timeout=timeout)


def grpc_code(server: Server, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        raw_grpc(server, method, data)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def tensor(dtype: int, shape: list[int], **fields: Any) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    proto.tensor_shape.SetInParent()
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def predict_bytes(inputs: dict[str, tensor_pb2.TensorProto], signature: str = "") -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half"
    request.model_spec.signature_name = signature
    for alias, proto in inputs.items():
        request.inputs[alias].CopyFrom(proto)
    return request.SerializeToString()


# -- what a good request answers -----------------------------------------------------------------

GOOD_PREDICT = predict_bytes({"x": tensor(types_pb2.DT_FLOAT, [2], float_val=[1.0, 2.0])})


def assert_grpc_serves(server: Server) -> None:
    response = predict_pb2.PredictResponse.FromString(raw_grpc(server, PREDICT, GOOD_PREDICT))
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [2.5, 3.0], response


def assert_rest_serves(server: Server) -> None:
    status, _, body = http_request(
        server, "POST", "/v1/models/half:predict", b'{"instances": [1.0, 2.0]}'
    )
    assert (status, json.loads(body)) == (200, {"predictions": [2.5, 3.0]})


def rest_error(status: int, headers: dict[str, str], body: bytes) -> str:
    """The ``error`` of a JSON error body (assertion failure otherwise)."""
    assert headers.get("Content-Type", "").startswith("application/json"), (status, headers, body)
    error = json.loads(body)["error"]
    assert isinstance(error, str)
    return error


# == focused tests: one class of bad request each =================================================

# -- REST: routes and methods, as TF Serving's dispatcher answers them (http_server.cc) -----------


@pytest.mark.parametrize(
    "method, path, status, message",
    [
        # outside TF Serving's "(?i)/v1/.*": libevent's 404
        ("GET", "/", 404, "Not found: GET /"),
        ("POST", "/v2/models/half:predict", 404, "Not found: POST /v2/models/half:predict"),
        ("PUT", "/favicon.ico", 404, "Not found: PUT /favicon.ico"),
        # inside it, TF Serving's handler: INVALID_ARGUMENT "Malformed request"
        ("PUT", "/v1/models/half", 400, "Malformed request: PUT /v1/models/half"),
        (
            "DELETE",
            "/v1/models/half:predict",
            400,
            "Malformed request: DELETE /v1/models/half:predict",
        ),
        ("PATCH", "/v1/models/half", 400, "Malformed request: PATCH /v1/models/half"),
        ("POST", "/v1/models/half:nope", 400, "Malformed request: POST /v1/models/half:nope"),
        ("POST", "/v1/models/half", 400, "Malformed request: POST /v1/models/half"),
        (
            "POST",
            "/v1/models/half/metadata",
            400,
            "Malformed request: POST /v1/models/half/metadata",
        ),
        ("GET", "/v1/models/half:predict", 400, "Malformed request: GET /v1/models/half:predict"),
        ("GET", "/v1/models/half/extra", 400, "Malformed request: GET /v1/models/half/extra"),
        ("GET", "/v1/models/", 400, "Malformed request: GET /v1/models/"),
        ("GET", "/v1/other", 400, "Malformed request: GET /v1/other"),
        ("GET", "/v1/models", 400, "Missing model name in request."),
        ("POST", "/v1/models/half:PREDICT", 400, "Malformed request: POST /v1/models/half:PREDICT"),
        # versions are digits only ("\d+"): anything else is no route
        (
            "GET",
            "/v1/models/half/versions/x",
            400,
            "Malformed request: GET /v1/models/half/versions/x",
        ),
        (
            "GET",
            "/v1/models/half/versions/-1",
            400,
            "Malformed request: GET /v1/models/half/versions/-1",
        ),
        (
            "POST",
            "/v1/models/half/versions/1_0:predict",
            400,
            "Malformed request: POST /v1/models/half/versions/1_0:predict",
        ),
        (
            "GET",
            "/v1/models/half/versions/99999999999999999999",
            400,
            "Failed to convert version: 99999999999999999999 to numeric.",
        ),
        # methods libevent does not take at all
        ("TRACE", "/v1/models/half", 501, "Method not implemented: TRACE"),
        ("PROPFIND", "/anything", 501, "Method not implemented: PROPFIND"),
        # a CORS preflight without an Origin
        ("OPTIONS", "/v1/models/half", 400, "Origin header is missing in CORS preflight"),
    ],
)
def test_rest_routes_and_methods_answer_json(half, method, path, status, message):
    answer = http_request(half, method, path)
    assert (answer[0], rest_error(*answer)) == (status, message)


def test_rest_paths_match_case_insensitively_as_tf_serving(half):
    status, _, body = http_request(half, "GET", "/V1/Models/half/Versions/1")
    assert status == 200 and json.loads(body)["model_version_status"][0]["version"] == "1"
    status, _, body = http_request(half, "POST", "/v1/MODELS/half:predict", b'{"instances": [2]}')
    assert (status, json.loads(body)) == (200, {"predictions": [3.0]})


def test_rest_cors_preflight_with_an_origin_is_ok(half):
    status, _, body = http_request(
        half, "OPTIONS", "/v1/models/half:predict", headers={"Origin": "https://example.com"}
    )
    assert (status, body) == (200, b"")


def test_rest_head_is_malformed_without_a_body(half):
    status, headers, body = http_request(half, "HEAD", "/v1/models/half")
    assert (status, body) == (400, b"") and headers["Content-Type"].startswith("application/json")


# -- REST: bodies --------------------------------------------------------------------------------


def test_rest_body_over_the_limit_is_413_before_it_is_read(half):
    with socket.create_connection(("127.0.0.1", half.rest_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/models/half:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 3000000000\r\n\r\n{"
        )
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 413
        assert "larger than" in rest_error(413, dict(response.getheaders()), response.read())
    assert_rest_serves(half)


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x", "nope"],
)
def test_rest_content_type_is_ignored_as_tf_serving(half, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    status, _, body = http_request(
        half, "POST", "/v1/models/half:predict", b'{"instances": [1.0]}', headers
    )
    assert (status, json.loads(body)) == (200, {"predictions": [2.5]})


def test_rest_gzip_body_is_decompressed_and_a_corrupt_one_is_400(half):
    headers = {"Content-Encoding": "gzip"}
    good = gzip.compress(b'{"instances": [1.0]}')
    status, _, body = http_request(half, "POST", "/v1/models/half:predict", good, headers)
    assert (status, json.loads(body)) == (200, {"predictions": [2.5]})
    for corrupt in (b"not gzip", good[:-9]):
        answer = http_request(half, "POST", "/v1/models/half:predict", corrupt, headers)
        assert answer[0] == 400 and "gzipped body" in rest_error(*answer)
    assert_rest_serves(half)


def deep(depth: int, leaf: str = "1.0") -> str:
    return "[" * depth + leaf + "]" * depth


# Deeper than any tensor TensorFlow takes (254 dims); shallower nesting is a tensor shape, and
# Predict no longer checks shapes against the signature.
@pytest.mark.parametrize("depth", [300, 990, 1030, 100_000])
@pytest.mark.parametrize(
    "template",
    [
        '{"instances": %s}',
        '{"inputs": {"x": %s}}',
        '{"signature_name": "mixed", "instances": [{"s": %s}]}',
        '{"examples": [{"x": %s}]}',
        "%s",
    ],
)
def test_rest_deeply_nested_json_is_400(half, depth, template):
    path = "/v1/models/half:regress" if "examples" in template else "/v1/models/half:predict"
    leaf = '"a"' if '"s"' in template else "1.0"
    answer = http_request(half, "POST", path, (template % deep(depth, leaf)).encode())
    assert answer[0] == 400, answer
    assert rest_error(*answer)
    answer = http_request(half, "POST", path, (template % deep(depth, "NaN")).encode())
    assert answer[0] == 400, answer


@pytest.mark.parametrize(
    "body, message",
    [
        (b"\xff\xfe{", "JSON Parse error"),
        (b'{"instances": ["\xff"]}', "JSON Parse error"),
        (b'{"instances": [1e400]}', "JSON Parse error: Number too big"),
        (b'{"instances": [-1e400]}', "JSON Parse error: Number too big"),
        (
            b'{"signature_name": "mixed", "inputs": {"s": [{"b64": "!!"}]}}',
            "Unable to base64 decode",
        ),
        (b'{"signature_name": "mixed", "inputs": {"s": [{"b64": 1}]}}', "base64"),
        (b'{"instances": [{"b64": "aGk="}]}', 'Input "x"'),
        (b'{"instances": [1, "a"]}', 'Input "x"'),
        (b'{"instances": ["1.5"]}', 'Input "x"'),
        (b'{"instances": [true]}', 'Input "x"'),
        (b'{"instances": [null]}', 'Input "x"'),
        (b'{"instances": [[1, 2], [3]]}', 'Input "x"'),
        (b'{"instances": [[1, 2], 3]}', 'Input "x"'),
        (b'{"signature_name": "mixed", "inputs": {"i32": [1.5]}}', 'Input "i32"'),
        (b'{"signature_name": "mixed", "inputs": {"i32": [NaN]}}', 'Input "i32"'),
        (b'{"signature_name": "mixed", "inputs": {"i32": [4294967296]}}', 'Input "i32"'),
        (b'{"signature_name": "mixed", "inputs": {"i64": [9223372036854775808]}}', 'Input "i64"'),
        (b'{"signature_name": "mixed", "inputs": {"i64": [1' + b"0" * 30 + b"]}}", 'Input "i64"'),
        (b'{"signature_name": "mixed", "inputs": {"bool": [0]}}', 'Input "bool"'),
        (b'{"signature_name": "mixed", "inputs": {"s": [1]}}', 'Input "s"'),
        (b'{"instances": []}', "'instances' is empty"),
        (b'{"instances": {}}', "'instances' must be a JSON array"),
        (b"{}", "Missing 'inputs' or 'instances' key"),
        (b"[]", "Is not object"),
        (b"", "The document is empty"),
    ],
)
def test_rest_bad_bodies_are_400_naming_the_problem(half, body, message):
    answer = http_request(half, "POST", "/v1/models/half:predict", body)
    assert answer[0] == 400, answer
    assert message in rest_error(*answer)


@pytest.mark.parametrize(
    "body, predictions",
    [
        # NaN and Infinity are accepted in input, as TF Serving's rapidjson flags take them
        (b'{"instances": [NaN, -Infinity]}', [math.nan, -math.inf]),
        # a float input takes any JSON number: ints, and ints too big for int64
        (b'{"instances": [2, 1' + b"0" * 30 + b"]}", [3.0, 5e29]),
        (b'{"instances": [1e300]}', [math.inf]),  # a float32 overflows as TF's GetFloat does
        (b'{"inputs": []}', []),
    ],
)
def test_rest_numbers_as_tf_serving_takes_them(half, body, predictions):
    status, _, text = http_request(half, "POST", "/v1/models/half:predict", body)
    assert status == 200, text
    key = "outputs" if b"inputs" in body else "predictions"
    got = json.loads(text)[key]
    np.testing.assert_allclose(got, predictions, rtol=1e-6)


# -- gRPC: requests that do not decode, tensors that cannot be ------------------------------------

GRPC_METHODS = [
    PREDICT,
    "/tensorflow.serving.PredictionService/Classify",
    "/tensorflow.serving.PredictionService/Regress",
    "/tensorflow.serving.PredictionService/MultiInference",
    "/tensorflow.serving.PredictionService/GetModelMetadata",
    "/tensorflow.serving.ModelService/GetModelStatus",
    "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
]


@pytest.mark.parametrize("method", GRPC_METHODS)
@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", GOOD_PREDICT[:-3]])
def test_grpc_undecodable_request_is_invalid_argument(half, method, data):
    code, details = grpc_code(half, method, data)
    assert code == INVALID and "parse" in details, (code, details)


def test_grpc_unknown_method_is_unimplemented(half):
    assert grpc_code(half, "/tensorflow.serving.PredictionService/Nope", b"")[0] == (
        grpc.StatusCode.UNIMPLEMENTED
    )


F = types_pb2.DT_FLOAT


@pytest.mark.parametrize(
    "proto",
    [
        tensor(F, [2**20, 2**20], float_val=[1.0]),  # 4 TiB from one value
        tensor(F, [2**40]),  # zeros
        tensor(F, [2**31, 2**31, 2**31]),  # more elements than an int64 counts
        tensor(types_pb2.DT_STRING, [2**36], string_val=[b"a"]),
        tensor(F, [2**36], tensor_content=b"\0" * 8),
        tensor(F, [1] * 300, float_val=[1.0]),  # more dims than TF (254) or numpy hold
        tensor(F, [3], tensor_content=b"\0" * 11),
        tensor(F, [0], tensor_content=b"\0" * 4),
        tensor(F, [-1], float_val=[1.0]),
        tensor(types_pb2.DT_STRING, [1], tensor_content=b"a"),
        tensor(types_pb2.DT_INVALID, [1]),
        tensor(types_pb2.DT_RESOURCE, [1]),
        tensor(999, [1]),
    ],
)
def test_grpc_tensor_that_cannot_be_made_is_invalid_argument(half, proto):
    code, details = grpc_code(half, PREDICT, predict_bytes({"x": proto}))
    assert (code, details) == (INVALID, "tensor parsing error: x")
    assert_grpc_serves(half)


def test_grpc_typed_values_wrap_into_narrow_dtypes_as_tf(half):
    """An ``int_val`` holds int32s and TF casts them into an int8 / uint8 / int16, as it casts a
    ``half_val``'s into float16 bits: decoded (then refused by the float32 signature for its
    dtype), never an overflow."""
    for dtype, field in [
        (types_pb2.DT_UINT8, "int_val"),
        (types_pb2.DT_INT8, "int_val"),
        (types_pb2.DT_HALF, "half_val"),
    ]:
        proto = tensor(dtype, [2], **{field: [300, -70000]})
        code, details = grpc_code(half, PREDICT, predict_bytes({"x": proto}))
        assert code == INVALID and "expects dtype float" in details, (code, details)


# == the property-based suite =====================================================================

# Derandomized: the same requests on every run, so that CI is stable (and a failure repeats).
SUITE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

MODEL_NAMES = st.sampled_from(["half", "nope", "", "HALF"]) | st.text(max_size=12)
SIGNATURES = st.sampled_from(
    ["", "serving_default", "mixed", "classify_x_to_y", "classify_with_labels", "regress_x_to_y"]
) | st.text(max_size=12)
ALIASES = st.sampled_from(["x", "f", "d", "i32", "i64", "s", "bool", "y", ""]) | st.text(max_size=8)
INT32 = st.integers(-(2**31), 2**31 - 1)
DIMS = st.lists(
    st.integers(0, 4) | st.sampled_from([-1, -(2**62), 2**20, 2**33, 2**62]), max_size=6
) | st.lists(st.integers(0, 2), min_size=60, max_size=300)

TYPED_VALUES = {
    "float_val": st.floats(width=32),
    "double_val": st.floats(),
    "int_val": INT32,
    "int64_val": st.integers(-(2**63), 2**63 - 1),
    "uint32_val": st.integers(0, 2**32 - 1),
    "uint64_val": st.integers(0, 2**64 - 1),
    "half_val": INT32,
    "bool_val": st.booleans(),
    "string_val": st.binary(max_size=8),
}


@st.composite
def tensor_protos(draw: st.DrawFn) -> tensor_pb2.TensorProto:
    """Any dtype (unknown ones too) and shape, its values in tensor_content (of the right size,
    or not) or in typed fields (too few, too many, of another dtype's field)."""
    dtype = draw(st.sampled_from(sorted(types_pb2.DataType.values())) | st.integers(0, 2**31 - 1))
    dims = draw(DIMS)
    proto = tensor(dtype, dims)
    proto.tensor_shape.unknown_rank = draw(st.booleans()) and draw(st.booleans())
    if draw(st.booleans()):
        size = math.prod(d for d in dims if d >= 0) if len(dims) < 8 else 0
        itemsize = draw(st.sampled_from([1, 2, 4, 8]))
        length = draw(st.sampled_from([size * itemsize]) | st.integers(0, 64))
        length = min(length, 256)
        proto.tensor_content = draw(st.binary(min_size=length, max_size=length))
    else:
        for field in draw(st.lists(st.sampled_from(sorted(TYPED_VALUES)), max_size=2, unique=True)):
            getattr(proto, field).extend(draw(st.lists(TYPED_VALUES[field], max_size=6)))
    return proto


def good_tensors() -> st.SearchStrategy[tensor_pb2.TensorProto]:
    return st.lists(st.floats(width=32), max_size=5).map(
        lambda xs: tensor(F, [len(xs)], float_val=xs)
    )


def model_spec_into(draw: st.DrawFn, spec: Any) -> None:
    spec.name = draw(MODEL_NAMES)
    spec.signature_name = draw(SIGNATURES)
    choice = draw(st.integers(0, 2))
    if choice == 1:
        spec.version.value = draw(st.sampled_from([1, 0, 2]) | st.integers(-(2**63), 2**63 - 1))
    elif choice == 2:
        spec.version_label = draw(st.sampled_from(["stable", "canary"]) | st.text(max_size=8))


@st.composite
def predict_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    request = predict_pb2.PredictRequest()
    model_spec_into(draw, request.model_spec)
    inputs = draw(st.dictionaries(ALIASES, tensor_protos() | good_tensors(), max_size=7))
    for alias, proto in inputs.items():
        request.inputs[alias].CopyFrom(proto)
    request.output_filter.extend(draw(st.lists(ALIASES | st.sampled_from(["total"]), max_size=3)))
    return PREDICT, request.SerializeToString()


FEATURE_VALUES = st.one_of(  # (the tf.train.Feature's list, its values)
    st.tuples(st.just("float_list"), st.lists(st.floats(width=32), max_size=4)),
    st.tuples(st.just("int64_list"), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)),
    st.tuples(st.just("bytes_list"), st.lists(st.binary(max_size=6), max_size=4)),
)


@st.composite
def examples_input(draw: st.DrawFn, target: Any) -> None:
    """A ``tensorflow.serving.Input``: examples of random features, a context, or nothing."""
    kind = draw(st.sampled_from(["none", "list", "context"]))
    if kind == "none":
        return
    listed = target.example_list if kind == "list" else target.example_list_with_context
    for _ in range(draw(st.integers(0, 3))):
        features = draw(st.dictionaries(st.sampled_from(["x", "y", ""]), FEATURE_VALUES))
        example = listed.examples.add()
        for name, (kind_of_list, values) in features.items():
            getattr(example.features.feature[name], kind_of_list).value.extend(values)
    if kind == "context":
        listed.context.features.feature["x"].float_list.value.append(1.0)


@st.composite
def example_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(["Classify", "Regress", "MultiInference"]))
    if method == "MultiInference":
        request = inference_pb2.MultiInferenceRequest()
        for _ in range(draw(st.integers(0, 3))):
            task = request.tasks.add()
            model_spec_into(draw, task.model_spec)
            task.method_name = draw(
                st.sampled_from(["tensorflow/serving/classify", "tensorflow/serving/regress"])
                | st.text(max_size=12)
            )
    else:
        request = (
            classification_pb2.ClassificationRequest()
            if method == "Classify"
            else regression_pb2.RegressionRequest()
        )
        model_spec_into(draw, request.model_spec)
    draw(examples_input(request.input))
    return f"/tensorflow.serving.PredictionService/{method}", request.SerializeToString()


@st.composite
def model_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    if draw(st.booleans()):
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.metadata_field.extend(
            draw(st.lists(st.sampled_from(["signature_def"]) | st.text(max_size=8), max_size=3))
        )
        method = "/tensorflow.serving.PredictionService/GetModelMetadata"
    else:
        request = get_model_status_pb2.GetModelStatusRequest()
        method = "/tensorflow.serving.ModelService/GetModelStatus"
    model_spec_into(draw, request.model_spec)
    return method, request.SerializeToString()


METHOD_PATHS = st.text(string.ascii_letters + "./_", max_size=30).map(lambda s: "/" + s)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """Bytes that are no request (or a good one, corrupted); HandleReloadConfigRequest only gets
    bytes that cannot decode, so that no generated model list replaces the one under test."""
    method = draw(st.sampled_from(GRPC_METHODS[:-1]) | METHOD_PATHS)
    if draw(st.booleans()):
        data = bytearray(GOOD_PREDICT)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = data[: draw(st.integers(0, len(data)))]
        return method, bytes(data)
    if draw(st.integers(0, 9)) == 0:
        return GRPC_METHODS[-1], b"\xff\xff\xff" + draw(st.binary(max_size=16))
    return method, draw(st.binary(max_size=200))


GRPC_REQUESTS = st.one_of(predict_requests(), example_requests(), model_requests(), raw_requests())


def grpc_problem(server: Server, method: str, data: bytes) -> str | None:
    """Why the server's answer to ``data`` is not one a client can act on (None: it is)."""
    code, details = grpc_code(server, method, data)
    if code != grpc.StatusCode.OK and code not in GRPC_ACTIONABLE:
        return f"{code.name}: {details}"
    return None


# -- REST requests ---------------------------------------------------------------------------------

B64 = st.fixed_dictionaries(
    {"b64": st.text("ABCDabcd0123+/=!-_ ", max_size=12) | st.integers() | st.none()}
)
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(),
    st.text(max_size=6),
    B64,
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(ALIASES | st.sampled_from(["b64"]), children, max_size=3),
    max_leaves=12,
)
NUMBER_LITERALS = st.sampled_from(
    [
        "1e400",
        "-1e400",
        "1" + "0" * 400,
        "NaN",
        "-Infinity",
        "nan",
        "inf",
        "0x10",
        "01",
        ".5",
        "+1",
        "1.",
        "--1",
        "1e",
        "true",
        "null",
        '"1"',
        "[]",
        "{}",
        "2147483648",
        "-9223372036854775809",
    ]
)


def json_text(value: Any) -> str:
    return json.dumps(value)  # NaN and Infinity as such, which TF Serving reads


@st.composite
def predict_bodies(draw: st.DrawFn) -> str:
    body: dict[str, Any] = {}
    key = draw(st.sampled_from(["instances", "inputs", "both", "neither"]))
    if key in ("instances", "both"):
        body["instances"] = draw(
            JSON_VALUES | st.lists(st.dictionaries(ALIASES, JSON_VALUES, max_size=3), max_size=3)
        )
    if key in ("inputs", "both"):
        body["inputs"] = draw(JSON_VALUES | st.dictionaries(ALIASES, JSON_VALUES, max_size=4))
    if draw(st.booleans()):
        body["signature_name"] = draw(SIGNATURES | JSON_LEAVES)
    return json_text(body)


@st.composite
def matrix_bodies(draw: st.DrawFn) -> str:
    """The shape the fast numeric path reads: a matrix of numbers, its rows of any length."""
    rows = draw(
        st.lists(st.lists(st.floats() | st.integers(-(2**70), 2**70), max_size=4), max_size=4)
    )
    return json_text({draw(st.sampled_from(["instances", "inputs"])): rows})


@st.composite
def examples_bodies(draw: st.DrawFn) -> str:
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["examples"] = draw(
            st.lists(st.dictionaries(ALIASES, JSON_VALUES, max_size=3), max_size=3) | JSON_VALUES
        )
    if draw(st.booleans()):
        body["context"] = draw(JSON_VALUES)
    if draw(st.booleans()):
        body["signature_name"] = draw(SIGNATURES | JSON_LEAVES)
    return json_text(body)


@st.composite
def literal_bodies(draw: st.DrawFn) -> str:
    template = draw(
        st.sampled_from(
            [
                '{"instances": [%s]}',
                '{"inputs": {"x": [%s]}}',
                '{"examples": [{"x": %s}]}',
                '{"signature_name": "mixed", "inputs": {"i64": [%s], "s": ["a"]}}',
                "%s",
            ]
        )
    )
    return template % draw(NUMBER_LITERALS)


@st.composite
def nested_bodies(draw: st.DrawFn) -> str:
    depth = draw(st.integers(1, 3000) | st.sampled_from([10_000, 100_000]))
    inner = draw(st.sampled_from(["[", '{"a":'])) if draw(st.booleans()) else "["
    close = "]" if inner == "[" else "}"
    nested = inner * depth + draw(st.sampled_from(["1", "NaN", '"s"', ""])) + close * depth
    return draw(st.sampled_from(['{"instances": %s}', '{"examples": %s}', "%s"])) % nested


def encoded(text: str, draw: st.DrawFn) -> bytes:
    """``text`` as UTF-8, or spoilt: cut short, bytes that are not UTF-8 spliced in."""
    data = text.encode("utf-8")
    spoil = draw(st.integers(0, 5))
    if spoil == 1 and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if spoil == 2:
        at = draw(st.integers(0, len(data)))
        return (
            data[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\0"]))
            + data[at:]
        )
    return data


PATH_TAILS = st.sampled_from(
    [
        ":predict",
        ":classify",
        ":regress",
        ":nope",
        ":PREDICT",
        "/metadata",
        "",
        "/",
        ":",
        "::predict",
    ]
)
PATH_TEXT = st.text(string.ascii_letters + string.digits + "-._~%!$&'()*+,;=@:", max_size=12)
PERCENT = st.sampled_from(["%ff", "%00", "%2F", "%zz", "%", "%e2%82%ac"])


@st.composite
def rest_paths(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return "/" + "/".join(draw(st.lists(PATH_TEXT | PERCENT, max_size=4)))
    name = draw(st.sampled_from(["half", "nope", "HALF"]) | PATH_TEXT | PERCENT)
    path = "/v1/models/" + name
    version = draw(st.integers(0, 3))
    if version == 1:
        path += "/versions/" + draw(
            st.sampled_from(["1", "2", "0", "-1", "01", "1_0", "99999999999999999999", ""])
            | PATH_TEXT
        )
    elif version == 2:
        path += "/labels/" + draw(st.sampled_from(["stable", ""]) | PATH_TEXT)
    path += draw(PATH_TAILS)
    if draw(st.integers(0, 9)) == 0:
        path += draw(st.sampled_from(["?a=b", "?", "#frag", "?instances=[1]"]))
    return path


CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "application/json; charset=latin-1",
        "nope",
    ]
)
ENCODINGS = st.sampled_from([None, None, None, "gzip", "deflate", "identity", "x-bogus"])
METHODS = st.sampled_from(
    ["POST"] * 6
    + ["GET"] * 3
    + ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "PURGE"]
)


@st.composite
def rest_requests(draw: st.DrawFn) -> tuple[str, str, bytes | None, dict[str, str]]:
    method = draw(METHODS)
    if draw(st.integers(0, 3)) == 0:
        path = draw(rest_paths())
    else:
        path = "/v1/models/half:" + draw(st.sampled_from(["predict"] * 3 + ["classify", "regress"]))
    text = draw(
        st.one_of(
            predict_bodies(), matrix_bodies(), examples_bodies(), literal_bodies(), nested_bodies()
        )
    )
    body: bytes | None = (
        encoded(text, draw) if draw(st.integers(0, 7)) else draw(st.binary(max_size=64))
    )
    headers: dict[str, str] = {}
    content_type = draw(CONTENT_TYPES)
    if content_type:
        headers["Content-Type"] = content_type
    encoding = draw(ENCODINGS)
    if encoding:
        headers["Content-Encoding"] = encoding
        if encoding == "gzip" and draw(st.booleans()):
            body = gzip.compress(body)
    if method in ("GET", "HEAD", "OPTIONS") and draw(st.booleans()):
        body = None
    if method == "OPTIONS" and draw(st.booleans()):
        headers["Origin"] = draw(st.sampled_from(["https://a.example", "null", "ftp://x"]))
    return method, path, body, headers


def rest_problem(server: Server, method: str, path: str, body: bytes | None, headers) -> str | None:
    """Why the server's answer is not one a client can act on (None: it is)."""
    status, response_headers, data = http_request(server, method, path, body, headers)
    if status != 200 and status not in HTTP_ACTIONABLE:
        return f"HTTP {status}: {data[:200]!r}"
    if method == "HEAD" or (method == "OPTIONS" and status == 200):
        return None
    if not response_headers.get("Content-Type", "").startswith("application/json"):
        return f"HTTP {status} {response_headers.get('Content-Type')}: {data[:200]!r}"
    try:
        answer = json.loads(data)
    except ValueError:
        return f"HTTP {status}, not JSON: {data[:200]!r}"
    if status != 200 and not (isinstance(answer, dict) and isinstance(answer.get("error"), str)):
        return f"HTTP {status} without an error string: {data[:200]!r}"
    return None


# -- the two suites --------------------------------------------------------------------------------


def run_suite(
    strategy: st.SearchStrategy, problem: Callable[..., str | None], serves: Callable[[], None]
) -> int:
    """Send ``EXAMPLES`` generated requests, each answered actionably, a good request answered
    right every ``GOOD_REQUEST_EVERY``; the number sent."""
    sent = 0

    @SUITE
    @given(strategy)
    def one(request: tuple) -> None:
        nonlocal sent
        sent += 1
        found = problem(*request)
        assert found is None, f"{request!r:.600}\n-> {found}"
        if sent % GOOD_REQUEST_EVERY == 0:
            serves()

    one()
    serves()
    return sent


def test_grpc_generated_malformed_requests(half):
    sent = run_suite(
        GRPC_REQUESTS, lambda m, d: grpc_problem(half, m, d), lambda: assert_grpc_serves(half)
    )
    assert sent >= EXAMPLES
    assert half.proc.poll() is None


def test_rest_generated_malformed_requests(half):
    sent = run_suite(
        rest_requests(),
        lambda *request: rest_problem(half, *request),
        lambda: assert_rest_serves(half),
    )
    assert sent >= EXAMPLES
    assert half.proc.poll() is None
