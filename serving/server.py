"""Wiring: model config -> filesystem sources -> manager -> data plane -> gRPC + REST front ends,
one asyncio loop.

The model list comes from ``--model_config_file`` or else ``--model_name``/``--model_base_path``; a
bad config file stops the server before anything loads (exit status 1, naming the file). Startup
order follows TF Serving: the first poll's versions are loaded before the ports open, so a client
that connects as soon as the port answers finds the model (an empty or missing base path simply
opens the ports with nothing loaded). Afterwards the sources are polled every
``--file_system_poll_wait_seconds``, the config file is re-read every
``--model_config_file_poll_wait_seconds``, and the manager's loader thread applies changes in the
background. SIGTERM/SIGINT stop accepting requests, let in-flight ones finish, then unload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Callable

from serving.errors import ServingError
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


async def _every(interval: float, action: Callable[[], None], stop: asyncio.Event) -> None:
    """Run the blocking ``action`` off the event loop every ``interval`` seconds until ``stop``."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        except asyncio.TimeoutError:
            pass
        await loop.run_in_executor(None, action)


async def serve(options: Options) -> None:
    """Run the server until SIGTERM/SIGINT."""
    from grpc_health.v1 import health

    # The model list first: a bad config file is reported before TensorFlow is even imported.
    from serving.model_config import (
        RELOAD_TIMEOUT_S,
        ConfigFileWatcher,
        ModelConfigController,
        model_configs,
        read_file,
        single_model,
    )

    watcher = None
    if options.model_config_file:
        file_config = read_file(options.model_config_file)
        configs = model_configs(file_config) or []
        log.info("model config file %s: %d model(s): %s", options.model_config_file, len(configs),
                 ", ".join(c.name for c in configs) or "none")
    else:
        configs = single_model(options.model_name, str(options.model_base_path))

    from serving import batching
    from serving.core import DataPlane
    from serving.grpc_frontend import start_grpc_server
    from serving.manager import Manager
    from serving.rest_frontend import start_rest_server
    from serving.servable import import_runtime, load_servable

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    interval = options.file_system_poll_wait_seconds
    if interval < 0:
        log.warning("--file_system_poll_wait_seconds < 0: the file system is never polled")
    await loop.run_in_executor(None, import_runtime)
    batcher = None
    load_fn = load_servable
    if options.batching is not None:
        batcher = batching.start(options.batching)
        load_fn = batching.batching_loader(options.batching, load_servable)
    manager = Manager(enable_warmup=options.enable_model_warmup, load_fn=load_fn)
    manager.start()
    controller = ModelConfigController(
        manager, options.allow_version_labels_for_unavailable_models, poll_filesystem=interval >= 0)
    data_plane = DataPlane(manager, options.num_threads, batcher)
    await loop.run_in_executor(None, controller.start, configs)
    if options.model_config_file and options.model_config_file_poll_wait_seconds > 0:
        watcher = ConfigFileWatcher(options.model_config_file, controller, file_config,
                                    RELOAD_TIMEOUT_S)

    health_servicer = None
    if options.enable_grpc_healthcheck_service:
        health_servicer = health.aio.HealthServicer()  # SERVING for "" from the start
    grpc_server = await start_grpc_server(data_plane, options.bind_address, options.port,
                                          models=controller, health_servicer=health_servicer)
    rest_runner = None
    if options.rest_api_port:
        rest_runner = await start_rest_server(data_plane, options.bind_address,
                                              options.rest_api_port, options.rest_api_timeout_in_ms,
                                              prometheus_path=options.prometheus_path)
    elif options.prometheus_path:
        log.warning("--monitoring_config_file: no metrics page without --rest_api_port")
    log.info("server ready (models: %s)", ", ".join(c.name for c in configs) or "none")

    pollers = []
    if interval > 0:
        pollers.append(asyncio.create_task(_every(interval, controller.poll_sources, stop)))
    if watcher is not None:
        pollers.append(asyncio.create_task(
            _every(options.model_config_file_poll_wait_seconds, watcher.poll, stop)))
    await stop.wait()
    log.info("shutting down")
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()  # NOT_SERVING while requests drain
    for poller in pollers:
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
    except ServingError as e:  # a refused model config (file or labels) at startup
        log.error("cannot start: %s", e.message)
        return 1
    return 0
