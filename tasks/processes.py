"""Processes the tasks start (infra validation's sandbox server), shared with the tests' own.

``free_port()``: a TCP port free on 127.0.0.1 now. ``stop_group(process, grace_s)``: stops a
process started as the leader of its own session (``start_new_session=True``) and everything in
its process group: SIGTERM, then SIGKILL after ``grace_s`` (at once for the stragglers of a
leader that already exited). TensorFlow-free, so that importing it costs nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
