"""Command-line flags of ``tensorflow_model_server``, parsed into a typed ``Options``.

The server is a drop-in for TF Serving, so flag names and defaults are TF Serving's (see
docs/tf-serving-compat.md). A bad value is rejected with a message naming the flag, and the
config files named by flags are read here, so a bad one stops the server before anything loads.
This module must not import TensorFlow: ``--help`` and flag errors have to be instant.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.batching import BatchingConfig

DEFAULT_THREADS = 4 * (os.cpu_count() or 1)  # TF Serving's default for both thread flags
# One worker process per core this process may run on: a Python process serves on one core at
# most (the GIL), so fewer workers leave cores idle and more only add memory (a model per worker).
DEFAULT_WORKERS = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
)


@dataclass(frozen=True)
class Options:
    """Parsed, validated server options."""

    port: int = 8500
    rest_api_port: int = 0
    bind_address: str = "127.0.0.1"
    model_name: str = "default"
    model_base_path: str | None = None
    model_config_file: str | None = None  # when set, model_name/model_base_path are ignored
    model_config_file_poll_wait_seconds: float = 0.0
    allow_version_labels_for_unavailable_models: bool = False
    file_system_poll_wait_seconds: float = 1.0
    enable_model_warmup: bool = True
    rest_api_timeout_in_ms: int = 30000
    grpc_max_threads: int = DEFAULT_THREADS
    rest_api_num_threads: int = DEFAULT_THREADS
    enable_grpc_healthcheck_service: bool = False
    # Response tensors in tensor_content instead of the typed fields (float_val, ...).
    enable_serialization_as_tensor_content: bool = False
    # Classify/Regress/MultiInference refuse a signature of another method_name only when set.
    enable_signature_method_name_check: bool = False
    prometheus_path: str | None = None  # from --monitoring_config_file; None = no metrics page
    batching: BatchingConfig | None = None  # --enable_batching; None = no server-side batching
    num_workers: int = DEFAULT_WORKERS  # serving processes sharing the ports (an extension)

    @property
    def num_threads(self) -> int:
        """Size of the model-call pool both front ends share: as many as either may run at once."""
        return max(self.grpc_max_threads, self.rest_api_num_threads)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "t", "y"):
        return True
    if value in ("false", "0", "no", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value: {text!r} (use true or false)")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0..65535: {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}")
    return value


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}: {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with TF Serving's flag names (``--flag=value`` and ``--flag value``)."""
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Model server compatible with tensorflow_model_server (gRPC + REST).",
        allow_abbrev=False,
    )
    # --help lists the flags in the order they are added here.
    _add_port_flags(parser)
    _add_model_flags(parser)
    _add_request_flags(parser)
    _add_batching_flags(parser)
    parser.add_argument(
        "--num_workers",
        type=_int_at_least(1),
        default=DEFAULT_WORKERS,
        help="serving processes sharing the gRPC and REST ports, each with every model loaded, "
        f"all following one version manager (extension; default: cores = {DEFAULT_WORKERS})",
    )
    return parser


