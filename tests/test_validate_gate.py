"""The gate's decision: the absolute bound, and no regression against the serving version."""

from tasks.config import ValidateConfig
from tasks.validate import judge

CFG = ValidateConfig(max_error_rate=0.10, max_regression=0.005)


def test_first_push_only_needs_the_absolute_bound():
    assert judge(0.09, None, CFG)[0]
    passed, reason = judge(0.11, None, CFG)
    assert not passed and "validate.max_error_rate" in reason


def test_regression_beyond_the_allowance_fails():
    assert judge(0.084, 0.080, CFG)[0]  # within 0.005
    passed, reason = judge(0.086, 0.080, CFG)
    assert not passed and "validate.max_regression" in reason and "0.0800" in reason


def test_improvement_passes_and_the_reason_gives_both_rates():
    passed, reason = judge(0.07, 0.08, CFG)
    assert passed and "0.0700" in reason and "0.0800" in reason
