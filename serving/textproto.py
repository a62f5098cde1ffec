"""Text-format protobuf files (batching parameters, monitoring config), as TF Serving reads them."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import text_format
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def read(path: str, message: M) -> M:
    """Parse the file at ``path`` into ``message``; ``ValueError`` naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(f"{path}: not a {message.DESCRIPTOR.name}: {e}") from None
