"""The supervisor: model config -> filesystem sources -> manager -> worker processes, each serving
gRPC + REST from its own asyncio loop (``serving.worker``).

The model list comes from ``--model_config_file`` or else ``--model_name``/``--model_base_path``; a
bad config file stops the server before anything loads (exit status 1, naming the file). Startup
order follows TF Serving: the first poll's versions are loaded before the ports open, so a client
that connects as soon as the port answers finds the model (an empty or missing base path simply
opens the ports with nothing loaded). Afterwards the sources are polled every
``--file_system_poll_wait_seconds``, the config file is re-read every
``--model_config_file_poll_wait_seconds``, and the manager's loader thread applies changes in the
background, loading each version into every worker. A worker process that dies is replaced by a
new one that serves every version before it takes connections (``serving.workers``); the
supervisor never stops for it. SIGTERM/SIGINT stop the workers (they stop accepting requests, let
in-flight ones finish, then unload) and then the supervisor; nothing is restarted from then on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, Callable

from serving.errors import ServingError
from serving.flags import IGNORED, Options
from serving.logs import setup_logging

if TYPE_CHECKING:
    from serving.model_config import ModelConfig, ModelServerConfig
    from serving.types import VersionStatus

log = logging.getLogger("serving.server")


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


class Supervisor:
    """The control plane of one server: model list, sources, manager, and the worker processes.

    It serves no request itself; the workers ask it, through their pipes, for what only it knows
    (``status``, ``reload``, ``metrics_page``: the handlers below).
    """

    def __init__(self, options: Options) -> None:
        from serving.manager import Manager
        from serving.model_config import ModelConfigController
        from serving.workers import Workers

        self.options = options
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.workers = Workers(
            options,
            {
                "status": self.status,
                "reload": self.reload,
                "metrics_page": lambda: self.workers.metrics_page(),
            },
        )
        self.manager = Manager(
            self.workers.load,
            options.enable_model_warmup,
            publish_labels=self.workers.set_labels,
            max_load_retries=options.max_num_load_retries,
            load_retry_interval_s=options.load_retry_interval_s,
            load_threads=options.num_load_threads,
        )
        self.controller = ModelConfigController(
            self.manager,
            options.allow_version_labels_for_unavailable_models,
            poll_filesystem=options.file_system_poll_wait_seconds >= 0,
        )

    def status(self, name: str, version: int | None, label: str | None) -> list[VersionStatus]:
        return self.manager.statuses(name, version, label)

    def reload(self, config: bytes, timeout_s: float) -> None:
        from serving.model_config import ModelServerConfig

        self.controller.reload(ModelServerConfig.FromString(config), timeout_s)


async def serve(options: Options) -> int:
    """Run the server until SIGTERM/SIGINT (0); a worker process that dies is replaced
    (``serving.workers``)."""
    # The model list first: a bad config file is reported before any worker starts.
    file_config, configs = _model_list(options)
    check_ports_free(options)

    supervisor = Supervisor(options)
    loop, stop = supervisor.loop, supervisor.stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if options.file_system_poll_wait_seconds < 0:
        log.warning("--file_system_poll_wait_seconds < 0: the file system is never polled")
    for flag, value in options.ignored_flags:
        log.warning("%s=%s ignored: %s", flag, value, IGNORED[flag.removeprefix("--")])
    try:
        if not await _start_unless_stopped(supervisor, configs):
            return 0
        _log_ready(options, configs)
        pollers = _start_pollers(supervisor, file_config)
        await stop.wait()
        log.info("shutting down")
        for poller in pollers:
            await poller
    finally:
        await loop.run_in_executor(None, supervisor.workers.stop)
        await loop.run_in_executor(None, supervisor.manager.stop)
        supervisor.controller.close()
        log.info("stopped")
    return 0


def _model_list(options: Options) -> tuple[ModelServerConfig | None, list[ModelConfig]]:
    """The models to serve, and the config file's content they came from (None: from flags)."""
    from serving.model_config import model_configs, read_file, single_model

    if not options.model_config_file:
        return None, single_model(options.model_name, str(options.model_base_path))
    file_config = read_file(options.model_config_file)
    configs = model_configs(file_config) or []
    log.info(
        "model config file %s: %d model(s): %s",
        options.model_config_file,
        len(configs),
        ", ".join(c.name for c in configs) or "none",
    )
    return file_config, configs


