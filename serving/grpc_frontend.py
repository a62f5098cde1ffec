"""gRPC front end: TF Serving's ``PredictionService`` and ``ModelService`` on ``grpc.aio``.

Only translation lives here: ``TensorProto`` <-> numpy, ``ModelSpec`` -> (name, version),
``ServingError`` -> gRPC status. Behaviour is in ``serving.core``. Numeric tensors are converted
through ``tensor_content`` bytes directly (``tf.make_tensor_proto`` costs more than the model call
for a small request); anything else falls back to TensorFlow's converters.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.core import DataPlane
from serving.errors import ServingError, invalid

log = logging.getLogger("serving.grpc")

UNLIMITED = 2**31 - 1
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", UNLIMITED),
    ("grpc.max_send_message_length", UNLIMITED),
    ("grpc.so_reuseport", 0),
]

# Numeric dtypes whose TensorProto.tensor_content is the raw little-endian array bytes.
_NUMPY_OF = {
    types_pb2.DT_FLOAT: np.dtype("<f4"),
    types_pb2.DT_DOUBLE: np.dtype("<f8"),
    types_pb2.DT_INT32: np.dtype("<i4"),
    types_pb2.DT_INT64: np.dtype("<i8"),
    types_pb2.DT_UINT8: np.dtype("u1"),
    types_pb2.DT_INT8: np.dtype("i1"),
    types_pb2.DT_INT16: np.dtype("<i2"),
    types_pb2.DT_UINT16: np.dtype("<u2"),
    types_pb2.DT_UINT32: np.dtype("<u4"),
    types_pb2.DT_UINT64: np.dtype("<u8"),
    types_pb2.DT_HALF: np.dtype("<f2"),
    types_pb2.DT_BOOL: np.dtype("?"),
}
_DT_OF = {np.dtype(v).newbyteorder("="): k for k, v in _NUMPY_OF.items()}


def to_ndarray(alias: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
    """TensorProto -> numpy; INVALID_ARGUMENT naming the input when it is malformed."""
    shape = [d.size for d in proto.tensor_shape.dim]
    np_dtype = _NUMPY_OF.get(proto.dtype)
    try:
        if np_dtype is not None and proto.tensor_content:
            array = np.frombuffer(proto.tensor_content, dtype=np_dtype)
            return array.reshape(shape).astype(np_dtype.newbyteorder("="), copy=False)
        return tf.make_ndarray(proto)
    except (ValueError, TypeError) as e:
        raise invalid(f'Input "{alias}" is not a valid tensor: {e}') from None


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """numpy -> TensorProto (fast path for numeric dtypes)."""
    dt = _DT_OF.get(array.dtype)
    if dt is None:
        return tf.make_tensor_proto(array)
    return tensor_pb2.TensorProto(
        dtype=dt,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in array.shape]
        ),
        tensor_content=np.ascontiguousarray(array).astype(_NUMPY_OF[dt], copy=False).tobytes(),
    )


def spec_version(model_spec: Any) -> int | None:
    """The version a ModelSpec asks for (None = latest); labels are not configured yet."""
    if model_spec.HasField("version"):
        return int(model_spec.version.value)
    if model_spec.version_label:
        raise invalid(f"Unrecognized servable version label: {model_spec.version_label}")
    return None


def _errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn ServingError (and bugs) into gRPC status codes."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ServingError as e:
            await context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict + GetModelMetadata (Classify/Regress/MultiInference: UNIMPLEMENTED for now)."""

    def __init__(self, data_plane: DataPlane) -> None:
        self.data_plane = data_plane

    @_errors
    async def Predict(self, request: predict_pb2.PredictRequest, context: Any) -> Any:
        spec = request.model_spec
        inputs = {alias: to_ndarray(alias, t) for alias, t in request.inputs.items()}
        result = await self.data_plane.predict(
            spec.name, spec_version(spec), spec.signature_name, inputs, list(request.output_filter)
        )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = result.version
        response.model_spec.signature_name = result.signature_name
        for alias, value in result.outputs.items():
            response.outputs[alias].CopyFrom(to_tensor_proto(value))
        return response

    @_errors
    async def GetModelMetadata(self, request: Any, context: Any) -> Any:
        spec = request.model_spec
        fields = list(request.metadata_field)
        if not fields:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for name in fields:
            if name != "signature_def":
                raise invalid(f"Metadata field {name} is not supported")
        metadata = self.data_plane.model_metadata(spec.name, spec_version(spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = metadata.version
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in metadata.signature_defs.items():
            sig_map.signature_def[name].CopyFrom(sig)
        response.metadata["signature_def"].Pack(sig_map)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus (HandleReloadConfigRequest: UNIMPLEMENTED for now)."""

    def __init__(self, data_plane: DataPlane) -> None:
        self.data_plane = data_plane

    @_errors
    async def GetModelStatus(self, request: Any, context: Any) -> Any:
        spec = request.model_spec
        statuses = self.data_plane.model_status(spec.name, spec_version(spec))
        response = get_model_status_pb2.GetModelStatusResponse()
        for s in statuses:
            entry = response.model_version_status.add()
            entry.version = s.version
            entry.state = int(s.state)
            entry.status.error_code = s.error_code.value[0]
            entry.status.error_message = s.error_message
        return response


async def start_grpc_server(data_plane: DataPlane, address: str, port: int) -> grpc.aio.Server:
    """Create, bind and start the gRPC server; raises when the port cannot be bound."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(data_plane), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(data_plane), server)
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    bound = server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {target}")
    await server.start()
    log.info("gRPC server listening on %s", target)
    return server


__all__ = ["start_grpc_server", "to_ndarray", "to_tensor_proto"]
