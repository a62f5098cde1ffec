"""Command line, Prometheus metrics and gRPC health of ``python -m serving`` (real server processes).

Flags are checked in-process (parse_args) for values and defaults, and as subprocesses for exit
status and messages. One module-scoped server runs with ``--monitoring_config_file`` and
``--enable_grpc_healthcheck_service``; its tests run in file order: requests -> metrics -> version
swap -> failed load -> shutdown (health turns NOT_SERVING). A second, model-less server checks
that neither the metrics page nor the health service exist without their flags.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import saved_models  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from test_serving import Server, images  # noqa: E402

from serving.flags import DEFAULT_THREADS, parse_args  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
METRICS_PATH = "/monitoring/prometheus/metrics"
# Model lifecycle metrics count per worker process (each loads its own copy); requests once each.
WORKERS = 2

pytestmark = pytest.mark.timeout(120)


# -- flags ---------------------------------------------------------------------------------------

# (flag, command-line value, Options attribute, parsed value, TF Serving's default)
FLAGS = [
    ("port", "9000", "port", 9000, 8500),
    ("rest_api_port", "9001", "rest_api_port", 9001, 0),
    ("model_name", "mnist", "model_name", "mnist", "default"),
    ("file_system_poll_wait_seconds", "0.5", "file_system_poll_wait_seconds", 0.5, 1.0),
    ("enable_model_warmup", "false", "enable_model_warmup", False, True),
    ("rest_api_timeout_in_ms", "500", "rest_api_timeout_in_ms", 500, 30000),
    ("grpc_max_threads", "3", "grpc_max_threads", 3, DEFAULT_THREADS),
    ("rest_api_num_threads", "5", "rest_api_num_threads", 5, DEFAULT_THREADS),
    ("enable_grpc_healthcheck_service", "true", "enable_grpc_healthcheck_service", True, False),
    ("model_config_file_poll_wait_seconds", "30", "model_config_file_poll_wait_seconds", 30.0, 0.0),
    (
        "allow_version_labels_for_unavailable_models",
        "true",
        "allow_version_labels_for_unavailable_models",
        True,
        False,
    ),
]


@pytest.mark.parametrize("flag, text, attr, value, default", FLAGS, ids=[f[0] for f in FLAGS])
def test_flag_both_syntaxes_and_default(flag, text, attr, value, default):
    assert getattr(parse_args(["--model_base_path=/m"]), attr) == default
    assert getattr(parse_args(["--model_base_path=/m", f"--{flag}={text}"]), attr) == value
    assert getattr(parse_args(["--model_base_path", "/m", f"--{flag}", text]), attr) == value


def test_batching_flags_accepted_at_their_defaults():
    parse_args(["--model_base_path=/m", "--enable_batching=false", "--batching_parameters_file="])
    parse_args(["--model_base_path", "/m", "--enable_batching", "false"])


def test_thread_defaults_are_four_per_cpu_and_size_the_pool():
    options = parse_args(["--model_base_path=/m"])
    assert DEFAULT_THREADS == 4 * (os.cpu_count() or 1)
    assert options.num_threads == DEFAULT_THREADS
    assert (
        parse_args(
            ["--model_base_path=/m", "--grpc_max_threads=2", "--rest_api_num_threads=6"]
        ).num_threads
        == 6
    )


def test_monitoring_config_file(tmp_path):
    default = tmp_path / "default.config"
    default.write_text("prometheus_config { enable: true }\n")
    custom = tmp_path / "custom.config"
    custom.write_text('prometheus_config {\n  enable: true,\n  path: "/metrics/tf"\n}\n')
    disabled = tmp_path / "disabled.config"
    disabled.write_text('prometheus_config { enable: false path: "/metrics/tf" }\n')
    assert parse_args(["--model_base_path=/m"]).prometheus_path is None
    for config, path in [(default, METRICS_PATH), (custom, "/metrics/tf"), (disabled, None)]:
        assert (
            parse_args(
                ["--model_base_path=/m", "--monitoring_config_file", str(config)]
            ).prometheus_path
            == path
        )
        assert (
            parse_args(
                ["--model_base_path=/m", f"--monitoring_config_file={config}"]
            ).prometheus_path
            == path
        )


def _run_server_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "serving", *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    "args, named",
    [
        (["--no_such_flag=1"], "--no_such_flag"),
        (["--grpc_max_threads=0"], "--grpc_max_threads"),
        (["--rest_api_num_threads", "many"], "--rest_api_num_threads"),
        (["--rest_api_timeout_in_ms=-1"], "--rest_api_timeout_in_ms"),
        (["--enable_grpc_healthcheck_service=maybe"], "--enable_grpc_healthcheck_service"),
        (["--monitoring_config_file=/does/not/exist"], "--monitoring_config_file"),
        (["--batching_parameters_file=/tmp/batching.config"], "--enable_batching"),
        (["--enable_batching=maybe"], "--enable_batching"),
        (["--rest_api_port=65536"], "--rest_api_port"),
    ],
)
def test_bad_flag_exits_nonzero_naming_it(args, named):
    done = _run_server_cli("--model_base_path=/tmp/x", *args)
    assert done.returncode != 0
    assert named in done.stderr


def test_bad_monitoring_config_exits_nonzero(tmp_path):
    for text in (
        "prometheus_config { enable: yes please }",
        "prometheus_config { nope: 1 }",
        'prometheus_config { enable: true path: "metrics" }',
    ):
        config = tmp_path / "monitoring.config"
        config.write_text(text)
        done = _run_server_cli("--model_base_path=/tmp/x", f"--monitoring_config_file={config}")
        assert done.returncode != 0
        assert "--monitoring_config_file" in done.stderr


def test_help_lists_the_flags_without_tensorflow():
    code = (
        "import sys\nfrom serving.__main__ import main\ntry:\n    main(['--help'])\n"
        "except SystemExit as e:\n    assert e.code == 0\n"
        "print('TF' if 'tensorflow' in sys.modules else 'noTF')"
    )
    start = time.monotonic()
    done = subprocess.run(
        [PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert time.monotonic() - start < 5
    assert done.returncode == 0, done.stderr
    for flag in (
        "--enable_grpc_healthcheck_service",
        "--grpc_max_threads",
        "--rest_api_num_threads",
        "--monitoring_config_file",
        "--rest_api_timeout_in_ms",
        "--enable_batching",
        "--batching_parameters_file",
    ):
        assert flag in done.stdout
    assert done.stdout.strip().endswith("noTF")


# -- metrics -------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format 0.0.4 -> (name, labels, value); asserts every line is well formed."""
    samples = []
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \S+ .+$", line), line
            continue
        match = _SAMPLE.match(line)
        assert match, line
        labels = dict(_LABEL.findall(match["labels"] or ""))
        samples.append((match["name"], labels, float(match["value"])))
    return samples