async def _start_unless_stopped(supervisor: Supervisor, configs: list[ModelConfig]) -> bool:
    """Start the server; False when a signal stopped it first.

    A signal during startup (TensorFlow imports, first loads) stops the server at once instead of
    after the loads it interrupts. A refused config or a worker that failed to start (or was lost
    during startup) is raised."""
    startup = asyncio.create_task(_start(supervisor, configs))
    stopped = asyncio.create_task(supervisor.stop.wait())
    await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not startup.done():
        log.info("stopped during startup")
        startup.cancel()
        return False
    startup.result()
    return True


def _log_ready(options: Options, configs: list[ModelConfig]) -> None:
    grpc_on = [f"{options.bind_address}:{options.port}"] if options.port else []
    if options.grpc_socket_path:
        grpc_on.append(f"unix:{options.grpc_socket_path}")
    log.info(
        "gRPC%s on %s, REST on %s, %d worker process(es)",
        " (TLS)" if options.ssl else "",
        " and ".join(grpc_on),
        options.rest_api_port or "none",
        options.num_workers,
    )
    if not options.rest_api_port and options.prometheus_path:
        log.warning("--monitoring_config_file: no metrics page without --rest_api_port")
    log.info("server ready (models: %s)", ", ".join(c.name for c in configs) or "none")


def _start_pollers(
    supervisor: Supervisor, file_config: ModelServerConfig | None
) -> list[asyncio.Task]:
    """What runs until the server stops: polls of the sources and re-reads of the config file."""
    from serving.model_config import ConfigFileWatcher
    from serving.types import RELOAD_TIMEOUT_S

    options, controller, stop = supervisor.options, supervisor.controller, supervisor.stop
    pollers = []
    interval = options.file_system_poll_wait_seconds
    if interval > 0:
        pollers.append(asyncio.create_task(_every(interval, controller.poll_sources, stop)))
    config_interval = options.model_config_file_poll_wait_seconds
    if options.model_config_file and config_interval > 0:
        watcher = ConfigFileWatcher(
            options.model_config_file, controller, file_config, RELOAD_TIMEOUT_S
        )
        pollers.append(asyncio.create_task(_every(config_interval, watcher.poll, stop)))
    return pollers


async def _start(supervisor: Supervisor, configs: list[ModelConfig]) -> None:
    """Workers up, the first versions loaded in all of them, then the ports open (TF Serving's
    order: a client that connects as soon as the port answers finds the model)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, supervisor.workers.start)
    supervisor.manager.start()
    await loop.run_in_executor(None, supervisor.controller.start, configs)
    await loop.run_in_executor(None, supervisor.workers.open_ports)


def check_ports_free(options: Options) -> None:
    """Fail at once when another program listens on our ports.

    The workers bind with ``SO_REUSEPORT``, which would silently share a port with another
    server that set it too; this probe binds without it (``SO_REUSEADDR`` only, so connections
    of a previous run in TIME_WAIT do not count)."""
    ports = [
        (what, port)
        for what, port in (("gRPC", options.port), ("REST", options.rest_api_port))
        if port
    ]
    family = socket.AF_INET6 if ":" in options.bind_address else socket.AF_INET
    for what, port in ports:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((options.bind_address, port))
            except OSError as e:
                raise OSError(
                    f"cannot bind {what} server to {options.bind_address}:{port}: {e.strerror}"
                ) from None


def run(options: Options) -> int:
    """Entry point used by ``python -m serving``; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a user's explicit setting wins
    setup_logging()
    try:
        return asyncio.run(serve(options))
    except OSError as e:
        log.error("%s", e)
        return 1
    except ServingError as e:  # a refused model config (file or labels), a worker that failed
        log.error("cannot start: %s", e.message)
        return 1
