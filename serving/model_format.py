"""What a model version directory holds: the contract between what exports it (``tasks.export``,
or any TF Serving exporter) and the server that reads it.

``<base_path>/<version>/saved_model.pb`` (+ ``variables/``, ``assets.extra/``): the version is a
positive int64 in plain decimal digits; a directory without ``saved_model.pb`` is not (yet) a
version, which is what lets a pusher write elsewhere and rename. Signatures are found by the
method names TF Serving's APIs check. TensorFlow-free, so the exporter, the server's sources and
its CLI can all import it.
"""

from __future__ import annotations

import re
from pathlib import Path

SAVED_MODEL_FILE = "saved_model.pb"
# Requests replayed when a version loads, before it serves (TF Serving's SavedModel warmup).
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

_VERSION_RE = re.compile(r"[0-9]+")
_INT64_MAX = 2**63 - 1


def version_of_dir(name: str) -> int | None:
    """The version number a directory name stands for, or None if it is not a version dir."""
    if not _VERSION_RE.fullmatch(name):  # not match with "$": that accepts "12\n"
        return None
    value = int(name)
    if value <= 0 or value > _INT64_MAX:
        return None
    return value


__all__ = [
    "CLASSIFY_METHOD",
    "DEFAULT_SIGNATURE",
    "MAX_WARMUP_RECORDS",
    "PREDICT_METHOD",
    "REGRESS_METHOD",
    "SAVED_MODEL_FILE",
    "WARMUP_FILE",
    "version_of_dir",
]
