"""Realistic batches from data the repository ships: MNIST's training rows after
``data.base_rows`` (which the base never trains on), cut into equal batches.

With the defaults, the base is the first 50,000 training images and ``python -m tasks.data
holdout DIR`` writes the last 10,000 as five batches of 2,000, in the order MNIST stores them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving import mnist
from tasks.config import DataConfig
from tasks.data.formats import write_idx_pair, write_npz


def write_batches(
    cfg: DataConfig, out: Path, batches: int, fmt: str = "npz"
) -> list[tuple[Path, int]]:
    images, labels = mnist.read_pair(cfg.dir, "train")
    held = np.arange(cfg.base_rows, len(labels))
    if batches < 1 or batches > len(held):
        raise ValueError(f"--batches must be between 1 and the {len(held)} held-back rows")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for number, rows in enumerate(np.array_split(held, batches), start=1):
        if fmt == "npz":
            path = write_npz(out / f"batch-{number}.npz", images[rows], labels[rows])
        else:
            path = write_idx_pair(out / f"batch-{number}", images[rows], labels[rows])
        written.append((path, len(rows)))
    return written
