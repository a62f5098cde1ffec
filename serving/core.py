"""The data plane: one async method per API, the single implementation both front ends call.

A front end only translates. For an inference request it hands over the ModelSpec, the request's
size and a *call* of its own making: ``call.read()`` decodes the request (numpy arrays, serialized
examples) and ``call.answer(result)`` writes the response in the front end's format, as TF
Serving's handlers give its core a request to read and a response to fill. Everything else is
decided here, the same way for gRPC and REST:

* without batching, reading, the model call and answering run as one job (``serving.jobs``): on
  the event loop when jobs of that kind have been cheap, else on the thread pool (``Session.run``
  releases the GIL), so that neither a big model nor the conversion of a big tensor holds up the
  loop;
* with ``--enable_batching``, the request is read on the loop and its session run joins a batch
  (``serving.batching``); the batch answers each of its requests as it finishes, before any of
  them resumes, so that a batch's responses are sent together.

Status, config reloads and the metrics page are the supervisor's (``ControlPlane``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Generic,
    Hashable,
    NamedTuple,
    Protocol,
    Sequence,
    TypeVar,
    Union,
)

import numpy as np

from serving.batching import Batcher
from serving.errors import invalid
from serving.inference import (
    Classification,
    Regression,
    SignatureTask,
    inference_results,
    inference_tensors,
    predict_outputs,
    predict_tensors,
)
from serving.jobs import JobRunner
from serving.model_format import CLASSIFY_METHOD, REGRESS_METHOD
from serving.routing import Handle, RoutingTable
from serving.servable import Servable
from serving.signatures import SignatureInfo
from serving.types import RELOAD_TIMEOUT_S, VersionStatus

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

# A reload answers this long before the client's deadline, so that the answer still reaches it.
RELOAD_ANSWER_MARGIN_S = 0.5


class ModelSpec(NamedTuple):
    """What a request routes by: a version, else the version a label points at, else the latest."""

    name: str
    version: int | None = None
    label: str | None = None


# -- what the front ends hand over ---------------------------------------------------------------

# A Predict's arrays by input alias, or a function that makes them for the routed signature (REST
# needs its dtypes to decode JSON; decoding under the same handle means a version swap between
# "look up the signature" and "run" cannot fail the request).
Inputs = Union[dict[str, np.ndarray], Callable[[SignatureInfo], dict[str, np.ndarray]]]


class PredictInput(NamedTuple):
    signature_name: str
    inputs: Inputs
    output_filter: Sequence[str] = ()


class ExamplesInput(NamedTuple):
    """A Classify or Regress: serialized ``tf.Example``s for one signature."""

    signature_name: str
    examples: Sequence[bytes]


@dataclass(frozen=True)
class InferenceTask:
    """One task of a MultiInference request: a ModelSpec and the method to run its signature as."""

    model_name: str
    version: int | None
    label: str | None
    signature_name: str
    method_name: str


class MultiInferenceInput(NamedTuple):
    tasks: Sequence[InferenceTask]
    examples: Sequence[bytes]


@dataclass(frozen=True)
class PredictResult:
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class InferenceResult:
    """The answer of Classify (``value`` is a Classification) or Regress (a Regression)."""

    version: int
    signature_name: str
    value: Classification | Regression


class PredictCall(Protocol[R_co]):
    def read(self) -> PredictInput: ...

    def answer(self, result: PredictResult) -> R_co: ...


class ExamplesCall(Protocol[R_co]):
    def read(self) -> ExamplesInput: ...

    def answer(self, result: InferenceResult) -> R_co: ...


class MultiInferenceCall(Protocol[R_co]):
    def read(self) -> MultiInferenceInput: ...

    def answer(self, results: list[InferenceResult]) -> R_co: ...


@dataclass(frozen=True)
class ModelMetadata:
    version: int
    signature_defs: dict[str, Any]  # name -> tensorflow.SignatureDef proto


class ControlPlane(Protocol):
    """What a worker asks the supervisor, which alone knows every version's state and owns the
    model list and the metrics of all workers (``serving.worker.SupervisorLink``)."""

    async def statuses(
        self, model_name: str, version: int | None, label: str | None
    ) -> list[VersionStatus]: ...

    async def reload(self, config: Any, timeout_s: float) -> None: ...

    async def metrics_page(self) -> str: ...


@dataclass(frozen=True)
class _Inference(Generic[R]):
    """A Classify, Regress or MultiInference once read: the examples, the model they route to,
    its (signature, method) tasks, and how the results become the front end's answer."""

    model: ModelSpec
    examples: Sequence[bytes]
    tasks_of: Callable[[Servable], list[SignatureTask]]
    answer: Callable[[list[InferenceResult]], R]


