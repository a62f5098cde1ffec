"""Our model server under test: a ``python -m serving`` subprocess on free ports, with TF
Serving's official gRPC stubs and a plain-HTTP REST helper, and the requests tests send it.

``Server`` is a context manager (``with Server(base, log) as server``: started, ready, stopped);
a test that starts one of its own takes the ``start_server`` fixture (``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tests.processes import free_port, serving_command
from tests.saved_models import x_example

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


class Server:
    """A ``python -m serving`` subprocess on free ports, with gRPC stubs and a REST helper."""

    def __init__(
        self,
        base_path: Path,
        log_path: Path,
        model_name: str = "mnist",
        extra: list[str] | None = None,
    ) -> None:
        self.port, self.rest_port = free_port(), free_port()
        self.model_name = model_name
        self.log_path = log_path
        self.base_path = base_path
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            serving_command(self.port, self.rest_port, model_name, base_path, 0.2, extra or []),
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                grpc.channel_ready_future(self.channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def __enter__(self) -> "Server":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    # -- gRPC --
    def predict(
        self,
        images: np.ndarray,
        version: int | None = None,
        signature: str = "",
        inputs: dict | None = None,
        model_name: str | None = None,
        timeout: float = 10,
        label: str = "",
    ):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name or self.model_name
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        if label:
            request.model_spec.version_label = label
        for key, value in (inputs if inputs is not None else {"images": images}).items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        return self.predict_stub.Predict(request, timeout=timeout)

    def status(self, version: int | None = None, model_name: str | None = None):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model_name or self.model_name
        if version is not None:
            request.model_spec.version.value = version
        return self.model_stub.GetModelStatus(request, timeout=10)

    def states(self) -> dict[int, tuple[int, int, str]]:
        try:
            response = self.status()
        except grpc.RpcError:
            return {}
        return {
            s.version: (s.state, s.status.error_code, s.status.error_message)
            for s in response.model_version_status
        }

    def wait_for(self, predicate, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.states()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what}; states {self.states()}\n{self.log()}")

    # -- REST --
    def http(self, method: str, path: str, body: object | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.rest_port}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def predict_on_fresh_connection(port: int, model: str = "mnist", version: int | None = None):
    """One Predict on a new TCP connection: (version, class) or the gRPC error code."""
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images(1)))
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                request, timeout=10
            )
        except grpc.RpcError as e:
            return e.code()
        return (
            response.model_spec.version.value,
            tf.make_ndarray(response.outputs["classes"]).tolist()[0],
        )


def images(n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


class Load:
    """A client thread sending Predict continuously (through ``label``, if given), recording
    versions seen and failures."""

    def __init__(self, server: Server, label: str = "") -> None:
        self.server = server
        self.label = label
        self.failures: list[str] = []
        self.answers: list[tuple[int, int]] = []  # (version, class)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        x = images(1)
        while not self._stop.is_set():
            try:
                response = self.server.predict(x, label=self.label)
                cls = int(tf.make_ndarray(response.outputs["classes"])[0])
                self.answers.append((response.model_spec.version.value, cls))
            except grpc.RpcError as e:
                self.failures.append(f"{e.code().name}: {e.details()}")

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait_for_answer(self, answer: tuple[int, int], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and answer not in self.answers[-5:]:
            time.sleep(0.05)
        assert answer in self.answers[-5:], (answer, self.answers[-5:], self.server.log())


class MixedLoad:
    """Client threads sending gRPC Predict (each thread its own kept connection) and REST
    :predict (a new connection each) to a server until stopped, each outcome recorded with its
    time, latency and the version that answered (gRPC); with ``status``, a thread calling it
    every 50 ms records GetModelStatus's states meanwhile.

    gRPC calls wait for the channel to be ready, as a client that reconnects does: a call made
    while the channel reconnects waits for it instead of failing at once through gRPC's
    reconnect backoff (a second), while a call in flight on a connection that breaks fails."""

    GRPC_CLIENTS = 3
    REST_CLIENTS = 3
    CLIENTS = GRPC_CLIENTS + REST_CLIENTS

    def __init__(self, grpc_address: str, rest_port: int, model: str = "mnist", status=None):
        self.grpc_address = grpc_address
        self.rest_url = f"http://127.0.0.1:{rest_port}/v1/models/{model}:predict"
        self.model = model
        # (answered at, "grpc"|"rest", "ok"|the error, latency s, version or 0)
        self.outcomes: list[tuple[float, str, str, float, int]] = []
        self.statuses: list[tuple[float, object]] = []  # (time, {version: state} or error)
        self._status = status
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(self.CLIENTS + 1)

    def __enter__(self) -> "MixedLoad":
        for _ in range(self.GRPC_CLIENTS):
            self._pool.submit(self._grpc_client)
        for _ in range(self.REST_CLIENTS):
            self._pool.submit(self._rest_client)
        if self._status is not None:
            self._pool.submit(self._status_client)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)

    def _grpc_client(self) -> None:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images(1)))
        with grpc.insecure_channel(
            self.grpc_address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = stub.Predict(request, timeout=10, wait_for_ready=True)
                    self._record(started, "grpc", "ok", response.model_spec.version.value)
                except grpc.RpcError as e:
                    self._record(started, "grpc", f"{e.code().name}: {e.details()}")

    def _rest_client(self) -> None:
        body = json.dumps({"instances": images(1).tolist()}).encode()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(self.rest_url, body), timeout=10
                ) as response:
                    json.loads(response.read())
                self._record(started, "rest", "ok")
            except OSError as e:  # URLError, HTTPError, a reset connection
                self._record(started, "rest", f"{type(e).__name__}: {e}")

    def _status_client(self) -> None:
        while not self._stop.is_set():
            try:
                response = self._status()
                states = {s.version: s.state for s in response.model_version_status}
            except grpc.RpcError as e:
                states = e.code().name
            self.statuses.append((time.monotonic(), states))
            time.sleep(0.05)

    def _record(self, started: float, kind: str, outcome: str, version: int = 0) -> None:
        now = time.monotonic()
        self.outcomes.append((now, kind, outcome, now - started, version))

    def failures(self) -> list[tuple[float, str, str, float, int]]:
        return [o for o in self.outcomes if o[2] != "ok"]

    def answered_since(self, since: float) -> int:
        return sum(1 for o in self.outcomes if o[0] > since and o[2] == "ok")


# -- model config files and reloads ----------------------------------------------------------------


def model_entry(
    name: str, base: Path, policy: str = "", labels: dict[str, int] | None = None
) -> str:
    """One ``config { ... }`` of a ModelServerConfig in text format."""
    text = f'config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" '
    if policy:
        text += f"model_version_policy {{ {policy} }} "
    for label, version in (labels or {}).items():
        text += f'version_labels {{ key: "{label}" value: {version} }} '
    return text + "}"


def config_text(*entries: str) -> str:
    return "model_config_list {\n  " + "\n  ".join(entries) + "\n}\n"


def reload(server: Server, text: str, timeout: float = 60):
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(text, request.config)
    return server.model_stub.HandleReloadConfigRequest(request, timeout=timeout)


# -- half_plus_two's example requests --------------------------------------------------------------


def examples(*xs: float) -> list[tf.train.Example]:
    return [x_example(x) for x in xs]


def classify_request(signature: str, xs=(1.0, 2.0), model: str = "half"):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.input.example_list.examples.extend(examples(*xs))
    return request


def regress_request(signature: str = "regress_x_to_y", xs=(1.0, 2.0)):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "half"
    request.model_spec.signature_name = signature
    request.input.example_list.examples.extend(examples(*xs))
    return request


def multi_request(*tasks: tuple[str, str, str], xs=(1.0, 2.0)):
    request = inference_pb2.MultiInferenceRequest()
    for model, signature, method in tasks:
        task = request.tasks.add()
        task.model_spec.name = model
        task.model_spec.signature_name = signature
        task.method_name = method
    request.input.example_list.examples.extend(examples(*xs))
    return request
