"""The MNIST loader: the shipped copy verifies, a corrupt or missing file is a clear error."""

import shutil

import numpy as np
import pytest

from serving import mnist
from tasks.config import REPO_ROOT

SHIPPED = REPO_ROOT / "data" / "mnist"


def test_shipped_copy_loads_with_the_known_shapes_and_label_counts():
    data = mnist.load(SHIPPED)
    assert data.train.images.shape == (60000, 784) and data.train.images.dtype == np.float32
    assert data.test.images.shape == (10000, 784)
    assert 0.0 <= data.test.images.min() and data.test.images.max() <= 1.0
    assert np.bincount(data.test.labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert data.test.labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_missing_file_names_it(tmp_path):
    with pytest.raises(mnist.DatasetError, match="t10k-images-idx3-ubyte.gz is missing"):
        mnist.load_test(tmp_path)


def test_corrupt_file_fails_the_checksum(tmp_path):
    for name in mnist.SHA256:
        shutil.copy(SHIPPED / name, tmp_path / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[-1] ^= 0xFF
    labels.write_bytes(bytes(raw))
    with pytest.raises(mnist.DatasetError, match="corrupt: SHA-256"):
        mnist.load_test(tmp_path)
