"""MNIST from the four original IDX files, checksum-verified; never downloaded at run time.

The data of the model this repository serves: the pipeline trains and validates on it
(``tasks``), and the MNIST client (``serving.client``) sends its test images, as TF Serving's
example client reads them with its own ``mnist_input_data``. Here, in ``serving``, because the
pipeline imports ``serving`` and never the other way round.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# SHA-256 of the original gzipped files (their MD5s are in data/mnist/SOURCE.txt).
SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}
# The copy this repository ships (data/mnist/SOURCE.txt says where it comes from).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"
IMAGE_PIXELS = 28 * 28
NUM_CLASSES = 10


class DatasetError(RuntimeError):
    """A missing or corrupt MNIST file."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # float32 [N, 784], pixel / 255
    labels: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class Mnist:
    train: Split
    test: Split


def _read_verified(path: Path) -> bytes:
    if not path.is_file():
        raise DatasetError(f"MNIST file {path} is missing (data.dir={path.parent})")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256[path.name]:
        raise DatasetError(
            f"MNIST file {path} is corrupt: SHA-256 {digest}, expected {SHA256[path.name]}"
        )
    return gzip.decompress(raw)


def _idx(data: bytes, magic: int, path: Path) -> np.ndarray:
    ndim = magic & 0xFF
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DatasetError(f"MNIST file {path}: IDX magic {found}, expected {magic}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_pair(directory: str | Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``prefix`` split ("train", "t10k") as stored: images uint8 [N, 28, 28], labels uint8."""
    directory = Path(directory)
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    images = _idx(_read_verified(images_path), 2051, images_path)
    labels = _idx(_read_verified(labels_path), 2049, labels_path)
    if len(images) != len(labels):
        raise DatasetError(f"MNIST {prefix}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """Stored pixels (uint8, [N, 28, 28] or [N, 784]) as the model's input: float32 / 255."""
    flat = images.reshape(len(images), IMAGE_PIXELS).astype(np.float32) / 255.0
    return Split(images=flat, labels=labels.astype(np.int64))


def source_digest(prefix: str) -> str:
    """A digest of the ``prefix`` split that needs no reading: loading verifies every file against
    its pinned SHA-256, so the pinned values stand for the content."""
    names = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    return hashlib.sha256("".join(SHA256[name] for name in names).encode()).hexdigest()


def _split(directory: Path, prefix: str) -> Split:
    return to_split(*read_pair(directory, prefix))


def load_test(directory: str | Path) -> Split:
    return _split(Path(directory), "t10k")


def load(directory: str | Path) -> Mnist:
    directory = Path(directory)
    return Mnist(train=_split(directory, "train"), test=_split(directory, "t10k"))
