"""A paired comparison of two classifiers on the same evaluation images: is the candidate's error
rate worse than the champion's by more than a margin, or is the difference noise?

Pure NumPy, no TensorFlow: ``compare(candidate_wrong, champion_wrong, ...)`` takes one boolean per
image for each model (True: misclassified) and returns a ``Comparison``:

- ``b`` (champion right, candidate wrong) and ``c`` (the reverse): the discordant pairs;
- the exact McNemar p-value: under "equally good", each discordant pair is a fair coin, so the
  two-sided binomial test of ``b`` among ``b + c``;
- a paired bootstrap confidence interval of the error-rate difference (candidate - champion).
  Per image the difference is -1, 0 or +1, so resampling n images with replacement is drawing
  the three counts from a multinomial: exactly the paired bootstrap, in ``resamples`` x 3 numbers
  rather than ``resamples`` x n indices.

The gate is a non-inferiority test: it blocks when the interval's upper end exceeds the margin,
so a small measured difference that is noise passes and a real regression does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    n: int
    candidate_error: float
    champion_error: float
    b: int  # champion right, candidate wrong
    c: int  # candidate right, champion wrong
    p_value: float  # exact McNemar, two-sided
    low: float  # confidence interval of candidate_error - champion_error
    high: float

    @property
    def difference(self) -> float:
        return self.candidate_error - self.champion_error


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(a fair coin gives a split at least as uneven)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    peak = max(log_terms)
    tail = math.exp(peak) * sum(math.exp(t - peak) for t in log_terms)
    return min(1.0, 2.0 * tail)


def bootstrap_interval(
    b: int, c: int, n: int, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """The paired bootstrap interval of (b - c) / n, the error-rate difference."""
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [b / n, c / n, (n - b - c) / n], size=resamples)
    differences = (counts[:, 0] - counts[:, 1]) / n
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    return float(low), float(high)


def compare(
    candidate_wrong: np.ndarray,
    champion_wrong: np.ndarray,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Comparison:
    candidate_wrong = np.asarray(candidate_wrong, bool)
    champion_wrong = np.asarray(champion_wrong, bool)
    if candidate_wrong.shape != champion_wrong.shape:
        raise ValueError(
            f"paired comparison needs the same images: {candidate_wrong.shape} vs "
            f"{champion_wrong.shape}"
        )
    n = len(candidate_wrong)
    b = int(np.sum(candidate_wrong & ~champion_wrong))
    c = int(np.sum(~candidate_wrong & champion_wrong))
    low, high = bootstrap_interval(b, c, n, confidence, resamples, seed)
    return Comparison(
        n=n,
        candidate_error=float(candidate_wrong.mean()) if n else 0.0,
        champion_error=float(champion_wrong.mean()) if n else 0.0,
        b=b,
        c=c,
        p_value=mcnemar_exact(b, c),
        low=low,
        high=high,
    )
