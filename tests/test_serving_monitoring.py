"""Prometheus metrics and gRPC health of ``python -m serving`` (real server processes).

One module-scoped server runs with ``--monitoring_config_file`` and
``--enable_grpc_healthcheck_service``; its tests run in file order: requests -> metrics -> version
swap -> failed load -> shutdown (health turns NOT_SERVING). A second, model-less server checks
that neither the metrics page nor the health service exist without their flags.
"""

from __future__ import annotations

import signal
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tests import saved_models  # noqa: E402
from tests.prometheus import parse_exposition, value  # noqa: E402
from tests.servers import Server, images  # noqa: E402  # noqa: E402

METRICS_PATH = "/monitoring/prometheus/metrics"
# Model lifecycle metrics count per worker process (each loads its own copy); requests once each.
WORKERS = 2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


# -- flags -----------------------------------------------------------------------------------------


# -- metrics ---------------------------------------------------------------------------------------


def check_histogram(samples, name: str, **labels: str) -> float:
    """Buckets of one label set are cumulative up to +Inf == _count; returns the count."""
    buckets = [
        (got["le"], v)
        for n, got, v in samples
        if n == f"{name}_bucket" and labels.items() <= got.items()
    ]
    assert len(buckets) == 34, (name, labels, buckets)  # TF Serving's 33 bounds + Inf
    assert buckets[-1][0] == "+Inf"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    count = value(samples, f"{name}_count", **labels)
    assert counts[-1] == count > 0
    assert value(samples, f"{name}_sum", **labels) > 0
    return count


class MonitoredServer(Server):
    def scrape(self, path: str = METRICS_PATH) -> tuple[int, str, str]:
        url = f"http://127.0.0.1:{self.rest_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read().decode()

    def metrics(self):
        status, content_type, text = self.scrape()
        assert status == 200, text
        assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
        return parse_exposition(text)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitored")
    base = root / "mnist"
    saved_models.write_version(base, 1, 3, warmup_records=3)
    config = root / "monitoring.config"
    config.write_text("prometheus_config { enable: true }\n")
    with MonitoredServer(
        base,
        root / "server.log",
        extra=[
            f"--monitoring_config_file={config}",
            "--enable_grpc_healthcheck_service",
            f"--num_workers={WORKERS}",
        ],
    ) as server:
        yield server


def test_requests_are_counted_by_status_and_timed_per_entrypoint(monitored):
    for _ in range(3):
        monitored.predict(images(1))
    with pytest.raises(grpc.RpcError) as info:
        monitored.predict(images(1), version=99)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    status, _ = monitored.http(
        "POST", "/v1/models/mnist:predict", {"instances": images(2).tolist()}
    )
    assert status == 200
    status, _ = monitored.http(
        "POST", "/v1/models/mnist:predict", {"signature_name": "nope", "instances": [[0.0] * 784]}
    )
    assert status == 400
    assert monitored.http("GET", "/v1/models/mnist")[0] == 200

    samples = monitored.metrics()
    assert (
        value(samples, ":tensorflow:serving:request_count", model_name="mnist", status="OK") == 5
    )  # 3 gRPC + 1 REST predict + 1 REST status
    assert (
        value(samples, ":tensorflow:serving:request_count", model_name="mnist", status="NOT_FOUND")
        == 1
    )
    assert (
        value(
            samples,
            ":tensorflow:serving:request_count",
            model_name="mnist",
            status="FAILED_PRECONDITION",
        )
        == 1
    )  # REST's 400, by its exact code
    latency = ":tensorflow:serving:request_latency"
    for entrypoint, status, count in (
        ("GRPC", "OK", 3),
        ("GRPC", "NOT_FOUND", 1),
        ("REST", "OK", 1),
        ("REST", "FAILED_PRECONDITION", 1),
    ):
        timed = check_histogram(
            samples,
            latency,
            model_name="mnist",
            API="Predict",
            entrypoint=entrypoint,
            status=status,
        )
        assert timed == count, (entrypoint, status)
    assert (
        check_histogram(
            samples,
            latency,
            model_name="mnist",
            API="GetModelStatus",
            entrypoint="REST",
            status="OK",
        )
        == 1
    )
    # Microseconds: a local predict takes well over 10 us and well under 10 s.
    total = value(
        samples, f"{latency}_sum", model_name="mnist", API="Predict", entrypoint="GRPC", status="OK"
    )
    assert 30 < total < 3 * 10_000_000


def test_load_and_warmup_are_recorded(monitored):
    samples = monitored.metrics()
    path = str(monitored.base_path / "1")
    assert (
        check_histogram(
            samples, ":tensorflow:serving:model_warmup_latency", model_path=path, status="OK"
        )
        == WORKERS
    )
    assert (
        value(
            samples,
            ":tensorflow:cc:saved_model:load_attempt_count",
            model_path=path,
            status="success",
        )
        == WORKERS
    )
    assert value(samples, ":tensorflow:cc:saved_model:load_latency", model_path=path) > 0


def test_swap_records_load_and_unload(monitored):
    saved_models.write_version(monitored.base_path, 2, 5)
    monitored.wait_for(
        lambda s: s.get(1, (0,))[0] == 50 and s.get(2, (0,))[0] == 30,
        "version 2 AVAILABLE, version 1 END",
    )
    samples = monitored.metrics()
    old, new = str(monitored.base_path / "1"), str(monitored.base_path / "2")
    assert (
        value(
            samples,
            ":tensorflow:cc:saved_model:load_attempt_count",
            model_path=new,
            status="success",
        )
        == WORKERS
    )
    assert value(samples, ":tensorflow:serving:model_unload_count", model_path=old) == WORKERS
    assert value(samples, ":tensorflow:serving:model_unload_count", model_path=new) == 0
    # Version 2 has no warmup file: like TF Serving, no warmup sample for it.
    assert not [n for n, got, _ in samples if got.get("model_path") == new and "warmup" in n]


def test_failed_load_is_counted(monitored):
    saved_models.write_broken_version(monitored.base_path, 3)
    monitored.wait_for(lambda s: s.get(3, (0,))[0] == 50, "broken version 3 END")
    samples = monitored.metrics()
    assert (
        value(
            samples,
            ":tensorflow:cc:saved_model:load_attempt_count",
            model_path=str(monitored.base_path / "3"),
            status="fail",
        )
        == WORKERS
    )
    assert "load FAILED" in monitored.log()


def test_health_serving_then_not_serving_on_shutdown(monitored):
    assert monitored.health() == health_pb2.HealthCheckResponse.SERVING
    stub = health_pb2_grpc.HealthStub(monitored.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    monitored.proc.send_signal(signal.SIGTERM)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    assert monitored.proc.wait(timeout=30) == 0


def test_no_metrics_page_nor_health_service_without_their_flags(tmp_path, start_server):
    server = start_server(tmp_path / "empty", server_class=MonitoredServer)
    status, _, _ = server.scrape()
    assert status == 404
    with pytest.raises(grpc.RpcError) as info:
        server.health()
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert server.stop() == 0
