"""The data plane: the one implementation of every API both front ends call.

The front ends only translate wire formats (protobuf, JSON) to numpy / serialized examples and
``ServingError`` back to status codes, so gRPC and REST cannot drift apart in behaviour. The
methods here block; front ends call them through ``run``, together with their own decoding and
encoding, as one job: on the event loop itself when that kind of job has been cheaper than
handing it to a thread, else on a thread pool (``Session.run`` releases the GIL, so the asyncio
loop keeps accepting requests meanwhile, and a large response is not built on the loop either).

With ``--enable_batching`` Predict goes through ``predict_batched`` instead, from the event loop:
decoding and encoding stay on the loop and the model call joins a batch (``serving.batching``), so
a request costs no thread hand-off of its own -- the batch thread hands back a whole batch at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol, Sequence, TypeVar, Union

import numpy as np

from serving.batching import Batcher
from serving.errors import ServingError, invalid
from serving.manager import VersionStatus
from serving.routing import RoutingTable
from serving.servable import DEFAULT_SIGNATURE, Classification, Regression, SignatureInfo

T = TypeVar("T")

Inputs = Union[dict[str, np.ndarray], Callable[[SignatureInfo], dict[str, np.ndarray]]]

# Handing a job to a pool thread and its answer back to the loop costs ~200 us on the 2-core
# benchmark machine (a 75 us batch-1 MNIST Predict took 275 us through ``run_in_executor`` at
# c=64): two thread wake-ups and the GIL passed back and forth. A job that takes less than that
# costs the server less on the loop than handed off; one that takes longer would hold up every
# other request for more than the hand-off saves, so it goes to the pool.
INLINE_BUDGET_S = 200e-6
# A kind of job is judged by the fastest of its last COST_WINDOW runs (see ``JobCosts``).
COST_WINDOW = 8


class JobCosts:
    """Which kinds of job are cheap enough to run on the event loop (``INLINE_BUDGET_S``).

    A run's cost is the wall time of the job itself, wherever it ran: what it would hold the loop
    for, TensorFlow's intra-op threads included (``time.thread_time`` misses those: a 2-core
    matmul model showed 174 us of thread time for 576 us of wall time). Noise only ever adds to
    it (the OS preempting the thread, waiting for the GIL on a pool thread, a cold first call),
    so the fastest recent run is the nearest to the job's own cost, and a few slow runs do not
    push a cheap kind of job off the loop for good. A kind never seen runs on the pool: a big
    model never holds the loop, not even once, while a cheap one pays a few hand-offs until its
    first runs are measured. Only successful runs count, so requests naming models that do not
    exist cannot grow the table.
    """

    def __init__(self) -> None:
        self._recent: dict[Hashable, deque[float]] = {}

    def cheap(self, kind: Hashable) -> bool:
        recent = self._recent.get(kind)
        return recent is not None and min(recent) < INLINE_BUDGET_S

    def record(self, kind: Hashable, seconds: float) -> None:
        recent = self._recent.get(kind)
        if recent is None:
            recent = self._recent[kind] = deque(maxlen=COST_WINDOW)
        recent.append(seconds)

    def measured(self, kind: Hashable, fn: Callable[[], T]) -> T:
        """``fn()``, its run recorded as one of ``kind``'s when it returns."""
        start = time.perf_counter()
        result = fn()
        self.record(kind, time.perf_counter() - start)
        return result


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

    async def statuses(self, model_name: str, version: int | None,
                       label: str | None) -> list[VersionStatus]: ...

    async def reload(self, config: Any, timeout_s: float) -> None: ...

    async def metrics_page(self) -> str: ...