def _add_switch(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """A boolean flag as TF Serving takes them: ``--name``, ``--name=true``, ``--name=false``."""
    parser.add_argument(name, type=_bool, nargs="?", const=True, default=default, help=help)


def _add_port_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--port", type=_port, default=8500, help="gRPC port (default 8500)")
    add("--rest_api_port", type=_port, default=0, help="REST port, 0 = off (default 0)")
    add(
        "--bind_address",
        default="127.0.0.1",
        help="address both ports listen on (extension; default 127.0.0.1)",
    )


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """What is served, where it comes from, and how versions are found and loaded."""
    add = parser.add_argument
    add("--model_name", default="default", help="name of the served model (default 'default')")
    add(
        "--model_base_path",
        default=None,
        help="directory holding numbered version subdirectories of the model",
    )
    add(
        "--model_config_file",
        default=None,
        help="text-format ModelServerConfig listing the served models; when set, "
        "--model_name and --model_base_path are ignored",
    )
    add(
        "--model_config_file_poll_wait_seconds",
        type=_seconds,
        default=0.0,
        help="seconds between re-reads of --model_config_file; 0 = read once (default 0)",
    )
    _add_switch(
        parser,
        "--allow_version_labels_for_unavailable_models",
        False,
        "let a new version label point at a version not loaded yet",
    )
    add(
        "--file_system_poll_wait_seconds",
        type=_seconds,
        default=1.0,
        help="seconds between polls of model_base_path; 0 = poll once, negative = never "
        "(fractions allowed, an extension)",
    )
    _add_switch(
        parser,
        "--enable_model_warmup",
        True,
        "replay assets.extra/tf_serving_warmup_requests before serving a version",
    )


def _add_request_flags(parser: argparse.ArgumentParser) -> None:
    """How the front ends take requests: timeouts, concurrency, health and metrics."""
    add = parser.add_argument
    add(
        "--rest_api_timeout_in_ms",
        type=_int_at_least(0),
        default=30000,
        help="timeout of a REST request in ms (default 30000)",
    )
    add(
        "--grpc_max_threads",
        type=_int_at_least(1),
        default=DEFAULT_THREADS,
        help=f"max concurrent gRPC model calls (default 4 x CPUs = {DEFAULT_THREADS})",
    )
    add(
        "--rest_api_num_threads",
        type=_int_at_least(1),
        default=DEFAULT_THREADS,
        help=f"max concurrent REST model calls (default 4 x CPUs = {DEFAULT_THREADS})",
    )
    _add_switch(
        parser,
        "--enable_grpc_healthcheck_service",
        False,
        "serve grpc.health.v1.Health on the gRPC port (default false)",
    )
    _add_switch(
        parser,
        "--enable_serialization_as_tensor_content",
        False,
        "write response tensors as tensor_content instead of the typed fields (default false)",
    )
    _add_switch(
        parser,
        "--enable_signature_method_name_check",
        False,
        "Classify, Regress and MultiInference accept only signatures of their method_name "
        "(default false)",
    )
    add(
        "--monitoring_config_file",
        default=None,
        help="text-format MonitoringConfig; prometheus_config { enable: true path: ... } serves "
        "Prometheus metrics on the REST port",
    )


def _add_batching_flags(parser: argparse.ArgumentParser) -> None:
    _add_switch(
        parser,
        "--enable_batching",
        False,
        "batch Predict requests on the server (default false)",
    )
    parser.add_argument(
        "--batching_parameters_file",
        default="",
        help="text-format BatchingParameters used with --enable_batching (default: TF Serving's "
        "defaults)",
    )
    _add_switch(
        parser,
        "--enable_per_model_batching_parameters",
        False,
        "with --enable_batching, batch a version only when its directory holds "
        "batching_params.pbtxt, with those parameters (default false)",
    )


def parse_args(argv: list[str] | None = None) -> Options:
    """Parse ``argv``; on a bad flag print a message naming it and exit with status 2."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.batching_parameters_file and not ns.enable_batching:  # TF Serving refuses it too
        parser.error("--batching_parameters_file is set without setting --enable_batching")
    if not ns.model_config_file:
        if not ns.model_base_path:
            parser.error("--model_base_path (or --model_config_file) is required")
        if not ns.model_name or "/" in ns.model_name or ":" in ns.model_name:
            parser.error(f"--model_name: invalid model name {ns.model_name!r}")
    return Options(
        port=ns.port,
        rest_api_port=ns.rest_api_port,
        bind_address=ns.bind_address,
        model_name=ns.model_name,
        model_base_path=ns.model_base_path,
        model_config_file=ns.model_config_file or None,
        model_config_file_poll_wait_seconds=ns.model_config_file_poll_wait_seconds,
        allow_version_labels_for_unavailable_models=ns.allow_version_labels_for_unavailable_models,
        file_system_poll_wait_seconds=ns.file_system_poll_wait_seconds,
        enable_model_warmup=ns.enable_model_warmup,
        rest_api_timeout_in_ms=ns.rest_api_timeout_in_ms,
        grpc_max_threads=ns.grpc_max_threads,
        rest_api_num_threads=ns.rest_api_num_threads,
        enable_grpc_healthcheck_service=ns.enable_grpc_healthcheck_service,
        enable_serialization_as_tensor_content=ns.enable_serialization_as_tensor_content,
        enable_signature_method_name_check=ns.enable_signature_method_name_check,
        prometheus_path=_prometheus_path(parser, ns.monitoring_config_file),
        batching=_batching(parser, ns),
        num_workers=ns.num_workers,
    )


def _batching(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> BatchingConfig | None:
    """Read --batching_parameters_file now, so that a bad one fails at startup naming it."""
    if not ns.enable_batching:
        return None
    from serving.batching import BatchingConfig, read_parameters
    from serving.types import BatchingParameters

    parameters = BatchingParameters()
    if ns.batching_parameters_file:
        try:
            parameters = read_parameters(ns.batching_parameters_file)
        except ValueError as e:
            parser.error(f"--batching_parameters_file: {e}")
    return BatchingConfig(parameters, per_model=ns.enable_per_model_batching_parameters)


def _prometheus_path(parser: argparse.ArgumentParser, config_file: str | None) -> str | None:
    """Read --monitoring_config_file now, so that a bad one fails at startup naming the flag."""
    if not config_file:
        return None
    from serving.metrics import read_monitoring_config  # only when given: --help stays instant

    try:
        return read_monitoring_config(config_file)
    except ValueError as e:
        parser.error(f"--monitoring_config_file: {e}")
