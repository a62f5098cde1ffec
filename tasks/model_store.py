"""A serving model store: ``<base_path>/<model>/<version>/``, a directory or ``s3://bucket/prefix``.

What push, rollback and export need of a store, whichever it is: which versions it holds, and
publishing or withdrawing one so that a polling server never sees half of it.
- A directory: publish copies under a hidden name and renames; withdraw renames away, then
  deletes.
- S3 (``serving.object_store``): publish uploads ``saved_model.pb`` last; withdraw deletes it
  first. Servers list only versions that have it.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from serving import object_store
from serving.model_format import SAVED_MODEL_FILE, version_of_dir
from serving.object_store import S3Url


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

    def publish(self, export_dir: Path, version: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / str(version)
        if target.exists():
            raise VersionExists(f"{target} already exists: version {version} was pushed before")
        staging = self.root / f".push-{version}-{uuid.uuid4().hex}"
        try:
            shutil.copytree(export_dir, staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def withdraw(self, version: int) -> None:
        target = self.root / str(version)
        if target.exists():
            trash = target.with_name(f".rollback-{target.name}-{uuid.uuid4().hex}")
            target.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)


class S3Store:
    def __init__(self, base_path: str, model_name: str) -> None:
        self.root = S3Url.parse(base_path).child(model_name)

    def __str__(self) -> str:
        return str(self.root)

    def versions(self) -> set[int]:
        """Every version prefix the store holds, complete or not."""
        s3, found = object_store.client(), set()
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.root.bucket, Prefix=self.root.key(""), Delimiter="/"
        )
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                version = version_of_dir(common["Prefix"].rstrip("/").rsplit("/", 1)[-1])
                if version is not None:
                    found.add(version)
        return found

    def has_complete(self, version: int) -> bool:
        return version in object_store.list_versions(self.root)

    def publish(self, export_dir: Path, version: int) -> None:
        target = self.root.child(str(version))
        if object_store.version_exists(target):
            raise VersionExists(f"{target} already exists: version {version} was pushed before")
        try:
            object_store.upload_version(export_dir, target)
        except BaseException:
            object_store.delete_version(target)  # never complete: servers skipped it anyway
            raise

    def withdraw(self, version: int) -> None:
        object_store.delete_version(self.root.child(str(version)))


ModelStore = LocalStore | S3Store


def model_store(base_path: str | Path, model_name: str) -> ModelStore:
    if object_store.is_s3(base_path):
        return S3Store(str(base_path), model_name)
    return LocalStore(base_path, model_name)
