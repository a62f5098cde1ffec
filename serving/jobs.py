"""Where a request's work runs: on the worker's event loop when it is cheap, else on a thread pool.

Handing a job to a pool thread and its answer back to the loop costs ~200 us on the 2-core
benchmark machine (a 75 us batch-1 MNIST Predict took 275 us through ``run_in_executor`` at
c=64): two thread wake-ups and the GIL passed back and forth. A job that takes less than that
costs the server less on the loop than handed off; one that takes longer would hold up every
other request for more than the hand-off saves, so it goes to the pool (``Session.run`` releases
the GIL, so the loop keeps accepting requests meanwhile). The data plane runs each request's
decode + model call + encode through one ``JobRunner``; the batcher runs each batch through its
own (its pool is TF Serving's batch threads).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")

INLINE_BUDGET_S = 200e-6
# A kind of job is judged by the fastest of its last COST_WINDOW runs (see ``JobCosts``).
COST_WINDOW = 8


class JobCosts:
    """Which kinds of job are cheap enough to run on the event loop: below ``budget_s``.

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

    def __init__(self, budget_s: float = INLINE_BUDGET_S) -> None:
        self.budget_s = budget_s
        self._recent: dict[Hashable, deque[float]] = {}

    def cheap(self, kind: Hashable) -> bool:
        recent = self._recent.get(kind)
        return recent is not None and min(recent) < self.budget_s

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


class JobRunner:
    """A thread pool and the costs that decide, per kind of job, whether to use it."""

    def __init__(
        self, num_threads: int, thread_name_prefix: str, inline_budget_s: float = INLINE_BUDGET_S
    ) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=num_threads, thread_name_prefix=thread_name_prefix
        )
        self.costs = JobCosts(inline_budget_s)

    async def run(self, kind: Hashable, fn: Callable[[], T]) -> T:
        """``fn()``: right here on the event loop when jobs of this ``kind`` have been cheaper
        than the hand-off to a thread, else on the pool.

        ``kind`` groups jobs of about the same cost: the API, the model and the size class of
        the request, say (a model's batch-1 and batch-512 requests are different kinds).
        """
        if self.costs.cheap(kind):
            return self.costs.measured(kind, fn)
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self.costs.measured, kind, fn
        )

    def close(self) -> None:
        """Wait for the jobs running on the pool; drop those not started."""
        self.executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["COST_WINDOW", "INLINE_BUDGET_S", "JobCosts", "JobRunner"]
