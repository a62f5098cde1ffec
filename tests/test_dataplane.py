"""DataPlane.run (serving.jobs): cheap kinds of job run on the event loop, expensive ones on the thread pool."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.core import DataPlane
from serving.jobs import COST_WINDOW, INLINE_BUDGET_S

pytestmark = pytest.mark.timeout(60)


def _busy(seconds: float) -> None:
    """Hold the CPU (and the GIL) like a model call would: a sleep would free the loop."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _thread_of(job_seconds: float):
    def job() -> int:
        _busy(job_seconds)
        return threading.get_ident()

    return job


async def _threads(data_plane: DataPlane, kind: str, job_seconds: float, n: int) -> list[int]:
    return [await data_plane.run(kind, _thread_of(job_seconds)) for _ in range(n)]


def test_cheap_jobs_run_on_the_loop_and_expensive_ones_on_the_pool():
    data_plane = DataPlane(routing=None, control=None, num_threads=2)  # type: ignore[arg-type]

    async def main() -> None:
        loop_thread = threading.get_ident()
        cheap = await _threads(data_plane, "cheap", 0, 5)
        # Never seen: the pool measures it first; from then on it is known to be cheap.
        assert cheap[0] != loop_thread
        assert cheap[1:] == [loop_thread] * 4
        expensive = await _threads(data_plane, "expensive", 2 * INLINE_BUDGET_S, 5)
        assert loop_thread not in expensive
        # Kinds are judged apart: the expensive one did not move the cheap one off the loop.
        assert await _threads(data_plane, "cheap", 0, 1) == [loop_thread]

    try:
        asyncio.run(main())
    finally:
        data_plane.close()


def test_a_kind_that_becomes_expensive_moves_to_the_pool():
    data_plane = DataPlane(routing=None, control=None, num_threads=2)  # type: ignore[arg-type]

    async def main() -> None:
        loop_thread = threading.get_ident()
        await _threads(data_plane, "model", 0, 2)
        # A few slow runs (a preempted thread, say) do not move it ...
        slow = await _threads(data_plane, "model", 2 * INLINE_BUDGET_S, COST_WINDOW - 1)
        assert slow == [loop_thread] * (COST_WINDOW - 1)
        # ... a window of them does (the model behind the kind got bigger).
        await _threads(data_plane, "model", 2 * INLINE_BUDGET_S, 1)
        assert loop_thread not in await _threads(data_plane, "model", 2 * INLINE_BUDGET_S, 3)

    try:
        asyncio.run(main())
    finally:
        data_plane.close()


def test_failed_jobs_are_not_measured():
    data_plane = DataPlane(routing=None, control=None, num_threads=2)  # type: ignore[arg-type]

    def fail() -> None:
        raise ValueError("no such model")

    async def main() -> None:
        for _ in range(3):
            with pytest.raises(ValueError):
                await data_plane.run("unknown model", fail)
        assert not data_plane.jobs.costs.cheap("unknown model")

    try:
        asyncio.run(main())
    finally:
        data_plane.close()
