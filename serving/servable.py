"""One loaded model version: a SavedModel in its own TF1 graph + session, called via session callables.

Why TF1 and not ``tf.saved_model.load``: the TF2 signature wrapper costs ~4.6 ms per call, a
C++ session callable ~20 us (batch-1 MNIST), and the hot path is one small request at a time.
Each version gets its own ``Graph``/``Session`` so that ``close()`` really returns its memory on
unload. TensorFlow is imported lazily here (``--help`` must stay instant).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import grpc
import numpy as np

from serving import metrics
from serving.errors import ServingError, invalid
from serving.model_format import (
    CLASSIFY_METHOD,
    DEFAULT_SIGNATURE,
    MAX_WARMUP_RECORDS,
    REGRESS_METHOD,
    WARMUP_FILE,
)

if TYPE_CHECKING:
    from serving.types import BatchingParameters

log = logging.getLogger("serving.servable")

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
    # Every input and output has a leading dim of any size (or an unknown rank), so requests can
    # be concatenated along dim 0 and the answers split back: what server-side batching needs.
    batchable: bool = False

    @cached_property
    def output_aliases(self) -> tuple[str, ...]:
        """Every output alias, sorted: what a request without an output filter fetches."""
        return tuple(sorted(self.outputs))


def _batch_dim(info: TensorInfo) -> bool:
    return info.shape is None or (len(info.shape) > 0 and info.shape[0] == -1)


@dataclass(frozen=True)
class Classification:
    """Classify's answer per example: labels (bytes) and/or scores, both [N, num_classes]."""

    classes: np.ndarray | None
    scores: np.ndarray | None


