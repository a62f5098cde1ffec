"""A client of one model server through TF Serving's public gRPC API only.

The pipeline (validate's baseline error rate, push's availability and canary checks, its label
moves through ``HandleReloadConfigRequest``) and the MNIST client CLI (``serving.client``) build
their requests and read the answers here, so the same code drives this package's server and real
``tensorflow_model_server`` replicas. The model it speaks to takes ``images`` float32 [N, 784] and
answers ``scores`` float32 [N, 10] (``tasks.export``'s ``serving_default``); ``classify`` speaks
to any Classify signature.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config.model_server_config_pb2 import ModelServerConfig

from serving.model_format import DEFAULT_SIGNATURE
from serving.tensors import to_ndarray, to_tensor_proto

# No message size limit either way: gRPC's default receive limit (4 MiB) is ~1,300 MNIST images.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
RPC_TIMEOUT_S = 30.0  # each call's deadline, unless the client is given another


@dataclass(frozen=True)
class ReportedVersionStatus:
    """One version as a server reports it in GetModelStatus (the server's own record of a
    version is ``serving.types.VersionStatus``)."""

    version: int
    state: str  # START | LOADING | AVAILABLE | UNLOADING | END
    error_code: int  # grpc status code number; 0 = OK
    error_message: str


def wait_for_available(
    status_of: Callable[[], ReportedVersionStatus | None],
    timeout_s: float,
    poll_s: float = 0.2,
    stop_if: Callable[[], str | None] = lambda: None,
) -> str | None:
    """Poll ``status_of`` (one version's status, or None while unreported) until the version is
    AVAILABLE: None; else why not: its load error, what ``stop_if`` says (e.g. the server
    exited), or its last state at ``timeout_s``. An unreachable server is retried until then."""
    deadline = time.monotonic() + timeout_s
    last_state = "not reported"
    while True:
        stopped = stop_if()
        if stopped is not None:
            return stopped
        try:
            status = status_of()
        except Exception as error:  # grpc.RpcError while the server starts or restarts
            status, last_state = None, f"unreachable ({error.__class__.__name__})"
        if status is not None:
            if status.state == "AVAILABLE":
                return None
            if status.state == "END" and status.error_code != 0:
                return f"failed to load: {status.error_message}"
            last_state = status.state
        if time.monotonic() >= deadline:
            return f"not AVAILABLE within {timeout_s:g} s (last state: {last_state})"
        time.sleep(poll_s)


def predict_request(
    model_name: str,
    images: np.ndarray,
    version: int | None = None,
    signature_name: str = DEFAULT_SIGNATURE,
    label: str | None = None,
) -> predict_pb2.PredictRequest:
    """A Predict of float32 ``images`` [N,784], asking only for ``scores``; pinned to ``version``
    or to the version behind ``label``, else the server's choice (its newest)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["images"].CopyFrom(to_tensor_proto(np.asarray(images, dtype=np.float32)))
    request.output_filter.append("scores")
    return request


def response_scores(response: predict_pb2.PredictResponse) -> np.ndarray:
    return to_ndarray("scores", response.outputs["scores"])


class ModelServer:
    """One server at ``host:port`` serving ``model_name``."""

    def __init__(self, address: str, model_name: str, rpc_timeout_s: float = RPC_TIMEOUT_S):
        self.address = address
        self.model_name = model_name
        self._timeout = rpc_timeout_s
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version_statuses(self) -> list[ReportedVersionStatus]:
        """Every version the server reports; [] when it does not know the model (NOT_FOUND)."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            response = self._models.GetModelStatus(request, timeout=self._timeout)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        return [
            ReportedVersionStatus(
                version=status.version,
                state=get_model_status_pb2.ModelVersionStatus.State.Name(status.state),
                error_code=status.status.error_code,
                error_message=status.status.error_message,
            )
            for status in response.model_version_status
        ]

    def serving_version(self) -> int | None:
        """The version answering unpinned requests now (the newest AVAILABLE), or None."""
        available = [s.version for s in self.version_statuses() if s.state == "AVAILABLE"]
        return max(available) if available else None

    def predict_scores(
        self,
        images: np.ndarray,
        version: int | None = None,
        batch_size: int = 1000,
        label: str | None = None,
    ) -> np.ndarray:
        """``serving_default`` scores for ``images`` [N,784], in requests of ``batch_size``."""
        chunks = []
        for start in range(0, len(images), batch_size):
            request = predict_request(
                self.model_name, images[start : start + batch_size], version, label=label
            )
            chunks.append(
                response_scores(self._predictions.Predict(request, timeout=self._timeout))
            )
        return np.concatenate(chunks) if chunks else np.zeros((0, 10), np.float32)

    def version_behind(self, label: str, image: np.ndarray) -> int:
        """The version that answers a Predict of one ``image`` [784] through ``label``
        (GetModelStatus does not resolve labels in TF Serving; a Predict's answer names its
        version)."""
        request = predict_request(self.model_name, image[None, :], label=label)
        return self._predictions.Predict(request, timeout=self._timeout).model_spec.version.value

    def reload_config(self, config: ModelServerConfig, timeout_s: float) -> None:
        """HandleReloadConfigRequest: the server applies ``config`` -- all of it: models left out
        are unloaded; a refusal raises ``grpc.RpcError``. TF Serving answers once the models new
        to it are AVAILABLE, but at once for new versions of a model it serves (ours waits for
        those too): wait for a version with GetModelStatus."""
        request = model_management_pb2.ReloadConfigRequest(config=config)
        # TF Serving answers a failure as the call's status (the body's copy is never sent).
        self._models.HandleReloadConfigRequest(request, timeout=timeout_s)

    def classify(
        self,
        examples: Sequence[example_pb2.Example],
        signature_name: str,
        version: int | None = None,
    ) -> list[dict[str, float]]:
        """Classify ``examples`` in one request: per example, each class label's score."""
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature_name
        if version is not None:
            request.model_spec.version.value = version
        request.input.example_list.examples.extend(examples)
        response = self._predictions.Classify(request, timeout=self._timeout)
        return [
            {entry.label: entry.score for entry in classification.classes}
            for classification in response.result.classifications
        ]
