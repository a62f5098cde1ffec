"""Fixtures shared by the test modules; the helpers they build on are in ``tests/servers.py``,
``tests/processes.py``, ``tests/prefect_stack.py``, ``tests/saved_models.py`` and
``tests/prometheus.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., "Server"]]:  # noqa: F821
    """Starts our model server for this test: ``start_server(base_path, model_name=..., extra=
    [...], server_class=Server)`` returns a ``tests.servers.Server`` once it accepts gRPC calls
    (its log in the test's ``tmp_path``); every server it started is stopped when the test ends,
    whatever the test did with it."""
    from tests.servers import Server

    started: list[Server] = []

    def start(base_path: Path, *, server_class: type[Server] = Server, **kwargs) -> Server:
        log_path = tmp_path / f"server-{len(started)}.log"
        server = server_class(base_path, log_path, **kwargs)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
