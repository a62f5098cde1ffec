"""SavedModel warmup: replay a version's recorded requests before it serves (TF Serving's
saved_model_warmup), and the TFRecord reader for the file that holds them.

The records run through the loaded version's own API methods, the code live requests run, so a
warmed version has built the session callables its requests will use. The loader calls
``replay_warmup`` once per load; this module knows the servable only as ``Replayable``, what it
calls on it, so that it need not import the servable module that imports it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Protocol, Sequence

import grpc
import numpy as np

from serving import metrics
from serving.errors import ServingError
from serving.inference import Classification, Regression
from serving.model_format import MAX_WARMUP_RECORDS, WARMUP_FILE
from serving.signatures import SignatureInfo


class Replayable(Protocol):
    """What warmup calls on a loaded version (``serving.servable.Servable``)."""

    path: str

    def signature(self, name: str) -> SignatureInfo: ...

    def validate(
        self, sig: SignatureInfo, inputs: dict[str, np.ndarray], output_filter: list[str]
    ) -> tuple[str, ...]: ...

    def run(
        self, sig: SignatureInfo, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]: ...

    def classify(self, signature_name: str, examples: Sequence[bytes]) -> Classification: ...

    def regress(self, signature_name: str, examples: Sequence[bytes]) -> Regression: ...

    def multi_inference(
        self, tasks: Sequence[tuple[str, str]], examples: Sequence[bytes]
    ) -> list[Classification | Regression]: ...


@metrics.warmup_observed
def replay_warmup(servable: Replayable, iterations: int = 1) -> int:
    """Replay ``assets.extra/tf_serving_warmup_requests`` (<= 1000 records), each record
    ``iterations`` times in a row (``--num_request_iterations_for_warmup``); return the count of
    records.

    Predict, Classify, Regress and MultiInference records run through the same code as live
    requests. Any failure raises, which fails the load: a version whose warmup data does not
    run would fail real requests too (TF Serving behaves the same, and also rejects other
    record kinds).
    """
    path = Path(servable.path) / WARMUP_FILE
    if not path.is_file():
        return 0
    from tensorflow_serving.apis import prediction_log_pb2

    records = read_tfrecords(path, MAX_WARMUP_RECORDS)
    for record in records:
        entry = prediction_log_pb2.PredictionLog.FromString(record)
        for _ in range(iterations):
            _replay(servable, entry)
    return len(records)


def _replay(servable: Replayable, entry: Any) -> None:
    """Run one ``PredictionLog`` entry's request through ``servable``."""
    from serving.tensors import serialized_examples, to_ndarray

    kind = entry.WhichOneof("log_type")
    if kind == "predict_log":
        request = entry.predict_log.request
        sig = servable.signature(request.model_spec.signature_name)
        inputs = {a: to_ndarray(a, t) for a, t in request.inputs.items()}
        servable.run(sig, inputs, servable.validate(sig, inputs, list(request.output_filter)))
    elif kind == "classify_log":
        request = entry.classify_log.request
        servable.classify(request.model_spec.signature_name, serialized_examples(request.input))
    elif kind == "regress_log":
        request = entry.regress_log.request
        servable.regress(request.model_spec.signature_name, serialized_examples(request.input))
    elif kind == "multi_inference_log":
        request = entry.multi_inference_log.request
        servable.multi_inference(
            [(t.model_spec.signature_name, t.method_name) for t in request.tasks],
            serialized_examples(request.input),
        )
    else:
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {kind}"
        )


def read_tfrecords(path: str | Path, limit: int) -> list[bytes]:
    """Read up to ``limit`` records of a TFRecord file (length, crc, data, crc framing).

    Plain Python so that reading warmup data needs neither eager tf.data nor the deprecated
    ``tf_record_iterator`` (which logs a warning per call). CRCs are not verified; a truncated
    file, or a length longer than what is left of the file (not a TFRecord file), raises.
    """
    records: list[bytes] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while len(records) < limit:
            header = f.read(12)
            if not header:
                break
            if len(header) != 12:
                raise ValueError(f"{path}: truncated TFRecord header")
            (length,) = struct.unpack("<Q", header[:8])
            if length > size - f.tell():
                raise ValueError(
                    f"{path}: not a TFRecord file (a record of {length} bytes, "
                    f"{size - f.tell()} bytes left)"
                )
            data = f.read(length)
            if len(data) != length or len(f.read(4)) != 4:
                raise ValueError(f"{path}: truncated TFRecord")
            records.append(data)
    return records
