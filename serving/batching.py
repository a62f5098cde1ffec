"""Server-side batching of session runs, as TF Serving's ``BatchingSession`` does it: Predict,
Classify, Regress and MultiInference requests alike, whichever front end they came through.

Requests for the same (servable version, fed tensors, fetched tensors) wait in one queue; a
batch is due when it is full (``max_batch_size`` rows), when it is not the last in its queue, or
when its oldest request has waited ``batch_timeout_micros``. The batch's inputs are concatenated
along dim 0, padded with copies of the last request's first row up to the next
``allowed_batch_sizes`` entry, run through the servable in one session call, and the outputs are
split back by row counts (padding rows dropped). All queues share ``num_batch_threads`` batch
slots, as TF Serving's ``SharedBatchScheduler`` shares its threads.

Unlike TF Serving, the scheduling runs on the worker's event loop, and so does a batch whose kind
has been cheaper than a thread hand-off: with the GIL, batch threads that wake up per batch and
hand the answers back cost a small model more than its whole batch (see ``Batcher``). Each request
keeps its version ``Handle`` until its batch has run, so a version swap never closes a session
under a queued or running batch.

A request that cannot be concatenated with others (an input without dim 0, inputs of different
dim-0 sizes, zero rows, or a signature whose declared shapes fix dim 0) is not batched: the caller
runs it alone (``submit`` returns None). Requests whose inner dims differ are queued apart unless
``pad_variable_length_inputs`` pads them to the batch's largest (with the tensor's first element,
as TF Serving): TF Serving would fail the whole batch instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import grpc
import numpy as np

from serving import metrics, textproto
from serving.errors import ServingError, invalid
from serving.jobs import JobRunner
from serving.types import BatchingParameters

if TYPE_CHECKING:
    from serving.routing import Handle
    from serving.servable import LoadServable, Servable

log = logging.getLogger("serving.batching")

# A batch without a timeout runs when the worker's event loop is free (see ``Batcher``); under
# load that never leaves the loop idle, it runs after waiting this long at most. Batch-1 MNIST
# gRPC at 64 concurrent on 2 workers (one run each, against the no-op): 0.75x at 1 ms, 0.84x at
# 2 ms, 0.88x at 5 ms; one model call per request, 0.64x.
IDLE_WAIT_CAP_S = 5e-3
# A batch runs on the event loop when batches of its kind have taken less than this (the fastest
# of their recent runs). More than a single request's budget (``jobs.INLINE_BUDGET_S``, the
# ~200 us a thread hand-off costs): a batch answers many requests at once, and on a thread its
# Python half (merge, split, TF's call wrapper) still contends for the GIL. At 200 us, 3-33 % of
# batch-1 MNIST batches (16-63 rows: 100-470 us on a loaded loop) flapped onto threads, at 5,309
# req/s mean over 3 runs (2 workers, gRPC, 64 concurrent); at 1 ms none did, 5,629 req/s. A
# millisecond on the loop is within what waiting for a batch already adds.
BATCH_INLINE_BUDGET_S = 1e-3
PER_MODEL_FILE = "batching_params.pbtxt"  # TF Serving's kBatchingParamsFilename


@dataclass(frozen=True)
class BatchingConfig:
    """``--enable_batching`` with its parameters, and whether models may bring their own."""

    parameters: BatchingParameters
    per_model: bool = False  # --enable_per_model_batching_parameters

    def for_version(self, path: str) -> BatchingParameters | None:
        """The parameters a version at ``path`` is batched with; None: not batched.

        As TF Serving: with per-model parameters on, a version is batched only when its directory
        holds ``batching_params.pbtxt`` (the thread pool stays the global one); a bad file fails
        the load.
        """
        if not self.per_model:
            return self.parameters
        file = Path(path) / PER_MODEL_FILE
        if not file.is_file():
            return None
        try:
            return read_parameters(str(file))
        except ValueError as e:
            raise invalid(str(e)) from None


# -- the parameters file ---------------------------------------------------------------------


def _parameters_class() -> Any:
    """``tensorflow.serving.BatchingParameters``, built from its .proto definition.

    The tensorflow-serving-api wheel ships no ``session_bundle_config_pb2``; the message is
    declared here in a private descriptor pool, with the wrapper types TF Serving's proto uses
    (so a file written for TF Serving, ``max_batch_size { value: 32 }``, parses unchanged).
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    message = proto.message_type.add(name="BatchingParameters")
    for number, name, type_name in (
        (1, "max_batch_size", "Int64Value"),
        (2, "batch_timeout_micros", "Int64Value"),
        (3, "max_enqueued_batches", "Int64Value"),
        (4, "num_batch_threads", "Int64Value"),
        (5, "thread_pool_name", "StringValue"),
    ):
        message.field.add(
            name=name,
            number=number,
            type=F.TYPE_MESSAGE,
            label=F.LABEL_OPTIONAL,
            type_name=f".google.protobuf.{type_name}",
        )
    message.field.add(
        name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED
    )
    message.field.add(
        name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL
    )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


