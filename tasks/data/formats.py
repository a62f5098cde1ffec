"""Reading a labeled batch from disk, in the formats ``python -m tasks.data add`` accepts.

- a ``.npz`` file with arrays ``images`` (``[N, 28, 28]`` or ``[N, 784]``) and ``labels`` (``[N]``);
- a directory holding one IDX pair as MNIST ships it: ``*images-idx3-ubyte`` and
  ``*labels-idx1-ubyte``, each optionally gzipped (``.gz``).

``read_batch`` returns the arrays exactly as stored (any dtype, any shape): judging them is
``validation``'s job. A file that cannot be read at all raises ``UnreadableBatch`` naming the
anomaly (``empty_file``, ``corrupt_file``, ``truncated_file``, ``missing_array``).
"""

from __future__ import annotations

import gzip
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# IDX element types (the third byte of the magic number) and their big-endian NumPy dtypes.
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"


class UnreadableBatch(ValueError):
    """The batch's files cannot be read as arrays; ``anomaly`` names why."""

    def __init__(self, anomaly: str, detail: str) -> None:
        super().__init__(f"{anomaly}: {detail}")
        self.anomaly = anomaly
        self.detail = detail


@dataclass(frozen=True)
class Batch:
    images: np.ndarray
    labels: np.ndarray
    files: tuple[Path, ...]  # what was read, for the quarantine copy and the report


def read_batch(path: Path) -> Batch:
    if path.is_dir():
        return _read_idx_pair(path)
    if not path.is_file():
        raise UnreadableBatch("missing_array", f"{path} is neither a file nor a directory")
    if path.suffix != ".npz":
        raise UnreadableBatch(
            "corrupt_file", f"{path}: expected a .npz file or a directory with an IDX pair"
        )
    return _read_npz(path)


def _read_npz(path: Path) -> Batch:
    if path.stat().st_size == 0:
        raise UnreadableBatch("empty_file", f"{path} is empty")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("images", "labels") if key not in archive.files]
            if missing:
                raise UnreadableBatch(
                    "missing_array",
                    f"{path} has no {' or '.join(missing)} array (it has {archive.files})",
                )
            return Batch(archive["images"], archive["labels"], (path,))
    except UnreadableBatch:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        # A zip file keeps its directory at the end: a cut one starts right and reads as no zip.
        starts_right = path.read_bytes()[:4] == ZIP_MAGIC
        anomaly = "truncated_file" if starts_right else "corrupt_file"
        raise UnreadableBatch(anomaly, f"{path}: {error}") from None
    except (OSError, ValueError) as error:
        # np.load says "Object arrays cannot be loaded" or "cannot read" for non-npz content.
        raise UnreadableBatch("corrupt_file", f"{path}: {error}") from None


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern)) + sorted(directory.glob(pattern + ".gz"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise UnreadableBatch(
            "missing_array", f"{directory}: {what} file matching {pattern}[.gz], expected one"
        )
    return found[0]


def _read_idx_pair(directory: Path) -> Batch:
    images_path = _one(directory, "*images-idx3-ubyte")
    labels_path = _one(directory, "*labels-idx1-ubyte")
    return Batch(read_idx(images_path), read_idx(labels_path), (images_path, labels_path))


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not) as the array its header describes."""
    raw = path.read_bytes()
    if not raw:
        raise UnreadableBatch("empty_file", f"{path} is empty")
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise UnreadableBatch("truncated_file", f"{path}: gzip stream: {error}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPES:
        raise UnreadableBatch("corrupt_file", f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UnreadableBatch("truncated_file", f"{path}: header cut short")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise UnreadableBatch(
            "truncated_file",
            f"{path}: header says {shape} ({expected} bytes), file holds {len(raw) - header}",
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez_compressed(path, images=images, labels=labels)
    return path


def write_idx(path: Path, values: np.ndarray) -> Path:
    """``values`` (uint8) as a gzipped IDX file, as MNIST ships its own."""
    header = bytes([0, 0, 0x08, values.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in values.shape
    )
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(values, np.uint8).tobytes()))
    return path


def write_idx_pair(directory: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / "images-idx3-ubyte.gz", images)
    write_idx(directory / "labels-idx1-ubyte.gz", labels)
    return directory
