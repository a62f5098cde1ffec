"""End-to-end tests of ``python -m serving``: a real server subprocess, real sockets, TF Serving's
official stubs.

One module-scoped server serves a fixed model for the request/error tests; the lifecycle test runs
its own server and walks through: empty base path -> first version -> swap under load -> broken
version -> rollback under load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests import saved_models  # noqa: E402
from tests.processes import free_port  # noqa: E402
from tests.servers import (  # noqa: E402
    AVAILABLE,
    END,
    PYTHON,
    REPO,
    Load,
    Server,
    images,
    rpc_error,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    predict_pb2,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[int, Path]:
    """Exported models classifying everything as 3 (with warmup), 5 and 7."""
    root = tmp_path_factory.mktemp("templates")
    return {
        3: saved_models.make_template(root / "c3", 3, warmup_records=5),
        5: saved_models.make_template(root / "c5", 5),
        7: saved_models.make_template(root / "c7", 7),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory, templates):
    """A server with version 4 (answers class 3) of model "mnist" loaded at start."""
    root = tmp_path_factory.mktemp("served")
    base = root / "mnist"
    saved_models.copy_version(templates[3], base, 4)
    (base / "not-a-version").mkdir()
    (base / "README").write_text("ignored")
    with Server(base, root / "server.log") as server:
        yield server


# -- predict ---------------------------------------------------------------------------------------


def test_grpc_predict_returns_model_answer(served):
    response = served.predict(images(2))
    scores = tf.make_ndarray(response.outputs["scores"])
    classes = tf.make_ndarray(response.outputs["classes"])
    np.testing.assert_allclose(scores, saved_models.expected_scores(3, 2), rtol=1e-5)
    assert classes.tolist() == [3, 3]
    assert response.model_spec.name == "mnist"
    assert response.model_spec.version.value == 4
    assert response.model_spec.signature_name == "serving_default"


def test_grpc_predict_specific_version_and_output_filter(served):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.version.value = 4
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images(1)))
    request.output_filter.append("classes")
    response = served.predict_stub.Predict(request, timeout=10)
    assert list(response.outputs) == ["classes"]
    assert tf.make_ndarray(response.outputs["classes"]).tolist() == [3]


def test_warmup_was_replayed(served):
    assert "warmup replayed 5 request(s)" in served.log()


def test_rest_predict_row_format(served):
    status, body = served.http(
        "POST", "/v1/models/mnist:predict", {"instances": images(2).tolist()}
    )
    assert status == 200, body
    assert len(body["predictions"]) == 2
    assert body["predictions"][0]["classes"] == 3
    np.testing.assert_allclose(
        body["predictions"][1]["scores"], saved_models.expected_scores(3)[0], rtol=1e-5
    )


def test_rest_predict_columnar_and_version_path(served):
    status, body = served.http(
        "POST",
        "/v1/models/mnist/versions/4:predict",
        {"signature_name": "serving_default", "inputs": {"images": images(3).tolist()}},
    )
    assert status == 200, body
    assert body["outputs"]["classes"] == [3, 3, 3]
    np.testing.assert_allclose(
        body["outputs"]["scores"], saved_models.expected_scores(3, 3), rtol=1e-5
    )


def test_rest_predict_named_instances(served):
    status, body = served.http(
        "POST", "/v1/models/mnist:predict", {"instances": [{"images": images(1)[0].tolist()}]}
    )
    assert status == 200, body
    assert body["predictions"][0]["classes"] == 3


# -- status / metadata -----------------------------------------------------------------------------


def test_grpc_model_status(served):
    response = served.status()
    assert [(s.version, s.state, s.status.error_code) for s in response.model_version_status] == [
        (4, AVAILABLE, 0)
    ]
    assert served.status(version=4).model_version_status[0].state == AVAILABLE


def test_rest_model_status(served):
    assert served.http("GET", "/v1/models/mnist") == (
        200,
        {
            "model_version_status": [
                {
                    "version": "4",
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        },
    )
    status, body = served.http("GET", "/v1/models/mnist/versions/4")
    assert status == 200 and body["model_version_status"][0]["version"] == "4"


def test_grpc_model_metadata(served):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "mnist"
    request.metadata_field.append("signature_def")
    response = served.predict_stub.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == 4
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    sig = sig_map.signature_def["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    assert set(sig.inputs) == {"images"} and set(sig.outputs) == {"scores", "classes"}
    assert [d.size for d in sig.inputs["images"].tensor_shape.dim] == [-1, 784]


def test_rest_model_metadata(served):
    status, body = served.http("GET", "/v1/models/mnist/metadata")
    assert status == 200, body
    assert body["model_spec"]["version"] == "4"
    sig = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["images"]["dtype"] == "DT_FLOAT"


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_model_not_found(served):
    e = rpc_error(served.predict, images(1), model_name="nope")
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert e.details() == "Servable not found for request: Latest(nope)"
    assert rpc_error(served.status, model_name="nope").code() == grpc.StatusCode.NOT_FOUND
    status, body = served.http("POST", "/v1/models/nope:predict", {"instances": [[0.0] * 784]})
    assert status == 404 and "Latest(nope)" in body["error"]
    assert served.http("GET", "/v1/models/nope")[0] == 404


def test_unknown_version_not_found(served):
    e = rpc_error(served.predict, images(1), version=3)
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert e.details() == "Servable not found for request: Specific(mnist, 3)"
    assert rpc_error(served.status, version=3).code() == grpc.StatusCode.NOT_FOUND
    status, body = served.http(
        "POST", "/v1/models/mnist/versions/3:predict", {"instances": [[0.0] * 784]}
    )
    assert status == 404 and "Specific(mnist, 3)" in body["error"]


def test_unknown_signature_failed_precondition(served):
    e = rpc_error(served.predict, images(1), signature="nope")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.details() == 'Serving signature key "nope" not found.'
    status, body = served.http(
        "POST", "/v1/models/mnist:predict", {"signature_name": "nope", "instances": [[0.0] * 784]}
    )
    assert status == 400 and body["error"] == 'Serving signature key "nope" not found.'


@pytest.mark.parametrize(
    "inputs, named",
    [
        ({"pixels": np.zeros((1, 784), np.float32)}, "pixels"),  # wrong name
        ({"images": np.zeros((1, 784), np.float32), "extra": np.zeros(1, np.float32)}, "extra"),
        ({"images": np.zeros((1, 784), np.float64)}, "images"),  # wrong dtype
        # Shapes are the graph's to check, as in TF Serving: its error comes back as it is.
        ({"images": np.zeros((1, 783), np.float32)}, "Matrix size-incompatible: In[0]: [1,783]"),
        ({"images": np.zeros((784,), np.float32)}, "In[0] and In[1] has different ndims"),
    ],
)
def test_bad_input_invalid_argument_grpc(served, inputs, named):
    e = rpc_error(served.predict, None, inputs=inputs)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in e.details()


@pytest.mark.parametrize(
    "body, named",
    [
        ({"inputs": {"pixels": [[0.0] * 784]}}, "pixels"),
        ({"instances": [{"pixels": [0.0] * 784}]}, "pixels"),
        ({"instances": [["a"] * 784]}, "images"),  # not numbers
        ({"instances": [[0.0] * 783]}, "Matrix size-incompatible"),  # the graph's error
    ],
)
def test_bad_input_400_rest(served, body, named):
    status, response = served.http("POST", "/v1/models/mnist:predict", body)
    assert status == 400, response
    assert named in response["error"]


def test_rest_malformed_body(served):
    status, body = served.http("POST", "/v1/models/mnist:predict", {"nothing": 1})
    assert status == 400 and "instances" in body["error"]


# -- client ----------------------------------------------------------------------------------------


def test_client_reports_error_rate(served):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "serving.client",
            "--server",
            f"127.0.0.1:{served.port}",
            "--num_tests",
            "200",
            "--concurrency",
            "4",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # The test model answers 3 for everything: the error rate is 1 - share of 3s among the labels.
    from serving.mnist import load_test

    labels = load_test(REPO / "data" / "mnist").labels[:200]
    expected = (labels != 3).mean() * 100
    line = [t for t in done.stdout.splitlines() if t.startswith("Inference error rate: ")]
    assert line, done.stdout
    assert abs(float(line[0].split(": ")[1].rstrip("%")) - expected) < 1e-6


def test_client_unreachable_server_exits_nonzero():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "serving.client",
            "--server",
            f"127.0.0.1:{free_port()}",
            "--num_tests",
            "5",
            "--timeout",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "cannot reach model server" in done.stderr


# -- flags -----------------------------------------------------------------------------------------


# -- version lifecycle -----------------------------------------------------------------------------


def test_version_lifecycle(tmp_path, templates, start_server):
    base = tmp_path / "models" / "mnist"  # does not exist yet
    server = start_server(base)
    # Empty/missing base path: up, nothing to serve.
    e = rpc_error(server.predict, images(1))
    assert e.code() == grpc.StatusCode.NOT_FOUND

    # A half-written version (no saved_model.pb) and a hidden temp dir are ignored.
    (base / "9").mkdir(parents=True)
    (base / ".tmp-10").mkdir()
    # First version appears.
    saved_models.copy_version(templates[3], base, 1)
    server.wait_for(lambda s: s.get(1, (0,))[0] == AVAILABLE, "version 1 AVAILABLE")
    assert 9 not in server.states()
    assert tf.make_ndarray(server.predict(images(1)).outputs["classes"]).tolist() == [3]

    # Swap to version 2 under continuous load: zero failed requests.
    with Load(server) as load:
        load.wait_for_answer((1, 3))
        saved_models.copy_version(templates[5], base, 2)
        load.wait_for_answer((2, 5))
        server.wait_for(lambda s: s.get(1, (0,))[0] == END, "version 1 unloaded")
        time.sleep(0.3)
    assert load.failures == []
    assert {v for v, _ in load.answers} == {1, 2}
    assert all(c == {1: 3, 2: 5}[v] for v, c in load.answers)

    # A broken version: END with its error, version 2 keeps serving, no retry every poll.
    saved_models.write_broken_version(base, 3)
    server.wait_for(lambda s: s.get(3, (0,))[0] == END, "broken version 3 END")
    state, code, message = server.states()[3]
    assert code != 0 and message
    assert server.states()[2][0] == AVAILABLE
    response = server.predict(images(1))
    assert response.model_spec.version.value == 2
    status, body = server.http("GET", "/v1/models/mnist/versions/3")
    assert status == 200
    assert body["model_version_status"][0]["state"] == "END"
    assert body["model_version_status"][0]["status"]["error_code"] != "OK"
    time.sleep(0.6)  # a few polls
    assert server.log().count("version 3: LOADING") == 1

    # Remove the broken one; push 4; then roll back by deleting 4 under load: 2 comes back.
    shutil.rmtree(base / "3")
    saved_models.copy_version(templates[7], base, 4)
    server.wait_for(
        lambda s: s.get(4, (0,))[0] == AVAILABLE and s[2][0] == END,
        "version 4 AVAILABLE, 2 unloaded",
    )
    with Load(server) as load:
        load.wait_for_answer((4, 7))
        shutil.rmtree(base / "4")
        load.wait_for_answer((2, 5))
        server.wait_for(lambda s: s[4][0] == END and s[2][0] == AVAILABLE, "rolled back to 2")
        time.sleep(0.3)
    assert load.failures == []
    assert {v for v, _ in load.answers} == {2, 4}
    rc = server.stop()
    log = server.log()
    assert rc == 0, log
    for word in ("LOADING", "AVAILABLE", "UNLOADING", "END (unloaded)", "load FAILED"):
        assert word in log
