"""Command-line flags of ``tensorflow_model_server``, parsed into a typed ``Options``.

The server is a drop-in for TF Serving, so flag names and defaults are TF Serving's (see
docs/tf-serving-compat.md). Flags of TF Serving that this version does not implement yet are
accepted only at their default value: a value that would change behaviour is rejected with a message
naming the flag, rather than silently ignored. This module must not import TensorFlow: ``--help``
and flag errors have to be instant.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """Parsed, validated server options (single-model mode)."""

    port: int = 8500
    rest_api_port: int = 0
    bind_address: str = "127.0.0.1"
    model_name: str = "default"
    model_base_path: str | None = None
    file_system_poll_wait_seconds: float = 1.0
    enable_model_warmup: bool = True
    rest_api_timeout_in_ms: int = 30000
    grpc_max_threads: int = 0
    rest_api_num_threads: int = 0

    @property
    def num_threads(self) -> int:
        """Size of the model-call thread pool (TF Serving: 4 x CPUs)."""
        return max(self.grpc_max_threads, self.rest_api_num_threads) or 4 * (os.cpu_count() or 1)


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


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {value}")
    return value


# TF Serving flags accepted but not implemented yet: (name, type, default, help).
_NOT_YET = [
    ("model_config_file", str, "", "not supported yet (single-model mode only)"),
    ("model_config_file_poll_wait_seconds", _seconds, 0.0, "not supported yet"),
    ("enable_batching", _bool, False, "not supported yet"),
    ("batching_parameters_file", str, "", "not supported yet"),
    ("monitoring_config_file", str, "", "not supported yet"),
    ("allow_version_labels_for_unavailable_models", _bool, False, "not supported yet"),
]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with TF Serving's flag names (``--flag=value`` and ``--flag value``)."""
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Model server compatible with tensorflow_model_server (gRPC + REST).",
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--port", type=_port, default=8500, help="gRPC port (default 8500)")
    add("--rest_api_port", type=_port, default=0, help="REST port, 0 = off (default 0)")
    add("--bind_address", default="127.0.0.1",
        help="address both ports listen on (extension; default 127.0.0.1)")
    add("--model_name", default="default", help="name of the served model (default 'default')")
    add("--model_base_path", default=None,
        help="directory holding numbered version subdirectories of the model")
    add("--file_system_poll_wait_seconds", type=_seconds, default=1.0,
        help="seconds between polls of model_base_path; 0 = poll once, negative = never "
             "(fractions allowed, an extension)")
    add("--enable_model_warmup", type=_bool, nargs="?", const=True, default=True,
        help="replay assets.extra/tf_serving_warmup_requests before serving a version")
    add("--rest_api_timeout_in_ms", type=_non_negative_int, default=30000,
        help="timeout of a REST request in ms (default 30000)")
    add("--grpc_max_threads", type=_non_negative_int, default=0,
        help="threads running model calls (default 4 x CPUs)")
    add("--rest_api_num_threads", type=_non_negative_int, default=0,
        help="threads running model calls (default 4 x CPUs)")
    for name, type_, default, help_ in _NOT_YET:
        kwargs = {"nargs": "?", "const": True} if type_ is _bool else {}
        add(f"--{name}", type=type_, default=default, help=help_, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> Options:
    """Parse ``argv``; on a bad flag print a message naming it and exit with status 2."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    for name, _type, default, _help in _NOT_YET:
        if getattr(ns, name) != default:
            parser.error(f"--{name} is not supported by this server yet")
    if not ns.model_base_path:
        parser.error("--model_base_path is required (--model_config_file is not supported yet)")
    if not ns.model_name or "/" in ns.model_name or ":" in ns.model_name:
        parser.error(f"--model_name: invalid model name {ns.model_name!r}")
    return Options(
        port=ns.port,
        rest_api_port=ns.rest_api_port,
        bind_address=ns.bind_address,
        model_name=ns.model_name,
        model_base_path=ns.model_base_path,
        file_system_poll_wait_seconds=ns.file_system_poll_wait_seconds,
        enable_model_warmup=ns.enable_model_warmup,
        rest_api_timeout_in_ms=ns.rest_api_timeout_in_ms,
        grpc_max_threads=ns.grpc_max_threads,
        rest_api_num_threads=ns.rest_api_num_threads,
    )
