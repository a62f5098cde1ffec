"""Prometheus metrics under TF Serving's names, and the hooks that feed them from each layer.

TF Serving exports TensorFlow's monitoring registry, each metric named by its path with ``/``
turned into ``:`` (``/tensorflow/serving/request_count`` -> ``:tensorflow:serving:request_count``),
latencies in microseconds in TF's ``Buckets::Exponential(10, 1.8, 33)``. Dashboards built on TF
Serving keep working only with those exact names, labels and units, so:

* TF Serving's own: ``request_count``, ``request_latency``, ``model_warmup_latency``, and
  TensorFlow's SavedModel loader's ``:tensorflow:cc:saved_model:load_attempt_count`` /
  ``load_latency``;
* TF Serving's batching (batching_session.cc, batching_util.h): ``batching_session:
  queuing_latency``, ``input_batch_size``, ``processed_batch_size``, ``padding_size``, with its
  buckets;
* ours, named in the same style because TF Serving has no equivalent: ``model_unload_count``.

The registry is written here rather than taken from ``prometheus_client`` (installed only as a
dependency of prefect): that library appends ``_total`` to every counter name and adds ``_created``
series, so it cannot export ``:tensorflow:serving:request_count`` under TF Serving's name. What
is needed is small: a lock and a few additions per observation, and one text page per scrape.

A subsystem's metrics are declared below next to the others; the hooks that feed them stay in the
layer that owns the event.
"""

from __future__ import annotations

import bisect
import functools
import threading
import time
from typing import (
    Any,
    Callable,
    Concatenate,
    Iterable,
    Iterator,
    ParamSpec,
    Protocol,
    Sequence,
    TypeVar,
)

import grpc

from serving import textproto
from serving.errors import ServingError

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exponential_buckets(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TF's ``Buckets::Exponential``: upper bounds scale * growth^i, i < count (then +Inf)."""
    return tuple(scale * growth**i for i in range(count))


# Upper bounds in microseconds: 10 us .. ~24 min.
LATENCY_BUCKETS_US = exponential_buckets(10, 1.8, 33)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Metric:
    """A metric's values per label combination, kept in ``_values`` by the subclass."""

    kind = ""

    def __init__(self, name: str, help_: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.help = help_
        self.label_names = labels
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], Any] = {}

    def _check(self, values: tuple[str, ...]) -> None:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")

    def snapshot(self) -> dict[tuple[str, ...], Any]:
        """A copy of the values (picklable: a worker process sends it to the supervisor)."""
        with self._lock:
            return {labels: self._copy(value) for labels, value in self._values.items()}

    @staticmethod
    def _copy(value: Any) -> Any:
        return value

    @staticmethod
    def _add(total: Any, value: Any) -> Any:
        return total + value

    def merged(self, snapshots: Sequence[dict[tuple[str, ...], Any]]) -> dict[tuple[str, ...], Any]:
        """The sum of several processes' snapshots, label combination by label combination."""
        total: dict[tuple[str, ...], Any] = {}
        for snapshot in snapshots:
            for labels, value in snapshot.items():
                total[labels] = (
                    self._add(total[labels], value) if labels in total else self._copy(value)
                )
        return total

    def lines(self, values: dict[tuple[str, ...], Any]) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"


