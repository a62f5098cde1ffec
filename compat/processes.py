"""Process groups: everything a command starts, found again and stopped by the group's id.

Each upstream program runs in a session of its own, so the servers it starts, their worker
processes, and anything left behind by a server killed without its children are all in one
group, and ``stop_group`` ends exactly them (TF Serving's test base only kills its servers at
interpreter exit, with SIGKILL, which leaves our servers' workers behind).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

GRACE_S = 20.0  # for a SIGTERM'd server to stop its workers before the group is killed


def start_group(
    argv: Sequence[str | Path], log: Path, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen:
    """``argv`` as the leader of a new session and process group, stdout and stderr appended
    to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(arg) for arg in argv],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(leader: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM every process of ``leader``'s group, SIGKILL what is left after ``grace_s``, and
    return once the group is empty."""
    group = leader.pid  # a session leader's process group id is its pid
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(leader, group) and time.monotonic() < deadline:
        time.sleep(0.2)
    while _group_alive(leader, group):
        _signal_group(group, signal.SIGKILL)
        time.sleep(0.2)


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


def _group_alive(leader: subprocess.Popen, group: int) -> bool:
    leader.poll()  # reap the leader: a zombie still counts as a member
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
