"""Wiring: filesystem source -> manager -> data plane -> gRPC + REST front ends, one asyncio loop.

Startup order follows TF Serving: the first poll's versions are loaded before the ports open, so a
client that connects as soon as the port answers finds the model (an empty or missing base path
simply opens the ports with nothing loaded). Afterwards the source is polled every
``--file_system_poll_wait_seconds`` and the manager's loader thread applies changes in the
background. SIGTERM/SIGINT stop accepting requests, let in-flight ones finish, then unload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from serving.flags import Options

log = logging.getLogger("serving.server")

GRACE_S = 5.0


def setup_logging() -> None:
    """Readable, timestamped logs on stderr (loads, warmups, unloads, failures)."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )


async def _poll(source, manager, interval: float, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        except asyncio.TimeoutError:
            pass
        aspired = await loop.run_in_executor(None, source.poll)
        manager.set_aspired_versions(source.model_name, aspired)


async def serve(options: Options) -> None:
    """Run the server until SIGTERM/SIGINT."""
    from serving.core import DataPlane
    from serving.grpc_frontend import start_grpc_server
    from serving.manager import Manager
    from serving.rest_frontend import start_rest_server
    from serving.source import FileSystemSource

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    manager = Manager(enable_warmup=options.enable_model_warmup)
    manager.add_model(options.model_name)
    manager.start()
    source = FileSystemSource(options.model_name, str(options.model_base_path))
    data_plane = DataPlane(manager, options.num_threads)

    interval = options.file_system_poll_wait_seconds
    if interval >= 0:
        aspired = await loop.run_in_executor(None, source.poll)
        manager.set_aspired_versions(options.model_name, aspired)
        await loop.run_in_executor(None, manager.wait_until_idle)
    else:
        log.warning("--file_system_poll_wait_seconds < 0: the file system is never polled")

    grpc_server = await start_grpc_server(data_plane, options.bind_address, options.port)
    rest_runner = None
    if options.rest_api_port:
        rest_runner = await start_rest_server(data_plane, options.bind_address,
                                              options.rest_api_port, options.rest_api_timeout_in_ms)
    log.info("server ready (model %s, base path %s)", options.model_name, options.model_base_path)

    poller = asyncio.create_task(_poll(source, manager, interval, stop)) if interval > 0 else None
    await stop.wait()
    log.info("shutting down")
    if poller is not None:
        await poller
    if rest_runner is not None:
        await rest_runner.cleanup()
    await grpc_server.stop(GRACE_S)
    await loop.run_in_executor(None, manager.stop)
    data_plane.close()
    log.info("stopped")


def run(options: Options) -> int:
    """Entry point used by ``python -m serving``; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a user's explicit setting wins
    setup_logging()
    try:
        asyncio.run(serve(options))
    except OSError as e:
        log.error("%s", e)
        return 1
    return 0