class Counter(_Metric):
    """A monotonically increasing integer per label combination."""

    kind = "counter"

    def inc(self, *labels: str, by: int = 1) -> None:
        self._check(labels)
        with self._lock:
            self._values[labels] = self._values.get(labels, 0) + by

    def lines(self, values: dict[tuple[str, ...], Any]) -> Iterator[str]:
        yield from super().lines(values)
        for labels, value in sorted(values.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {value}"


class Histogram(_Metric):
    """Bucket counts, sum and count per label combination (Prometheus ``le`` semantics)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_: str,
        labels: tuple[str, ...],
        bounds: tuple[float, ...] = LATENCY_BUCKETS_US,
    ) -> None:
        super().__init__(name, help_, labels)
        self.bounds = bounds
        # _values: per label combination [count in bucket 0, ..., count in +Inf, sum]

    def observe(self, value: float, *labels: str) -> None:
        self.observe_all((value,), *labels)

    def observe_all(self, values: Iterable[float], *labels: str) -> None:
        """Several observations with the same labels (a batch's requests) under one lock."""
        self._check(labels)
        with self._lock:
            cell = self._values.get(labels)
            if cell is None:
                cell = self._values[labels] = [0] * (len(self.bounds) + 1) + [0.0]
            for value in values:
                cell[bisect.bisect_left(self.bounds, value)] += 1
                cell[-1] += value

    @staticmethod
    def _copy(value: Any) -> Any:
        return list(value)

    @staticmethod
    def _add(total: Any, value: Any) -> Any:
        return [a + b for a, b in zip(total, value)]

    def lines(self, values: dict[tuple[str, ...], Any]) -> Iterator[str]:
        yield from super().lines(values)
        limits = [f"{b:.6g}" for b in self.bounds] + ["+Inf"]  # TF Serving prints 6 digits
        for labels, cell in sorted(values.items()):
            cumulative = 0
            for limit, count in zip(limits, cell[:-1]):
                cumulative += int(count)
                le = _labels(self.label_names, labels, f'le="{limit}"')
                yield f"{self.name}_bucket{le} {cumulative}"
            text = _labels(self.label_names, labels)
            yield f"{self.name}_sum{text} {_number(cell[-1])}"
            yield f"{self.name}_count{text} {cumulative}"


Snapshot = dict[str, dict[tuple[str, ...], Any]]  # metric name -> label values -> value


class Registry:
    """All metrics of the process; ``exposition`` renders the Prometheus text page."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> Any:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_: str, labels: tuple[str, ...]) -> Counter:
        return self._add(Counter(name, help_, labels))

    def histogram(
        self,
        name: str,
        help_: str,
        labels: tuple[str, ...],
        bounds: tuple[float, ...] = LATENCY_BUCKETS_US,
    ) -> Histogram:
        return self._add(Histogram(name, help_, labels, bounds))

    def snapshot(self) -> Snapshot:
        """This process's values of every metric (what a worker sends for a scrape)."""
        return {name: metric.snapshot() for name, metric in self._metrics.items()}

    def exposition(self, snapshots: Sequence[Snapshot]) -> str:
        """Text format 0.0.4 of the sum of ``snapshots`` (one per worker process), metrics sorted
        by name like TF Serving's exporter: the page is the whole server's, whichever worker
        answers the scrape."""
        lines = []
        for name in sorted(self._metrics):
            metric = self._metrics[name]
            lines += metric.lines(metric.merged([s.get(name, {}) for s in snapshots]))
        return "\n".join(lines) + "\n"


REGISTRY = Registry()

# -- requests (tensorflow_serving/servables/tensorflow/util.cc) ------------------------------------
REQUEST_COUNT = REGISTRY.counter(
    ":tensorflow:serving:request_count", "The total number of requests.", ("model_name", "status")
)
REQUEST_LATENCY = REGISTRY.histogram(
    ":tensorflow:serving:request_latency",
    "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
    ("model_name", "API", "entrypoint", "status"),
)

# -- model lifecycle -----------------------------------------------------------------------------
# TensorFlow's SavedModel loader (tensorflow/cc/saved_model/loader.cc), exported by TF Serving.
LOAD_ATTEMPT_COUNT = REGISTRY.counter(
    ":tensorflow:cc:saved_model:load_attempt_count",
    "The number of times a SavedModel was successfully loaded.",
    ("model_path", "status"),
)
LOAD_LATENCY = REGISTRY.counter(
    ":tensorflow:cc:saved_model:load_latency",
    "Latency in microseconds for SavedModels that were successfully loaded.",
    ("model_path",),
)
# tensorflow_serving/servables/tensorflow/saved_model_warmup_util.cc
MODEL_WARMUP_LATENCY = REGISTRY.histogram(
    ":tensorflow:serving:model_warmup_latency",
    "Distribution of wall time (in microseconds) for warming up the model.",
    ("model_path", "status"),
)

# Ours: TF Serving counts no unloads; same label as the load counters so the two pair up.
MODEL_UNLOAD_COUNT = REGISTRY.counter(
    ":tensorflow:serving:model_unload_count",
    "The number of times a model version was unloaded.",
    ("model_path",),
)

# -- batching (tensorflow_serving/batching/batching_session.cc, batching_util.h) -----------------
_BATCH_SIZE_BUCKETS = exponential_buckets(1, 2, 14)
BATCHING_QUEUING_LATENCY = REGISTRY.histogram(
    ":tensorflow:serving:batching_session:queuing_latency",
    "Distribution of wall time spent (in microseconds) in queuing",
    ("thread_pool_name",),
    exponential_buckets(100, 1.2, 52),
)
BATCHING_INPUT_BATCH_SIZE = REGISTRY.histogram(
    ":tensorflow:serving:batching_session:input_batch_size",
    "Tracks the batch size distribution on the inputs.",
    (),
    _BATCH_SIZE_BUCKETS,
)
BATCHING_PROCESSED_BATCH_SIZE = REGISTRY.histogram(
    ":tensorflow:serving:batching_session:processed_batch_size",
    "Tracks the batch size distribution on processing.",
    (),
    _BATCH_SIZE_BUCKETS,
)
BATCHING_PADDING_SIZE = REGISTRY.histogram(
    ":tensorflow:serving:batching_session:padding_size",
    "Tracks the padding size distribution on batches.",
    ("execution_batch_size",),
    _BATCH_SIZE_BUCKETS,
)


# -- hooks ----------------------------------------------------------------------------------------


def _micros_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e6


def observe_request(
    model_name: str, api: str, entrypoint: str, code: grpc.StatusCode, start: float
) -> None:
    """Count one finished request and its latency since ``start`` (``time.perf_counter()``)."""
    REQUEST_COUNT.inc(model_name, code.name)
    REQUEST_LATENCY.observe(_micros_since(start), model_name, api, entrypoint, code.name)


class _Loadable(Protocol):
    path: str


Loadable = TypeVar("Loadable", bound=_Loadable)
P = ParamSpec("P")


def saved_model_load_observed(
    load: Callable[Concatenate[Loadable, P], None],
) -> Callable[Concatenate[Loadable, P], None]:
    """Wrap ``Servable.load``: TF's load attempt (success/fail) and latency per model path."""

    @functools.wraps(load)
    def wrapper(servable: Loadable, *args: P.args, **kwargs: P.kwargs) -> None:
        start = time.perf_counter()
        status = "fail"
        try:
            load(servable, *args, **kwargs)
            status = "success"
        finally:
            LOAD_ATTEMPT_COUNT.inc(servable.path, status)
            LOAD_LATENCY.inc(servable.path, by=int(_micros_since(start)))

    return wrapper


def warmup_observed(
    warmup: Callable[Concatenate[Loadable, P], int],
) -> Callable[Concatenate[Loadable, P], int]:
    """Wrap ``warmup.replay_warmup`` (returns the records replayed): TF Serving's warmup latency.

    Like TF Serving, a version without warmup data records nothing; a failed warmup records its
    status code name (TF Serving prints the whole status, message included).
    """

    @functools.wraps(warmup)
    def wrapper(servable: Loadable, *args: P.args, **kwargs: P.kwargs) -> int:
        start = time.perf_counter()
        try:
            count = warmup(servable, *args, **kwargs)
        except ServingError as e:
            MODEL_WARMUP_LATENCY.observe(_micros_since(start), servable.path, e.code.name)
            raise
        except Exception:
            MODEL_WARMUP_LATENCY.observe(_micros_since(start), servable.path, "UNKNOWN")
            raise
        if count:
            MODEL_WARMUP_LATENCY.observe(_micros_since(start), servable.path, "OK")
        return count

    return wrapper


# -- configuration --------------------------------------------------------------------------------


def _monitoring_config_class() -> Any:
    """``tensorflow.serving.MonitoringConfig`` (the tensorflow-serving-api wheel ships no
    ``monitoring_config_pb2``)."""
    messages = {
        "PrometheusConfig": (("enable", 1, "bool"), ("path", 2, "string")),
        "MonitoringConfig": (("prometheus_config", 1, "PrometheusConfig"),),
    }
    return textproto.declared_message(
        "tensorflow_serving/config/monitoring_config.proto", messages, "MonitoringConfig"
    )


def read_monitoring_config(path: str) -> str | None:
    """The Prometheus path a text-format MonitoringConfig file asks for (None: disabled).

    Raises ``ValueError`` naming the problem when the file cannot be read or parsed.
    """
    config = textproto.read(path, _monitoring_config_class()())
    prometheus = config.prometheus_config
    if not prometheus.enable:
        return None
    route = prometheus.path or DEFAULT_PROMETHEUS_PATH
    if not route.startswith("/"):
        raise ValueError(f"{path}: prometheus_config.path must start with '/': {route!r}")
    return route
