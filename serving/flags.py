"""Command-line flags of ``tensorflow_model_server``, parsed into a typed ``Options``.

The server is a drop-in for TF Serving: every flag of its main.cc is accepted, with its name and
default (see docs/tf-serving-compat.md), so a production command line starts unchanged. Those
that cannot mean anything here (TF Lite, TPU, ALTS, platform configs, ...: ``IGNORED``) are
accepted with their types checked and logged at startup as ignored; an unknown flag fails naming
it. A bad value is rejected with a message naming the flag, and the config files named by flags
are read here, so a bad one stops the server before anything loads (the session ConfigProto,
which needs TensorFlow's protos, is read here and parsed by each worker before it answers).
``--version`` prints TF Serving's two version lines. This module must not import TensorFlow:
``--help``, ``--version`` and flag errors have to be instant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.transport import ChannelArguments, SslConfig, parse_channel_arguments
from serving.types import SessionSettings

if TYPE_CHECKING:
    from serving.batching import BatchingConfig

DEFAULT_THREADS = 4 * (os.cpu_count() or 1)  # TF Serving's default for both thread flags
# One worker process per core this process may run on: a Python process serves on one core at
# most (the GIL), so fewer workers leave cores idle and more only add memory (a model per worker).
DEFAULT_WORKERS = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
)


# TF Serving's flags without an effect here: each is accepted (type-checked) and logged at startup
# when given. Why each cannot apply:
IGNORED = {
    "num_unload_threads": "unloads run with their model's load pass (--num_load_threads)",
    "flush_filesystem_caches": "the models' file systems keep no caches of their own to flush",
    "use_alts_credentials": "no ALTS (Google-internal transport); use --ssl_config_file",
    "platform_config_file": "one platform (TensorFlow SavedModels), set by the session flags",
    "remove_unused_fields_from_bundle_metagraph": "only the signatures are kept after a load",
    "prefer_tflite_model": "no TF Lite runtime",
    "num_tflite_pools": "no TF Lite runtime",
    "num_tflite_interpreters_per_pool": "no TF Lite runtime",
    "xla_cpu_compilation_enabled": "XLA runs as TensorFlow's Python runtime decides",
    "xla_gpu_compilation_enabled": "XLA runs as TensorFlow's Python runtime decides",
    "thread_pool_factory_config_file": "no custom inter-op thread pool factories",
    "mixed_precision": "no automatic mixed precision rewrite",
    "skip_initialize_tpu": "no TPU support",
}


@dataclass(frozen=True)
class Options:
    """Parsed, validated server options."""

    port: int = 8500  # 0: no gRPC TCP port (then --grpc_socket_path)
    grpc_socket_path: str = ""  # gRPC also on this Unix socket
    grpc_channel_arguments: ChannelArguments = ()
    ssl: SslConfig | None = None  # --ssl_config_file: TLS on gRPC
    rest_api_port: int = 0
    rest_api_enable_cors_support: bool = False
    bind_address: str = "127.0.0.1"
    model_name: str = "default"
    model_base_path: str | None = None
    model_config_file: str | None = None  # when set, model_name/model_base_path are ignored
    model_config_file_poll_wait_seconds: float = 0.0
    allow_version_labels_for_unavailable_models: bool = False
    file_system_poll_wait_seconds: float = 1.0
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 1  # each warmup record is replayed this many times
    saved_model_tags: tuple[str, ...] = ("serve",)
    session: SessionSettings = SessionSettings()  # every version's TensorFlow session
    max_num_load_retries: int = 5
    load_retry_interval_s: float = 60.0  # from --load_retry_interval_micros; <= 0: no wait
    num_load_threads: int = 0  # models whose versions load at once; 0 and 1: one at a time
    rest_api_timeout_in_ms: int = 30000
    grpc_max_threads: int = DEFAULT_THREADS
    rest_api_num_threads: int = DEFAULT_THREADS
    enable_grpc_healthcheck_service: bool = False
    enable_profiler: bool = True  # TensorFlow's ProfilerService on the gRPC port
    # Response tensors in tensor_content instead of the typed fields (float_val, ...).
    enable_serialization_as_tensor_content: bool = False
    # Classify/Regress/MultiInference refuse a signature of another method_name only when set.
    enable_signature_method_name_check: bool = False
    prometheus_path: str | None = None  # from --monitoring_config_file; None = no metrics page
    batching: BatchingConfig | None = None  # --enable_batching; None = no server-side batching
    num_workers: int = DEFAULT_WORKERS  # serving processes sharing the ports (an extension)
    ignored_flags: tuple[tuple[str, str], ...] = ()  # (flag, value) given but without effect

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


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not value >= 0:  # also NaN; above 1 is TensorFlow's unified-memory oversubscription
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _channel_arguments(text: str) -> ChannelArguments:
    try:
        return parse_channel_arguments(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tags(text: str) -> tuple[str, ...]:
    tags = tuple(tag for tag in text.split(",") if tag)
    if not tags:
        raise argparse.ArgumentTypeError(f"no tag in {text!r}")
    return tags


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
    _add_load_flags(parser)
    _add_session_flags(parser)
    _add_request_flags(parser)
    _add_batching_flags(parser)
    parser.add_argument(
        "--num_workers",
        type=_int_at_least(1),
        default=DEFAULT_WORKERS,
        help="serving processes sharing the gRPC and REST ports, each with every model loaded, "
        f"all following one version manager (extension; default: cores = {DEFAULT_WORKERS})",
    )
    _add_switch(parser, "--version", False, "print the version lines and exit")
    _add_ignored_flags(parser)
    return parser


def _add_switch(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """A boolean flag as TF Serving takes them: ``--name``, ``--name=true``, ``--name=false``."""
    parser.add_argument(name, type=_bool, nargs="?", const=True, default=default, help=help)


def _add_port_flags(parser: argparse.ArgumentParser) -> None:
    """Where and how the gRPC and REST servers listen."""
    add = parser.add_argument
    add("--port", type=_port, default=8500, help="gRPC port, 0 = none (default 8500)")
    add(
        "--grpc_socket_path",
        default="",
        help="also serve gRPC on this Unix socket (relative or absolute path)",
    )
    add(
        "--grpc_channel_arguments",
        type=_channel_arguments,
        default=(),
        help="comma-separated key=value arguments of the gRPC server "
        "(e.g. grpc.max_connection_age_ms=2000)",
    )
    add(
        "--ssl_config_file",
        default="",
        help="text-format SSLConfig (server_key, server_cert, custom_ca, client_verify): TLS on "
        "gRPC",
    )
    add("--rest_api_port", type=_port, default=0, help="REST port, 0 = off (default 0)")
    _add_switch(
        parser,
        "--rest_api_enable_cors_support",
        False,
        "add CORS headers to REST responses (default false)",
    )
    add(
        "--bind_address",
        default="127.0.0.1",
        help="address both ports listen on (extension; default 127.0.0.1)",
    )


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """What is served, where it comes from, and how versions are found."""
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


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    """How a version is loaded: tags, retries, concurrency, warmup."""
    add = parser.add_argument
    add(
        "--saved_model_tags",
        type=_tags,
        default=("serve",),
        help="comma-separated tags of the SavedModel meta graph to load (default serve)",
    )
    add(
        "--max_num_load_retries",
        type=_int_at_least(0),
        default=5,
        help="retries of a failed load before it is given up; 0 = one attempt (default 5)",
    )
    add(
        "--load_retry_interval_micros",
        type=_int,
        default=60_000_000,
        help="microseconds between load retries; negative = no wait (default 1 minute)",
    )
    add(
        "--num_load_threads",
        type=_int_at_least(0),
        default=0,
        help="models whose versions load at the same time; 0 = one at a time (default 0)",
    )
    _add_switch(
        parser,
        "--enable_model_warmup",
        True,
        "replay assets.extra/tf_serving_warmup_requests before serving a version",
    )
    add(
        "--num_request_iterations_for_warmup",
        type=_int,
        default=0,
        help="times each warmup request is replayed, used when > 0 (default: once)",
    )


def _add_session_flags(parser: argparse.ArgumentParser) -> None:
    """Each version's TensorFlow session: its ConfigProto, threads and GPU memory."""
    add = parser.add_argument
    add(
        "--tensorflow_session_config_file",
        default="",
        help="text-format tensorflow.ConfigProto of every version's session; the flags below "
        "override its fields",
    )
    for name, what in (
        ("tensorflow_session_parallelism", "threads of both pools (intra- and inter-op)"),
        ("tensorflow_intra_op_parallelism", "threads that one op may use"),
        ("tensorflow_inter_op_parallelism", "ops that may run at once"),
    ):
        add(f"--{name}", type=_int_at_least(0), default=0, help=f"{what}; 0 = auto (default 0)")
    add(
        "--per_process_gpu_memory_fraction",
        type=_fraction,
        default=0.0,
        help="fraction of each GPU's memory a worker takes; 0 = TensorFlow's choice (default 0)",
    )


