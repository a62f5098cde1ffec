"""TF Serving's flags at work in a real server over real sockets: gRPC on a Unix socket with the
channel arguments upstream's test base passes, TLS (client certificates included, made here with
``cryptography``), CORS, the profiler service answering ``profiler_client.trace``, load retries,
a production command line with flags that have no effect here, and TF Serving's wording for
config files that do not parse."""

from __future__ import annotations

import datetime
import glob
import json
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests import saved_models
from tests.processes import free_port
from tests.servers import AVAILABLE, END, PYTHON, REPO, Server, rpc_error

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# What tensorflow_model_server_test_base.py adds to every server it starts, with
# testGoodGrpcChannelArgs's own arguments in front.
UPSTREAM_CHANNEL_ARGUMENTS = "grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb"
UPSTREAM_REUSE = "grpc.so_reuseaddr=1"


@pytest.fixture(scope="module")
def half_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("half") / "half"
    saved_models.write_half_plus_two(base, 1)
    return base


def half_plus_two(channel: grpc.Channel, x: float = 2.0) -> float:
    """Predict over ``channel`` as upstream's VerifyPredictRequest does: ``y = x / 2 + 2``."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([x], np.float32)))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
        request, timeout=10
    )
    return float(tf.make_ndarray(response.outputs["y"])[0])


def http(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """(status, headers, body) of a plain HTTP request, error statuses included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# -- gRPC on a Unix socket, channel arguments, a production command line -----------------------


