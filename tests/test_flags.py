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

from serving.flags import DEFAULT_THREADS, parse_args
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
