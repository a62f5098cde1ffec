"""Model base paths on S3-compatible object storage: ``s3://bucket/prefix``.

A version is the prefix ``<base>/<n>/`` (``n`` as a version directory name); it is complete once
``<base>/<n>/saved_model.pb`` exists. Publishers upload that object last (TF Serving's sign that
a version is complete, which TFX's Pusher relies on) and delete it first when they withdraw a
version, so a listing never offers half a version.

TensorFlow cannot read ``s3://`` paths itself (its S3 filesystem left for tensorflow-io), so the
server loads from a local cache: ``VersionCache.fetch`` downloads a version into
``<cache>/<bucket>/<prefix>/<n>-<etag>`` under a hidden temporary name and renames it, so a
loader never sees a partly downloaded version, and a version rewritten in place (a new ETag of
``saved_model.pb``) is a new directory.

Endpoint, region and credentials come from the usual AWS environment variables
(``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), read by boto3, which is imported only when an ``s3://`` path is used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.model_format import SAVED_MODEL_FILE, version_of_dir

SCHEME = "s3://"


def is_s3(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str  # no leading or trailing "/"; "" for the bucket's root

    @classmethod
    def parse(cls, url: str) -> S3Url:
        bucket, _, prefix = url.removeprefix(SCHEME).partition("/")
        if not bucket:
            raise ValueError(f"{url}: no bucket (expected s3://bucket/prefix)")
        return cls(bucket, prefix.strip("/"))

    def child(self, name: str) -> S3Url:
        return S3Url(self.bucket, f"{self.prefix}/{name}" if self.prefix else name)

    def key(self, name: str) -> str:
        return self.child(name).prefix

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class RemoteVersion:
    version: int
    url: S3Url  # the version's prefix
    etag: str  # of its saved_model.pb: changes when the version is rewritten


_clients: dict[tuple[int, str | None, str | None], Any] = {}
_clients_lock = threading.Lock()


def client() -> Any:
    """One boto3 S3 client per process and endpoint (clients are thread-safe, and creating one
    costs tens of milliseconds); a changed ``AWS_ENDPOINT_URL`` gets a new one."""
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    with _clients_lock:
        if key not in _clients:
            import boto3

            _clients[key] = boto3.session.Session().client("s3")
        return _clients[key]


def version_prefixes(base: S3Url) -> list[tuple[int, S3Url]]:
    """Every version prefix under ``base`` (``<n>/``, ``n`` a version directory name), complete or
    not, in the store's order (by name). Errors propagate."""
    s3, found = client(), []
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=base.bucket, Prefix=base.key(""), Delimiter="/"
    )
    for page in pages:
        for common in page.get("CommonPrefixes", []):
            name = common["Prefix"].rstrip("/").rsplit("/", 1)[-1]
            if (version := version_of_dir(name)) is not None:
                found.append((version, base.child(name)))
    return found


def saved_model_etag(url: S3Url) -> str | None:
    """The ETag of the version prefix ``url``'s ``saved_model.pb``; None when there is none
    (still uploading, or being withdrawn)."""
    s3 = client()
    try:
        head = s3.head_object(Bucket=url.bucket, Key=url.key(SAVED_MODEL_FILE))
    except s3.exceptions.ClientError as error:
        if error.response["Error"]["Code"] in ("404", "NoSuchKey"):
            return None
        raise
    return head["ETag"].strip('"')


def list_versions(base: S3Url) -> dict[int, RemoteVersion]:
    """The complete versions under ``base``; of two complete names for one number (``1``,
    ``01``) the first by name. Errors (no bucket, no endpoint) propagate: a store that cannot be
    read is not a store without versions."""
    found: dict[int, RemoteVersion] = {}
    for version, url in version_prefixes(base):
        if version not in found and (etag := saved_model_etag(url)) is not None:
            found[version] = RemoteVersion(version, url, etag)
    return found


def download(url: S3Url, into: Path) -> None:
    """Every object under ``url``'s prefix into the directory ``into``, keeping relative paths."""
    s3 = client()
    root = url.key("")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=root):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(root) :]
            if not relative or relative.endswith("/"):
                continue
            target = into / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(url.bucket, obj["Key"], str(target))


class VersionCache:
    """Local copies of remote versions, each filled completely before it appears."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def temporary(cls) -> VersionCache:
        """A cache for this server's lifetime (under $TMPDIR)."""
        return cls(Path(tempfile.mkdtemp(prefix="serving-s3-cache-")))

    def path_of(self, remote: RemoteVersion) -> Path:
        name = f"{remote.url.prefix.rsplit('/', 1)[-1]}-{remote.etag}"
        return self.root / remote.url.bucket / remote.url.prefix.rpartition("/")[0] / name

    def fetch(self, remote: RemoteVersion) -> Path:
        target = self.path_of(remote)
        if target.is_dir():
            return target
        staging = target.with_name(f".download-{target.name}-{uuid.uuid4().hex}")
        try:
            download(remote.url, staging)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():
                    raise  # else another model with this base path fetched it meanwhile
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def keep_only(self, base: S3Url, kept: set[Path]) -> None:
        """Delete cached versions of ``base`` other than ``kept``: a loaded version no longer
        needs its files (the session holds its variables), and a withdrawn one must not pile up."""
        folder = self.root / base.bucket / base.prefix
        if not folder.is_dir():
            return
        for entry in folder.iterdir():
            if entry not in kept and not entry.name.startswith(".download-"):
                shutil.rmtree(entry, ignore_errors=True)


def upload_version(local: Path, url: S3Url) -> None:
    """Upload the SavedModel directory ``local`` as the version prefix ``url``, ``saved_model.pb``
    last: until it lands, listings skip the version."""
    s3 = client()
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.relative_to(local).as_posix() == SAVED_MODEL_FILE):
        s3.upload_file(str(path), url.bucket, url.key(path.relative_to(local).as_posix()))


def version_exists(url: S3Url) -> bool:
    """Whether the version prefix ``url`` holds any object (complete or not)."""
    listing = client().list_objects_v2(Bucket=url.bucket, Prefix=url.key(""), MaxKeys=1)
    return listing.get("KeyCount", 0) > 0


def create_if_absent(url: S3Url, name: str, body: bytes) -> bool:
    """Create the object ``<url>/<name>`` unless one exists: a conditional PUT (``If-None-Match:
    *``), which S3 applies atomically, so of two writers exactly one creates it. False when it
    existed (412), or when a concurrent conditional write of it was under way (409)."""
    s3 = client()
    try:
        s3.put_object(Bucket=url.bucket, Key=url.key(name), Body=body, IfNoneMatch="*")
    except s3.exceptions.ClientError as error:
        if error.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


def delete_version(url: S3Url, keep: frozenset[str] = frozenset()) -> None:
    """Delete a version, ``saved_model.pb`` first: from then on listings skip it. Objects named in
    ``keep`` (relative to the version's prefix) stay."""
    s3 = client()
    s3.delete_object(Bucket=url.bucket, Key=url.key(SAVED_MODEL_FILE))
    kept = {url.key(name) for name in keep}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=url.key("")):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", []) if obj["Key"] not in kept]
        if keys:
            s3.delete_objects(Bucket=url.bucket, Delete={"Objects": keys})