def stale_socket(path: Path) -> None:
    """A socket file left behind by a server that died (bound, never unlinked)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


def test_unix_socket_channel_arguments_and_a_production_command_line(
    tmp_path, half_base, start_server
):
    socket_path = tmp_path / "tf-serving.sock"
    stale_socket(socket_path)
    session_config = tmp_path / "session.config"
    session_config.write_text("allow_soft_placement: true intra_op_parallelism_threads: 2\n")
    base = tmp_path / "half"
    saved_models.copy_version(half_base / "1", base, 1)
    server = start_server(
        base,
        model_name="half",
        extra=[
            f"--grpc_socket_path={socket_path}",
            f"--grpc_channel_arguments={UPSTREAM_CHANNEL_ARGUMENTS},{UPSTREAM_REUSE}",
            f"--tensorflow_session_config_file={session_config}",
            "--tensorflow_inter_op_parallelism=1",
            "--per_process_gpu_memory_fraction=0.5",
            "--saved_model_tags=serve",
            "--num_request_iterations_for_warmup=2",
            "--num_load_threads=2",
            "--max_num_load_retries=1",
            "--load_retry_interval_micros=100000",
            "--enable_profiler=false",
            # Flags of a production command line that mean nothing here: accepted, logged.
            "--prefer_tflite_model=false",
            "--num_tflite_pools=2",
            "--skip_initialize_tpu=true",
            "--flush_filesystem_caches=true",
        ],
    )
    assert half_plus_two(grpc.insecure_channel(f"unix:{socket_path}")) == 3.0  # testPredictUDS
    assert half_plus_two(server.channel) == 3.0
    log = server.log()
    assert "--prefer_tflite_model=false ignored: no TF Lite runtime" in log
    assert "--skip_initialize_tpu=true ignored: no TPU support" in log
    assert log.count("warmup replayed 4 request(s)") == 2  # both workers, 4 records each

    # No CORS headers without --rest_api_enable_cors_support; a preflight is answered anyway.
    url = f"http://127.0.0.1:{server.rest_port}/v1/models/half"
    status, headers, _ = http(url)
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    status, headers, body = http(url, "OPTIONS", {"Origin": "http://example.com"})
    assert (status, body) == (200, b"") and "Access-Control-Allow-Origin" not in headers

    # --enable_profiler=false: no profiler service, as TF Serving.
    profile = server.channel.unary_unary("/tensorflow.ProfilerService/Profile")
    assert rpc_error(profile, b"", timeout=10).code() == grpc.StatusCode.UNIMPLEMENTED

    # --max_num_load_retries=1: a broken version is tried twice, then END; 1 keeps serving.
    saved_models.write_broken_version(base, 2)
    server.wait_for(lambda s: s.get(2, (0,))[0] == END, "broken version 2 END")
    assert "model half version 2: load failed" in server.log()
    assert "retry 1 of 1" in server.log()
    assert server.states()[1][0] == AVAILABLE
    assert half_plus_two(grpc.insecure_channel(f"unix:{socket_path}")) == 3.0

    server.stop()
    assert not socket_path.exists()  # gRPC removes the socket it created


def test_grpc_only_on_the_unix_socket(tmp_path, half_base):
    """``--port=0``: no TCP gRPC port, only the socket (and REST)."""
    socket_path = tmp_path / "only.sock"
    rest_port = free_port()
    command = [
        PYTHON,
        "-m",
        "serving",
        "--port=0",
        f"--grpc_socket_path={socket_path}",
        f"--rest_api_port={rest_port}",
        "--model_name=half",
        f"--model_base_path={half_base}",
        "--num_workers=2",
    ]
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(f"unix:{socket_path}")
        grpc.channel_ready_future(channel).result(timeout=120)
        assert half_plus_two(channel) == 3.0
        status, _, _ = http(f"http://127.0.0.1:{rest_port}/v1/models/half")
        assert status == 200
        assert "gRPC on unix:" in (tmp_path / "server.log").read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


# -- TLS ------------------------------------------------------------------------------------------


class Pki:
    """A CA and certificates it signs, made for the test (EC keys: quick to make)."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._ec, self._oid = x509, ec, NameOID
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
        self.ca_cert = (
            self._builder(name, name, self.ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, _sha256())
        )

    def _builder(self, subject, issuer, public_key):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            self._x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(self._x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, common_name: str) -> tuple[str, str]:
        """(private key PEM, certificate PEM) for ``common_name``, valid for 127.0.0.1."""
        import ipaddress

        from cryptography.hazmat.primitives import serialization

        x509 = self._x509
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, common_name)])
        cert = (
            self._builder(subject, self.ca_cert.subject, key.public_key())
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .sign(self.ca_key, _sha256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return key_pem, _pem(cert)

    @property
    def ca_pem(self) -> str:
        return _pem(self.ca_cert)


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _pem(cert) -> str:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM).decode()


class TlsServer(Server):
    """Our server with ``--ssl_config_file``; its own channel speaks TLS with ``credentials``."""

    def __init__(self, *args, credentials: grpc.ChannelCredentials, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channel.close()
        self.channel = grpc.secure_channel(f"127.0.0.1:{self.port}", credentials)
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)


def test_tls_with_client_verification(tmp_path, half_base, start_server):
    pki = Pki()
    server_key, server_cert = pki.issue("server")
    client_key, client_cert = pki.issue("client")
    config = tmp_path / "ssl.config"
    config.write_text(
        f"server_key: {server_key!r}\nserver_cert: {server_cert!r}\n"
        f"custom_ca: {pki.ca_pem!r}\nclient_verify: true\n"
    )
    with_client_cert = grpc.ssl_channel_credentials(
        pki.ca_pem.encode(), client_key.encode(), client_cert.encode()
    )
    server = start_server(
        half_base,
        model_name="half",
        server_class=TlsServer,
        credentials=with_client_cert,
        extra=[f"--ssl_config_file={config}"],
    )
    assert half_plus_two(server.channel) == 3.0
    address = f"127.0.0.1:{server.port}"
    without_client_cert = grpc.secure_channel(
        address, grpc.ssl_channel_credentials(pki.ca_pem.encode())
    )
    for refused in (without_client_cert, grpc.insecure_channel(address)):
        with pytest.raises(grpc.RpcError) as info:
            half_plus_two(refused)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "gRPC (TLS) on" in server.log()


# -- CORS and the profiler service ----------------------------------------------------------------


def test_cors_headers_and_preflight(half_base, start_server):
    server = start_server(half_base, model_name="half", extra=["--rest_api_enable_cors_support"])
    cors = {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "POST, GET",
        "Access-Control-Allow-Headers": "Content-Type",
    }
    url = f"http://127.0.0.1:{server.rest_port}/v1/models/half"
    answers = {
        "status": http(url),
        "predict": http(f"{url}:predict", "POST", body=b'{"instances": [2.0]}'),
        "error": http(f"{url}/versions/9"),
        "preflight": http(url, "OPTIONS", {"Origin": "https://example.com"}),
    }
    for what, (_, headers, _) in answers.items():
        assert {k: headers.get(k) for k in cors} == cors, what
    assert answers["predict"][0] == 200
    assert json.loads(answers["predict"][2]) == {"predictions": [3.0]}
    assert answers["error"][0] == 404
    assert answers["preflight"][:1] == (200,) and answers["preflight"][2] == b""
    status, headers, body = http(url, "OPTIONS")
    assert status == 400 and headers.get("Access-Control-Allow-Origin") == "*"
    assert json.loads(body) == {"error": "Origin header is missing in CORS preflight"}


def test_profiler_trace_over_the_grpc_port(tmp_path, half_base, start_server):
    """test_profiler_service_with_valid_trace_request: ``profiler_client.trace`` against the gRPC
    port while REST predicts run writes a trace under the log directory."""
    from tensorflow.python.profiler import profiler_client

    server = start_server(half_base, model_name="half")  # --enable_profiler: default true
    url = f"http://127.0.0.1:{server.rest_port}/v1/models/half:predict"
    stop = threading.Event()

    def predicts() -> None:
        while not stop.is_set():
            http(url, "POST", body=b'{"instances": [2.0, 3.0, 4.0]}')
            stop.wait(0.2)

    load = threading.Thread(target=predicts, daemon=True)
    load.start()
    logdir = tmp_path / "logs"
    logdir.mkdir()
    try:
        profiler_client.trace(f"127.0.0.1:{server.port}", str(logdir), 1000, "", 10)
    finally:
        stop.set()
        load.join(timeout=10)
    traces = glob.glob(str(logdir / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert traces and Path(traces[0]).stat().st_size > 0, list(logdir.rglob("*"))
    assert half_plus_two(server.channel) == 3.0  # still serving


# -- config files that do not parse: TF Serving's wording at startup ------------------------------


def run_to_exit(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            PYTHON,
            "-m",
            "serving",
            f"--port={free_port()}",
            f"--rest_api_port={free_port()}",
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_bad_model_config_file_as_upstream_checks_it(tmp_path):
    """testBadModelConfig: an improperly formatted file, looked for in stderr."""
    config = tmp_path / "bad_model_config.txt"
    config.write_text("improperly formatted file\n")
    done = run_to_exit(
        f"--model_config_file={config}", "--grpc_socket_path=" + str(tmp_path / "s.sock")
    )
    assert done.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in done.stderr
    assert "--model_config_file" in done.stderr


def test_bad_session_config_file_stops_the_server_at_startup(tmp_path, half_base):
    config = tmp_path / "session.config"
    config.write_text("intra_op_parallelism_threads: lots\n")
    done = run_to_exit(
        "--model_name=half",
        f"--model_base_path={half_base}",
        "--num_workers=1",
        f"--tensorflow_session_config_file={config}",
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert (
        f"--tensorflow_session_config_file: {config}: Error parsing text-format "
        "tensorflow.ConfigProto: 1:31" in done.stderr
    ), done.stderr[-3000:]
    assert "LOADING" not in done.stderr  # refused before anything loads