def read_parameters(path: str) -> BatchingParameters:
    """A text-format BatchingParameters file -> checked parameters; ``ValueError`` naming the
    file and the field otherwise (TF Serving's checks and wording)."""
    proto = textproto.read(path, _parameters_class()())
    defaults = BatchingParameters()
    values: dict[str, Any] = {}
    for name in (
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "thread_pool_name",
    ):
        values[name] = (
            getattr(proto, name).value if proto.HasField(name) else getattr(defaults, name)
        )
    params = BatchingParameters(
        **values,
        allowed_batch_sizes=tuple(proto.allowed_batch_sizes),
        pad_variable_length_inputs=proto.pad_variable_length_inputs,
    )
    for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
        if getattr(params, name) < 1:
            raise ValueError(f"{path}: {name} must be positive; was {getattr(params, name)}")
    if params.batch_timeout_micros < 0:
        raise ValueError(
            f"{path}: batch_timeout_micros must be non-negative; was {params.batch_timeout_micros}"
        )
    sizes = params.allowed_batch_sizes
    if sizes:
        if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
            raise ValueError(
                f"{path}: allowed_batch_sizes entries must be monotonically "
                f"increasing positive numbers; were {list(sizes)}"
            )
        if sizes[-1] != params.max_batch_size:
            raise ValueError(
                f"{path}: allowed_batch_sizes: last entry must equal max_batch_size; "
                f"last entry was {sizes[-1]}; expected {params.max_batch_size}"
            )
    return params


def batching_loader(config: BatchingConfig, load: "LoadServable") -> "LoadServable":
    """Wrap a worker's load function: each version learns the parameters it is batched with
    (read before the SavedModel, so a bad per-model file fails the load at once)."""

    def load_batched(model_name: str, version: int, path: str, warmup: bool) -> "Servable":
        params = config.for_version(path)
        servable = load(model_name, version, path, warmup)
        servable.batching = params
        if params is not None and config.per_model:
            log.info("model %s version %d: batching with %s", model_name, version, PER_MODEL_FILE)
        return servable

    return load_batched


# -- the scheduler -----------------------------------------------------------------------------


@dataclass(eq=False)
class _Task:
    handle: "Handle"
    feeds: dict[str, np.ndarray]  # by graph tensor name
    rows: int
    complete: Callable[[dict[str, np.ndarray]], Any]  # fetched arrays -> the future's result
    future: asyncio.Future
    enqueued: float  # loop time


@dataclass(eq=False)
class _Queue:
    """The batches of one (servable, feeds, fetches[, inner shapes]); the last one is open."""

    servable: "Servable"
    fetches: tuple[str, ...]  # graph tensor names
    params: BatchingParameters
    batches: deque[list[_Task]] = field(default_factory=deque)
    open_rows: int = 0  # rows in the last batch

    def make_room(self, rows: int) -> None:
        """Open a new batch unless the open one has room for ``rows`` more; UNAVAILABLE when
        the queue already holds ``max_enqueued_batches``."""
        if self.batches and self.open_rows + rows <= self.params.max_batch_size:
            return
        if len(self.batches) >= self.params.max_enqueued_batches:
            raise ServingError(
                grpc.StatusCode.UNAVAILABLE,
                "The batch scheduling queue to which this task was submitted is full",
            )
        self.batches.append([])
        self.open_rows = 0

    @property
    def waits_for_idle(self) -> bool:
        """No timeout: a batch is due when the loop has nothing else to do (see ``Batcher``)."""
        return self.params.batch_timeout_micros == 0

    def deadline(self) -> float:
        """When the first batch is due, full or not (loop time)."""
        if len(self.batches) > 1 or self.open_rows >= self.params.max_batch_size:
            return -math.inf
        if self.waits_for_idle:
            return self.batches[0][0].enqueued + IDLE_WAIT_CAP_S
        return self.batches[0][0].enqueued + self.params.batch_timeout_micros / 1e6


