"""MNIST test client, like TF Serving's ``mnist_client.py``: one gRPC Predict per test image.

``python -m serving.client --server 127.0.0.1:8500 --num_tests 1000 --concurrency 4`` sends images
(input ``images``, float32 ``[1,784]``, signature ``serving_default``) with up to N requests in
flight, compares argmax(``scores``) with the label and prints ``Inference error rate: X%``.
Works against this server and against ``tensorflow_model_server`` alike: requests are built and
answers read by ``serving.api_client``, as the pipeline's are.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import numpy as np

from serving.model_format import DEFAULT_SIGNATURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.client",
        allow_abbrev=False,
        description="Send MNIST test images to a model server.",
    )
    parser.add_argument("--server", default="127.0.0.1:8500", help="gRPC host:port")
    parser.add_argument("--num_tests", type=int, default=100, help="number of test images")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--model_name", default="mnist")
    parser.add_argument("--signature_name", default=DEFAULT_SIGNATURE)
    parser.add_argument("--data_dir", default=None, help="MNIST directory (default data/mnist)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    return parser


async def run_client(args: argparse.Namespace, images: np.ndarray, labels: np.ndarray) -> int:
    """Send all requests; return the number of misclassified images (raises on RPC errors)."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from serving.api_client import CHANNEL_OPTIONS, predict_request, response_scores

    async with grpc.aio.insecure_channel(args.server, options=CHANNEL_OPTIONS) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=args.timeout)
        except asyncio.TimeoutError:
            raise ConnectionError(f"cannot reach model server at {args.server}") from None
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        errors = 0
        next_index = 0

        async def worker() -> None:
            nonlocal errors, next_index
            while next_index < len(images):
                i = next_index
                next_index += 1
                request = predict_request(
                    args.model_name, images[i : i + 1], signature_name=args.signature_name
                )
                response = await stub.Predict(request, timeout=args.timeout)
                if int(np.argmax(response_scores(response))) != int(labels[i]):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(max(1, args.concurrency))))
        return errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_tests <= 0:
        print("--num_tests must be positive", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from serving.mnist import SHIPPED_DIR, load_test

    test = load_test(args.data_dir or SHIPPED_DIR)
    n = min(args.num_tests, len(test.labels))
    import grpc

    start = time.monotonic()
    try:
        errors = asyncio.run(run_client(args, test.images[:n], test.labels[:n]))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(
            f"error: request to {args.server} failed: {e.code().name}: {e.details()}",
            file=sys.stderr,
        )
        return 1
    elapsed = time.monotonic() - start
    print(
        f"{n} requests in {elapsed:.2f} s ({n / elapsed:.0f}/s, concurrency {args.concurrency})",
        file=sys.stderr,
    )
    print(f"Inference error rate: {errors / n * 100:g}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
