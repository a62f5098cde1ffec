"""The live check of a rollout stage: the canaries' traffic against the old replicas' traffic.

Read from each replica's Prometheus page under TF Serving's own names, so it works the same on
``tensorflow_model_server``: ``:tensorflow:serving:request_count{model_name, status}`` and the
``:tensorflow:serving:request_latency`` histogram (microseconds). TF Serving labels neither by
version, so the check compares *replicas*, as Flagger compares canary and primary pods: once a
canary makes the new version AVAILABLE it unloads the old one, and its traffic from then on is the
new version's.

Like Argo Rollouts and Flagger, a check needs ``push.min_requests`` on each side before it counts;
the error rate (server-side status codes, the gRPC counterparts of HTTP 5xx) must stay at or
below ``push.max_error_rate`` and the canaries' p99 latency within ``push.max_p99_ratio`` of the
old replicas' (not checked in a stage that leaves no replica on the old version).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from tasks.config import PushConfig

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY_BUCKET = ":tensorflow:serving:request_latency_bucket"
# The server's fault, not the client's (INVALID_ARGUMENT, NOT_FOUND, ... are the caller's).
SERVER_ERRORS = frozenset(
    {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
)
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Traffic:
    """One model's requests on one or more replicas: cumulative counters, or the difference of
    two scrapes."""

    requests: int = 0
    errors: int = 0
    # upper bound in microseconds (inf last) -> requests at or below it (cumulative)
    buckets: dict[float, int] = field(default_factory=dict)

    def __add__(self, other: Traffic) -> Traffic:
        bounds = self.buckets.keys() | other.buckets.keys()
        return Traffic(
            self.requests + other.requests,
            self.errors + other.errors,
            {b: self.buckets.get(b, 0) + other.buckets.get(b, 0) for b in sorted(bounds)},
        )

    def since(self, before: Traffic) -> Traffic:
        """What happened between the scrape ``before`` and this one."""
        return Traffic(
            self.requests - before.requests,
            self.errors - before.errors,
            {b: n - before.buckets.get(b, 0) for b, n in self.buckets.items()},
        )

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float:
        """Prometheus's ``histogram_quantile``: linear within the bucket that holds it; the
        highest finite bound when it falls in +Inf."""
        bounds = sorted(self.buckets)
        total = self.buckets[bounds[-1]] if bounds else 0
        if total == 0:
            return math.nan
        rank, lower, below = q * total, 0.0, 0
        for bound in bounds:
            count = self.buckets[bound]
            if count >= rank:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - below) / max(count - below, 1)
            lower, below = bound, count
        return lower


def read_traffic(exposition: str, model_name: str) -> Traffic:
    """``model_name``'s traffic on a Prometheus text page (every API, entry point and status)."""
    requests = errors = 0
    buckets: dict[float, int] = {}
    for line in exposition.splitlines():
        match = _SAMPLE.match(line)
        if not match or match["name"] not in (REQUEST_COUNT, REQUEST_LATENCY_BUCKET):
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        if labels.get("model_name") != model_name:
            continue
        count = int(float(match["value"]))
        if match["name"] == REQUEST_COUNT:
            requests += count
            errors += count if labels.get("status") in SERVER_ERRORS else 0
        else:
            bound = float(labels["le"])  # "+Inf" parses
            buckets[bound] = buckets.get(bound, 0) + count
    return Traffic(requests, errors, dict(sorted(buckets.items())))


@dataclass(frozen=True)
class Check:
    state: Literal["passed", "failed", "inconclusive"]
    reason: str


def judge(canary: Traffic, baseline: Traffic | None, cfg: PushConfig) -> Check:
    """The canaries' traffic since the bake began against the old replicas' (None: none left)."""
    if canary.requests < cfg.min_requests:
        return Check(
            "inconclusive",
            f"{canary.requests} requests on the canaries, push.min_requests={cfg.min_requests}",
        )
    if canary.error_rate > cfg.max_error_rate:
        return Check(
            "failed",
            f"error rate {canary.error_rate:.3f} ({canary.errors} of {canary.requests} requests) "
            f"above push.max_error_rate={cfg.max_error_rate:g}",
        )
    if baseline is None:
        return Check("passed", f"error rate {canary.error_rate:.3f} of {canary.requests} requests")
    if baseline.requests < cfg.min_requests:
        return Check(
            "inconclusive",
            f"{baseline.requests} requests on the old replicas, "
            f"push.min_requests={cfg.min_requests}",
        )
    ratio = canary.quantile(0.99) / baseline.quantile(0.99)
    summary = (
        f"p99 {canary.quantile(0.99) / 1000:.2f} ms against {baseline.quantile(0.99) / 1000:.2f} "
        f"ms on the old replicas (ratio {ratio:.2f})"
    )
    if ratio > cfg.max_p99_ratio:
        return Check("failed", f"{summary} above push.max_p99_ratio={cfg.max_p99_ratio:g}")
    return Check(
        "passed",
        f"error rate {canary.error_rate:.3f} of {canary.requests} requests, {summary}",
    )
