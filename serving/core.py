"""The data plane: the one implementation of every API both front ends call.

The front ends only translate wire formats (protobuf, JSON) to numpy / serialized examples and
``ServingError`` back to status codes, so gRPC and REST cannot drift apart in behaviour. The
methods here block; front ends call them through ``run``, together with their own decoding and
encoding, as one job: on the event loop itself when that kind of job has been cheaper than
handing it to a thread, else on a thread pool (``Session.run`` releases the GIL, so the asyncio
loop keeps accepting requests meanwhile, and a large response is not built on the loop either).

With ``--enable_batching`` the inference APIs go through their ``*_batched`` methods instead,
from the event loop: decoding and encoding stay on the loop and the session run joins a batch
(``serving.batching``), which the batcher runs on the loop too when such batches are cheap, else
on a batch thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable, Protocol, Sequence, TypeVar, Union

import numpy as np

from serving.batching import Batcher
from serving.errors import ServingError, invalid
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
from serving.model_format import DEFAULT_SIGNATURE
from serving.routing import Handle, RoutingTable
from serving.servable import Servable
from serving.signatures import SignatureInfo
from serving.types import VersionStatus

T = TypeVar("T")

Inputs = Union[dict[str, np.ndarray], Callable[[SignatureInfo], dict[str, np.ndarray]]]


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


@dataclass(frozen=True)
class InferenceTask:
    """One task of a MultiInference request: a ModelSpec and the method to run its signature as."""

    model_name: str
    version: int | None
    label: str | None
    signature_name: str
    method_name: str


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


class DataPlane:
    """Predict, Classify, Regress, MultiInference, status and metadata over loaded versions.

    A ModelSpec is (``model_name``, ``version``, ``label``): a version, else the version a label
    points at, else the latest -- resolved by the routing table under the same lock that pins it.
    """

    def __init__(
        self,
        routing: RoutingTable,
        control: ControlPlane,
        num_threads: int,
        batcher: Batcher | None = None,
    ) -> None:
        self.routing = routing
        self.control = control
        self.jobs = JobRunner(num_threads, "predict")
        self.batcher = batcher  # None: batching off, front ends use ``predict`` through ``run``

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.jobs.close()

    def run(self, kind: Hashable, fn: Callable[[], T]) -> Awaitable[T]:
        """``fn`` (a request's decode + model call + encode) as one job: on the event loop when
        jobs of this ``kind`` have been cheap, else on the pool (``serving.jobs``)."""
        return self.jobs.run(kind, fn)

    # -- inference (blocking: call through ``run``) --------------------------------------------

    def predict(
        self,
        model_name: str,
        version: int | None,
        label: str | None,
        signature_name: str,
        inputs: Inputs,
        output_filter: Sequence[str] = (),
    ) -> PredictResult:
        """Route, validate and run one Predict request.

        ``inputs`` may be a callable that builds the arrays from the routed signature: REST
        needs the signature's dtypes to decode JSON, and doing it under the same handle means a
        version swap between "look up signature" and "run" cannot fail the request.
        """
        with self.routing.acquire(model_name, version, label=label) as handle:
            servable = handle.servable
            sig = servable.signature(signature_name)
            if callable(inputs):
                inputs = inputs(sig)
            outputs = servable.validate(sig, inputs, tuple(output_filter))
            values = servable.run(sig, inputs, outputs)
            return PredictResult(handle.version, sig.name, values)

    def predict_batched(
        self,
        model_name: str,
        version: int | None,
        label: str | None,
        signature_name: str,
        inputs: Inputs,
        output_filter: Sequence[str],
        answer: Callable[[PredictResult], T],
    ) -> Awaitable[T]:
        """``predict`` for the event loop when batching is on: route, decode and validate now
        (raising at once), then the batch to await (``_run_batched``) for the front end's
        ``answer``. Not a coroutine, like ``_run_batched``: each level of coroutine costs
        every request of a batch its creation and a resumption."""
        handle = self.routing.acquire(model_name, version, label=label)
        try:
            servable = handle.servable
            sig = servable.signature(signature_name)
            if callable(inputs):
                inputs = inputs(sig)
            outputs = servable.validate(sig, inputs, tuple(output_filter))
        except BaseException:
            handle.release()
            raise
        feeds, fetches = predict_tensors(sig, inputs, outputs)
        version_served = handle.version
        return self._run_batched(
            handle,
            feeds,
            fetches,
            sig.batchable,
            lambda values: answer(
                PredictResult(version_served, sig.name, predict_outputs(sig, outputs, values))
            ),
        )

    async def example_inference_batched(
        self,
        method: str,
        model_name: str,
        version: int | None,
        label: str | None,
        signature_name: str,
        examples: Sequence[bytes],
        answer: Callable[[InferenceResult], T],
    ) -> T:
        """``classify`` or ``regress`` (``method``: CLASSIFY_METHOD, REGRESS_METHOD) for the event
        loop when batching is on."""
        return await self._infer_batched(
            model_name,
            version,
            label,
            examples,
            lambda servable: servable.example_tasks(signature_name, method),
            lambda results: answer(results[0]),
        )

    async def multi_inference_batched(
        self,
        tasks: Sequence[InferenceTask],
        examples: Sequence[bytes],
        answer: Callable[[list[InferenceResult]], T],
    ) -> T:
        """``multi_inference`` for the event loop when batching is on."""
        first = _routing_task(tasks)
        return await self._infer_batched(
            first.model_name,
            first.version,
            first.label,
            examples,
            lambda servable: servable.multi_inference_tasks(_signature_methods(tasks)),
            answer,
        )

    async def _infer_batched(
        self,
        model_name: str,
        version: int | None,
        label: str | None,
        examples: Sequence[bytes],
        tasks_of: Callable[[Servable], list[SignatureTask]],
        answer: Callable[[list[InferenceResult]], T],
    ) -> T:
        handle = self.routing.acquire(model_name, version, label=label)
        try:
            tasks = tasks_of(handle.servable)
            feeds, fetches = inference_tensors(tasks, examples)
        except BaseException:
            handle.release()
            raise
        version_served = handle.version
        return await self._run_batched(
            handle,
            feeds,
            fetches,
            all(sig.batchable for sig, _ in tasks),
            lambda values: answer(
                [
                    InferenceResult(version_served, sig.name, value)
                    for (sig, _), value in zip(
                        tasks, inference_results(tasks, len(examples), values)
                    )
                ]
            ),
        )

    def _run_batched(
        self,
        handle: Handle,
        feeds: dict[str, np.ndarray],
        fetches: tuple[str, ...],
        batchable: bool,
        answer: Callable[[dict[str, np.ndarray]], T],
    ) -> Awaitable[T]:
        """One session run in a batch (its future); one that cannot join a batch (a version
        without batching parameters, an input without a batch dim) runs alone through ``run``.
        The caller awaits it at once. Takes ``handle`` over: it is released once the model has
        run, by whoever ran it, so a cancelled request cannot unpin its version under a running
        batch.

        ``answer`` turns the fetched arrays into the front end's response as the batch finishes
        (``Batcher.submit``), so that a batch's responses are sent together.
        """
        assert self.batcher is not None
        try:
            future = self.batcher.submit(handle, feeds, fetches, batchable, answer)
        except BaseException:
            handle.release()
            raise
        if future is not None:
            return future

        def run_alone() -> T:
            with handle:
                values = handle.servable.run_tensors(feeds, fetches)
            return answer(values)

        size_class = sum(v.nbytes for v in feeds.values()).bit_length()
        return self.run(("unbatched", handle.servable.model_name, fetches, size_class), run_alone)

    def classify(
        self,
        model_name: str,
        version: int | None,
        label: str | None,
        signature_name: str,
        examples: Sequence[bytes],
    ) -> InferenceResult:
        """Classify serialized ``tf.Example``s with a ``tensorflow/serving/classify`` signature."""
        with self.routing.acquire(model_name, version, label=label) as handle:
            value = handle.servable.classify(signature_name, examples)
            return InferenceResult(handle.version, signature_name or DEFAULT_SIGNATURE, value)

    def regress(
        self,
        model_name: str,
        version: int | None,
        label: str | None,
        signature_name: str,
        examples: Sequence[bytes],
    ) -> InferenceResult:
        """Regress serialized ``tf.Example``s with a ``tensorflow/serving/regress`` signature."""
        with self.routing.acquire(model_name, version, label=label) as handle:
            value = handle.servable.regress(signature_name, examples)
            return InferenceResult(handle.version, signature_name or DEFAULT_SIGNATURE, value)

    def multi_inference(
        self, tasks: Sequence[InferenceTask], examples: Sequence[bytes]
    ) -> list[InferenceResult]:
        """Several classify/regress tasks over the same examples, in one model call.

        As TF Serving: the first task's ModelSpec routes the request (the other tasks' versions
        are not looked at), every task must name that same model, signatures must be distinct.
        """
        first = _routing_task(tasks)
        with self.routing.acquire(first.model_name, first.version, label=first.label) as handle:
            values = handle.servable.multi_inference(_signature_methods(tasks), examples)
            return [
                InferenceResult(handle.version, t.signature_name or DEFAULT_SIGNATURE, v)
                for t, v in zip(tasks, values)
            ]

    # -- status / metadata ---------------------------------------------------------------------

    async def model_status(
        self, model_name: str, version: int | None = None, label: str | None = None
    ) -> list[VersionStatus]:
        """As the supervisor's manager knows it: AVAILABLE only once every worker serves it."""
        return await self.control.statuses(model_name, version, label)

    def model_metadata(
        self, model_name: str, version: int | None = None, label: str | None = None
    ) -> ModelMetadata:
        with self.routing.acquire(model_name, version, label=label) as handle:
            return ModelMetadata(handle.version, dict(handle.servable.signature_defs))


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


def parse_version(text: str) -> int:
    """A version from a URL or label position; INVALID_ARGUMENT when it is not an int64."""
    try:
        value = int(text)
    except ValueError:
        raise invalid(f"Invalid version: {text}") from None
    if value < 0 or value > 2**63 - 1:
        raise invalid(f"Invalid version: {text}")
    return value


__all__ = [
    "DataPlane",
    "InferenceResult",
    "InferenceTask",
    "ModelMetadata",
    "PredictResult",
    "ServingError",
    "parse_version",
]