@dataclass(frozen=True)
class Regression:
    """Regress's answer: one float32 per example."""

    values: np.ndarray


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
    dtype = value.dtype
    strings = dtype.kind in "OSU"  # bytes objects, or numpy's fixed-width bytes / str
    if dtype != info.dtype and not (info.is_string() and strings):
        got = "string" if strings else dtype.name
        raise invalid(f'Input "{info.alias}" expects dtype {info.dtype_name} but got {got}')
    if info.shape is None:
        return
    shape = value.shape
    if len(info.shape) == len(shape):
        for want, got_dim in zip(info.shape, shape):  # a loop: no generator on the hot path
            if want != -1 and want != got_dim:
                break
        else:
            return
    raise invalid(
        f'Input "{info.alias}" expects shape {_shape_str(info.shape)} '
        f"but got {_shape_str(tuple(shape))}"
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
        # (sorted feed tensor names, sorted fetch tensor names) -> Session callable
        self._callables: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()
        # Set by the loader when batching is on: the parameters of this version's Predict queues.
        self.batching: BatchingParameters | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @metrics.saved_model_load_observed
    def load(self) -> None:
        """Load the SavedModel (tag ``serve``) into a fresh graph/session; raise on any failure."""
        import tensorflow as tf

        graph = tf.Graph()
        # Ops run in the calling thread (negative inter-op parallelism): every call already comes
        # from a thread of ours (the data plane's pool or a batch thread), and handing the graph
        # to TF's inter-op pool and waiting for it costs thread wake-ups per call: batch-1 MNIST
        # 46 -> 18 us, batch 64 200 -> 140 us. Intra-op parallelism (one op on several cores)
        # stays TensorFlow's choice.
        session = tf.compat.v1.Session(
            graph=graph, config=tf.compat.v1.ConfigProto(inter_op_parallelism_threads=-1)
        )
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
            inputs = {a: _tensor_info(a, t) for a, t in sig.inputs.items()}
            outputs = {a: _tensor_info(a, t) for a, t in sig.outputs.items()}
            self.signatures[name] = SignatureInfo(
                name=name,
                method_name=sig.method_name,
                inputs=inputs,
                outputs=outputs,
                batchable=bool(inputs)
                and all(map(_batch_dim, [*inputs.values(), *outputs.values()])),
            )
        # Build the full-output callables now so the first request does not pay for it.
        for sig in self.signatures.values():
            self._callable(
                tuple(sorted(i.tensor_name for i in sig.inputs.values())),
                tuple(sorted({i.tensor_name for i in sig.outputs.values()})),
            )

    def close(self) -> None:
        """Close the session and drop the graph so TensorFlow can return the memory."""
        with self._lock:
            session, self._session, self._graph = self._session, None, None
            self._callables.clear()
        if session is not None:
            session.close()

    # -- predict -------------------------------------------------------------------------------

    def signature(self, name: str) -> SignatureInfo:
        """The signature ``name`` (empty = serving_default) or FAILED_PRECONDITION (Predict's)."""
        key = name or DEFAULT_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.'
            )
        return sig

    def validate(
        self,
        sig: SignatureInfo,
        inputs: dict[str, np.ndarray],
        output_filter: list[str] | tuple[str, ...] = (),
    ) -> tuple[str, ...]:
        """Check inputs/outputs against ``sig``; return the output aliases to fetch (sorted)."""
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
        for alias in output_filter:
            if alias not in sig.outputs:
                raise invalid(f"output tensor alias not found in signature: {alias}")
        return tuple(sorted(set(output_filter)))

    def run(
        self, sig: SignatureInfo, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """Run validated ``inputs`` through ``sig``; errors from TF become INVALID_ARGUMENT."""
        feeds, fetches = predict_tensors(sig, inputs, outputs)
        return predict_outputs(sig, outputs, self.run_tensors(feeds, fetches))

    # -- classify / regress / multi-inference --------------------------------------------------
    # Each is a list of (signature, method) tasks over the same examples: their session feeds
    # and fetches (``inference_tensors``), one session run (here, or in a batch), their results
    # (``inference_results``).

    def classify(self, signature_name: str, examples: Sequence[bytes]) -> Classification:
        """TF Serving's Classify over serialized ``tf.Example``s (signature checks as theirs)."""
        result = self.infer(self.example_tasks(signature_name, CLASSIFY_METHOD), examples)[0]
        assert isinstance(result, Classification)
        return result

    def regress(self, signature_name: str, examples: Sequence[bytes]) -> Regression:
        """TF Serving's Regress over serialized ``tf.Example``s."""
        result = self.infer(self.example_tasks(signature_name, REGRESS_METHOD), examples)[0]
        assert isinstance(result, Regression)
        return result

    def multi_inference(
        self, tasks: Sequence[tuple[str, str]], examples: Sequence[bytes]
    ) -> list[Classification | Regression]:
        """Several (signature name, method name) tasks over the same examples in one session run."""
        return self.infer(self.multi_inference_tasks(tasks), examples)

    def example_tasks(self, signature_name: str, method: str) -> list[SignatureTask]:
        """Classify's or Regress's one task; INVALID_ARGUMENT (not Predict's
        FAILED_PRECONDITION) for a signature that does not exist."""
        key = signature_name or DEFAULT_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            raise invalid(f"No signature was found with the name: {key}")
        return [(sig, method)]

    def multi_inference_tasks(self, tasks: Sequence[tuple[str, str]]) -> list[SignatureTask]:
        """As TF Serving: signatures must be distinct; only classify and regress are supported
        (that they share their input tensor is checked by ``inference_tensors``)."""
        resolved: list[SignatureTask] = []
        seen: set[str] = set()
        for signature_name, method_name in tasks:
            key = signature_name or DEFAULT_SIGNATURE
            if key in seen:
                raise invalid(f"Duplicate evaluation of signature: {key}")
            seen.add(key)
            sig = self.signatures.get(key)
            if sig is None:
                raise invalid(f"Requested signature not found in model graph: {key}")
            if method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise ServingError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"Unsupported signature method_name: {method_name}",
                )
            resolved.append((sig, method_name))
        return resolved

    def infer(
        self, tasks: list[SignatureTask], examples: Sequence[bytes]
    ) -> list[Classification | Regression]:
        feeds, fetches = inference_tensors(tasks, examples)
        return inference_results(tasks, len(examples), self.run_tensors(feeds, fetches))

    # -- session calls -------------------------------------------------------------------------

    def _callable(self, feeds: tuple[str, ...], fetches: tuple[str, ...]) -> Any:
        """The session callable for these (sorted) graph tensors, built once (building one costs
        more than a call). Sorted names make one callable serve every API that runs the same
        tensors (Predict and Classify of a signature, say).

        C++ ``Session::MakeCallable`` through ``_make_callable_from_options`` (what Keras's TF1
        backend uses), not the public ``make_callable``: with a feed list, that one goes through
        all of ``Session.run``'s Python feed and fetch handling each call (~150 us under the GIL
        at batch 1, several times the graph itself). Feeds must then be arrays of the placeholder's
        dtype and shape, which ``validate`` has checked against the signature.
        """
        key = (feeds, fetches)
        fn = self._callables.get(key)
        if fn is not None:
            return fn
        with self._lock:
            if self._session is None:
                raise ServingError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"Servable {self.model_name} version {self.version} is unloaded",
                )
            fn = self._callables.get(key)
            if fn is None:
                from tensorflow.core.protobuf import config_pb2

                fn = self._session._make_callable_from_options(
                    config_pb2.CallableOptions(feed=feeds, fetch=fetches)
                )
                self._callables[key] = fn
        return fn

    def run_tensors(
        self, feeds: dict[str, np.ndarray], fetches: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Feed graph tensors by name, fetch graph tensors by name: the one session call every
        API makes (what the batcher merges)."""
        import tensorflow as tf

        feed_names = tuple(sorted(feeds))
        fetch_names = tuple(sorted(set(fetches)))
        fn = self._callable(feed_names, fetch_names)
        try:
            return dict(zip(fetch_names, fn(*[feeds[n] for n in feed_names])))
        except tf.errors.InvalidArgumentError as e:
            raise invalid(e.message) from None
        except tf.errors.OpError as e:
            raise ServingError(status_code(e.error_code), e.message) from None

    # -- warmup --------------------------------------------------------------------------------

    @metrics.warmup_observed
    def warmup(self) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (<= 1000 records); return the count.

        Predict, Classify, Regress and MultiInference records run through the same code as live
        requests. Any failure raises, which fails the load: a version whose warmup data does not
        run would fail real requests too (TF Serving behaves the same, and also rejects other
        record kinds).
        """
        path = Path(self.path) / WARMUP_FILE
        if not path.is_file():
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        from serving.tensors import serialized_examples, to_ndarray

        count = 0
        for record in read_tfrecords(path, MAX_WARMUP_RECORDS):
            entry = prediction_log_pb2.PredictionLog.FromString(record)
            kind = entry.WhichOneof("log_type")
            if kind == "predict_log":
                request = entry.predict_log.request
                sig = self.signature(request.model_spec.signature_name)
                inputs = {a: to_ndarray(a, t) for a, t in request.inputs.items()}
                self.run(sig, inputs, self.validate(sig, inputs, list(request.output_filter)))
            elif kind == "classify_log":
                request = entry.classify_log.request
                self.classify(request.model_spec.signature_name, serialized_examples(request.input))
            elif kind == "regress_log":
                request = entry.regress_log.request
                self.regress(request.model_spec.signature_name, serialized_examples(request.input))
            elif kind == "multi_inference_log":
                request = entry.multi_inference_log.request
                self.multi_inference(
                    [(t.model_spec.signature_name, t.method_name) for t in request.tasks],
                    serialized_examples(request.input),
                )
            else:
                raise ServingError(
                    grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {kind}"
                )
            count += 1
        return count


def _preprocess(sig: SignatureInfo, method: str) -> tuple[str, tuple[str, ...]]:
    """TF Serving's PreProcessClassification / PreProcessRegression: the input tensor name and the
    output aliases to fetch, or its error for a signature of the wrong shape."""
    kind = "classification" if method == CLASSIFY_METHOD else "regression"
    if sig.method_name != method:
        raise invalid(
            f"Expected {kind} signature method_name to be {method}. Was: {sig.method_name}"
        )
    if len(sig.inputs) != 1:
        raise invalid("Expected one input Tensor.")
    if method == CLASSIFY_METHOD and len(sig.outputs) not in (1, 2):
        raise invalid(f"Expected one or two output Tensors, found {len(sig.outputs)}")
    if method == REGRESS_METHOD and len(sig.outputs) != 1:
        raise invalid("Expected one output Tensor.")
    info = sig.inputs.get("inputs")
    if info is None:
        raise ServingError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"No {kind} inputs found in SignatureDef: {sig.name}",
        )
    if method == CLASSIFY_METHOD:
        outputs = tuple(a for a in ("classes", "scores") if a in sig.outputs)
        if not outputs:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                'Expected classification signature outputs to contain at least one of "classes" '
                f'or "scores". Signature was: {sig.name}',
            )
    else:
        if "outputs" not in sig.outputs:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"No regression outputs found in SignatureDef: {sig.name}",
            )
        outputs = ("outputs",)
    return info.tensor_name, outputs


