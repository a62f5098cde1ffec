"""Pre-encoded request bodies, so the load generator spends nothing on encoding."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from serving.api_client import predict_request
from serving.mnist import SHIPPED_DIR, load_test


def one_image() -> np.ndarray:
    return load_test(SHIPPED_DIR).images[:1]


def grpc_predict_frame(model_name: str, image: np.ndarray) -> bytes:
    """A gRPC length-prefixed message (flag 0 = uncompressed, 4-byte big-endian length, proto)."""
    request = predict_request(model_name, image)
    message = request.SerializeToString()
    return struct.pack(">?I", False, len(message)) + message


def rest_predict_body(image: np.ndarray) -> bytes:
    return json.dumps({"instances": image.tolist()}).encode()


def mlflow_invocations_body(image: np.ndarray) -> bytes:
    return json.dumps({"inputs": image.tolist()}).encode()


def write_all(directory: Path, model_name: str) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    image = one_image()
    files = {
        "grpc": (directory / "predict.grpc", grpc_predict_frame(model_name, image)),
        "rest": (directory / "predict.json", rest_predict_body(image)),
        "mlflow": (directory / "invocations.json", mlflow_invocations_body(image)),
    }
    for path, body in files.values():
        path.write_bytes(body)
    return {kind: path for kind, (path, _) in files.items()}
