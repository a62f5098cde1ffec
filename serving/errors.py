"""The one error type of the data plane, carrying a gRPC status code.

Both front ends translate it: gRPC aborts with the code, REST maps it to an HTTP status
(docs/tf-serving-compat.md). Keeping the code next to the message means the mapping lives in one
place per front end instead of being guessed from exception classes.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request or load failure with the gRPC status code TF Serving would return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def not_found(model_name: str, version: int | None) -> ServingError:
    """TF Serving's message for a model or version it cannot route to."""
    what = f"Latest({model_name})" if version is None else f"Specific({model_name}, {version})"
    return ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {what}")


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)