def _add_request_flags(parser: argparse.ArgumentParser) -> None:
    """How the front ends take requests: timeouts, concurrency, health, profiling and metrics."""
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
        "--enable_profiler",
        True,
        "serve TensorFlow's ProfilerService on the gRPC port (default true)",
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


# The types TF Serving gives the flags in IGNORED: a value of the wrong type is still refused.
_IGNORED_INTS = ("num_unload_threads", "num_tflite_pools", "num_tflite_interpreters_per_pool")
_IGNORED_TEXTS = ("platform_config_file", "thread_pool_factory_config_file", "mixed_precision")


def _add_ignored_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accepted for compatibility, without effect here")
    for name, reason in IGNORED.items():
        flag, help = f"--{name}", f"ignored: {reason}"
        if name in _IGNORED_INTS:
            group.add_argument(flag, type=_int, default=None, help=help)
        elif name in _IGNORED_TEXTS:
            group.add_argument(flag, default=None, help=help)
        else:  # a boolean
            group.add_argument(flag, type=_bool, nargs="?", const=True, default=None, help=help)


def parse_args(argv: list[str] | None = None) -> Options:
    """Parse ``argv``; on a bad flag print a message naming it and exit with status 2.
    ``--version`` prints the version lines and exits with status 0."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.version:
        print(version_lines())
        sys.exit(0)
    _check_combinations(parser, ns)
    return Options(
        port=ns.port,
        grpc_socket_path=ns.grpc_socket_path,
        grpc_channel_arguments=ns.grpc_channel_arguments,
        ssl=_ssl(parser, ns.ssl_config_file),
        rest_api_port=ns.rest_api_port,
        rest_api_enable_cors_support=ns.rest_api_enable_cors_support,
        bind_address=ns.bind_address,
        model_name=ns.model_name,
        model_base_path=ns.model_base_path,
        model_config_file=ns.model_config_file or None,
        model_config_file_poll_wait_seconds=ns.model_config_file_poll_wait_seconds,
        allow_version_labels_for_unavailable_models=ns.allow_version_labels_for_unavailable_models,
        file_system_poll_wait_seconds=ns.file_system_poll_wait_seconds,
        enable_model_warmup=ns.enable_model_warmup,
        num_request_iterations_for_warmup=max(1, ns.num_request_iterations_for_warmup),
        saved_model_tags=ns.saved_model_tags,
        session=_session(parser, ns),
        max_num_load_retries=ns.max_num_load_retries,
        load_retry_interval_s=max(0.0, ns.load_retry_interval_micros / 1e6),
        num_load_threads=ns.num_load_threads,
        rest_api_timeout_in_ms=ns.rest_api_timeout_in_ms,
        grpc_max_threads=ns.grpc_max_threads,
        rest_api_num_threads=ns.rest_api_num_threads,
        enable_grpc_healthcheck_service=ns.enable_grpc_healthcheck_service,
        enable_profiler=ns.enable_profiler,
        enable_serialization_as_tensor_content=ns.enable_serialization_as_tensor_content,
        enable_signature_method_name_check=ns.enable_signature_method_name_check,
        prometheus_path=_prometheus_path(parser, ns.monitoring_config_file),
        batching=_batching(parser, ns),
        num_workers=ns.num_workers,
        ignored_flags=tuple(
            (f"--{name}", _text(getattr(ns, name)))
            for name in IGNORED
            if getattr(ns, name) is not None
        ),
    )


def _text(value: object) -> str:
    """A flag's value as TF Serving's command line writes it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_combinations(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """What TF Serving refuses at startup about flags together (its checks, its order)."""
    if not ns.port and not ns.grpc_socket_path:
        parser.error("--port: at least one of --port and --grpc_socket_path must be set")
    if ns.use_alts_credentials and ns.ssl_config_file:
        parser.error(
            "--ssl_config_file: either use_alts_credentials must be false or "
            "ssl_config_file must be empty"
        )
    if ns.batching_parameters_file and not ns.enable_batching:
        parser.error("--batching_parameters_file is set without setting --enable_batching")
    if not ns.model_config_file:
        if not ns.model_base_path:
            parser.error("--model_base_path (or --model_config_file) is required")
        if not ns.model_name or "/" in ns.model_name or ":" in ns.model_name:
            parser.error(f"--model_name: invalid model name {ns.model_name!r}")
    if (
        ns.tensorflow_intra_op_parallelism
        and ns.tensorflow_inter_op_parallelism
        and ns.tensorflow_session_parallelism
    ):
        parser.error(
            "--tensorflow_session_parallelism: either configure it or "
            "(--tensorflow_intra_op_parallelism, --tensorflow_inter_op_parallelism) "
            "separately; you cannot configure all"
        )


def version_lines() -> str:
    """``--version``'s output, TF Serving's two lines: the TF Serving API this server implements
    (with our own version) and the TensorFlow it runs, from the installed packages' metadata."""
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return (
        f"TensorFlow ModelServer: {installed('tensorflow-serving-api')}"
        f"+train-and-serve.{installed('train-and-serve')}\n"
        f"TensorFlow Library: {installed('tensorflow')}"
    )


def _session(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> SessionSettings:
    """The session flags, ``--tensorflow_session_config_file`` read now (a missing file fails at
    startup); TF Serving's rule: the separate intra/inter values win over the joint one."""
    text = ""
    if ns.tensorflow_session_config_file:
        from serving import textproto

        try:
            text = textproto.read_text(ns.tensorflow_session_config_file)
        except ValueError as e:
            parser.error(f"--tensorflow_session_config_file: {e}")
    intra, inter = ns.tensorflow_intra_op_parallelism, ns.tensorflow_inter_op_parallelism
    if not intra and not inter:
        intra = inter = ns.tensorflow_session_parallelism
    return SessionSettings(
        config_file=ns.tensorflow_session_config_file,
        config_text=text,
        intra_op_parallelism=intra,
        inter_op_parallelism=inter,
        per_process_gpu_memory_fraction=ns.per_process_gpu_memory_fraction,
    )


def _ssl(parser: argparse.ArgumentParser, config_file: str) -> SslConfig | None:
    """Read --ssl_config_file now, so that a bad one fails at startup naming the flag."""
    if not config_file:
        return None
    from serving.transport import read_ssl_config

    try:
        return read_ssl_config(config_file)
    except ValueError as e:
        parser.error(f"--ssl_config_file: {e}")


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
