"""Text-format protobuf files (model config, batching parameters, monitoring, SSL and session
configs), as TF Serving reads them, with its wording for a file that does not parse: upstream's
tests look for ``Error parsing text-format tensorflow.serving.ModelServerConfig`` (protobuf's C++
message) in the server's output."""

from __future__ import annotations

from typing import TypeVar

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
