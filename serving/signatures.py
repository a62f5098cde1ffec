"""A loaded version's signatures as a request sees them, and the checks of a request against one.

``TensorInfo`` / ``SignatureInfo`` are built once per load from the ``SignatureDef`` protos, so
that the hot path reads plain attributes instead of protobufs. The checks here are TF Serving's
Predict input validation (predict_util): the exact input set, each input's dtype (not its shape:
the graph checks that), the output filter; every failure is INVALID_ARGUMENT naming the input or
alias, in TF Serving's words.
TensorFlow is imported only to read a proto's dtype (at load), never per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from serving.errors import invalid


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of a signature: alias -> graph tensor, numpy dtype, shape (None = any)."""

    alias: str
    tensor_name: str
    dtype: np.dtype
    dtype_name: str  # TF name, e.g. "float32", "string"
    shape: tuple[int, ...] | None  # -1 for unknown dims; None for unknown rank

    def is_string(self) -> bool:
        return self.dtype_name == "string"


@dataclass(frozen=True)
class SignatureInfo:
    """What a request needs to know about one signature."""

    name: str
    method_name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    # Every input and output has a leading dim of any size (or an unknown rank), so requests can
    # be concatenated along dim 0 and the answers split back: what server-side batching needs.
    batchable: bool = False
    proto: Any = None  # the SignatureDef, for TF Serving's errors that print it

    @cached_property
    def output_aliases(self) -> tuple[str, ...]:
        """Every output alias, sorted: what a request without an output filter fetches."""
        return tuple(sorted(self.outputs))

    def debug_string(self) -> str:
        """The SignatureDef as TF Serving's errors print it (``DebugString``: text format)."""
        from google.protobuf import text_format

        return text_format.MessageToString(self.proto) if self.proto is not None else ""


def signature_info(name: str, proto: Any) -> SignatureInfo:
    """The ``SignatureInfo`` of the ``SignatureDef`` ``proto`` named ``name``."""
    inputs = {a: _tensor_info(a, t) for a, t in proto.inputs.items()}
    outputs = {a: _tensor_info(a, t) for a, t in proto.outputs.items()}
    return SignatureInfo(
        name=name,
        method_name=proto.method_name,
        inputs=inputs,
        outputs=outputs,
        batchable=bool(inputs) and all(map(_batch_dim, [*inputs.values(), *outputs.values()])),
        proto=proto,
    )


def _batch_dim(info: TensorInfo) -> bool:
    return info.shape is None or (len(info.shape) > 0 and info.shape[0] == -1)


def _tensor_info(alias: str, proto: Any) -> TensorInfo:
    import tensorflow as tf

    tf_dtype = tf.dtypes.as_dtype(proto.dtype)
    np_dtype = np.dtype(object) if tf_dtype == tf.string else np.dtype(tf_dtype.as_numpy_dtype)
    shape_proto = proto.tensor_shape
    shape = None if shape_proto.unknown_rank else tuple(int(d.size) for d in shape_proto.dim)
    return TensorInfo(alias, proto.name, np_dtype, tf_dtype.name, shape)


def check_input(info: TensorInfo, value: np.ndarray) -> None:
    """INVALID_ARGUMENT naming the input unless ``value`` has the signature's dtype.

    Not its shape: TF Serving feeds the tensor as it came and lets the graph take it or fail
    (``half_plus_two``'s ``[-1,1]`` input takes a ``[3]``); that failure is TensorFlow's
    INVALID_ARGUMENT, raised by the session run.
    """
    dtype = value.dtype
    if dtype != info.dtype and not (info.is_string() and dtype.kind in "OSU"):
        got = "string" if dtype.kind in "OSU" else dtype.name  # bytes objects, numpy bytes / str
        raise invalid(f'Input "{info.alias}" expects dtype {info.dtype_name} but got {got}')


def validate_predict(
    sig: SignatureInfo,
    inputs: dict[str, np.ndarray],
    output_filter: list[str] | tuple[str, ...] = (),
) -> tuple[str, ...]:
    """Check a Predict's inputs and output filter against ``sig``; return the output aliases to
    fetch (sorted)."""
    if inputs.keys() != sig.inputs.keys():
        extra = sorted(set(inputs) - set(sig.inputs))
        missing = sorted(set(sig.inputs) - set(inputs))
        raise invalid(
            f"input size does not match signature: {len(inputs)}!={len(sig.inputs)} "
            f"len({{{','.join(sorted(inputs))}}}) != len({{{','.join(sorted(sig.inputs))}}}). "
            f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}."
        )
    for alias, value in inputs.items():
        check_input(sig.inputs[alias], value)
    if not output_filter:
        return sig.output_aliases
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in sig.outputs:
            raise invalid(
                f"output tensor alias not found in signature: {alias} "
                f"Outputs expected to be in the set {{{','.join(sig.output_aliases)}}}."
            )
        if alias in seen:
            raise invalid(f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return tuple(sorted(seen))
