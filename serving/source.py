"""Storage path source: which versions of a model exist in its store, and which of them to serve.

Mirrors TF Serving's ``FileSystemStoragePathSource`` + its version policies (``latest{N}``, default
N=1; ``all{}``; ``specific{versions}``).
A version is a directory ``<base>/<n>`` whose name is a positive int64 in plain decimal digits
(``1``, ``00000001``). Anything else (files, hidden or temporary dirs such as ``.tmp-x``) is
ignored, as is a version directory without ``saved_model.pb``: pushers write elsewhere and rename,
but a dir without the graph can never load, so it is not aspired. A missing base path is simply
"no versions" so the server can start before the first push.

An ``s3://bucket/prefix`` base path is listed through ``serving.object_store``; the aspired
versions are downloaded into the server's local cache before they are reported, so the manager
and the workers only ever see local directories. A store that cannot be read (no endpoint, no
bucket, no credentials) keeps the last aspired versions: an outage of the object store must not
unload what serves.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from serving import object_store
from serving.model_format import SAVED_MODEL_FILE, version_of_dir

log = logging.getLogger("serving.source")


@dataclass(frozen=True)
class VersionDir:
    """One version on disk; ``fingerprint`` changes when the directory is replaced or rewritten
    (inode and mtime; for a cached remote version, the ETag of its ``saved_model.pb``)."""

    version: int
    path: str
    fingerprint: tuple[int | str, ...]


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


class StoragePathSource:
    """Polls one model's base path and reports the aspired versions (logging what changed)."""

    def __init__(
        self,
        model_name: str,
        base_path: str,
        policy: VersionPolicy = DEFAULT_POLICY,
        cache: object_store.VersionCache | None = None,  # for s3:// base paths
    ) -> None:
        self.model_name = model_name
        self.base_path = base_path
        self.policy = policy
        self.last_aspired: tuple[int, ...] = ()  # what the last poll reported, ascending
        self._polled = False
        self._cache = cache
        self._aspired: dict[int, VersionDir] = {}
        self.polling = threading.Lock()  # held by whoever calls poll(): one poll at a time

    def poll(self) -> dict[int, VersionDir]:
        """One poll of the store; returns the aspired versions."""
        if object_store.is_s3(self.base_path):
            aspired = self._poll_object_store()
        else:
            aspired = self.policy.select(list_versions(self.base_path))
        self._aspired = aspired
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

    def _poll_object_store(self) -> dict[int, VersionDir]:
        """The aspired remote versions, each downloaded into the cache (or the last poll's
        versions when the store cannot be read)."""
        assert self._cache is not None, "an s3:// source needs a cache"
        base = object_store.S3Url.parse(self.base_path)
        try:
            remote = object_store.list_versions(base)
            listed = {v: VersionDir(v, str(r.url), (r.etag,)) for v, r in remote.items()}
            aspired = {
                v: VersionDir(v, str(self._cache.fetch(remote[v])), (remote[v].etag,))
                for v in self.policy.select(listed)
            }
        except Exception as error:  # botocore's errors have no common base worth importing
            log.warning(
                "model %s: cannot read %s (%s: %s); keeping versions %s",
                self.model_name,
                self.base_path,
                error.__class__.__name__,
                error,
                sorted(self._aspired),
            )
            return self._aspired
        self._cache.keep_only(base, {Path(d.path) for d in aspired.values()})
        return aspired
