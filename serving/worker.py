"""One worker process: the gRPC and REST ports, served from this process's own copy of each model.

All workers listen on the same ports (``SO_REUSEPORT``: the kernel spreads connections across
them), so the server uses every core although each Python process runs on one (the GIL). A worker
decides nothing about versions; the supervisor (``serving.server``) calls it through a pipe
(``serving.ipc``):

``load``   load and warm up a version, not routed yet;
``route``  route requests to a loaded version (sent once *every* worker has loaded it);
``unload`` take a version out of routing, let its requests finish, close it;
``labels`` a model's version labels;
``open``   bind the ports (after the first loads, as TF Serving opens them): gRPC on the TCP port
         and, in worker 0 only, on ``--grpc_socket_path`` (a Unix socket has one listener:
         binding it again would take it from the worker that has it);
``metrics`` this process's metric values, summed by the supervisor for a scrape;
``stop``   stop accepting requests, let those in flight finish, unload, exit.

``ping`` answers once the worker is up, or with the reason it cannot serve (a session config that
does not parse), which stops the server at startup.

Requests that only the supervisor can answer -- model status, config reload, the metrics page --
go the other way through ``SupervisorLink``. SIGINT and SIGTERM are ignored: Ctrl-C and a stop of
the process group reach every process, and the supervisor leads the shutdown (a worker that
stopped on its own would look like a crash to it). A worker whose supervisor is gone stops.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

import grpc

from serving.errors import ServingError
from serving.flags import Options
from serving.ipc import Channel
from serving.logs import setup_logging
from serving.routing import RoutingTable, close_servable
from serving.servable import LoadServable, Servable
from serving.types import VersionStatus

# Loads and unloads run at this niceness (see ``_yield_cpu_to_serving``).
LOAD_NICENESS = 10

log = logging.getLogger("serving.worker")

GRACE_S = 5.0  # how long requests in flight may take to finish at shutdown


class SupervisorLink:
    """The worker's view of the supervisor: ``serving.core.ControlPlane`` over the pipe."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def statuses(
        self, model_name: str, version: int | None, label: str | None
    ) -> list[VersionStatus]:
        return await self._channel.call_async("status", model_name, version, label)

    async def reload(self, config: Any, timeout_s: float) -> None:
        await self._channel.call_async("reload", config.SerializeToString(), timeout_s)

    async def metrics_page(self) -> str:
        return await self._channel.call_async("metrics_page")


