"""How the gRPC server listens, from TF Serving's flags: ``--grpc_channel_arguments``,
``--ssl_config_file`` (a text-format ``tensorflow.serving.SSLConfig``) and its credentials.

Parsed at startup by ``serving.flags`` (a bad value stops the server naming the flag), applied by
``serving.grpc_frontend`` in each worker. TF Serving's rules (server.cc): each argument is
``key=value``, a value that parses as a 32-bit integer is passed as one, any other as a string;
TLS uses the same credentials on the TCP port and the Unix socket, and ``client_verify`` requires
and verifies a client certificate signed by ``custom_ca``. No TensorFlow here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from serving import textproto

ChannelArguments = tuple[tuple[str, int | str], ...]

_INT32 = (-(2**31), 2**31 - 1)


def parse_channel_arguments(text: str) -> ChannelArguments:
    """``"a=1,b=x"`` -> ``(("a", 1), ("b", "x"))``; ``ValueError`` for an item without ``=``."""
    arguments = []
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        arguments.append((key, _int32_or_text(value)))
    return tuple(arguments)


def _int32_or_text(value: str) -> int | str:
    try:
        number = int(value)
    except ValueError:
        return value
    return number if _INT32[0] <= number <= _INT32[1] else value


@dataclass(frozen=True)
class SslConfig:
    """``tensorflow.serving.SSLConfig``: PEM texts and whether clients must present a
    certificate."""

    server_key: str
    server_cert: str
    custom_ca: str = ""
    client_verify: bool = False


def read_ssl_config(path: str) -> SslConfig:
    """The SSLConfig file at ``path``; ``ValueError`` naming the problem when it cannot serve."""
    proto = textproto.read(path, _ssl_config_class()())
    config = SslConfig(proto.server_key, proto.server_cert, proto.custom_ca, proto.client_verify)
    if not config.server_key or not config.server_cert:
        raise ValueError(f"{path}: server_key and server_cert are required")
    if config.client_verify and not config.custom_ca:
        raise ValueError(f"{path}: client_verify needs custom_ca, the CA that signs clients")
    return config


def server_credentials(config: SslConfig) -> Any:
    """The ``grpc.ServerCredentials`` TF Serving builds from an SSLConfig."""
    import grpc

    return grpc.ssl_server_credentials(
        [(config.server_key.encode(), config.server_cert.encode())],
        root_certificates=config.custom_ca.encode() or None,
        require_client_auth=config.client_verify,
    )


@functools.cache
def _ssl_config_class() -> Any:
    """``tensorflow.serving.SSLConfig`` (the tensorflow-serving-api wheel ships no
    ``ssl_config_pb2``)."""
    fields = (
        ("server_key", 1, "string"),
        ("server_cert", 2, "string"),
        ("custom_ca", 3, "string"),
        ("client_verify", 4, "bool"),
    )
    return textproto.declared_message(
        "tensorflow_serving/config/ssl_config.proto", {"SSLConfig": fields}, "SSLConfig"
    )
