"""gRPC front end: TF Serving's ``PredictionService`` and ``ModelService`` on ``grpc.aio``.

Only translation lives here: ``TensorProto`` <-> numpy and ``Input`` -> serialized examples
(``serving.tensors``), ``ModelSpec`` -> (name, version, label), results -> response protos,
``ServingError`` -> gRPC status. Behaviour is in ``serving.core``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import metrics
from serving.core import DataPlane, InferenceResult, InferenceTask, PredictResult
from serving.errors import ServingError, invalid
from serving.inference import Classification, Regression
from serving.model_format import CLASSIFY_METHOD, REGRESS_METHOD
from serving.tensors import fill_tensor_proto, serialized_examples, to_ndarray
from serving.types import RELOAD_TIMEOUT_S

log = logging.getLogger("serving.grpc")

UNLIMITED = 2**31 - 1
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", UNLIMITED),
    ("grpc.max_send_message_length", UNLIMITED),
    ("grpc.so_reuseport", 1),  # every worker process listens on the same port
]


def spec_version(model_spec: Any) -> int | None:
    """The version a ModelSpec names (None = latest, or whatever its label points at)."""
    return int(model_spec.version.value) if model_spec.HasField("version") else None


def spec_label(model_spec: Any) -> str | None:
    """The version label a ModelSpec names, if any (resolved by the routing table)."""
    return model_spec.version_label or None


def _set_spec(target: Any, name: str, version: int, signature_name: str) -> None:
    target.name = name
    target.version.value = version
    target.signature_name = signature_name


def _job_kind(api: str, model_name: str, request: Any) -> tuple[str, str, int]:
    """What ``DataPlane.run`` judges a job's cost by: API, model and the request's size class."""
    return api, model_name, request.ByteSize().bit_length()


def _errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn ServingError (and bugs) into gRPC status codes; count and time every call."""
    observed = metrics.grpc_observed(method)

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await observed(self, request, context)
        except ServingError as e:
            await context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict, Classify, Regress, MultiInference and GetModelMetadata.

    Each call decodes, runs and builds its response proto in one job through ``DataPlane.run``:
    on the event loop when such jobs are cheap, else on its thread pool, so neither a big model
    nor the conversion of a large tensor holds up the loop; with batching on, an inference call
    decodes and encodes on the loop and awaits its batch instead.
    """

    def __init__(self, data_plane: DataPlane) -> None:
        self.data_plane = data_plane

    @_errors
    async def Predict(self, request: predict_pb2.PredictRequest, context: Any) -> Any:
        if self.data_plane.batcher is None:
            return await self.data_plane.run(
                _job_kind("Predict", request.model_spec.name, request),
                lambda: self._predict(request),
            )
        spec = request.model_spec
        return await self.data_plane.predict_batched(
            spec.name,
            spec_version(spec),
            spec_label(spec),
            spec.signature_name,
            _predict_inputs(request),
            list(request.output_filter),
            lambda result: _predict_response(spec, result),
        )

    def _predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        result = self.data_plane.predict(
            spec.name,
            spec_version(spec),
            spec_label(spec),
            spec.signature_name,
            _predict_inputs(request),
            list(request.output_filter),
        )
        return _predict_response(spec, result)

    @_errors
    async def Classify(
        self, request: classification_pb2.ClassificationRequest, context: Any
    ) -> Any:
        spec = request.model_spec
        if self.data_plane.batcher is not None:
            return await self.data_plane.example_inference_batched(
                CLASSIFY_METHOD,
                spec.name,
                spec_version(spec),
                spec_label(spec),
                spec.signature_name,
                serialized_examples(request.input),
                lambda result: _classification_response(spec, result),
            )
        return await self.data_plane.run(
            _job_kind("Classify", spec.name, request), lambda: self._classify(request)
        )

    def _classify(self, request: classification_pb2.ClassificationRequest) -> Any:
        spec = request.model_spec
        result = self.data_plane.classify(
            spec.name,
            spec_version(spec),
            spec_label(spec),
            spec.signature_name,
            serialized_examples(request.input),
        )
        return _classification_response(spec, result)

    @_errors
    async def Regress(self, request: regression_pb2.RegressionRequest, context: Any) -> Any:
        spec = request.model_spec
        if self.data_plane.batcher is not None:
            return await self.data_plane.example_inference_batched(
                REGRESS_METHOD,
                spec.name,
                spec_version(spec),
                spec_label(spec),
                spec.signature_name,
                serialized_examples(request.input),
                lambda result: _regression_response(spec, result),
            )
        return await self.data_plane.run(
            _job_kind("Regress", spec.name, request), lambda: self._regress(request)
        )

    def _regress(self, request: regression_pb2.RegressionRequest) -> Any:
        spec = request.model_spec
        result = self.data_plane.regress(
            spec.name,
            spec_version(spec),
            spec_label(spec),
            spec.signature_name,
            serialized_examples(request.input),
        )
        return _regression_response(spec, result)

    @_errors
    async def MultiInference(
        self, request: inference_pb2.MultiInferenceRequest, context: Any
    ) -> Any:
        if self.data_plane.batcher is not None:
            tasks = _inference_tasks(request)
            return await self.data_plane.multi_inference_batched(
                tasks,
                serialized_examples(request.input),
                lambda results: _multi_inference_response(tasks, results),
            )
        model_name = request.tasks[0].model_spec.name if request.tasks else ""
        return await self.data_plane.run(
            _job_kind("MultiInference", model_name, request), lambda: self._multi_inference(request)
        )

    def _multi_inference(self, request: inference_pb2.MultiInferenceRequest) -> Any:
        tasks = _inference_tasks(request)
        results = self.data_plane.multi_inference(tasks, serialized_examples(request.input))
        return _multi_inference_response(tasks, results)

    @_errors
    async def GetModelMetadata(self, request: Any, context: Any) -> Any:
        spec = request.model_spec
        fields = list(request.metadata_field)
        if not fields:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for name in fields:
            if name != "signature_def":
                raise invalid(f"Metadata field {name} is not supported")
        metadata = self.data_plane.model_metadata(spec.name, spec_version(spec), spec_label(spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = metadata.version
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in metadata.signature_defs.items():
            sig_map.signature_def[name].CopyFrom(sig)
        response.metadata["signature_def"].Pack(sig_map)
        return response


def _predict_inputs(request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
    return {alias: to_ndarray(alias, t) for alias, t in request.inputs.items()}


def _predict_response(spec: Any, result: PredictResult) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse()
    _set_spec(response.model_spec, spec.name, result.version, result.signature_name)
    for alias, value in result.outputs.items():
        fill_tensor_proto(response.outputs[alias], value)
    return response


def _classification_response(spec: Any, result: InferenceResult) -> Any:
    response = classification_pb2.ClassificationResponse()
    _set_spec(response.model_spec, spec.name, result.version, result.signature_name)
    assert isinstance(result.value, Classification)
    _fill_classifications(response.result, result.value)
    return response


def _regression_response(spec: Any, result: InferenceResult) -> Any:
    response = regression_pb2.RegressionResponse()
    _set_spec(response.model_spec, spec.name, result.version, result.signature_name)
    assert isinstance(result.value, Regression)
    _fill_regressions(response.result, result.value)
    return response


def _inference_tasks(request: inference_pb2.MultiInferenceRequest) -> list[InferenceTask]:
    return [
        InferenceTask(
            t.model_spec.name,
            spec_version(t.model_spec),
            spec_label(t.model_spec),
            t.model_spec.signature_name,
            t.method_name,
        )
        for t in request.tasks
    ]


def _multi_inference_response(tasks: list[InferenceTask], results: list[InferenceResult]) -> Any:
    response = inference_pb2.MultiInferenceResponse()
    for task, result in zip(tasks, results):
        entry = response.results.add()
        _set_spec(entry.model_spec, task.model_name, result.version, result.signature_name)
        if isinstance(result.value, Classification):
            _fill_classifications(entry.classification_result, result.value)
        else:
            _fill_regressions(entry.regression_result, result.value)
    return response


def _fill_classifications(result: Any, value: Classification) -> None:
    """``result.classifications[i].classes[j] = {label, score}``; a missing output stays unset."""
    reference = value.classes if value.classes is not None else value.scores
    assert reference is not None
    labels = value.classes.tolist() if value.classes is not None else None
    scores = value.scores.tolist() if value.scores is not None else None
    for i in range(reference.shape[0]):
        entry = result.classifications.add()
        for j in range(reference.shape[1]):
            cls = entry.classes.add()
            if labels is not None:
                cls.label = labels[i][j]
            if scores is not None:
                cls.score = scores[i][j]


def _fill_regressions(result: Any, value: Regression) -> None:
    for v in value.values.tolist():
        result.regressions.add(value=v)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus + HandleReloadConfigRequest."""

    def __init__(self, data_plane: DataPlane) -> None:
        self.data_plane = data_plane

    @_errors
    async def GetModelStatus(self, request: Any, context: Any) -> Any:
        spec = request.model_spec
        statuses = await self.data_plane.model_status(
            spec.name, spec_version(spec), spec_label(spec)
        )
        response = get_model_status_pb2.GetModelStatusResponse()
        for s in statuses:
            entry = response.model_version_status.add()
            entry.version = s.version
            entry.state = int(s.state)
            entry.status.error_code = s.error_code.value[0]
            entry.status.error_message = s.error_message
        return response

    @_errors
    async def HandleReloadConfigRequest(self, request: Any, context: Any) -> Any:
        """Apply the new model list; answer once its versions are AVAILABLE or failed.

        As TF Serving, a failure is the call's gRPC status (code + message naming the model and
        version); the response's ``status`` carries OK otherwise. Unlike TF Serving the wait is
        bounded: by ``RELOAD_TIMEOUT_S`` and by the client's deadline, whichever comes first.
        """
        if request.config.WhichOneof("config") != "model_config_list":
            raise invalid(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                "Only ModelConfigList is currently supported"
            )
        timeout_s = RELOAD_TIMEOUT_S
        remaining = context.time_remaining()
        if remaining is not None:  # leave time to send the answer before the client gives up
            timeout_s = max(0.0, min(timeout_s, remaining - 0.5))
        names = ", ".join(c.name for c in request.config.model_config_list.config) or "none"
        log.info("HandleReloadConfigRequest: models %s", names)
        try:
            await self.data_plane.control.reload(request.config, timeout_s)
        except ServingError as e:
            log.error("HandleReloadConfigRequest failed: %s: %s", e.code.name, e.message)
            raise
        log.info("HandleReloadConfigRequest: done (models %s)", names)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = grpc.StatusCode.OK.value[0]
        return response


async def start_grpc_server(
    data_plane: DataPlane,
    address: str,
    port: int,
    *,
    health_servicer: health.aio.HealthServicer | None = None,
) -> grpc.aio.Server:
    """Create, bind and start the gRPC server; raises when the port cannot be bound.

    ``health_servicer`` (``--enable_grpc_healthcheck_service``) answers ``grpc.health.v1.Health``:
    SERVING for the whole server (service "") from the start, which is true once the port opens
    because models load before it; the server turns it NOT_SERVING when shutting down.
    """
    server = grpc.aio.server(options=GRPC_OPTIONS)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(data_plane), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(data_plane), server)
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    bound = server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {target}")
    await server.start()
    log.info("gRPC server listening on %s", target)
    return server


__all__ = ["start_grpc_server"]
