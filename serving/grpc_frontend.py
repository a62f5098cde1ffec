"""gRPC front end: TF Serving's ``PredictionService`` and ``ModelService`` on ``grpc.aio``.

Only translation lives here: request bytes -> request protos, ``TensorProto`` <-> numpy and
``Input`` -> serialized examples (``serving.tensors``), ``ModelSpec`` -> ``core.ModelSpec``,
results -> response protos, ``ServingError`` -> gRPC status; and each call's request metrics.
Behaviour is in ``serving.core``: each inference method hands the data plane a *call* (read the
request, answer its result) and awaits the response.

Requests arrive as bytes and are parsed by the method (``_rpc``), not by gRPC's deserializer: a
deserializer's exception is gRPC's UNKNOWN, where bytes that are no request are the client's
INVALID_ARGUMENT (TF Serving's C++ gRPC answers INTERNAL; neither tells the client what to fix).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import time
from typing import Any, Awaitable, Callable, Sequence

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
)

from serving import metrics
from serving.core import (
    DataPlane,
    ExamplesInput,
    InferenceResult,
    InferenceTask,
    ModelSpec,
    MultiInferenceInput,
    PredictInput,
    PredictResult,
)
from serving.errors import ServingError, invalid
from serving.inference import Classification, Regression
from serving.tensors import fill_tensor_proto, serialized_examples, to_ndarray

log = logging.getLogger("serving.grpc")

UNLIMITED = 2**31 - 1
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", UNLIMITED),
    ("grpc.max_send_message_length", UNLIMITED),
    ("grpc.so_reuseport", 1),  # every worker process listens on the same port
]


def model_spec(spec: Any) -> ModelSpec:
    """A ``tensorflow.serving.ModelSpec`` as the data plane routes it (no version field: the
    latest, or whatever its label points at)."""
    version = int(spec.version.value) if spec.HasField("version") else None
    return ModelSpec(spec.name, version, spec.version_label or None)


def _set_spec(target: Any, name: str, version: int, signature_name: str) -> None:
    target.name = name
    target.version.value = version
    target.signature_name = signature_name


def _model_name(request: Any) -> str:
    return request.model_spec.name


def _no_model(request: Any) -> str:
    return ""


def _first_task_model_name(request: inference_pb2.MultiInferenceRequest) -> str:
    return request.tasks[0].model_spec.name if request.tasks else ""


Method = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _parse(request_class: Any, data: bytes) -> Any:
    try:
        return request_class.FromString(data)
    except DecodeError as e:
        raise invalid(f"Failed to parse the {request_class.DESCRIPTOR.name}: {e}") from None


def _rpc(
    request_class: Any, model_name: Callable[[Any], str] = _model_name
) -> Callable[[Method], Method]:
    """A servicer method that takes the bytes of a ``request_class``, with its status and
    metrics: ``ServingError`` becomes its gRPC status, a bug INTERNAL; each call is counted and
    timed (API = the method's name, entrypoint GRPC) under the model ``model_name(request)``
    names (none for bytes that are no request)."""

    def decorate(method: Method) -> Method:
        api = method.__name__

        @functools.wraps(method)
        async def wrapper(self: Any, data: bytes, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            request = None
            try:
                request = _parse(request_class, data)
                return await method(self, request, context)
            except ServingError as e:
                code = e.code
                await context.abort(e.code, e.message)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:  # noqa: BLE001
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", api)
                await context.abort(code, f"{type(e).__name__}: {e}")
            finally:
                name = "" if request is None else model_name(request)
                metrics.observe_request(name, api, "GRPC", code, start)

        return wrapper

    return decorate


def _service(name: str, servicer: Any, methods: tuple[str, ...]) -> grpc.GenericRpcHandler:
    """The handler of the service ``name``: each of ``methods`` gets the request's bytes (see
    ``_rpc``) and returns a response proto."""
    serialize = operator.methodcaller("SerializeToString")
    return grpc.method_handlers_generic_handler(
        name,
        {
            method: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, method), response_serializer=serialize
            )
            for method in methods
        },
    )


class PredictionServicer:
    """Predict, Classify, Regress, MultiInference and GetModelMetadata.

    ``tensor_content``: Predict's outputs as raw ``tensor_content`` rather than the typed fields
    (``--enable_serialization_as_tensor_content``).
    """

    SERVICE = "tensorflow.serving.PredictionService"
    METHODS = ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")

    def __init__(self, data_plane: DataPlane, tensor_content: bool = False) -> None:
        self.data_plane = data_plane
        self.tensor_content = tensor_content

    @_rpc(predict_pb2.PredictRequest)
    async def Predict(self, request: predict_pb2.PredictRequest, context: Any) -> Any:
        call = _PredictCall(request, self.tensor_content)
        return await self.data_plane.predict(
            model_spec(request.model_spec), request.ByteSize(), call
        )

    @_rpc(classification_pb2.ClassificationRequest)
    async def Classify(
        self, request: classification_pb2.ClassificationRequest, context: Any
    ) -> Any:
        call = _ExamplesCall(request, _classification_response)
        return await self.data_plane.classify(
            model_spec(request.model_spec), request.ByteSize(), call
        )

    @_rpc(regression_pb2.RegressionRequest)
    async def Regress(self, request: regression_pb2.RegressionRequest, context: Any) -> Any:
        call = _ExamplesCall(request, _regression_response)
        return await self.data_plane.regress(
            model_spec(request.model_spec), request.ByteSize(), call
        )

    @_rpc(inference_pb2.MultiInferenceRequest, _first_task_model_name)
    async def MultiInference(
        self, request: inference_pb2.MultiInferenceRequest, context: Any
    ) -> Any:
        call = _MultiInferenceCall(request)
        return await self.data_plane.multi_inference(
            _first_task_model_name(request), request.ByteSize(), call
        )

    @_rpc(get_model_metadata_pb2.GetModelMetadataRequest)
    async def GetModelMetadata(self, request: Any, context: Any) -> Any:
        if not request.HasField("model_spec"):
            raise invalid("Missing ModelSpec")
        fields = list(request.metadata_field)
        if not fields:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for name in fields:
            if name != "signature_def":
                raise invalid(f"Metadata field {name} is not supported")
        metadata = await self.data_plane.model_metadata(model_spec(request.model_spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = metadata.version
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in metadata.signature_defs.items():
            sig_map.signature_def[name].CopyFrom(sig)
        response.metadata["signature_def"].Pack(sig_map)
        return response


# -- the calls handed to the data plane: read a request, answer its result ------------------------


class _PredictCall:
    __slots__ = ("request", "tensor_content")

    def __init__(self, request: predict_pb2.PredictRequest, tensor_content: bool) -> None:
        self.request = request
        self.tensor_content = tensor_content

    def read(self) -> PredictInput:
        request = self.request
        inputs = {alias: to_ndarray(alias, t) for alias, t in request.inputs.items()}
        return PredictInput(request.model_spec.signature_name, inputs, request.output_filter)

    def answer(self, result: PredictResult) -> predict_pb2.PredictResponse:
        response = predict_pb2.PredictResponse()
        _set_spec(
            response.model_spec, self.request.model_spec.name, result.version, result.signature_name
        )
        for alias, value in result.outputs.items():
            fill_tensor_proto(response.outputs[alias], value, self.tensor_content)
        return response


class _ExamplesCall:
    """A Classify or Regress request; ``respond`` builds its response proto."""

    __slots__ = ("request", "respond")

    def __init__(self, request: Any, respond: Callable[[Any, InferenceResult], Any]) -> None:
        self.request = request
        self.respond = respond

    def read(self) -> ExamplesInput:
        return ExamplesInput(
            self.request.model_spec.signature_name, serialized_examples(self.request.input)
        )

    def answer(self, result: InferenceResult) -> Any:
        return self.respond(self.request.model_spec, result)


class _MultiInferenceCall:
    __slots__ = ("request", "tasks")

    def __init__(self, request: inference_pb2.MultiInferenceRequest) -> None:
        self.request = request
        self.tasks: list[InferenceTask] = []

    def read(self) -> MultiInferenceInput:
        self.tasks = [_inference_task(task) for task in self.request.tasks]
        return MultiInferenceInput(self.tasks, serialized_examples(self.request.input))

    def answer(self, results: list[InferenceResult]) -> Any:
        response = inference_pb2.MultiInferenceResponse()
        for task, result in zip(self.tasks, results):
            entry = response.results.add()
            _set_spec(entry.model_spec, task.model_name, result.version, result.signature_name)
            if isinstance(result.value, Classification):
                _fill_classifications(entry.classification_result, result.value)
            else:
                _fill_regressions(entry.regression_result, result.value)
        return response


def _inference_task(task: inference_pb2.InferenceTask) -> InferenceTask:
    spec = model_spec(task.model_spec)
    return InferenceTask(
        spec.name, spec.version, spec.label, task.model_spec.signature_name, task.method_name
    )


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


class ModelServicer:
    """GetModelStatus + HandleReloadConfigRequest."""

    SERVICE = "tensorflow.serving.ModelService"
    METHODS = ("GetModelStatus", "HandleReloadConfigRequest")

    def __init__(self, data_plane: DataPlane) -> None:
        self.data_plane = data_plane

    @_rpc(get_model_status_pb2.GetModelStatusRequest)
    async def GetModelStatus(self, request: Any, context: Any) -> Any:
        statuses = await self.data_plane.model_status(model_spec(request.model_spec))
        response = get_model_status_pb2.GetModelStatusResponse()
        for s in statuses:
            entry = response.model_version_status.add()
            entry.version = s.version
            entry.state = int(s.state)
            entry.status.error_code = s.error_code.value[0]
            entry.status.error_message = s.error_message
        return response

    @_rpc(model_management_pb2.ReloadConfigRequest, _no_model)
    async def HandleReloadConfigRequest(self, request: Any, context: Any) -> Any:
        """Apply the new model list; answer once its versions are AVAILABLE or failed.

        As TF Serving, a failure is the call's gRPC status (code + message naming the model and
        version); the response's ``status`` carries OK otherwise. The wait is bounded
        (``DataPlane.reload``).
        """
        if request.config.WhichOneof("config") != "model_config_list":
            raise invalid(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                "Only ModelConfigList is currently supported"
            )
        names = ", ".join(c.name for c in request.config.model_config_list.config) or "none"
        log.info("HandleReloadConfigRequest: models %s", names)
        try:
            await self.data_plane.reload(request.config, context.time_remaining())
        except ServingError as e:
            log.error("HandleReloadConfigRequest failed: %s: %s", e.code.name, e.message)
            raise
        log.info("HandleReloadConfigRequest: done (models %s)", names)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = grpc.StatusCode.OK.value[0]
        return response


def grpc_options(channel_arguments: Sequence[tuple[str, int | str]] = ()) -> list[tuple]:
    """The server's options: ours (no message size limit, a port shared by the workers), then
    ``--grpc_channel_arguments``, which win where they set the same key."""
    return list({**dict(GRPC_OPTIONS), **dict(channel_arguments)}.items())


async def start_grpc_server(
    data_plane: DataPlane,
    targets: Sequence[str],
    *,
    credentials: grpc.ServerCredentials | None = None,
    channel_arguments: Sequence[tuple[str, int | str]] = (),
    health_servicer: health.aio.HealthServicer | None = None,
    handlers: Sequence[grpc.GenericRpcHandler] = (),
    tensor_content: bool = False,
) -> grpc.aio.Server:
    """Create, bind and start the gRPC server on ``targets`` (``host:port``, ``unix:path``);
    raises when one cannot be bound.

    ``credentials`` (``--ssl_config_file``) secure every target, as TF Serving's; ``handlers``
    serve further services (the profiler's). ``health_servicer``
    (``--enable_grpc_healthcheck_service``) answers ``grpc.health.v1.Health``: SERVING for the
    whole server (service "") from the start, which is true once the port opens because models
    load before it; the server turns it NOT_SERVING when shutting down. ``tensor_content``:
    ``--enable_serialization_as_tensor_content`` (``PredictionServicer``).
    """
    server = grpc.aio.server(options=grpc_options(channel_arguments))
    for servicer in (PredictionServicer(data_plane, tensor_content), ModelServicer(data_plane)):
        server.add_generic_rpc_handlers([_service(servicer.SERVICE, servicer, servicer.METHODS)])
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers(handlers)
    for target in targets:
        try:
            bound = (
                server.add_insecure_port(target)
                if credentials is None
                else server.add_secure_port(target, credentials)
            )
        except RuntimeError:  # grpcio raises for some targets, returns 0 for others
            bound = 0
        if bound == 0:
            raise OSError(f"cannot bind gRPC server to {target}")
    await server.start()
    log.info("gRPC server listening on %s", ", ".join(targets))
    return server


__all__ = ["start_grpc_server"]
