"""TensorFlow's ``ProfilerService`` on the gRPC port (``--enable_profiler``, default true, as TF
Serving registers it on its gRPC server): ``profiler_client.trace(<grpc address>, logdir, ...)``
captures a trace of the worker process that answers, written under ``logdir`` as TensorBoard's
profile plugin reads it.

TensorFlow ships its profiler service only as a C++ gRPC server of its own
(``_pywrap_profiler.start_server``), no servicer to add to ours, and its Python wheel has no
message classes for the service. So calls to ``/tensorflow.ProfilerService/*`` are forwarded, as
bytes, to that server, started in this process on the first call: that server listens on every
interface of its own port (TensorFlow's choice, which it does not let us change), so it is not
opened unless someone profiles. Its methods (Profile, Terminate, Monitor) are unary.

A trace covers the one worker process the client's connection reached, which may have served no
request meanwhile (the kernel spreads connections over the workers): so that its trace is not
empty, which the client would take for a failure and retry, the worker records one event of its
own, ``serving worker <pid> profiled``, once the profiling session has started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Awaitable, Callable

import grpc

from serving.errors import ServingError

log = logging.getLogger("serving.profiler")

SERVICE = "tensorflow.ProfilerService"
METHODS = ("Profile", "Terminate", "Monitor")
START_TIMEOUT_S = 10.0
_MARK_POLL_S = 0.02
# A trace carries the whole XSpace when the client asks for it back rather than on disk.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class ProfilerForwarder:
    """The profiler service's methods, forwarded to TensorFlow's server; ``handler()`` is what
    the gRPC server registers."""

    def __init__(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._starting = asyncio.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        """A handler of the service's methods by name, like the generated services' (a
        catch-all handler would be asked about every RPC the others do not take first)."""
        return grpc.method_handlers_generic_handler(
            SERVICE, {m: grpc.unary_unary_rpc_method_handler(self._forward(m)) for m in METHODS}
        )

    def _forward(self, name: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        method = f"/{SERVICE}/{name}"

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            marker = asyncio.create_task(_mark_profiled()) if name == "Profile" else None
            try:
                channel = await self._profiler_channel()
                return await channel.unary_unary(method)(request, timeout=context.time_remaining())
            except ServingError as e:
                await context.abort(e.code, e.message)
            except grpc.aio.AioRpcError as e:  # TensorFlow's server's own status, passed on
                await context.abort(e.code(), e.details() or "")
            finally:
                if marker is not None:
                    marker.cancel()

        return forward

    async def _profiler_channel(self) -> grpc.aio.Channel:
        async with self._starting:
            if self._channel is None:
                self._channel = await _start_profiler_server()
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


async def _mark_profiled() -> None:
    """Record this worker's event as soon as a profiling session records events."""
    from tensorflow.python.profiler.internal import _pywrap_traceme

    while not _pywrap_traceme.traceme_enabled():
        await asyncio.sleep(_MARK_POLL_S)
    _pywrap_traceme.TraceMe(f"serving worker {os.getpid()} profiled").Stop()


async def _start_profiler_server() -> grpc.aio.Channel:
    """TensorFlow's profiler server on a free port of this process, and a channel to it."""
    from tensorflow.python.profiler.internal import _pywrap_profiler

    port = _free_port()
    await asyncio.get_running_loop().run_in_executor(None, _pywrap_profiler.start_server, port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_CHANNEL_OPTIONS)
    try:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT_S)
    except asyncio.TimeoutError:
        await channel.close()
        raise ServingError(
            grpc.StatusCode.UNAVAILABLE,
            f"TensorFlow's profiler server did not start on port {port}",
        ) from None
    log.info("profiler: TensorFlow's profiler server started on port %d", port)
    return channel


def _free_port() -> int:
    """A port free on every interface (TensorFlow's server binds all of them)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
