"""Request/reply calls between the supervisor and one worker process, over a duplex pipe.

Either side calls the other by method name (``channel.call("load", ...)``) and gets the handler's
return value back, or its ``ServingError`` re-raised with the same code and message, so an error
raised in a worker reaches a client unchanged. A reader thread per side receives both requests
and replies: requests run on a small pool (a model load must not hold up a status query), replies
resolve the caller's future. When the other process goes away every pending call fails with
UNAVAILABLE and ``on_close`` runs once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from typing import Any, Callable

import grpc

from serving.errors import ServingError

log = logging.getLogger("serving.ipc")

Handlers = dict[str, Callable[..., Any]]


class Channel:
    """One end of the pipe: ``call`` the peer's handlers, serve ``handlers`` to the peer."""

    def __init__(
        self,
        connection: Connection,
        handlers: Handlers,
        name: str,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        self._connection = connection
        self._handlers = handlers
        self._name = name
        self._on_close = on_close
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{name}-calls")
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)

    def start(self) -> "Channel":
        self._reader.start()
        return self

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Run the peer's ``method(*args)`` and return its result (blocking)."""
        future = self.call_future(method, *args)
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise ServingError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{self._name}: no answer to {method} within {timeout:g} s",
            ) from None

    async def call_async(self, method: str, *args: Any) -> Any:
        """``call`` for an event loop: awaits the reply without holding a thread."""
        return await asyncio.wrap_future(self.call_future(method, *args))

    def close(self) -> None:
        """Stop serving calls and fail pending ones (the pipe is closed with it)."""
        self._fail_pending()
        self._connection.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def call_future(self, method: str, *args: Any) -> Future:
        """Send the call; the future resolves with the peer's answer (for calls in parallel)."""
        future: Future = Future()
        call_id = next(self._ids)
        with self._pending_lock:
            if self._closed.is_set():
                future.set_exception(self._gone())
                return future
            self._pending[call_id] = future
        try:
            self._send(("call", call_id, method, args))
        except (OSError, ValueError):  # the pipe is closed: the peer is gone
            with self._pending_lock:
                self._pending.pop(call_id, None)
            future.set_exception(self._gone())
        return future

    # -- internals -----------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._connection.send(message)

    def _gone(self) -> ServingError:
        return ServingError(grpc.StatusCode.UNAVAILABLE, f"{self._name}: the other process is gone")

    def _read(self) -> None:
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                break
            if message[0] == "call":
                _, call_id, method, args = message
                try:
                    self._pool.submit(self._serve, call_id, method, args)
                except RuntimeError:  # pool shut down: we are closing
                    break
            else:
                _, call_id, ok, value = message
                with self._pending_lock:
                    future = self._pending.pop(call_id, None)
                if future is None:
                    continue
                if ok:
                    future.set_result(value)
                else:
                    code, text = value
                    future.set_exception(ServingError(grpc.StatusCode[code], text))
        self._fail_pending()
        self._on_close()

    def _fail_pending(self) -> None:
        with self._pending_lock:
            self._closed.set()
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(self._gone())

    def _serve(self, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            reply = (True, self._handlers[method](*args))
        except ServingError as e:
            reply = (False, (e.code.name, e.message))
        except Exception as e:  # noqa: BLE001 -- a bug answers INTERNAL instead of a hang
            log.exception("%s: %s failed", self._name, method)
            reply = (False, (grpc.StatusCode.INTERNAL.name, f"{type(e).__name__}: {e}"))
        try:
            self._send(("reply", call_id, *reply))
        except (OSError, ValueError):
            pass  # the caller is gone; nobody waits for this answer