class Batcher:
    """The queues of one worker's event loop, and its batch threads.

    Everything but the model call happens on the loop, so the queues need no lock and a request
    costs no thread hand-off of its own. A batch is due when it is full, when it is not the last
    of its queue, or when its oldest request has waited ``batch_timeout_micros`` (a loop timer).
    At most ``num_batch_threads`` batches run at once, queues taken round-robin as TF Serving's
    ``SharedBatchScheduler`` does. A batch runs through a ``JobRunner``: on the loop itself when
    batches of its kind (model, fetched tensors, size class) have taken less than
    ``BATCH_INLINE_BUDGET_S``, else on a batch thread -- for a small model, a batch costs the loop
    less than the hand-off.

    ``batch_timeout_micros`` 0 means, as in TF Serving, "run as soon as a batch thread is free";
    here the loop is the batch thread, and it is free once it has nothing else ready to run. So
    a lone request runs at once, while under load the requests the loop takes in meanwhile join
    the batch (gRPC's server takes in one new call per loop iteration, so without this its
    batches would hold one request each). A loop that never idles runs it after
    ``IDLE_WAIT_CAP_S``.
    """

    def __init__(self, num_threads: int, thread_pool_name: str) -> None:
        self.thread_pool_name = thread_pool_name
        self.num_threads = num_threads
        self._runner = JobRunner(num_threads, thread_pool_name, BATCH_INLINE_BUDGET_S)
        self._loop = asyncio.get_running_loop()
        self._queues: dict[tuple[Any, ...], _Queue] = {}  # in round-robin order
        self._running = 0  # batches taken and not yet finished
        self._dispatch_scheduled = False
        self._idle_watched = False
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = False

    def stop(self) -> None:
        """Fail what is still queued (UNAVAILABLE), wait for the batches on threads."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        queues, self._queues = list(self._queues.values()), {}
        error = ServingError(grpc.StatusCode.UNAVAILABLE, "The server is shutting down")
        for queue in queues:
            for batch in queue.batches:
                _finish(batch, [None] * len(batch), error)
        self._runner.close()

    def submit(
        self,
        handle: "Handle",
        feeds: dict[str, np.ndarray],
        fetches: tuple[str, ...],
        batchable: bool,
        complete: Callable[[dict[str, np.ndarray]], Any],
    ) -> asyncio.Future | None:
        """Enqueue one session run of validated ``feeds`` (on the event loop), as TF Serving's
        BatchingSession batches ``Session::Run``: Predict, Classify, Regress and MultiInference
        alike. ``batchable``: every tensor of the signature(s) has a free dim 0.

        The future gets ``complete(fetched arrays by tensor name)`` (the data plane's: the
        request's answer), or what it raised. A batch completes all its requests when it
        finishes, before any of them resumes, so that its responses go out together: sent one
        by one as each request resumed and made its answer, they let the clients' next requests
        trickle in over many more loop iterations.

        On success the batcher owns ``handle`` and releases it once the batch has run. Returns
        None when this request is not batched (the caller runs it and keeps the handle); raises
        INVALID_ARGUMENT for a request larger than a batch, UNAVAILABLE when the queue is full.
        """
        servable = handle.servable
        params = servable.batching
        rows = _rows(feeds) if params is not None and batchable else None
        if params is None or rows is None:
            return None
        if rows > params.max_batch_size:
            raise invalid(
                f"Task size {rows} is larger than maximum input batch size {params.max_batch_size}"
            )
        if self._stopping:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, "The server is shutting down")
        # TF Serving records it per input tensor
        metrics.BATCHING_INPUT_BATCH_SIZE.observe_all([rows] * len(feeds))
        queue = self._queue(servable, feeds, fetches, params)
        queue.make_room(rows)
        task = _Task(handle, feeds, rows, complete, self._loop.create_future(), self._loop.time())
        queue.batches[-1].append(task)
        queue.open_rows += rows
        self._schedule_dispatch()
        return task.future

    def _queue(
        self,
        servable: "Servable",
        feeds: dict[str, np.ndarray],
        fetches: tuple[str, ...],
        params: BatchingParameters,
    ) -> _Queue:
        """The queue of runs that can be concatenated with this one: same version, fed and fetched
        tensors, and inner dims (or ranks, when ``pad_variable_length_inputs`` pads them)."""
        names = tuple(sorted(feeds))
        if params.pad_variable_length_inputs:
            shapes = tuple([feeds[n].ndim for n in names])
        else:
            shapes = tuple([feeds[n].shape[1:] for n in names])
        key = (servable, names, fetches, shapes)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(servable, fetches, params)
        return queue

    # -- on the loop -----------------------------------------------------------------------------

    def _schedule_dispatch(self) -> None:
        """Dispatch once the loop has run what is ready now, so that requests that arrived
        together join the same batch."""
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self, idle: bool = False) -> None:
        """Start due batches while a batch slot is free; then wait for the next one to fall due:
        a timer for the earliest deadline, and an idle watch when a queue has no timeout."""
        self._dispatch_scheduled = False
        now = self._loop.time()
        while self._running < self.num_threads:
            taken = self._take(now, idle)
            if taken is None:
                break
            self._running += 1
            self._loop.create_task(self._process(*taken))
        due = None
        if self._running < self.num_threads and self._queues:
            due = min(queue.deadline() for queue in self._queues.values())
            if any(queue.waits_for_idle for queue in self._queues.values()):
                self._watch_idle()
        if self._timer is not None and (due is None or self._timer.when() != due):
            self._timer.cancel()
            self._timer = None
        if due is not None and self._timer is None:
            self._timer = self._loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _watch_idle(self) -> None:
        if not self._idle_watched:
            self._idle_watched = True
            self._loop.call_soon(self._check_idle)

    def _check_idle(self) -> None:
        """Each loop iteration until the loop has nothing else to run: then the batches without
        a timeout are due (the loop is their batch thread, and it is free)."""
        self._idle_watched = False
        if not any(queue.waits_for_idle for queue in self._queues.values()):
            return  # nothing waits for it any more (its batches filled up meanwhile, say)
        if has_ready_callbacks(self._loop):
            self._watch_idle()
        else:
            self._dispatch(idle=True)

    def _take(self, now: float, idle: bool) -> tuple[_Queue, list[_Task]] | None:
        """The first due batch, queues visited round-robin."""
        for key, queue in self._queues.items():
            if queue.deadline() <= now or (idle and queue.waits_for_idle):
                batch = queue.batches.popleft()
                del self._queues[key]  # back at the end of the round, or gone when empty
                if queue.batches:
                    self._queues[key] = queue
                return queue, batch
        return None

    async def _process(self, queue: _Queue, batch: list[_Task]) -> None:
        started = self._loop.time()
        metrics.BATCHING_QUEUING_LATENCY.observe_all(
            [(started - task.enqueued) * 1e6 for task in batch], self.thread_pool_name
        )
        rows = sum(task.rows for task in batch)
        size = padded_size(queue.params.allowed_batch_sizes, rows)
        padding = size - rows
        kind = (queue.servable.model_name, queue.fetches, size.bit_length())
        results: list[Any] = [None] * len(batch)
        error: BaseException | None = None
        try:
            results = await self._runner.run(kind, lambda: _run_batch(queue, batch, size, padding))
        except ServingError as e:
            error = e
        except asyncio.CancelledError:  # the loop is shutting down
            error = ServingError(grpc.StatusCode.UNAVAILABLE, "The server is shutting down")
            raise
        except Exception as e:  # noqa: BLE001 -- a bug must fail the batch, not the scheduler
            log.exception("batch of %d request(s) failed", len(batch))
            error = ServingError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            self._running -= 1
            _finish(batch, results, error)
            if not self._stopping:
                self._schedule_dispatch()


def has_ready_callbacks(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` has callbacks queued for its next iteration.

    No public API tells; asyncio's own loop keeps them in its private ``_ready``. A loop without
    it (uvloop, a later asyncio) answers False, so batches without a timeout run at the next
    iteration instead of gathering what arrives while the loop is busy: smaller batches, never
    a request left waiting.
    """
    return bool(getattr(loop, "_ready", None))


def _finish(batch: list[_Task], results: list[Any], error: BaseException | None) -> None:
    """Release the handles (a swap may close the version now), then answer the requests."""
    for task, result in zip(batch, results):
        task.handle.release()
        if task.future.done():  # the request was cancelled meanwhile
            continue
        if error is not None:
            task.future.set_exception(error)
            continue
        try:
            task.future.set_result(task.complete(result))
        except Exception as e:  # noqa: BLE001 -- the request's own error, raised where it awaits
            task.future.set_exception(e)


def _rows(inputs: dict[str, np.ndarray]) -> int | None:
    """The common dim-0 size of all inputs; None when they cannot be concatenated."""
    rows = None
    for value in inputs.values():
        if value.ndim == 0 or (rows is not None and value.shape[0] != rows):
            return None
        rows = value.shape[0]
    return rows or None


def padded_size(allowed: tuple[int, ...], size: int) -> int:
    """TF Serving's RoundToLowestAllowedBatchSize."""
    for allowed_size in allowed:
        if allowed_size >= size:
            return allowed_size
    return size


def _run_batch(
    queue: _Queue, batch: list[_Task], size: int, padding: int
) -> list[dict[str, np.ndarray]]:
    """Merge, pad with ``padding`` rows to ``size``, run, split back; on the loop or a batch
    thread."""
    params = queue.params
    metrics.BATCHING_PADDING_SIZE.observe(padding, str(size))
    metrics.BATCHING_PROCESSED_BATCH_SIZE.observe(size)
    if len(batch) == 1 and not padding:
        merged = batch[0].feeds  # nothing to copy
    else:
        merged = {
            name: _merge(
                [task.feeds[name] for task in batch], padding, params.pad_variable_length_inputs
            )
            for name in batch[0].feeds
        }
    values = queue.servable.run_tensors(merged, queue.fetches)
    for name, value in values.items():
        if value.ndim == 0 or value.shape[0] != size:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Batched output tensor {name} has shape {list(value.shape)}: its "
                f"0th dimension does not equal the batch size {size}",
            )
    bounds = list(itertools.accumulate(task.rows for task in batch))
    return [
        {name: value[end - task.rows : end] for name, value in values.items()}
        for task, end in zip(batch, bounds)
    ]


