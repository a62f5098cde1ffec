"""The data plane: the one implementation of predict / status / metadata both front ends call.

The front ends only translate wire formats (protobuf, JSON) to numpy and ``ServingError`` back to
status codes, so gRPC and REST cannot drift apart in behaviour. Model calls run in a thread pool:
``Session.run`` releases the GIL, so the asyncio loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np

from serving.errors import ServingError, invalid
from serving.manager import Manager, VersionStatus
from serving.servable import SignatureInfo


Inputs = Union[dict[str, np.ndarray], Callable[[SignatureInfo], dict[str, np.ndarray]]]


@dataclass(frozen=True)
class PredictResult:
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelMetadata:
    version: int
    signature_defs: dict[str, Any]  # name -> tensorflow.SignatureDef proto


class DataPlane:
    """Predict, status and metadata over the manager's loaded versions."""

    def __init__(self, manager: Manager, num_threads: int) -> None:
        self.manager = manager
        self.executor = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="predict")

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    # -- predict -------------------------------------------------------------------------------

    def predict_sync(
        self,
        model_name: str,
        version: int | None,
        signature_name: str,
        inputs: Inputs,
        output_filter: Sequence[str] = (),
    ) -> PredictResult:
        """Route, validate and run one request (blocking; call from a worker thread).

        ``inputs`` may be a callable that builds the arrays from the routed signature: REST
        needs the signature's dtypes to decode JSON, and doing it under the same handle means a
        version swap between "look up signature" and "run" cannot fail the request.
        """
        with self.manager.acquire(model_name, version) as handle:
            servable = handle.servable
            sig = servable.signature(signature_name)
            if callable(inputs):
                inputs = inputs(sig)
            outputs = servable.validate(sig, inputs, tuple(output_filter))
            values = servable.run(sig, inputs, outputs)
            return PredictResult(handle.version, sig.name, values)

    async def predict(
        self,
        model_name: str,
        version: int | None,
        signature_name: str,
        inputs: Inputs,
        output_filter: Sequence[str] = (),
    ) -> PredictResult:
        """``predict_sync`` on the thread pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self.predict_sync, model_name, version, signature_name, inputs,
            tuple(output_filter),
        )

    # -- status / metadata ---------------------------------------------------------------------

    def model_status(self, model_name: str, version: int | None = None) -> list[VersionStatus]:
        return self.manager.statuses(model_name, version)

    def model_metadata(self, model_name: str, version: int | None = None) -> ModelMetadata:
        with self.manager.acquire(model_name, version) as handle:
            return ModelMetadata(handle.version, dict(handle.servable.signature_defs))


def parse_version(text: str) -> int:
    """A version from a URL or label position; INVALID_ARGUMENT when it is not an int64."""
    try:
        value = int(text)
    except ValueError:
        raise invalid(f"Invalid version: {text}") from None
    if value < 0 or value > 2**63 - 1:
        raise invalid(f"Invalid version: {text}")
    return value


__all__ = ["DataPlane", "ModelMetadata", "PredictResult", "ServingError", "parse_version"]
