"""Filesystem source: which versions of a model exist on disk, and which of them to serve.

Mirrors TF Serving's ``FileSystemStoragePathSource`` + its version policies (``latest{N}``, default
N=1; ``all{}``; ``specific{versions}``).
A version is a directory ``<base>/<n>`` whose name is a positive int64 in plain decimal digits
(``1``, ``00000001``). Anything else (files, hidden or temporary dirs such as ``.tmp-x``) is
ignored, as is a version directory without ``saved_model.pb``: pushers write elsewhere and rename,
but a dir without the graph can never load, so it is not aspired. A missing base path is simply
"no versions" so the server can start before the first push.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from serving.model_format import SAVED_MODEL_FILE, version_of_dir

log = logging.getLogger("serving.source")


@dataclass(frozen=True)
class VersionDir:
    """One version on disk; ``fingerprint`` changes when the directory is replaced or rewritten."""

    version: int
    path: str
    fingerprint: tuple[int, int]


def list_versions(base_path: str | os.PathLike[str]) -> dict[int, VersionDir]:
    """All complete versions under ``base_path`` (empty when it is missing or unreadable)."""
    found: dict[int, VersionDir] = {}
    try:
        entries = list(os.scandir(base_path))
    except FileNotFoundError:
        return found
    except OSError as e:
        log.warning("cannot list model base path %s: %s", base_path, e)
        return found
    for entry in entries:
        version = version_of_dir(entry.name)
        if version is None:
            continue
        try:
            if not entry.is_dir():
                continue
            st = entry.stat()
            if not (Path(entry.path) / SAVED_MODEL_FILE).is_file():
                continue
        except OSError:
            continue  # vanished while we looked
        if version in found:
            # "1" and "001" both exist: keep the lexically-smallest path so the choice is stable.
            if found[version].path <= entry.path:
                continue
        found[version] = VersionDir(version, entry.path, (st.st_ino, st.st_mtime_ns))
    return found


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's ``ServableVersionPolicy``: which of the versions on disk are aspired."""

    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1  # latest{N}
    versions: frozenset[int] = frozenset()  # specific{versions}

    def select(self, on_disk: dict[int, VersionDir]) -> dict[int, VersionDir]:
        if self.kind == "all":
            return dict(on_disk)
        if self.kind == "specific":
            return {v: d for v, d in on_disk.items() if v in self.versions}
        # latest{N}, TF Serving's default (N=1): the N highest versions on disk.
        return {v: on_disk[v] for v in sorted(on_disk, reverse=True)[: self.num_versions]}

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest{{{self.num_versions}}}"
        if self.kind == "all":
            return "all{}"
        return "specific{" + ",".join(str(v) for v in sorted(self.versions)) + "}"


# latest{1}: TF Serving's policy for a model that names none.
DEFAULT_POLICY = VersionPolicy()


class FileSystemSource:
    """Polls one model's base path and reports the aspired versions (logging what changed)."""

    def __init__(
        self, model_name: str, base_path: str, policy: VersionPolicy = DEFAULT_POLICY
    ) -> None:
        self.model_name = model_name
        self.base_path = base_path
        self.policy = policy
        self.last_aspired: tuple[int, ...] = ()  # what the last poll reported, ascending
        self._polled = False

    def poll(self) -> dict[int, VersionDir]:
        """One poll of the filesystem; returns the aspired versions."""
        aspired = self.policy.select(list_versions(self.base_path))
        key = tuple(sorted(aspired))
        if key != self.last_aspired or not self._polled:
            if aspired:
                log.info(
                    "model %s: aspired versions %s under %s (policy %s)",
                    self.model_name,
                    list(key),
                    self.base_path,
                    self.policy,
                )
            else:
                log.warning(
                    "model %s: no versions for policy %s under base path %s",
                    self.model_name,
                    self.policy,
                    self.base_path,
                )
            if self.policy.kind == "specific" and len(aspired) < len(self.policy.versions):
                # A pinned version that is not on disk is most likely a typo in the config.
                log.warning(
                    "model %s: version(s) %s of policy %s not found under %s",
                    self.model_name,
                    sorted(self.policy.versions - set(aspired)),
                    self.policy,
                    self.base_path,
                )
            self.last_aspired, self._polled = key, True
        return aspired
