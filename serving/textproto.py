"""Text-format protobuf files (model config, batching parameters, monitoring, SSL and session
configs), as TF Serving reads them, with its wording for a file that does not parse: upstream's
tests look for ``Error parsing text-format tensorflow.serving.ModelServerConfig`` (protobuf's C++
message) in the server's output."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import text_format
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def parse(text: str, message: M, origin: str) -> M:
    """Parse ``text`` into ``message``; ``ValueError`` naming ``origin`` otherwise."""
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(
            f"{origin}: Error parsing text-format {message.DESCRIPTOR.full_name}: {e}"
        ) from None


def read_text(path: str) -> str:
    """The file's text; ``ValueError`` naming the file when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def read(path: str, message: M) -> M:
    """Parse the file at ``path`` into ``message``; ``ValueError`` naming the file otherwise."""
    return parse(read_text(path), message, path)


PACKAGE = "tensorflow.serving"
_SCALAR_TYPES = {"bool": "TYPE_BOOL", "string": "TYPE_STRING"}
Field = tuple[str, int, str]  # name, number, "bool" | "string" | a message declared before it


def declared_message(proto_file: str, messages: dict[str, tuple[Field, ...]], name: str) -> Any:
    """The class of the ``tensorflow.serving`` message ``name``, one of ``messages`` declared
    as ``proto_file`` in a private descriptor pool: for the config messages whose ``_pb2`` the
    tensorflow-serving-api wheel does not ship (no clash should TF or a later wheel register the
    same names). Fields are proto3 singular fields."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name=proto_file, package=PACKAGE, syntax="proto3")
    for message_name, fields in messages.items():
        message = file.message_type.add(name=message_name)
        for field_name, number, kind in fields:
            field = message.field.add(name=field_name, number=number, label=F.LABEL_OPTIONAL)
            if kind in _SCALAR_TYPES:
                field.type = getattr(F, _SCALAR_TYPES[kind])
            else:
                field.type, field.type_name = F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
