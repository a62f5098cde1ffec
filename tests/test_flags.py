"""``python -m serving``'s command line: TF Serving's flags, both syntaxes, their defaults, and a
clear exit naming the flag for a bad value; parsed in-process (``serving.flags.parse_args``). One
subprocess checks what only a fresh process can show: ``--help`` lists the flags without
importing TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from serving.flags import DEFAULT_THREADS, IGNORED, parse_args
from serving.metrics import DEFAULT_PROMETHEUS_PATH as METRICS_PATH
from tests.servers import REPO

# (flag, command-line value, Options attribute, parsed value, TF Serving's default)
FLAGS = [
    ("port", "9000", "port", 9000, 8500),
    ("rest_api_port", "9001", "rest_api_port", 9001, 0),
    ("model_name", "mnist", "model_name", "mnist", "default"),
    ("bind_address", "0.0.0.0", "bind_address", "0.0.0.0", "127.0.0.1"),
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


def test_a_negative_poll_wait_is_accepted():  # TF Serving's way to poll once
    argv = ["--model_base_path=/m", "--file_system_poll_wait_seconds=-1"]
    assert parse_args(argv).file_system_poll_wait_seconds == -1


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


def _refused(argv: list[str], capsys) -> str:
    """What ``parse_args`` prints as it exits with status 2 (argparse's usage error)."""
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "args, named",
    [
        (["--no_such_flag=1"], "--no_such_flag"),
        (["--port", "notaport"], "--port"),
        (["--enable_model_warmup=maybe"], "--enable_model_warmup"),
        (["--file_system_poll_wait_seconds=soon"], "--file_system_poll_wait_seconds"),
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
def test_bad_flag_exits_naming_it(args, named, capsys):
    assert named in _refused(["--model_base_path=/tmp/x", *args], capsys)


@pytest.mark.parametrize(
    "argv, named",
    [
        ([], "--model_base_path"),
        (["--model_base_path=/m", "--port=70000"], "--port"),
        (
            ["--model_config_file=/c", "--model_config_file_poll_wait_seconds=x"],
            "--model_config_file_poll_wait_seconds",
        ),
    ],
)
def test_a_missing_or_bad_model_flag_exits_naming_it(argv, named, capsys):
    assert named in _refused(argv, capsys)


def test_bad_monitoring_config_exits_naming_the_flag(tmp_path, capsys):
    for text in (
        "prometheus_config { enable: yes please }",
        "prometheus_config { nope: 1 }",
        'prometheus_config { enable: true path: "metrics" }',
    ):
        config = tmp_path / "monitoring.config"
        config.write_text(text)
        argv = ["--model_base_path=/tmp/x", f"--monitoring_config_file={config}"]
        assert "--monitoring_config_file" in _refused(argv, capsys), text


def test_batching_parameters_file_needs_enable_batching_and_must_parse(tmp_path, capsys):
    config = tmp_path / "batching.config"
    config.write_text("max_batch_size { value: 8 } allowed_batch_sizes: 4")
    refused = _refused(["--model_base_path=/m", f"--batching_parameters_file={config}"], capsys)
    assert "--enable_batching" in refused
    argv = ["--model_base_path=/m", "--enable_batching", f"--batching_parameters_file={config}"]
    refused = _refused(argv, capsys)
    assert str(config) in refused and "allowed_batch_sizes" in refused


def test_help_lists_the_flags_without_tensorflow():
    code = (
        "import sys\nfrom serving.__main__ import main\ntry:\n    main(['--help'])\n"
        "except SystemExit as e:\n    assert e.code == 0\n"
        "print('TF' if 'tensorflow' in sys.modules else 'noTF')"
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert time.monotonic() - start < 5
    assert done.returncode == 0, done.stderr
    for flag in (
        "--file_system_poll_wait_seconds",
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


# -- every flag of TF Serving's main.cc ------------------------------------------------------------


def test_every_tf_serving_flag_is_accepted(tmp_path):
    """A command line with each of the 48 flags of TF Serving's main.cc (our own list, in its
    order) starts; those without effect here are reported as ignored."""
    files = {
        "batching": "max_batch_size { value: 8 }",
        "model_config": 'model_config_list { config { name: "m" base_path: "/m" } }',
        "monitoring": "prometheus_config { enable: true }",
        "ssl": 'server_key: "KEY" server_cert: "CERT"',
        "session": "allow_soft_placement: true",
        "platform": "",
        "thread_pool": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    every_flag = [
        "--port=9000",
        f"--grpc_socket_path={tmp_path / 'tf.sock'}",
        "--rest_api_port=9001",
        "--rest_api_num_threads=3",
        "--rest_api_timeout_in_ms=1000",
        "--rest_api_enable_cors_support=true",
        "--enable_batching=true",
        "--allow_version_labels_for_unavailable_models=true",
        f"--batching_parameters_file={tmp_path / 'batching'}",
        "--enable_per_model_batching_parameters=false",
        f"--model_config_file={tmp_path / 'model_config'}",
        "--model_config_file_poll_wait_seconds=5",
        "--model_name=m",
        "--model_base_path=/m",
        "--num_load_threads=2",
        "--num_unload_threads=2",
        "--max_num_load_retries=1",
        "--load_retry_interval_micros=1000",
        "--file_system_poll_wait_seconds=2",
        "--flush_filesystem_caches=true",
        "--tensorflow_session_parallelism=0",
        f"--tensorflow_session_config_file={tmp_path / 'session'}",
        "--tensorflow_intra_op_parallelism=2",
        "--tensorflow_inter_op_parallelism=2",
        "--use_alts_credentials=false",
        f"--ssl_config_file={tmp_path / 'ssl'}",
        f"--platform_config_file={tmp_path / 'platform'}",
        "--per_process_gpu_memory_fraction=0.5",
        "--saved_model_tags=serve",
        "--grpc_channel_arguments=grpc.so_reuseaddr=1",
        "--grpc_max_threads=3",
        "--enable_model_warmup=true",
        "--num_request_iterations_for_warmup=2",
        "--version=false",
        f"--monitoring_config_file={tmp_path / 'monitoring'}",
        "--remove_unused_fields_from_bundle_metagraph=true",
        "--prefer_tflite_model=false",
        "--num_tflite_pools=4",
        "--num_tflite_interpreters_per_pool=1",
        "--enable_signature_method_name_check=false",
        "--xla_cpu_compilation_enabled=false",
        "--xla_gpu_compilation_enabled=false",
        "--enable_profiler=true",
        f"--thread_pool_factory_config_file={tmp_path / 'thread_pool'}",
        "--mixed_precision=",
        "--skip_initialize_tpu=false",
        "--enable_grpc_healthcheck_service=true",
        "--enable_serialization_as_tensor_content=false",
    ]
    assert len(every_flag) == 48
    options = parse_args(every_flag)
    assert options.num_load_threads == 2 and options.num_request_iterations_for_warmup == 2
    assert options.ssl is not None and options.ssl.server_key == "KEY"
    assert [flag for flag, _ in options.ignored_flags] == [f"--{name}" for name in IGNORED]
    assert ("--use_alts_credentials", "false") in options.ignored_flags
    assert parse_args(["--model_base_path=/m"]).ignored_flags == ()


# (flag, command-line value, what Options holds, TF Serving's default as Options holds it)
NEW_FLAGS = [
    ("grpc_socket_path", "/tmp/s.sock", lambda o: o.grpc_socket_path, "/tmp/s.sock", ""),
    (
        "grpc_channel_arguments",
        "grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb,grpc.so_reuseaddr=1",
        lambda o: o.grpc_channel_arguments,
        (
            ("grpc.max_connection_age_ms", 2000),
            ("grpc.lb_policy_name", "grpclb"),
            ("grpc.so_reuseaddr", 1),
        ),
        (),
    ),
    (
        "rest_api_enable_cors_support",
        "true",
        lambda o: o.rest_api_enable_cors_support,
        True,
        False,
    ),
    ("saved_model_tags", "serve,gpu", lambda o: o.saved_model_tags, ("serve", "gpu"), ("serve",)),
    ("max_num_load_retries", "0", lambda o: o.max_num_load_retries, 0, 5),
    ("load_retry_interval_micros", "250000", lambda o: o.load_retry_interval_s, 0.25, 60.0),
    ("num_load_threads", "4", lambda o: o.num_load_threads, 4, 0),
    ("num_request_iterations_for_warmup", "3", lambda o: o.num_request_iterations_for_warmup, 3, 1),
    ("enable_profiler", "false", lambda o: o.enable_profiler, False, True),
    (
        "tensorflow_intra_op_parallelism",
        "3",
        lambda o: (o.session.intra_op_parallelism, o.session.inter_op_parallelism),
        (3, 0),
        (0, 0),
    ),
    (
        "tensorflow_session_parallelism",
        "5",
        lambda o: (o.session.intra_op_parallelism, o.session.inter_op_parallelism),
        (5, 5),
        (0, 0),
    ),
    (
        "per_process_gpu_memory_fraction",
        "0.25",
        lambda o: o.session.per_process_gpu_memory_fraction,
        0.25,
        0.0,
    ),
]


@pytest.mark.parametrize(
    "flag, text, read, value, default", NEW_FLAGS, ids=[f[0] for f in NEW_FLAGS]
)
def test_serving_flag_both_syntaxes_and_default(flag, text, read, value, default):
    assert read(parse_args(["--model_base_path=/m"])) == default
    assert read(parse_args(["--model_base_path=/m", f"--{flag}={text}"])) == value
    assert read(parse_args(["--model_base_path", "/m", f"--{flag}", text])) == value


def test_parallelism_flags_as_tf_serving_combines_them(capsys):
    def threads(*flags: str) -> tuple[int, int]:
        session = parse_args(["--model_base_path=/m", *flags]).session
        return session.intra_op_parallelism, session.inter_op_parallelism

    # The separate values win over the joint one when either is set.
    assert threads("--tensorflow_session_parallelism=4", "--tensorflow_inter_op_parallelism=2") == (
        0,
        2,
    )
    all_three = [
        "--tensorflow_session_parallelism=4",
        "--tensorflow_intra_op_parallelism=1",
        "--tensorflow_inter_op_parallelism=2",
    ]
    assert "you cannot configure all" in _refused(["--model_base_path=/m", *all_three], capsys)


def test_negative_retry_interval_means_no_wait_and_warmup_iterations_at_least_one():
    options = parse_args(
        [
            "--model_base_path=/m",
            "--load_retry_interval_micros=-1",
            "--num_request_iterations_for_warmup=-3",
        ]
    )
    assert options.load_retry_interval_s == 0.0
    assert options.num_request_iterations_for_warmup == 1


@pytest.mark.parametrize(
    "args, named",
    [
        (["--grpc_channel_arguments=grpc.so_reuseaddr"], "--grpc_channel_arguments"),
        (["--saved_model_tags=,"], "--saved_model_tags"),
        (["--max_num_load_retries=-1"], "--max_num_load_retries"),
        (["--load_retry_interval_micros=soon"], "--load_retry_interval_micros"),
        (["--num_load_threads=-1"], "--num_load_threads"),
        (["--tensorflow_intra_op_parallelism=-2"], "--tensorflow_intra_op_parallelism"),
        (["--per_process_gpu_memory_fraction=-0.5"], "--per_process_gpu_memory_fraction"),
        (["--per_process_gpu_memory_fraction=nan"], "--per_process_gpu_memory_fraction"),
        (["--enable_profiler=maybe"], "--enable_profiler"),
        (["--tensorflow_session_config_file=/does/not/exist"], "--tensorflow_session_config_file"),
        (["--ssl_config_file=/does/not/exist"], "--ssl_config_file"),
        # Flags without effect still have TF Serving's types.
        (["--num_tflite_pools=many"], "--num_tflite_pools"),
        (["--prefer_tflite_model=maybe"], "--prefer_tflite_model"),
        (["--port=0"], "--grpc_socket_path"),
        (["--use_alts_credentials", "--ssl_config_file=/x"], "use_alts_credentials"),
    ],
)
def test_bad_serving_flag_exits_naming_it(args, named, capsys):
    assert named in _refused(["--model_base_path=/m", *args], capsys)


def test_grpc_only_on_a_unix_socket():
    options = parse_args(["--model_base_path=/m", "--port=0", "--grpc_socket_path=/tmp/s.sock"])
    assert options.port == 0 and options.grpc_socket_path == "/tmp/s.sock"


def test_channel_arguments_are_ints_only_within_int32():
    from serving.transport import parse_channel_arguments

    assert parse_channel_arguments("a=2147483647,b=2147483648,c=-5,d=x=y,e=") == (
        ("a", 2147483647),
        ("b", "2147483648"),
        ("c", -5),
        ("d", "x=y"),
        ("e", ""),
    )
    assert parse_channel_arguments("") == ()


# -- config files that do not parse: TF Serving's wording -----------------------------------------

# Our own file in the spirit of upstream's testdata/bad_model_config.txt: not a text proto at all.
NOT_A_TEXT_PROTO = "this is not a text-format protobuf\n"


@pytest.mark.parametrize(
    "flag, proto",
    [
        ("--ssl_config_file", "tensorflow.serving.SSLConfig"),
        ("--monitoring_config_file", "tensorflow.serving.MonitoringConfig"),
        ("--batching_parameters_file", "tensorflow.serving.BatchingParameters"),
    ],
)
def test_a_config_file_that_does_not_parse_is_reported_as_tf_serving_does(
    tmp_path, capsys, flag, proto
):
    path = tmp_path / "bad.config"
    path.write_text(NOT_A_TEXT_PROTO)
    argv = ["--model_base_path=/m", "--enable_batching", f"{flag}={path}"]
    refused = _refused(argv, capsys)
    assert f"{flag}: {path}: Error parsing text-format {proto}: 1:1" in refused, refused


def test_a_model_config_file_that_does_not_parse_is_reported_as_tf_serving_does(tmp_path):
    from serving.errors import ServingError
    from serving.model_config import read_file

    path = tmp_path / "bad_model_config.txt"
    path.write_text(NOT_A_TEXT_PROTO)
    with pytest.raises(ServingError) as info:
        read_file(str(path))
    assert info.value.message.startswith(
        f"--model_config_file: {path}: Error parsing text-format "
        "tensorflow.serving.ModelServerConfig: 1:1"
    ), info.value.message


@pytest.mark.parametrize(
    "text, problem",
    [
        ('server_cert: "CERT"', "server_key and server_cert are required"),
        ('server_key: "K" server_cert: "C" client_verify: true', "client_verify needs custom_ca"),
    ],
)
def test_an_ssl_config_that_cannot_serve_is_refused(tmp_path, capsys, text, problem):
    path = tmp_path / "ssl.config"
    path.write_text(text)
    refused = _refused(["--model_base_path=/m", f"--ssl_config_file={path}"], capsys)
    assert "--ssl_config_file" in refused and problem in refused


def test_session_config_is_the_file_with_the_flags_over_it():
    from serving.tf_runtime import session_config
    from serving.types import SessionSettings

    default = session_config()
    assert default.inter_op_parallelism_threads == -1  # ops in the calling thread
    assert default.intra_op_parallelism_threads == 0
    text = "intra_op_parallelism_threads: 3 allow_soft_placement: true"
    from_file = session_config(SessionSettings("s.config", text))
    assert from_file.intra_op_parallelism_threads == 3 and from_file.allow_soft_placement
    assert from_file.inter_op_parallelism_threads == -1
    flagged = session_config(
        SessionSettings("s.config", text, 2, 4, per_process_gpu_memory_fraction=0.5)
    )
    assert (flagged.intra_op_parallelism_threads, flagged.inter_op_parallelism_threads) == (2, 4)
    assert flagged.gpu_options.per_process_gpu_memory_fraction == 0.5
    assert flagged.allow_soft_placement
    with pytest.raises(ValueError) as info:
        session_config(SessionSettings("bad.config", NOT_A_TEXT_PROTO))
    assert str(info.value).startswith(
        "--tensorflow_session_config_file: bad.config: Error parsing text-format "
        "tensorflow.ConfigProto: 1:1"
    )


def test_version_prints_tf_serving_lines_without_tensorflow():
    code = (
        "import sys\nfrom serving.__main__ import main\ntry:\n    main(['--version'])\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('TF' if 'tensorflow' in sys.modules else 'noTF')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("TensorFlow ModelServer: ") and "train-and-serve" in lines[0]
    assert lines[1] == f"TensorFlow Library: {tf_version()}"
    assert lines[2] == "noTF"


def tf_version() -> str:
    from importlib import metadata

    return metadata.version("tensorflow")