class Worker:
    def __init__(self, connection: Connection, options: Options, index: int) -> None:
        self.options = options
        self.index = index
        self.routing = RoutingTable()
        self.loaded: dict[tuple[str, int], Servable] = {}  # loaded, not routed yet
        self.startup_error: ServingError | None = None
        self.channel = Channel(
            connection,
            {
                "ping": self.ping,
                "load": self.load,
                "route": self.route,
                "unload": self.unload,
                "labels": self.routing.set_labels,
                "open": self.open_ports,
                "metrics": self.metric_values,
                "stop": self.request_stop,
            },
            name=f"worker {index}",
            on_close=self.request_stop,
        )

    async def run(self) -> None:
        from serving import batching
        from serving.core import DataPlane
        from serving.tf_runtime import import_tensorflow_for_serving

        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        await self.loop.run_in_executor(None, import_tensorflow_for_serving)
        batcher = None
        self.load_fn = self._load_function()
        if self.options.batching is not None:
            batcher = batching.start(self.options.batching)
            self.load_fn = batching.batching_loader(self.options.batching, self.load_fn)
        self.data_plane = DataPlane(
            self.routing, SupervisorLink(self.channel), self.options.num_threads, batcher
        )
        self.grpc_server: grpc.aio.Server | None = None
        self.rest_runner = None
        self.health = None
        self.profiler = None
        self.channel.start()
        await self.stopping.wait()
        await self._shutdown()

    def _load_function(self) -> LoadServable:
        """``load_servable`` with this server's load settings; their session config is parsed
        now, so that a bad one is the answer to the supervisor's first ping."""
        from serving.servable import LoadSettings, load_servable
        from serving.tf_runtime import session_config

        options = self.options
        try:
            session_config(options.session)
        except ValueError as e:
            self.startup_error = ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        settings = LoadSettings(
            options.saved_model_tags,
            options.session,
            options.num_request_iterations_for_warmup,
            options.enable_signature_method_name_check,
        )
        return functools.partial(load_servable, settings=settings)

    # -- calls from the supervisor (on the channel's threads) ----------------------------------

    def ping(self) -> None:
        if self.startup_error is not None:
            raise self.startup_error

    def load(self, name: str, version: int, path: str, warmup: bool) -> None:
        _yield_cpu_to_serving()
        try:
            servable = self.load_fn(name, version, path, warmup)
        except ServingError:
            raise
        except Exception as e:  # noqa: BLE001 -- reported as the version's error, as TF Serving
            raise ServingError(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}".strip()) from e
        self.loaded[(name, version)] = servable

    def route(self, name: str, version: int) -> None:
        self.routing.add(name, self.loaded.pop((name, version)))

    def unload(self, name: str, version: int) -> None:
        _yield_cpu_to_serving()
        servable = self.loaded.pop((name, version), None)
        if servable is not None:
            close_servable(servable)
        else:
            self.routing.remove(name, version)

    def metric_values(self) -> Any:
        from serving import metrics

        return metrics.REGISTRY.snapshot()

    def open_ports(self) -> None:
        asyncio.run_coroutine_threadsafe(self._open_ports(), self.loop).result()

    def request_stop(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.stopping.set)
        except RuntimeError:  # the loop has finished: the pipe closed after the shutdown
            pass

    # -- on the event loop ---------------------------------------------------------------------

    async def _open_ports(self) -> None:
        from grpc_health.v1 import health

        from serving.grpc_frontend import start_grpc_server
        from serving.profiler import ProfilerForwarder
        from serving.rest_frontend import start_rest_server
        from serving.transport import server_credentials

        options = self.options
        if options.enable_grpc_healthcheck_service:
            self.health = health.aio.HealthServicer()  # SERVING for "" from the start
        if options.enable_profiler:
            self.profiler = ProfilerForwarder()
        targets = self._grpc_targets()
        if targets:  # none in workers > 0 with --port=0 and a Unix socket
            self.grpc_server = await start_grpc_server(
                self.data_plane,
                targets,
                credentials=server_credentials(options.ssl) if options.ssl else None,
                channel_arguments=options.grpc_channel_arguments,
                health_servicer=self.health,
                handlers=[self.profiler.handler()] if self.profiler else [],
                tensor_content=options.enable_serialization_as_tensor_content,
            )
        if options.rest_api_port:
            self.rest_runner = await start_rest_server(
                self.data_plane,
                options.bind_address,
                options.rest_api_port,
                options.rest_api_timeout_in_ms,
                prometheus_path=options.prometheus_path,
                cors=options.rest_api_enable_cors_support,
            )

    def _grpc_targets(self) -> list[str]:
        """The TCP port (every worker) and the Unix socket (worker 0: see the module's doc)."""
        address, port = self.options.bind_address, self.options.port
        targets = [f"[{address}]:{port}" if ":" in address else f"{address}:{port}"] if port else []
        if self.options.grpc_socket_path and self.index == 0:
            targets.append(f"unix:{self.options.grpc_socket_path}")
        return targets

    async def _shutdown(self) -> None:
        log.info("worker %d: shutting down", self.index)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()  # NOT_SERVING while requests drain
        if self.rest_runner is not None:
            await self.rest_runner.cleanup()
        if self.grpc_server is not None:
            await self.grpc_server.stop(GRACE_S)
        if self.profiler is not None:
            await self.profiler.close()
        await self.loop.run_in_executor(None, self.routing.remove_all, GRACE_S)
        for servable in self.loaded.values():
            close_servable(servable)
        self.data_plane.close()
        self.channel.close()


def _yield_cpu_to_serving() -> None:
    """Lower the calling thread's CPU priority (nice 10, Linux: per thread), so that a version
    loading or unloading takes what CPU the serving threads leave over."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)


def main(connection: Connection, options: Options, index: int) -> None:
    """The worker process's entry point (``multiprocessing`` target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging()
    asyncio.run(Worker(connection, options, index).run())
