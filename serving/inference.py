"""The four inference APIs' semantics over a version's signatures, apart from running the session.

Each API is split into what TF Serving's predict_util / classifier / regressor / multi_inference
do around one session run: resolving the tasks and checking their signatures (``example_tasks``,
``multi_inference_tasks``; Predict's input checks are ``serving.signatures``'), the session feeds
and fetches (``predict_tensors``, ``inference_tensors``), and the answers read back from the
fetched arrays with TF Serving's post-processing checks (``predict_outputs``,
``inference_results``). The run between them is the caller's: the servable's own API methods
run it at once, the data plane (``serving.core``) may hand it to the batcher to merge with
others. So these are plain functions of signatures and arrays, shared by both: a batched and an
unbatched request are checked and answered alike. Errors are TF Serving's codes and words; the
one setting, ``--enable_signature_method_name_check``, comes in as ``method_name_check``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import grpc
import numpy as np

from serving.errors import ServingError, invalid
from serving.model_format import CLASSIFY_METHOD, DEFAULT_SIGNATURE, REGRESS_METHOD
from serving.signatures import SignatureInfo


@dataclass(frozen=True)
class Classification:
    """Classify's answer per example: labels (bytes) and/or scores, both [N, num_classes]."""

    classes: np.ndarray | None
    scores: np.ndarray | None


@dataclass(frozen=True)
class Regression:
    """Regress's answer: one float32 per example."""

    values: np.ndarray


class SignatureTask(NamedTuple):
    """A signature to run as ``method`` (classify or regress), once TF Serving's checks of its
    shape passed: the graph tensor fed the examples, and the output aliases it answers from."""

    sig: SignatureInfo
    method: str
    input_name: str
    outputs: tuple[str, ...]


# -- predict -------------------------------------------------------------------------------------


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


# -- classify / regress / multi-inference: which tasks ------------------------------------------


def example_tasks(
    signatures: dict[str, SignatureInfo], signature_name: str, method: str, method_name_check: bool
) -> list[SignatureTask]:
    """Classify's or Regress's one task; INVALID_ARGUMENT (not Predict's FAILED_PRECONDITION) for
    a signature that does not exist."""
    key = signature_name or DEFAULT_SIGNATURE
    sig = signatures.get(key)
    if sig is None:
        raise invalid(f"No signature was found with the name: {key}")
    return [_task(sig, method, method_name_check)]


def multi_inference_tasks(
    signatures: dict[str, SignatureInfo],
    tasks: Sequence[tuple[str, str]],
    method_name_check: bool,
) -> list[SignatureTask]:
    """As TF Serving: signatures must be distinct; only classify and regress are supported; each
    task checked in turn. Their input tensors may differ (separate ``tf.function`` signatures of
    a TF2 export each have their own): every one is fed the same examples."""
    resolved: list[SignatureTask] = []
    seen: set[str] = set()
    for signature_name, method_name in tasks:
        key = signature_name or DEFAULT_SIGNATURE
        if key in seen:
            raise invalid(f"Duplicate evaluation of signature: {key}")
        seen.add(key)
        sig = signatures.get(key)
        if sig is None:
            raise invalid(f"Requested signature not found in model graph: {key}")
        if method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
            raise ServingError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"Unsupported signature method_name: {method_name}",
            )
        resolved.append(_task(sig, method_name, method_name_check))
    return resolved


def _task(sig: SignatureInfo, method: str, method_name_check: bool) -> SignatureTask:
    """TF Serving's PreProcessClassification / PreProcessRegression: the signature's method name
    only with ``--enable_signature_method_name_check`` (a TF2 export marks every signature
    predict), its shape always: one input ``inputs``; ``classes`` and/or ``scores`` (one or two
    outputs) or the one output ``outputs``."""
    kind = "classification" if method == CLASSIFY_METHOD else "regression"
    if method_name_check and sig.method_name != method:
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
        raise invalid(f"No {kind} inputs found in SignatureDef: {sig.debug_string()}")
    if method == CLASSIFY_METHOD:
        outputs = tuple(a for a in ("classes", "scores") if a in sig.outputs)
        if not outputs:
            raise invalid(
                'Expected classification signature outputs to contain at least one of "classes" '
                f'or "scores". Signature was: {sig.debug_string()}'
            )
    else:
        if "outputs" not in sig.outputs:
            raise invalid(f"No regression outputs found in SignatureDef: {sig.debug_string()}")
        outputs = ("outputs",)
    return SignatureTask(sig, method, info.tensor_name, outputs)


def inference_tensors(
    tasks: list[SignatureTask], examples: Sequence[bytes]
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The session feeds (the examples, into every task's input tensor) and all the tasks'
    fetches; INVALID_ARGUMENT "Input is empty." without examples."""
    if not examples:
        raise invalid("Input is empty.")
    serialized = _string_tensor(examples)
    feeds = {task.input_name: serialized for task in tasks}
    fetches = [task.sig.outputs[a].tensor_name for task in tasks for a in task.outputs]
    return feeds, tuple(fetches)


def inference_results(
    tasks: list[SignatureTask], n: int, values: dict[str, np.ndarray]
) -> list[Classification | Regression]:
    """Each task's Classification or Regression from the fetched tensors (TF Serving's checks)."""
    results: list[Classification | Regression] = []
    for task in tasks:
        got = {a: values[task.sig.outputs[a].tensor_name] for a in task.outputs}
        if task.method == CLASSIFY_METHOD:
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
