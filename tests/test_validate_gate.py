"""The gate's decision on predicted classes: the absolute bounds, then a paired, per-digit
non-inferiority test against the serving version (seeded synthetic predictions on the real test
labels' class balance)."""

from __future__ import annotations

import grpc
import numpy as np

from serving.mnist import load_test
from tasks.config import REPO_ROOT, ValidateConfig
from tasks.validate import Predictions, ValidationError, is_transient, judge

CFG = ValidateConfig(max_error_rate=0.10)
LABELS = load_test(REPO_ROOT / "data" / "mnist").labels


def predictions(rng: np.random.Generator, error: float) -> np.ndarray:
    """The labels, with a fraction ``error`` replaced by another digit."""
    predicted = LABELS.copy()
    wrong = rng.random(len(LABELS)) < error
    predicted[wrong] = (LABELS[wrong] + rng.integers(1, 10, wrong.sum())) % 10
    return predicted


def reshuffle(rng, predicted: np.ndarray, flips: int) -> np.ndarray:
    """As good as ``predicted``: ``flips`` of its mistakes fixed, ``flips`` new ones made."""
    candidate = predicted.copy()
    wrong, right = np.flatnonzero(predicted != LABELS), np.flatnonzero(predicted == LABELS)
    fixed, broken = rng.choice(wrong, flips, replace=False), rng.choice(right, flips, replace=False)
    candidate[fixed] = LABELS[fixed]
    candidate[broken] = (LABELS[broken] + 1) % 10
    return candidate


def test_first_push_only_needs_the_absolute_bounds():
    rng = np.random.default_rng(0)
    judgement = judge(Predictions(predictions(rng, 0.08), LABELS, None), CFG)
    assert judgement.passed and judgement.overall is None
    assert "nothing serving" in judgement.reason
    failed = judge(Predictions(predictions(rng, 0.12), LABELS, None), CFG)
    assert not failed.passed and "validate.max_error_rate" in failed.reason


def test_a_difference_that_is_noise_passes():
    rng = np.random.default_rng(1)
    champion = predictions(rng, 0.08)
    candidate = reshuffle(rng, champion, 200)
    judgement = judge(Predictions(candidate, LABELS, champion), CFG)
    assert judgement.passed, judgement.reason
    assert judgement.overall.b == judgement.overall.c == 200
    assert judgement.overall.low < 0 < judgement.overall.high
    assert "McNemar p=" in judgement.reason and "95% interval" in judgement.reason


def test_a_real_regression_is_blocked_though_its_point_estimate_is_small():
    rng = np.random.default_rng(2)
    champion = predictions(rng, 0.08)
    candidate = reshuffle(rng, champion, 100)
    right = np.flatnonzero(candidate == LABELS)
    worse = rng.choice(right, 90, replace=False)
    candidate[worse] = (LABELS[worse] + 1) % 10  # 0.9 points worse: the old gate let it pass
    judgement = judge(Predictions(candidate, LABELS, champion), CFG)
    assert not judgement.passed
    assert "validate.max_regression" in judgement.reason
    assert judgement.overall.high > 0.01 > judgement.overall.difference


def test_better_overall_but_clearly_worse_on_one_digit_is_blocked_naming_it():
    rng = np.random.default_rng(3)
    champion = predictions(rng, 0.08)
    candidate = reshuffle(rng, champion, 100)
    wrong_elsewhere = np.flatnonzero((candidate != LABELS) & (LABELS != 7))
    fixed = rng.choice(wrong_elsewhere, 200, replace=False)
    candidate[fixed] = LABELS[fixed]  # better on the other digits
    sevens = np.flatnonzero((candidate == LABELS) & (LABELS == 7))
    broken = rng.choice(sevens, 80, replace=False)
    candidate[broken] = 1  # and much worse on 7
    judgement = judge(Predictions(candidate, LABELS, champion), CFG)
    assert judgement.overall.difference < 0  # better overall
    assert not judgement.passed
    assert judgement.reason.startswith("digit 7:"), judgement.reason
    assert "validate.max_class_regression" in judgement.reason


def test_a_regression_on_an_evaluation_slice_is_blocked_naming_it():
    rng = np.random.default_rng(5)
    champion = predictions(rng, 0.08)
    slice_labels = LABELS[:2000]
    theirs = champion[:2000].copy()
    ours = theirs.copy()
    right = np.flatnonzero(ours == slice_labels)
    broken = rng.choice(right, 200, replace=False)
    ours[broken] = (slice_labels[broken] + 1) % 10  # 10 points worse on this slice only
    fresh = Predictions(ours, slice_labels, theirs)
    judgement = judge(Predictions(champion.copy(), LABELS, champion), CFG, {"fresh": fresh})
    assert not judgement.passed
    assert (
        judgement.reason.startswith("slice fresh:") and "max_slice_regression" in judgement.reason
    )
    assert [check.group for check in judgement.checks][-1] == "slice fresh"


def test_a_bound_per_digit_names_the_digit():
    rng = np.random.default_rng(4)
    predicted = predictions(rng, 0.05)
    threes = np.flatnonzero(LABELS == 3)[:200]
    predicted[threes] = 8
    cfg = ValidateConfig(max_error_rate=0.10, max_class_error_rate={3: 0.15})
    judgement = judge(Predictions(predicted, LABELS, None), cfg)
    assert not judgement.passed
    assert judgement.reason.startswith("digit 3:") and "max_class_error_rate[3]" in judgement.reason
    assert judgement.class_error_rates[3] > 0.15


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def _failed_with(error: BaseException):
    from prefect.states import Failed

    return Failed(data=error)


def test_only_an_unreachable_server_is_retried_never_a_failed_gate():
    def measured(code):
        try:
            raise ValidationError("cannot measure the serving baseline") from _Rpc(code)
        except ValidationError as error:
            return error

    assert is_transient(None, None, _failed_with(measured(grpc.StatusCode.UNAVAILABLE)))
    assert not is_transient(None, None, _failed_with(measured(grpc.StatusCode.NOT_FOUND)))
    assert not is_transient(None, None, _failed_with(RuntimeError("a bug")))
