"""The rollout's live check on pages written by the server's own metrics registry."""

import math
import re

import pytest

from serving.metrics import Registry
from tasks.config import PushConfig
from tasks.rollout_checks import REQUEST_COUNT, Traffic, judge, read_traffic

CFG = PushConfig(replicas=[], min_requests=10, max_error_rate=0.1, max_p99_ratio=1.5)


def page(requests: dict[str, int], latency_us: float, model: str = "mnist") -> str:
    """A Prometheus page as ``serving.metrics`` renders it: ``requests`` per status code, each
    taking ``latency_us``; plus traffic of another model, which must not count."""
    registry = Registry()
    count = registry.counter(REQUEST_COUNT, "requests", ("model_name", "status"))
    latency = registry.histogram(
        ":tensorflow:serving:request_latency",
        "latency",
        ("model_name", "API", "entrypoint", "status"),
    )
    for status, n in requests.items():
        count.inc(model, status, by=n)
        latency.observe_all([latency_us] * n, model, "predict", "GRPC", status)
    count.inc("other", "INTERNAL", by=1000)
    latency.observe_all([1e9] * 1000, "other", "predict", "GRPC", "INTERNAL")
    return registry.exposition([registry.snapshot()])


def test_a_page_is_read_per_model_with_only_server_side_errors_counted():
    traffic = read_traffic(page({"OK": 90, "INVALID_ARGUMENT": 5, "INTERNAL": 5}, 500), "mnist")
    assert (traffic.requests, traffic.errors) == (100, 5)
    assert traffic.buckets[math.inf] == 100
    # 500 us falls in TF's bucket (453.5, 816.3]: the quantile lies inside it
    assert 453 < traffic.quantile(0.99) <= 817
    assert read_traffic(page({}, 1), "nope") == Traffic(0, 0, {})


def test_traffic_since_an_earlier_scrape_and_summed_over_replicas():
    before = read_traffic(page({"OK": 10}, 100), "mnist")
    after = read_traffic(page({"OK": 30, "UNAVAILABLE": 2}, 100), "mnist")
    window = after.since(before)
    assert (window.requests, window.errors, window.buckets[math.inf]) == (22, 2, 22)
    both = window + window
    assert (both.requests, both.errors, both.buckets[math.inf]) == (44, 4, 44)
    assert math.isnan(Traffic().quantile(0.99))


@pytest.mark.parametrize(
    ("canary", "baseline", "state", "reason"),
    [
        ({"OK": 9}, {"OK": 100}, "inconclusive", "9 requests on the canaries"),
        ({"OK": 80, "INTERNAL": 20}, {"OK": 100}, "failed", r"0.200 .*max_error_rate=0.1"),
        ({"OK": 100}, {"OK": 3}, "inconclusive", "3 requests on the old replicas"),
        ({"OK": 100}, {"OK": 100}, "passed", r"ratio 1.00"),
    ],
)
def test_judge(canary, baseline, state, reason):
    check = judge(
        read_traffic(page(canary, 500), "mnist"), read_traffic(page(baseline, 500), "mnist"), CFG
    )
    assert check.state == state
    assert re.search(reason, check.reason), check.reason


def test_a_slower_canary_fails_on_the_p99_ratio_and_one_stage_without_old_replicas_skips_it():
    slow, fast = (
        read_traffic(page({"OK": 50}, 5000), "mnist"),
        read_traffic(page({"OK": 50}, 500), "mnist"),
    )
    check = judge(slow, fast, CFG)
    assert check.state == "failed" and "push.max_p99_ratio=1.5" in check.reason
    assert judge(slow, None, CFG).state == "passed"