class DataPlane:
    """Predict, Classify, Regress, MultiInference, metadata, status, reload and the metrics page."""

    def __init__(
        self,
        routing: RoutingTable,
        control: ControlPlane,
        num_threads: int,
        batcher: Batcher | None = None,
    ) -> None:
        self.routing = routing
        self.control = control
        self.batcher = batcher  # None: batching off
        self._jobs = JobRunner(num_threads, "predict")

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self._jobs.close()

    # -- inference -------------------------------------------------------------------------------
    # Not coroutines where batching is on: each level of coroutine costs every request of a batch
    # its creation and a resumption. Errors found before the model runs are raised at once.

    def predict(self, model: ModelSpec, size: int, call: PredictCall[R]) -> Awaitable[R]:
        """Route, read, validate and run one Predict; ``size`` (the request's bytes) tells its
        cost class."""
        if self.batcher is None:
            kind = ("Predict", model.name, size.bit_length(), type(call))
            return self._job(kind, lambda: call.answer(self._predict_now(model, call.read())))
        handle, sig, inputs, outputs = self._prepare_predict(model, call.read())
        feeds, fetches = predict_tensors(sig, inputs, outputs)
        version = handle.version
        return self._run_batched(
            handle,
            feeds,
            fetches,
            sig.batchable,
            lambda values: call.answer(
                PredictResult(version, sig.name, predict_outputs(sig, outputs, values))
            ),
        )

    def classify(self, model: ModelSpec, size: int, call: ExamplesCall[R]) -> Awaitable[R]:
        """Classify serialized ``tf.Example``s with a classification-shaped signature (its
        method_name checked only with ``--enable_signature_method_name_check``)."""
        return self._examples(CLASSIFY_METHOD, "Classify", model, size, call)

    def regress(self, model: ModelSpec, size: int, call: ExamplesCall[R]) -> Awaitable[R]:
        """Regress serialized ``tf.Example``s with a regression-shaped signature (its
        method_name checked only with ``--enable_signature_method_name_check``)."""
        return self._examples(REGRESS_METHOD, "Regress", model, size, call)

    def multi_inference(
        self, model_name: str, size: int, call: MultiInferenceCall[R]
    ) -> Awaitable[R]:
        """Several classify/regress tasks over the same examples, in one model call.

        As TF Serving: the first task's ModelSpec routes the request (the other tasks' versions
        are not looked at), every task must name that same model, signatures must be distinct.
        ``model_name`` (the first task's) only tells the request's cost class.
        """

        def plan(request: MultiInferenceInput) -> _Inference[R]:
            first = _routing_task(request.tasks)
            return _Inference(
                ModelSpec(first.model_name, first.version, first.label),
                request.examples,
                lambda servable: servable.multi_inference_tasks(_signature_methods(request.tasks)),
                call.answer,
            )

        kind = ("MultiInference", model_name, size.bit_length(), type(call))
        return self._inference(kind, lambda: plan(call.read()))

    def _examples(
        self, method: str, api: str, model: ModelSpec, size: int, call: ExamplesCall[R]
    ) -> Awaitable[R]:
        def plan(request: ExamplesInput) -> _Inference[R]:
            return _Inference(
                model,
                request.examples,
                lambda servable: servable.example_tasks(request.signature_name, method),
                lambda results: call.answer(results[0]),
            )

        kind = (api, model.name, size.bit_length(), type(call))
        return self._inference(kind, lambda: plan(call.read()))

    # -- how the work runs -----------------------------------------------------------------------

    async def _job(self, kind: Hashable, work: Callable[[], R]) -> R:
        """``work`` (read + model call + answer) as one job: on the loop when jobs of ``kind``
        have been cheap, else on the pool."""
        answer = await self._jobs.run(kind, work)
        # A cheap job answers within the loop step that read its request, and the front end would
        # send the response before the loop reads the other requests that came in with it; one
        # yield lets those run first, so that a step's responses go out together, as a batch's do.
        await asyncio.sleep(0)
        return answer

    def _predict_now(self, model: ModelSpec, request: PredictInput) -> PredictResult:
        handle, sig, inputs, outputs = self._prepare_predict(model, request)
        with handle:
            return PredictResult(
                handle.version, sig.name, handle.servable.run(sig, inputs, outputs)
            )

    def _prepare_predict(
        self, model: ModelSpec, request: PredictInput
    ) -> tuple[Handle, SignatureInfo, dict[str, np.ndarray], tuple[str, ...]]:
        """Route (the handle is the caller's to release), decode against the routed signature,
        validate; the output aliases to fetch."""
        handle = self.routing.acquire(*model)
        try:
            sig = handle.servable.signature(request.signature_name)
            inputs = request.inputs(sig) if callable(request.inputs) else request.inputs
            outputs = handle.servable.validate(sig, inputs, tuple(request.output_filter))
        except BaseException:
            handle.release()
            raise
        return handle, sig, inputs, outputs

    def _inference(self, kind: Hashable, read: Callable[[], _Inference[R]]) -> Awaitable[R]:
        if self.batcher is None:
            return self._job(kind, lambda: self._infer_now(read()))
        return self._infer_batched(read())

    def _infer_now(self, inference: _Inference[R]) -> R:
        with self.routing.acquire(*inference.model) as handle:
            tasks = inference.tasks_of(handle.servable)
            values = handle.servable.infer(tasks, inference.examples)
            version = handle.version
        return inference.answer(
            [InferenceResult(version, task.sig.name, value) for task, value in zip(tasks, values)]
        )

    def _infer_batched(self, inference: _Inference[R]) -> Awaitable[R]:
        handle = self.routing.acquire(*inference.model)
        try:
            tasks = inference.tasks_of(handle.servable)
            feeds, fetches = inference_tensors(tasks, inference.examples)
        except BaseException:
            handle.release()
            raise
        version, count = handle.version, len(inference.examples)
        return self._run_batched(
            handle,
            feeds,
            fetches,
            all(task.sig.batchable for task in tasks),
            lambda values: inference.answer(
                [
                    InferenceResult(version, task.sig.name, value)
                    for task, value in zip(tasks, inference_results(tasks, count, values))
                ]
            ),
        )

    def _run_batched(
        self,
        handle: Handle,
        feeds: dict[str, np.ndarray],
        fetches: tuple[str, ...],
        batchable: bool,
        complete: Callable[[dict[str, np.ndarray]], R],
    ) -> Awaitable[R]:
        """One session run in a batch (its future); one that cannot join a batch (a version
        without batching parameters, an input without a batch dim) runs alone as a job. Takes
        ``handle`` over: it is released once the model has run, by whoever ran it, so a cancelled
        request cannot unpin its version under a running batch.

        ``complete`` makes the request's answer from the fetched arrays; the batcher calls it as
        the batch finishes (``Batcher.submit``), so that a batch's responses are sent together.
        """
        assert self.batcher is not None
        try:
            future = self.batcher.submit(handle, feeds, fetches, batchable, complete)
        except BaseException:
            handle.release()
            raise
        if future is not None:
            return future

        def run_alone() -> R:
            with handle:
                values = handle.servable.run_tensors(feeds, fetches)
            return complete(values)

        size_class = sum(v.nbytes for v in feeds.values()).bit_length()
        return self._jobs.run(
            ("unbatched", handle.servable.model_name, fetches, size_class), run_alone
        )

    # -- metadata, status, reload, metrics -------------------------------------------------------

    async def model_metadata(self, model: ModelSpec) -> ModelMetadata:
        with self.routing.acquire(*model) as handle:
            return ModelMetadata(handle.version, dict(handle.servable.signature_defs))

    async def model_status(self, model: ModelSpec) -> list[VersionStatus]:
        """As the supervisor's manager knows it: AVAILABLE only once every worker serves it."""
        return await self.control.statuses(*model)

    async def reload(self, config: Any, time_remaining_s: float | None) -> None:
        """Apply a new model list (a ``ModelServerConfig``); return once its versions are
        AVAILABLE, or raise the first failure (code and message naming the model and version).

        Unlike TF Serving the wait is bounded: by ``RELOAD_TIMEOUT_S`` and by the client's
        deadline (``time_remaining_s``), whichever comes first.
        """
        timeout_s = RELOAD_TIMEOUT_S
        if time_remaining_s is not None:
            timeout_s = max(0.0, min(timeout_s, time_remaining_s - RELOAD_ANSWER_MARGIN_S))
        await self.control.reload(config, timeout_s)

    async def metrics_page(self) -> str:
        """The Prometheus page: every worker's metrics, summed."""
        return await self.control.metrics_page()


def _routing_task(tasks: Sequence[InferenceTask]) -> InferenceTask:
    """The task whose ModelSpec routes a MultiInference (the first; an empty spec, which routing
    rejects, when there is none)."""
    return tasks[0] if tasks else InferenceTask("", None, None, "", "")


def _signature_methods(tasks: Sequence[InferenceTask]) -> list[tuple[str, str]]:
    """A MultiInference's (signature, method) pairs, once its ModelSpecs are checked as TF
    Serving checks them: every task names the model of the first (whose version routes)."""
    for task in tasks:
        if not task.model_name:
            raise invalid("Found ModelSpec with an empty model name.")
        if task.model_name != tasks[0].model_name:
            raise invalid(
                "All ModelSpecs in a MultiInferenceRequest must access the same model name."
            )
    return [(t.signature_name, t.method_name) for t in tasks]


__all__ = [
    "DataPlane",
    "ExamplesInput",
    "InferenceResult",
    "InferenceTask",
    "ModelMetadata",
    "ModelSpec",
    "MultiInferenceInput",
    "PredictInput",
    "PredictResult",
]
