"""Hidden working directories beside the versions of a store, and the cleanup of those a killed run
left behind.

Export writes a version under ``.tmp@<owner>``, publish copies one under ``.push-<v>@<owner>``,
``discard`` renames one away to ``.rollback-<v>@<owner>`` before deleting it (the model server and
``next_version`` ignore every hidden name). ``<owner>`` is ``<host>:<pid>:<random>``: the process
that works in it. A process killed with -9 leaves its directory; the next export or publish into
the same directory calls ``sweep``, which removes a leftover when

* its owner is a process of this host that no longer exists, or
* nothing in it changed for ``STALE_AFTER_S`` (another host's, a live pid that may have been
  reused, or a name from before owners were recorded),

so a directory a concurrent run is still writing is never deleted. Hosts that share a store must
have distinct host names (two containers with one name and their own pid spaces would not).

``disk_full`` tells a full disk (or a file size limit) from other write errors: TensorFlow's file
errors carry only the C library's text, not the errno. TensorFlow-free.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

from tasks.logs import logger

EXPORT, PUBLISH, WITHDRAW = "tmp", "push", "rollback"
STALE_AFTER_S = 3600.0
_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_FULL_TEXTS = tuple(os.strerror(number) for number in _FULL_ERRNOS)
_OWNED = re.compile(r"\.(tmp|push|rollback)(-\d+)?@(?P<host>[^:]+):(?P<pid>\d+):[0-9a-f]+")
_LEFTOVER = re.compile(r"\.(tmp|push|rollback)[-@]")


def staging_path(directory: Path, kind: str, version: int | str | None = None) -> Path:
    """A fresh hidden name in ``directory`` for this process to work in."""
    label = "" if version is None else f"-{version}"
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    return directory / f".{kind}{label}@{owner}"


def discard(path: Path, version: int | str | None = None) -> None:
    """Remove the directory ``path`` if it exists: renamed away to a hidden name first, so that
    no reader sees a half-deleted version, and a kill mid-delete leaves a leftover ``sweep``
    removes."""
    if path.exists():
        trash = staging_path(path.parent, WITHDRAW, version)
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def _owner_is_gone(name: str) -> bool:
    match = _OWNED.fullmatch(name)
    if match is None or match["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _last_change(path: Path) -> float:
    """The newest mtime in the tree (a copy in progress touches files deep inside it)."""
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def sweep(directory: Path, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the working directories killed runs left in ``directory``; returns their names."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not _LEFTOVER.match(entry.name):
            continue
        try:
            abandoned = _owner_is_gone(entry.name) or (
                time.time() - _last_change(entry) > stale_after_s
            )
        except FileNotFoundError:  # its owner finished meanwhile
            continue
        if abandoned:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        logger().warning("removed what killed runs left in %s: %s", directory, ", ".join(removed))
    return removed


def disk_full(error: BaseException) -> bool:
    """A write failed for want of space: ENOSPC, EDQUOT, or EFBIG (RLIMIT_FSIZE, a file system's
    largest file)."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    return any(text in str(error) for text in _FULL_TEXTS)


class DiskFull(RuntimeError):
    """Writing a version into ``path`` ran out of space; nothing was published. Not an OSError, so
    that ``shutil.copytree`` lets it through at once instead of collecting it."""

    def __init__(self, path: Path, error: BaseException):
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        super().__init__(f"disk full writing {path}: {detail}; nothing published there")
        self.path = path