SignatureTask = tuple[SignatureInfo, str]  # a signature and the method it runs as


def predict_tensors(
    sig: SignatureInfo, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """A Predict's session feeds and fetches: the signature's aliases as graph tensor names."""
    return (
        {sig.inputs[a].tensor_name: v for a, v in inputs.items()},
        tuple([sig.outputs[a].tensor_name for a in outputs]),
    )


def predict_outputs(
    sig: SignatureInfo, outputs: tuple[str, ...], values: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The fetched graph tensors back under the signature's output aliases."""
    return {a: values[sig.outputs[a].tensor_name] for a in outputs}


def inference_tensors(
    tasks: list[SignatureTask], examples: Sequence[bytes]
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Check each task's signature shape; the examples feed and all the tasks' fetches."""
    input_name = ""
    fetches: list[str] = []  # graph tensor names
    for sig, method in tasks:
        name, outputs = _preprocess(sig, method)
        if input_name and name != input_name:
            raise invalid("Input tensor must be the same for all Signatures.")
        input_name = name
        fetches.extend(sig.outputs[a].tensor_name for a in outputs)
    if not examples:
        raise invalid("Input is empty.")
    return {input_name: _string_tensor(examples)}, tuple(fetches)


def inference_results(
    tasks: list[SignatureTask], n: int, values: dict[str, np.ndarray]
) -> list[Classification | Regression]:
    """Each task's Classification or Regression from the fetched tensors (TF Serving's checks)."""
    results: list[Classification | Regression] = []
    for sig, method in tasks:
        got = {a: values[i.tensor_name] for a, i in sig.outputs.items() if i.tensor_name in values}
        if method == CLASSIFY_METHOD:
            results.append(_classification(n, got.get("classes"), got.get("scores")))
        else:
            results.append(_regression(n, got["outputs"]))
    return results


def _string_tensor(values: Sequence[bytes]) -> np.ndarray:
    """A 1-D object array of bytes, what a DT_STRING placeholder is fed."""
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


def _tf_shape(array: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in array.shape) + "]"


_DT_NAMES = {
    "object": "DT_STRING",
    "float32": "DT_FLOAT",
    "float64": "DT_DOUBLE",
    "float16": "DT_HALF",
}


def _dt_name(array: np.ndarray) -> str:
    """TF's DataType name of a fetched array (DT_FLOAT, DT_INT64, DT_STRING, ...)."""
    return _DT_NAMES.get(array.dtype.name, f"DT_{array.dtype.name.upper()}")


def _classification(
    n: int, classes: np.ndarray | None, scores: np.ndarray | None
) -> Classification:
    """TF Serving's PostProcessClassificationResult checks on the fetched tensors."""
    for name, value, dt in (("classes", classes, "DT_STRING"), ("scores", scores, "DT_FLOAT")):
        if value is None:
            continue
        if value.ndim != 2:
            raise invalid(
                f"Expected Tensor shape: [batch_size num_classes] but got {_tf_shape(value)}"
            )
        if _dt_name(value) != dt:
            raise invalid(f"Expected {name} Tensor of {dt}. Got: {_dt_name(value)}")
        if value.shape[0] != n:
            raise invalid(f"Expected {name} output batch size of {n}. Got: {value.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise invalid(
            f"Tensors class and score should match in dim_size(1). "
            f"Got {classes.shape[1]} vs. {scores.shape[1]}"
        )
    return Classification(classes, scores)


def _regression(n: int, outputs: np.ndarray) -> Regression:
    """TF Serving's PostProcessRegressionResult checks: float32 [batch] or [batch, 1]."""
    if not (outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1)):
        raise invalid(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
            f"but got {_tf_shape(outputs)}"
        )
    if outputs.shape[0] != n:
        raise invalid(
            f"Input batch size did not match output batch size: {n} vs. {outputs.shape[0]}"
        )
    if outputs.dtype != np.float32:
        raise invalid(f"Expected output Tensor of DT_FLOAT.  Got: {_dt_name(outputs)}")
    return Regression(outputs.reshape(n))


def read_tfrecords(path: str | Path, limit: int) -> list[bytes]:
    """Read up to ``limit`` records of a TFRecord file (length, crc, data, crc framing).

    Plain Python so that reading warmup data needs neither eager tf.data nor the deprecated
    ``tf_record_iterator`` (which logs a warning per call). CRCs are not verified; a truncated
    file, or a length longer than what is left of the file (not a TFRecord file), raises.
    """
    records: list[bytes] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while len(records) < limit:
            header = f.read(12)
            if not header:
                break
            if len(header) != 12:
                raise ValueError(f"{path}: truncated TFRecord header")
            (length,) = struct.unpack("<Q", header[:8])
            if length > size - f.tell():
                raise ValueError(
                    f"{path}: not a TFRecord file (a record of {length} bytes, "
                    f"{size - f.tell()} bytes left)"
                )
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


def import_runtime() -> None:
    """Import TensorFlow once, and move its objects out of the garbage collector's sight.

    Its ~400k module-level objects live as long as the process. Every unload runs a full
    ``gc.collect`` (routing: to free the closed graph's reference cycles), which would walk them
    all, ~190 ms holding the GIL: a stall every in-flight request waited out (benchmark d).
    Frozen, the collection walks only what was created since (the servables) and takes ~1 ms.
    Call it before the first version loads, so no version's objects are frozen with them.

    TensorFlow's kernels are its own (Eigen) unless the user sets ``TF_ENABLE_ONEDNN_OPTS=1``, as
    in TF Serving's standard (non-MKL) build: for serving-sized calls oneDNN's per-call overhead
    costs more than it saves (MNIST softmax, in-process: batch 1 17 -> 11 us, batch 64 130 -> 37
    us, batch 128 175 -> 151 us without it). A model whose big kernels gain from oneDNN can have
    it back with the variable.

    The young generation is collected every 20,000 allocations instead of 700: a request
    allocates dozens of container objects that die with it, and the fewer collections find
    nearly all of them gone already (REST at 64 concurrent, 2 workers: 1.04x requests/s in a
    paired run, all four rounds ahead, with the older generations collected after 20 of the
    younger's collections instead of 10). Cyclic garbage lives a little longer; unloads still
    collect in full.
    """
    import gc

    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow  # noqa: F401

    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


# (model name, version, version directory, replay warmup) -> the loaded version
LoadServable = Callable[[str, int, str, bool], "Servable"]


def load_servable(model_name: str, version: int, path: str, warmup: bool) -> Servable:
    """Load (and optionally warm up) one version, logging timings; raises on failure."""
    servable = Servable(model_name, version, path)
    start = time.monotonic()
    servable.load()
    loaded = time.monotonic()
    log.info(
        "model %s version %d: loaded from %s in %.2f s (signatures: %s)",
        model_name,
        version,
        path,
        loaded - start,
        ", ".join(sorted(servable.signatures)),
    )
    if warmup:
        try:
            n = servable.warmup()
        except Exception:
            servable.close()
            raise
        if n:
            log.info(
                "model %s version %d: warmup replayed %d request(s) in %.2f s",
                model_name,
                version,
                n,
                time.monotonic() - loaded,
            )
    return servable
