"""One loaded model version: a SavedModel in its own TF1 graph + session, called via session callables.

Why TF1 and not ``tf.saved_model.load``: the TF2 signature wrapper costs ~4.6 ms per call, a
``Session.make_callable`` ~0.3 ms, and the hot path is one small request at a time. Each version
gets its own ``Graph``/``Session`` so that ``close()`` really returns its memory on unload.
TensorFlow is imported lazily here (``--help`` must stay instant).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving.errors import ServingError, invalid

log = logging.getLogger("serving.servable")

DEFAULT_SIGNATURE = "serving_default"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000
_INIT_OP_SIGNATURE = "__saved_model_init_op"


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


def _tensor_info(alias: str, proto: Any) -> TensorInfo:
    import tensorflow as tf

    tf_dtype = tf.dtypes.as_dtype(proto.dtype)
    np_dtype = np.dtype(object) if tf_dtype == tf.string else np.dtype(tf_dtype.as_numpy_dtype)
    shape_proto = proto.tensor_shape
    shape = None if shape_proto.unknown_rank else tuple(int(d.size) for d in shape_proto.dim)
    return TensorInfo(alias, proto.name, np_dtype, tf_dtype.name, shape)


def _shape_str(shape: tuple[int, ...] | None) -> str:
    return "<unknown>" if shape is None else "[" + ",".join(str(d) for d in shape) + "]"


def check_input(info: TensorInfo, value: np.ndarray) -> None:
    """INVALID_ARGUMENT naming the input unless ``value`` has the signature's dtype and shape."""
    if info.is_string():
        ok = value.dtype == object or value.dtype.kind in ("S", "U")
    else:
        ok = value.dtype == info.dtype
    if not ok:
        got = "string" if value.dtype == object or value.dtype.kind in ("S", "U") else value.dtype.name
        raise invalid(f"Input \"{info.alias}\" expects dtype {info.dtype_name} but got {got}")
    if info.shape is None:
        return
    if len(info.shape) != value.ndim or any(
        want != -1 and want != got for want, got in zip(info.shape, value.shape)
    ):
        raise invalid(
            f"Input \"{info.alias}\" expects shape {_shape_str(info.shape)} "
            f"but got {_shape_str(tuple(value.shape))}"
        )


