"""A serving model store: ``<base_path>/<model>/<version>/``, a directory or ``s3://bucket/prefix``.

What push, rollback and export need of a store, whichever it is: which versions it holds, and
publishing or withdrawing one so that a polling server never sees half of it.
- A directory: publish copies under a hidden name and renames; withdraw renames away, then
  deletes (``tasks.staging`` names those working directories after their owner, and publish
  sweeps away what killed runs left). A full disk is ``DiskFull``, with nothing published.
- S3 (``serving.object_store``): publish uploads ``saved_model.pb`` last; withdraw deletes it
  first. Servers list only versions that have it.

Export claims its version number in the store: in a directory by renaming the finished version
into place; on S3 by creating ``<n>/.claim`` with a conditional PUT (``S3Store.claim``), then
uploading (``S3Store.upload``). A claimed number is never given again, even when its upload
failed; a claim alone is not a version to a server (no ``saved_model.pb``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
from pathlib import Path

from serving import object_store
from serving.model_format import SAVED_MODEL_FILE, version_of_dir
from serving.object_store import S3Url
from tasks.staging import PUBLISH, DiskFull, discard, disk_full, staging_path, sweep

ROLLOUT_LOCK = ".rollout.lock"
CLAIM = ".claim"  # <n>/.claim: export's claim of version n in an S3 store


class VersionExists(RuntimeError):
    """The store already holds the version: it was pushed before."""


class LocalStore:
    def __init__(self, base_path: str | Path, model_name: str) -> None:
        self.root = Path(base_path) / model_name

    def __str__(self) -> str:
        return str(self.root)

    def versions(self) -> set[int]:
        """Every version the store holds, complete or not (one being written counts)."""
        if not self.root.is_dir():
            return set()
        return {
            version
            for entry in self.root.iterdir()
            if (version := version_of_dir(entry.name)) is not None and entry.is_dir()
        }

    def has_complete(self, version: int) -> bool:
        return (self.root / str(version) / SAVED_MODEL_FILE).is_file()

    def lock_path(self) -> Path:
        return self.root / ROLLOUT_LOCK

    def local_dir(self) -> Path:
        """Where an export writes (the rename into place must stay within one file system)."""
        return self.root

    def publish(self, export_dir: Path, version: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        sweep(self.root)
        target = self.root / str(version)
        if target.exists():
            raise VersionExists(f"{target} already exists: version {version} was pushed before")
        staging = staging_path(self.root, PUBLISH, version)
        try:
            shutil.copytree(export_dir, staging, copy_function=_copy_or_disk_full)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # only there when the copy or rename failed

    def withdraw(self, version: int) -> None:
        discard(self.root / str(version), version)


def _copy_or_disk_full(source: str, destination: str) -> None:
    try:
        shutil.copy2(source, destination)
    except OSError as error:
        if disk_full(error):
            raise DiskFull(Path(destination).parent, error) from error
        raise


class S3Store:
    def __init__(self, base_path: str, model_name: str) -> None:
        self.root = S3Url.parse(base_path).child(model_name)

    def __str__(self) -> str:
        return str(self.root)

    def versions(self) -> set[int]:
        """Every version prefix the store holds, complete or not (a claimed one counts)."""
        return {version for version, _ in object_store.version_prefixes(self.root)}

    def has_complete(self, version: int) -> bool:
        """Whether ``<n>/saved_model.pb`` is there (the name push writes): one HEAD request."""
        return object_store.saved_model_etag(self.root.child(str(version))) is not None

    def lock_path(self) -> Path:
        """A bucket has no lock of its own: rollouts from this host take turns on a local file."""
        name = urllib.parse.quote(str(self.root), safe="")
        return _on_this_host("rollout-locks") / f"{name}.lock"

    def local_dir(self) -> Path:
        """Where an export into this store writes, and keeps, its local copies: under this host's
        temporary directory, apart per endpoint (two S3 services may have the same bucket)."""
        endpoint = urllib.parse.urlsplit(object_store.client().meta.endpoint_url).netloc
        return _on_this_host("exports") / endpoint / self.root.bucket / self.root.prefix

    def claim(self, version: int) -> bool:
        """Take version number ``version`` for an export, atomically; False when it was taken.
        The claim says who took it (host, pid, time), for whoever finds one never completed."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "time": when}
        url = self.root.child(str(version))
        return object_store.create_if_absent(url, CLAIM, json.dumps(owner).encode())

    def upload(self, export_dir: Path, version: int) -> None:
        """Upload the SavedModel ``export_dir`` as ``version``; on failure delete what was
        uploaded (a claim stays: the number is not given again)."""
        target = self.root.child(str(version))
        try:
            object_store.upload_version(export_dir, target)
        except BaseException:
            # never complete: servers skipped it anyway
            object_store.delete_version(target, keep=frozenset({CLAIM}))
            raise

    def publish(self, export_dir: Path, version: int) -> None:
        target = self.root.child(str(version))
        if object_store.version_exists(target):
            raise VersionExists(f"{target} already exists: version {version} was pushed before")
        self.upload(export_dir, version)

    def withdraw(self, version: int) -> None:
        object_store.delete_version(self.root.child(str(version)))


def _on_this_host(kind: str) -> Path:
    """Where an S3 store keeps what it needs on this host's disk: its temporary directory."""
    return Path(tempfile.gettempdir()) / f"train-and-serve-{kind}"


ModelStore = LocalStore | S3Store


def model_store(base_path: str | Path, model_name: str) -> ModelStore:
    if object_store.is_s3(base_path):
        return S3Store(str(base_path), model_name)
    return LocalStore(base_path, model_name)