def _merge(parts: list[np.ndarray], padding: int, pad_inner: bool) -> np.ndarray:
    """Concatenate along dim 0 (inner dims padded first when asked), then the padding rows."""
    if pad_inner:
        target = tuple(max(dims) for dims in zip(*(p.shape[1:] for p in parts)))
        parts = [_pad_inner(p, target) for p in parts]
    if padding:
        parts = [*parts, np.repeat(parts[-1][:1], padding, axis=0)]
    return np.concatenate(parts)


def _pad_inner(value: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """Grow dims 1+ to ``target``, filled with the tensor's first element (TF's AddPadding)."""
    if value.shape[1:] == target:
        return value
    out = np.full((value.shape[0], *target), value.flat[0], dtype=value.dtype)
    out[tuple(slice(0, d) for d in value.shape)] = value
    return out


def start(config: BatchingConfig) -> Batcher:
    """The server's batcher: the global parameters size and name the thread pool."""
    params = config.parameters
    log.info(
        "batching on: %d batch thread(s); max_batch_size %d, batch_timeout_micros %d, "
        "max_enqueued_batches %d%s",
        params.num_batch_threads,
        params.max_batch_size,
        params.batch_timeout_micros,
        params.max_enqueued_batches,
        "; per-model batching_params.pbtxt honoured" if config.per_model else "",
    )
    return Batcher(params.num_batch_threads, params.thread_pool_name)


__all__ = [
    "Batcher",
    "BatchingConfig",
    "BatchingParameters",
    "batching_loader",
    "padded_size",
    "read_parameters",
    "start",
]