def value(samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (0 when there is none)."""
    found = [v for n, l, v in samples if n == name and labels.items() <= l.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def check_histogram(samples, name: str, **labels: str) -> float:
    """Buckets of one label set are cumulative up to +Inf == _count; returns the count."""
    buckets = [
        (l["le"], v) for n, l, v in samples if n == f"{name}_bucket" and labels.items() <= l.items()
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
    server = MonitoredServer(
        base,
        root / "server.log",
        extra=[
            f"--monitoring_config_file={config}",
            "--enable_grpc_healthcheck_service",
            f"--num_workers={WORKERS}",
        ],
    )
    server.base = base
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


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
    assert (
        check_histogram(
            samples, latency, model_name="mnist", API="Predict", entrypoint="GRPC", status="OK"
        )
        == 3
    )
    assert (
        check_histogram(
            samples,
            latency,
            model_name="mnist",
            API="Predict",
            entrypoint="GRPC",
            status="NOT_FOUND",
        )
        == 1
    )
    assert (
        check_histogram(
            samples, latency, model_name="mnist", API="Predict", entrypoint="REST", status="OK"
        )
        == 1
    )
    assert (
        check_histogram(
            samples,
            latency,
            model_name="mnist",
            API="Predict",
            entrypoint="REST",
            status="FAILED_PRECONDITION",
        )
        == 1
    )
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
    path = str(monitored.base / "1")
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
    saved_models.write_version(monitored.base, 2, 5)
    monitored.wait_for(
        lambda s: s.get(1, (0,))[0] == 50 and s.get(2, (0,))[0] == 30,
        "version 2 AVAILABLE, version 1 END",
    )
    samples = monitored.metrics()
    old, new = str(monitored.base / "1"), str(monitored.base / "2")
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
    assert not [l for n, l, _ in samples if l.get("model_path") == new and "warmup" in n]


def test_failed_load_is_counted(monitored):
    saved_models.write_broken_version(monitored.base, 3)
    monitored.wait_for(lambda s: s.get(3, (0,))[0] == 50, "broken version 3 END")
    samples = monitored.metrics()
    assert (
        value(
            samples,
            ":tensorflow:cc:saved_model:load_attempt_count",
            model_path=str(monitored.base / "3"),
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


def test_no_metrics_page_nor_health_service_without_their_flags(tmp_path):
    server = MonitoredServer(tmp_path / "empty", tmp_path / "server.log")
    try:
        server.wait_ready()
        status, _, _ = server.scrape()
        assert status == 404
        with pytest.raises(grpc.RpcError) as info:
            server.health()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        assert server.stop() == 0
