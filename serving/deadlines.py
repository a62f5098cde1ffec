"""Request deadlines on an event loop (``--rest_api_timeout_in_ms``), at a set insert a request.

``asyncio.timeout`` gives each request a loop timer of its own and costs ~6 us a request (its
context manager, a TimerHandle in the loop's heap, its removal): a tenth of everything our REST
path adds to aiohttp's own work. Here the requests whose deadlines fall in the same slot (1 ms)
share one timer, which cancels those still running when it fires; a request is cancelled at most
one slot after its deadline.
"""

from __future__ import annotations

import asyncio
import math
from typing import Awaitable, TypeVar

import grpc

from serving.errors import ServingError

T = TypeVar("T")

SLOT_S = 1e-3


class Deadlines:
    """The deadlines of the requests in flight on one event loop, ``timeout_s`` after each
    starts (None: none)."""

    def __init__(self, timeout_s: float | None, slot_s: float = SLOT_S) -> None:
        self.timeout_s = timeout_s
        self._slot_s = slot_s
        self._loop = asyncio.get_running_loop()
        self._slots: dict[int, set[asyncio.Task]] = {}  # slot number -> tasks waiting in it
        self._expired: set[asyncio.Task] = set()  # cancelled by their deadline, not yet told

    async def run(self, work: Awaitable[T]) -> T:
        """Await ``work`` in the current task; DEADLINE_EXCEEDED once its deadline has passed
        (``work`` is cancelled)."""
        if self.timeout_s is None:
            return await work
        task = asyncio.current_task()
        assert task is not None
        slot = math.ceil((self._loop.time() + self.timeout_s) / self._slot_s)
        waiting = self._slots.get(slot)
        if waiting is None:
            waiting = self._slots[slot] = set()
            self._loop.call_at(slot * self._slot_s, self._expire, slot)
        waiting.add(task)
        try:
            return await work
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # cancelled by someone else: the client went away, the server stops
            self._expired.discard(task)
            task.uncancel()
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded") from None
        finally:
            waiting.discard(task)

    def _expire(self, slot: int) -> None:
        # A task still in the set is suspended inside ``run``'s await: the cancellation
        # reaches it there.
        for task in self._slots.pop(slot, ()):
            self._expired.add(task)
            task.cancel()


__all__ = ["Deadlines"]
