"""TensorProto <-> numpy and ``tensorflow.serving.Input`` -> serialized examples, as TF does them.

Used by the gRPC front end and by warmup replay (which reads the same protos from disk), so a
warmup record is decoded exactly like the request it stands for. No per-element Python loops for
numeric tensors: ``tensor_content`` goes through ``np.frombuffer``, typed fields through
``np.asarray`` of the repeated field, and ``tf.make_tensor_proto`` (which costs more than the model
call for a small request) is not used at all. Responses are written as TF Serving writes them:
the typed fields, or ``tensor_content`` when asked (``fill_tensor_proto``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.errors import invalid

# The largest tensor a request may make, in bytes: as much as the largest tensor_content a gRPC
# request can carry (its receive limit, ``grpc_frontend.GRPC_OPTIONS``), whichever way it is
# encoded -- a typed field's one value fills any shape. TF would try to allocate more.
MAX_TENSOR_BYTES = 2**31 - 1
_OBJECT_BYTES = np.dtype(object).itemsize  # a string tensor's element: one pointer

# dtype -> (numpy dtype of tensor_content, TensorProto typed field holding the values). Bool and
# the narrow ints travel in wider typed fields (bool_val, int_val) but as 1-2 bytes in content.
_LAYOUT: dict[int, tuple[np.dtype, str]] = {
    types_pb2.DT_FLOAT: (np.dtype("<f4"), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype("<f8"), "double_val"),
    types_pb2.DT_INT32: (np.dtype("<i4"), "int_val"),
    types_pb2.DT_INT16: (np.dtype("<i2"), "int_val"),
    types_pb2.DT_INT8: (np.dtype("i1"), "int_val"),
    types_pb2.DT_UINT8: (np.dtype("u1"), "int_val"),
    types_pb2.DT_UINT16: (np.dtype("<u2"), "int_val"),
    types_pb2.DT_INT64: (np.dtype("<i8"), "int64_val"),
    types_pb2.DT_UINT32: (np.dtype("<u4"), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype("<u8"), "uint64_val"),
    types_pb2.DT_HALF: (np.dtype("<f2"), "half_val"),
    types_pb2.DT_BOOL: (np.dtype("?"), "bool_val"),
}
_DT_OF = {np.dtype(v[0]).newbyteorder("="): k for k, v in _LAYOUT.items()}
# Each typed field's own element type: its values always fit, and are then cast to the tensor's
# dtype as TF casts them (int_val 300 is 44 in a uint8; half_val holds float16 bit patterns).
_FIELD_DTYPE = {
    "float_val": np.dtype(np.float32),
    "double_val": np.dtype(np.float64),
    "int_val": np.dtype(np.int32),
    "int64_val": np.dtype(np.int64),
    "uint32_val": np.dtype(np.uint32),
    "uint64_val": np.dtype(np.uint64),
    "half_val": np.dtype(np.int32),
    "bool_val": np.dtype(np.bool_),
}


def to_ndarray(alias: str, proto: tensor_pb2.TensorProto) -> np.ndarray:
    """TensorProto -> numpy with TF's ``Tensor::FromProto`` rules.

    A typed field with fewer values than the shape holds is padded with its last value (so one
    value broadcasts), an empty one means zeros, extra values are ignored; ``tensor_content`` must
    be exactly the tensor's size. Anything malformed is TF Serving's INVALID_ARGUMENT
    "tensor parsing error: <alias>", and so is a tensor over ``MAX_TENSOR_BYTES`` or with more
    dims than numpy holds, decided before anything is allocated.
    """
    dims = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_shape.unknown_rank or (dims and min(dims) < 0):
        raise _parse_error(alias)
    size = math.prod(dims)  # exact; np.prod costs ~3 us for a handful of dims
    if proto.dtype == types_pb2.DT_STRING:
        if proto.tensor_content or size * _OBJECT_BYTES > MAX_TENSOR_BYTES:
            raise _parse_error(alias)
        values = np.empty(len(proto.string_val), dtype=object)
        values[:] = list(proto.string_val)
        return _shaped(alias, _fill(values, size, b""), dims)
    layout = _LAYOUT.get(proto.dtype)
    if layout is None or size * layout[0].itemsize > MAX_TENSOR_BYTES:
        raise _parse_error(alias)
    np_dtype, field = layout
    native = np_dtype.newbyteorder("=")
    if proto.tensor_content:
        if len(proto.tensor_content) != size * np_dtype.itemsize:
            raise _parse_error(alias)
        return _shaped(alias, np.frombuffer(proto.tensor_content, np_dtype).astype(native), dims)
    values = np.asarray(getattr(proto, field), dtype=_FIELD_DTYPE[field])
    if proto.dtype == types_pb2.DT_HALF:
        values = values.astype(np.uint16).view(np.float16)
    elif values.dtype != native:
        values = values.astype(native)
    return _shaped(alias, _fill(values, size, native.type(0)), dims)


def _shaped(alias: str, flat: np.ndarray, dims: list[int]) -> np.ndarray:
    try:
        return flat.reshape(dims)
    except ValueError:  # more dims than numpy's maximum (TF's is 254)
        raise _parse_error(alias) from None


def _fill(values: np.ndarray, size: int, zero: Any) -> np.ndarray:
    if len(values) >= size:
        return values[:size]
    if len(values) == 0:
        return np.full(size, zero, dtype=values.dtype)
    out = np.empty(size, dtype=values.dtype)
    out[: len(values)] = values
    out[len(values) :] = values[-1]
    return out


def _parse_error(alias: str) -> Exception:
    return invalid(f"tensor parsing error: {alias}")


def to_tensor_proto(array: np.ndarray, tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """numpy -> TensorProto, as ``fill_tensor_proto`` writes it."""
    proto = tensor_pb2.TensorProto()
    fill_tensor_proto(proto, array, tensor_content)
    return proto


def fill_tensor_proto(
    proto: tensor_pb2.TensorProto, array: np.ndarray, tensor_content: bool = False
) -> None:
    """numpy -> an empty ``proto`` (a response's map entry, say: no message built and copied
    in), as TF's ``Tensor::AsProtoField`` writes it: the values in the dtype's typed field
    (``float_val``, ``int_val`` for the narrow ints, ``half_val`` as bit patterns,
    ``string_val``...), the shape always set. ``tensor_content``: numbers and bools as raw bytes
    instead (``AsProtoTensorContent``, TF Serving's ``--enable_serialization_as_tensor_content``);
    strings stay in ``string_val``, which is all TF writes for them either way.
    """
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        dt = types_pb2.DT_STRING
    else:
        dt = _DT_OF.get(array.dtype)
        if dt is None:
            raise TypeError(f"no TensorProto encoding for numpy dtype {array.dtype}")
    proto.dtype = dt
    proto.tensor_shape.SetInParent()  # present even for a scalar (no dims)
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    if dt == types_pb2.DT_STRING:
        proto.string_val.extend(
            v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.ravel().tolist()
        )
        return
    wire_dtype, field = _LAYOUT[dt]
    if tensor_content:
        proto.tensor_content = np.ascontiguousarray(array, dtype=wire_dtype).tobytes()
    elif dt in _PACKED_TAGS:
        values = array.astype(wire_dtype, copy=False).tobytes()  # C order, whatever the strides
        if values:
            proto.MergeFromString(_PACKED_TAGS[dt] + _varint(len(values)) + values)
    elif dt == types_pb2.DT_HALF:
        proto.half_val.extend(array.view(np.uint16).ravel().tolist())
    else:
        getattr(proto, field).extend(array.ravel().tolist())


def _packed_tag(field: str) -> bytes:
    """The wire tag of a packed repeated ``TensorProto`` field (wire type 2, length-delimited)."""
    number = tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name[field].number
    return _varint(number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Typed fields whose packed encoding is the array's own little-endian bytes: fixed32 floats,
# fixed64 doubles, bools (each a one-byte varint, 0 or 1). Such a field is merged in as those
# bytes, parsed by protobuf's C code, instead of made from one Python object per value (``extend``
# of ``tolist()``; of the array itself, slower still): the same message, at about the cost of
# tensor_content whatever the size. The other fields are varints, which numpy cannot write.
_PACKED_TAGS: dict[int, bytes] = {
    types_pb2.DT_FLOAT: _packed_tag("float_val"),
    types_pb2.DT_DOUBLE: _packed_tag("double_val"),
    types_pb2.DT_BOOL: _packed_tag("bool_val"),
}


def serialized_examples(input_proto: Any) -> list[bytes]:
    """A ``tensorflow.serving.Input`` -> one serialized ``tf.Example`` per example.

    ``example_list_with_context``: the context's bytes are prepended to each example's, which is
    how TF Serving merges them -- protobuf parsing merges concatenated messages, so a feature set
    in both takes the example's value.
    """
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in input_proto.example_list.examples]
    if kind == "example_list_with_context":
        listed = input_proto.example_list_with_context
        context = listed.context.SerializeToString()
        return [context + e.SerializeToString() for e in listed.examples]
    return []


__all__ = ["fill_tensor_proto", "serialized_examples", "to_ndarray", "to_tensor_proto"]
