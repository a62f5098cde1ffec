"""tasks.comparison: the paired statistics of the gate, on seeded synthetic predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.comparison import bootstrap_interval, compare, mcnemar_exact


def test_mcnemar_matches_the_binomial_tail_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    # b=0, c=6: 2 * 0.5**6
    assert mcnemar_exact(0, 6) == pytest.approx(2 * 0.5**6)
    # b=2, c=10: 2 * sum_{i<=2} C(12, i) / 2**12
    expected = 2 * sum(math.comb(12, i) for i in range(3)) / 2**12
    assert mcnemar_exact(2, 10) == pytest.approx(expected)
    assert mcnemar_exact(10, 2) == pytest.approx(expected)  # two-sided: symmetric


def noisy_pair(rng, n=10_000, error=0.08, flips=150):
    """Two models of the same quality: the champion's mistakes, with ``flips`` images swapped
    each way (the candidate gets some right that the champion missed, and vice versa)."""
    champion = rng.random(n) < error
    candidate = champion.copy()
    wrong = np.flatnonzero(champion)
    right = np.flatnonzero(~champion)
    candidate[rng.choice(wrong, flips, replace=False)] = False
    candidate[rng.choice(right, flips, replace=False)] = True
    return candidate, champion


def test_noise_only_gives_an_interval_around_zero_and_a_large_p():
    candidate, champion = noisy_pair(np.random.default_rng(0))
    result = compare(candidate, champion)
    assert (result.b, result.c) == (150, 150)
    assert result.low < 0 < result.high
    assert result.high < 0.005  # within the default non-inferiority margin
    assert result.p_value > 0.5


def test_a_real_regression_has_an_interval_above_zero():
    rng = np.random.default_rng(1)
    candidate, champion = noisy_pair(rng)
    right = np.flatnonzero(~candidate)
    candidate[rng.choice(right, 120, replace=False)] = True  # 1.2 points worse
    result = compare(candidate, champion)
    assert result.difference == pytest.approx(0.012)
    assert result.low > 0 and result.high > 0.005
    assert result.p_value < 1e-6


def test_the_bootstrap_is_seeded_and_matches_resampling_images():
    first = bootstrap_interval(300, 250, 10_000, 0.95, 10_000, seed=7)
    assert first == bootstrap_interval(300, 250, 10_000, 0.95, 10_000, seed=7)
    # The multinomial shortcut against the textbook paired bootstrap over image indices.
    rng = np.random.default_rng(3)
    differences = np.array([1] * 300 + [-1] * 250 + [0] * 9_450)
    means = [differences[rng.integers(0, 10_000, 10_000)].mean() for _ in range(2000)]
    low, high = np.quantile(means, [0.025, 0.975])
    assert first[0] == pytest.approx(low, abs=0.0006) and first[1] == pytest.approx(
        high, abs=0.0006
    )


def test_mismatched_images_are_refused():
    with pytest.raises(ValueError, match="same images"):
        compare(np.zeros(3, bool), np.zeros(4, bool))