class Servable:
    """A loaded version. Thread-safe: ``run`` may be called from many threads at once."""

    def __init__(self, model_name: str, version: int, path: str) -> None:
        self.model_name = model_name
        self.version = version
        self.path = path
        self._graph: Any = None
        self._session: Any = None
        self.signature_defs: dict[str, Any] = {}  # name -> SignatureDef proto (for metadata)
        self.signatures: dict[str, SignatureInfo] = {}
        self._callables: dict[tuple[str, tuple[str, ...]], tuple[Any, list[str], list[str]]] = {}
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        """Load the SavedModel (tag ``serve``) into a fresh graph/session; raise on any failure."""
        import tensorflow as tf

        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph)
        try:
            with graph.as_default():
                meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], self.path)
        except BaseException:
            session.close()
            raise
        self._graph, self._session = graph, session
        for name, sig in meta_graph.signature_def.items():
            self.signature_defs[name] = sig
            if name == _INIT_OP_SIGNATURE:
                continue
            self.signatures[name] = SignatureInfo(
                name=name,
                method_name=sig.method_name,
                inputs={a: _tensor_info(a, t) for a, t in sig.inputs.items()},
                outputs={a: _tensor_info(a, t) for a, t in sig.outputs.items()},
            )
        # Build the full-output callables now so the first request does not pay for it.
        for name, sig in self.signatures.items():
            self._callable(name, tuple(sorted(sig.outputs)))

    def close(self) -> None:
        """Close the session and drop the graph so TensorFlow can return the memory."""
        with self._lock:
            session, self._session, self._graph = self._session, None, None
            self._callables.clear()
        if session is not None:
            session.close()

    # -- calls ---------------------------------------------------------------------------------

    def signature(self, name: str) -> SignatureInfo:
        """The signature ``name`` (empty = serving_default) or FAILED_PRECONDITION."""
        key = name or DEFAULT_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f'Serving signature key "{key}" not found.')
        return sig

    def validate(self, sig: SignatureInfo, inputs: dict[str, np.ndarray],
                 output_filter: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
        """Check inputs/outputs against ``sig``; return the output aliases to fetch (sorted)."""
        extra = sorted(set(inputs) - set(sig.inputs))
        missing = sorted(set(sig.inputs) - set(inputs))
        if extra or missing:
            raise invalid(
                f"input size does not match signature: {len(inputs)}!={len(sig.inputs)} "
                f"len({{{','.join(sorted(inputs))}}}) != len({{{','.join(sorted(sig.inputs))}}}). "
                f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}."
            )
        for alias, value in inputs.items():
            check_input(sig.inputs[alias], value)
        if not output_filter:
            return tuple(sorted(sig.outputs))
        for alias in output_filter:
            if alias not in sig.outputs:
                raise invalid(f"output tensor alias not found in signature: {alias}")
        return tuple(sorted(set(output_filter)))

    def _callable(self, sig_name: str, outputs: tuple[str, ...]) -> tuple[Any, list[str], list[str]]:
        key = (sig_name, outputs)
        entry = self._callables.get(key)
        if entry is not None:
            return entry
        with self._lock:
            if self._session is None:
                raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                   f"Servable {self.model_name} version {self.version} is unloaded")
            entry = self._callables.get(key)
            if entry is None:
                sig = self.signatures[sig_name]
                feed = sorted(sig.inputs)
                fn = self._session.make_callable(
                    [sig.outputs[a].tensor_name for a in outputs],
                    feed_list=[sig.inputs[a].tensor_name for a in feed],
                )
                entry = (fn, feed, list(outputs))
                self._callables[key] = entry
        return entry

    def run(self, sig: SignatureInfo, inputs: dict[str, np.ndarray],
            outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Run validated ``inputs`` through ``sig``; errors from TF become INVALID_ARGUMENT."""
        import tensorflow as tf

        fn, feed, fetch = self._callable(sig.name, outputs)
        try:
            values = fn(*[inputs[a] for a in feed])
        except tf.errors.InvalidArgumentError as e:
            raise invalid(e.message) from None
        except tf.errors.OpError as e:
            raise ServingError(status_code(e.error_code), e.message) from None
        return dict(zip(fetch, values))

    # -- warmup --------------------------------------------------------------------------------

    def warmup(self) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (<= 1000 records); return the count.

        Any failure raises, which fails the load: a version whose warmup data does not run would
        fail real requests too (TF Serving behaves the same).
        """
        path = Path(self.path) / WARMUP_FILE
        if not path.is_file():
            return 0
        import tensorflow as tf
        from tensorflow_serving.apis import prediction_log_pb2

        count = 0
        skipped: dict[str, int] = {}
        for record in read_tfrecords(path, MAX_WARMUP_RECORDS):
            entry = prediction_log_pb2.PredictionLog.FromString(record)
            kind = entry.WhichOneof("log_type")
            if kind != "predict_log":
                # classify/regress/multi_inference replay comes with those APIs; until then such
                # records are skipped rather than failing a model that would otherwise serve.
                skipped[str(kind)] = skipped.get(str(kind), 0) + 1
                continue
            request = entry.predict_log.request
            sig = self.signature(request.model_spec.signature_name)
            inputs = {a: tf.make_ndarray(t) for a, t in request.inputs.items()}
            outputs = self.validate(sig, inputs, list(request.output_filter))
            self.run(sig, inputs, outputs)
            count += 1
        if skipped:
            log.warning("model %s version %d: warmup skipped unsupported records: %s",
                        self.model_name, self.version, skipped)
        return count


def read_tfrecords(path: str | Path, limit: int) -> list[bytes]:
    """Read up to ``limit`` records of a TFRecord file (length, crc, data, crc framing).

    Plain Python so that reading warmup data needs neither eager tf.data nor the deprecated
    ``tf_record_iterator`` (which logs a warning per call). CRCs are not verified; a truncated
    file raises.
    """
    records: list[bytes] = []
    with open(path, "rb") as f:
        while len(records) < limit:
            header = f.read(12)
            if not header:
                break
            if len(header) != 12:
                raise ValueError(f"{path}: truncated TFRecord header")
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) != length or len(f.read(4)) != 4:
                raise ValueError(f"{path}: truncated TFRecord")
            records.append(data)
    return records


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode with numeric ``value`` (TF error codes are the same numbers)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def load_servable(model_name: str, version: int, path: str, warmup: bool) -> Servable:
    """Load (and optionally warm up) one version, logging timings; raises on failure."""
    servable = Servable(model_name, version, path)
    start = time.monotonic()
    servable.load()
    loaded = time.monotonic()
    log.info("model %s version %d: loaded from %s in %.2f s (signatures: %s)", model_name, version,
             path, loaded - start, ", ".join(sorted(servable.signatures)))
    if warmup:
        try:
            n = servable.warmup()
        except Exception:
            servable.close()
            raise
        if n:
            log.info("model %s version %d: warmup replayed %d request(s) in %.2f s", model_name,
                     version, n, time.monotonic() - loaded)
    return servable
