"""One loaded model version: a SavedModel in its own TF1 graph + session, run via session callables.

Why TF1 and not ``tf.saved_model.load``: the TF2 signature wrapper costs ~4.6 ms per call, a
C++ session callable ~20 us (batch-1 MNIST), and the hot path is one small request at a time.
Each version gets its own ``Graph``/``Session`` so that ``close()`` really returns its memory on
unload. TensorFlow is imported lazily here (``--help`` must stay instant).

This module owns the session: load, close, the callables and the one session call every API makes
(``run_tensors``). What a request means around that call is elsewhere, along TF Serving's seams:
the signatures and Predict's input checks in ``serving.signatures``, the four APIs' feeds, fetches
and answers in ``serving.inference``, the warmup replay in ``serving.warmup`` (which
``load_servable`` runs). The API methods here only join those to this session.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import grpc
import numpy as np

from serving import metrics
from serving.errors import ServingError, invalid
from serving.inference import (
    Classification,
    Regression,
    SignatureTask,
    example_tasks,
    inference_results,
    inference_tensors,
    multi_inference_tasks,
    predict_outputs,
    predict_tensors,
)
from serving.model_format import (
    CLASSIFY_METHOD,
    DEFAULT_SIGNATURE,
    PREDICT_METHOD,
    REGRESS_METHOD,
    SAVED_MODEL_FILE,
)
from serving.signatures import SignatureInfo, signature_info, validate_predict
from serving.tf_runtime import SessionCallable, session_callable, session_config
from serving.types import SessionSettings
from serving.warmup import replay_warmup

if TYPE_CHECKING:
    from serving.types import BatchingParameters

log = logging.getLogger("serving.servable")

_INIT_OP_SIGNATURE = "__saved_model_init_op"
_PREDICTABLE_METHODS = (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD)


@dataclass(frozen=True)
class LoadSettings:
    """How a worker loads every version: TF Serving's ``--saved_model_tags``, session flags
    (``tf_runtime.session_config``), ``--num_request_iterations_for_warmup`` and
    ``--enable_signature_method_name_check`` (which the warmup replay obeys too)."""

    tags: tuple[str, ...] = ("serve",)
    session: SessionSettings = SessionSettings()
    warmup_iterations: int = 1
    method_name_check: bool = False


DEFAULT_LOAD = LoadSettings()


class Servable:
    """A loaded version. Thread-safe: ``run`` may be called from many threads at once."""

    def __init__(
        self, model_name: str, version: int, path: str, method_name_check: bool = False
    ) -> None:
        self.model_name = model_name
        self.version = version
        self.path = path
        # --enable_signature_method_name_check: each API takes only signatures of its methods.
        self.method_name_check = method_name_check
        self._graph: Any = None
        self._session: Any = None
        self.signature_defs: dict[str, Any] = {}  # name -> SignatureDef proto (for metadata)
        self.signatures: dict[str, SignatureInfo] = {}
        # (sorted feed tensor names, sorted fetch tensor names) -> Session callable
        self._callables: dict[tuple[tuple[str, ...], tuple[str, ...]], SessionCallable] = {}
        self._lock = threading.Lock()
        # Set by the loader when batching is on: the parameters of this version's Predict queues.
        self.batching: BatchingParameters | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @metrics.saved_model_load_observed
    def load(self, settings: LoadSettings = DEFAULT_LOAD) -> None:
        """Load the SavedModel's meta graph of ``settings.tags`` into a fresh graph/session, with
        ``settings.session``'s ConfigProto; raise on any failure."""
        import tensorflow as tf

        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph, config=session_config(settings.session))
        try:
            with graph.as_default():
                meta_graph = tf.compat.v1.saved_model.loader.load(
                    session, list(settings.tags), self.path
                )
        except BaseException as error:
            session.close()
            if isinstance(error, OSError) and "Cannot parse file" in str(error):
                # TF Serving's status for a corrupt saved_model.pb (ReadBinaryProto's).
                pb = f"{self.path.rstrip('/')}/{SAVED_MODEL_FILE}"
                raise ServingError(
                    grpc.StatusCode.DATA_LOSS, f"Can't parse {pb} as binary proto"
                ) from error
            raise
        self._graph, self._session = graph, session
        for name, sig in meta_graph.signature_def.items():
            self.signature_defs[name] = sig
            if name != _INIT_OP_SIGNATURE:
                self.signatures[name] = signature_info(name, sig)
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
        """Predict's signature ``name`` (empty = serving_default), or TF Serving's errors: none
        such, FAILED_PRECONDITION; with the method-name check on, one that is not predict,
        classify or regress, INTERNAL."""
        key = name or DEFAULT_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.'
            )
        if self.method_name_check and sig.method_name not in _PREDICTABLE_METHODS:
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                "Expected prediction signature method_name to be one of "
                f"{{{', '.join(_PREDICTABLE_METHODS)}}}. Was: {sig.method_name}",
            )
        return sig

    # Predict's input checks, a static method so the data plane's ``servable.validate(sig,
    # inputs, output_filter)`` costs no extra call on the hot path.
    validate = staticmethod(validate_predict)

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
        """Classify's or Regress's one task (``inference.example_tasks``)."""
        return example_tasks(self.signatures, signature_name, method, self.method_name_check)

    def multi_inference_tasks(self, tasks: Sequence[tuple[str, str]]) -> list[SignatureTask]:
        """MultiInference's tasks (``inference.multi_inference_tasks``)."""
        return multi_inference_tasks(self.signatures, tasks, self.method_name_check)

    def infer(
        self, tasks: list[SignatureTask], examples: Sequence[bytes]
    ) -> list[Classification | Regression]:
        feeds, fetches = inference_tensors(tasks, examples)
        return inference_results(tasks, len(examples), self.run_tensors(feeds, fetches))

    # -- session calls -------------------------------------------------------------------------

    def _callable(self, feeds: tuple[str, ...], fetches: tuple[str, ...]) -> SessionCallable:
        """The session callable for these (sorted) graph tensors, built once (building one costs
        more than a call). Sorted names make one callable serve every API that runs the same
        tensors (Predict and Classify of a signature, say). The fast C++ callable
        (``tf_runtime.session_callable``) takes a feed of any shape, as TF Serving's session does
        (the graph's ops then take it or fail with INVALID_ARGUMENT), and of another dtype than
        the placeholder's only to fail: ``validate`` checks dtypes first, in TF Serving's words.
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
                fn = session_callable(self._session, feeds, fetches)
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
        except ValueError as e:
            # A feed the callable cannot take: with the public fallback callable
            # (``tf_runtime.session_callable``), Session.run's own check of its shape.
            raise invalid(str(e)) from None


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode with numeric ``value`` (TF error codes are the same numbers)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


# (model name, version, version directory, replay warmup) -> the loaded version
LoadServable = Callable[[str, int, str, bool], "Servable"]


def load_servable(
    model_name: str, version: int, path: str, warmup: bool, settings: LoadSettings = DEFAULT_LOAD
) -> Servable:
    """Load (and optionally warm up) one version, logging timings; raises on failure."""
    servable = Servable(model_name, version, path, settings.method_name_check)
    start = time.monotonic()
    servable.load(settings)
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
            n = replay_warmup(servable, settings.warmup_iterations)
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