class DataPlane:
    """Predict, Classify, Regress, MultiInference, status and metadata over loaded versions.

    A ModelSpec is (``model_name``, ``version``, ``label``): a version, else the version a label
    points at, else the latest -- resolved by the routing table under the same lock that pins it.
    """

    def __init__(self, routing: RoutingTable, control: ControlPlane, num_threads: int,
                 batcher: Batcher | None = None) -> None:
        self.routing = routing
        self.control = control
        self.executor = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="predict")
        self.batcher = batcher  # None: batching off, front ends use ``predict`` through ``run``
        self.job_costs = JobCosts()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def run(self, kind: Hashable, fn: Callable[[], T]) -> T:
        """``fn`` (a request's decode + model call + encode): right here on the event loop when
        jobs of this ``kind`` have been cheaper than the hand-off to a thread, else on the pool.

        ``kind`` groups jobs of about the same cost: the API, the model and the size class of
        the request, say (a model's batch-1 and batch-512 requests are different kinds).
        """
        if self.job_costs.cheap(kind):
            return self.job_costs.measured(kind, fn)
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self.job_costs.measured, kind, fn)

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

    async def predict_batched(
        self,
        model_name: str,
        version: int | None,
        label: str | None,
        signature_name: str,
        inputs: Inputs,
        output_filter: Sequence[str] = (),
    ) -> PredictResult:
        """``predict`` for the event loop when batching is on: route, decode and validate here,
        then await the batch. A version without batching parameters, or a request that cannot
        join a batch, runs alone through ``run``; either way the handle is released by the
        thread that ran the model, once it has run (a cancelled request cannot unpin it early).
        """
        assert self.batcher is not None
        handle = self.routing.acquire(model_name, version, label=label)
        try:
            servable = handle.servable
            sig = servable.signature(signature_name)
            if callable(inputs):
                inputs = inputs(sig)
            outputs = servable.validate(sig, inputs, tuple(output_filter))
            future = self.batcher.submit(handle, sig, inputs, outputs)
        except BaseException:
            handle.release()
            raise
        if future is not None:
            values = await future
        else:
            validated = inputs

            def run_alone() -> dict[str, np.ndarray]:
                with handle:
                    return servable.run(sig, validated, outputs)

            size_class = sum(v.nbytes for v in validated.values()).bit_length()
            values = await self.run(
                ("Predict alone", model_name, handle.version, sig.name, outputs, size_class),
                run_alone)
        return PredictResult(handle.version, sig.name, values)

    def classify(self, model_name: str, version: int | None, label: str | None,
                 signature_name: str, examples: Sequence[bytes]) -> InferenceResult:
        """Classify serialized ``tf.Example``s with a ``tensorflow/serving/classify`` signature."""
        with self.routing.acquire(model_name, version, label=label) as handle:
            value = handle.servable.classify(signature_name, examples)
            return InferenceResult(handle.version, signature_name or DEFAULT_SIGNATURE, value)

    def regress(self, model_name: str, version: int | None, label: str | None,
                signature_name: str, examples: Sequence[bytes]) -> InferenceResult:
        """Regress serialized ``tf.Example``s with a ``tensorflow/serving/regress`` signature."""
        with self.routing.acquire(model_name, version, label=label) as handle:
            value = handle.servable.regress(signature_name, examples)
            return InferenceResult(handle.version, signature_name or DEFAULT_SIGNATURE, value)

    def multi_inference(self, tasks: Sequence[InferenceTask],
                        examples: Sequence[bytes]) -> list[InferenceResult]:
        """Several classify/regress tasks over the same examples, in one model call.

        As TF Serving: the first task's ModelSpec routes the request (the other tasks' versions
        are not looked at), every task must name that same model, signatures must be distinct.
        """
        first = tasks[0] if tasks else InferenceTask("", None, None, "", "")
        with self.routing.acquire(first.model_name, first.version, label=first.label) as handle:
            for task in tasks:
                if not task.model_name:
                    raise invalid("Found ModelSpec with an empty model name.")
                if task.model_name != first.model_name:
                    raise invalid("All ModelSpecs in a MultiInferenceRequest must access the same "
                                  "model name.")
            values = handle.servable.multi_inference(
                [(t.signature_name, t.method_name) for t in tasks], examples)
            return [InferenceResult(handle.version, t.signature_name or DEFAULT_SIGNATURE, v)
                    for t, v in zip(tasks, values)]

    # -- status / metadata ---------------------------------------------------------------------

    async def model_status(self, model_name: str, version: int | None = None,
                           label: str | None = None) -> list[VersionStatus]:
        """As the supervisor's manager knows it: AVAILABLE only once every worker serves it."""
        return await self.control.statuses(model_name, version, label)

    def model_metadata(self, model_name: str, version: int | None = None,
                       label: str | None = None) -> ModelMetadata:
        with self.routing.acquire(model_name, version, label=label) as handle:
            return ModelMetadata(handle.version, dict(handle.servable.signature_defs))


def parse_version(text: str) -> int:
    """A version from a URL or label position; INVALID_ARGUMENT when it is not an int64."""
    try:
        value = int(text)
    except ValueError:
        raise invalid(f"Invalid version: {text}") from None
    if value < 0 or value > 2**63 - 1:
        raise invalid(f"Invalid version: {text}")
    return value


__all__ = ["DataPlane", "InferenceResult", "InferenceTask", "ModelMetadata", "PredictResult",
           "ServingError", "parse_version"]
