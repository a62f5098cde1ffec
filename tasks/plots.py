"""Pictures a person would rather look at than read, logged with each MLflow run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; there is no display where flows run
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Loss and accuracy per epoch, on the training data and the held-out test data."""
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        for key, style in ((metric, "-o"), (f"val_{metric}", "--s")):
            if key in history:
                epochs = np.arange(1, len(history[key]) + 1)
                axes.plot(epochs, history[key], style, label=key)
        axes.set_xlabel("epoch")
        axes.set_title(metric)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def confusion_matrix(confusion: np.ndarray, error_rate: float, path: Path) -> Path:
    """Counts of true label (rows) against predicted label (columns); the diagonal is right."""
    figure, axes = plt.subplots(figsize=(6, 5.5))
    image = axes.imshow(np.log1p(confusion), cmap="Blues")
    for (row, column), count in np.ndenumerate(confusion):
        if count:
            axes.text(
                column,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if row == column else "black",
            )
    axes.set_xticks(range(confusion.shape[1]))
    axes.set_yticks(range(confusion.shape[0]))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"test set confusion (error rate {error_rate:.2%})")
    figure.colorbar(image, ax=axes, label="log(1 + count)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
