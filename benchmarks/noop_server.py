"""The ceiling: a server on the same stacks as ours (grpc.aio, aiohttp) and in the same process
layout (``--num_workers`` processes sharing the ports through SO_REUSEPORT) that parses each request
exactly as ours does but runs no model and returns a fixed response.

    python -m benchmarks.noop_server --port 8500 --rest_api_port 8501 --num_workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import sys

import grpc
import numpy as np
from aiohttp import web
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving.flags import DEFAULT_WORKERS
from serving.json_tensor import PredictBody
from serving.model_format import DEFAULT_SIGNATURE
from serving.tensors import to_tensor_proto

FIXED_SCORES = np.full((1, 10), 0.1, np.float32)


class NoopPrediction(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self) -> None:
        response = predict_pb2.PredictResponse()
        response.model_spec.name = "mnist"
        response.model_spec.version.value = 1
        response.model_spec.signature_name = DEFAULT_SIGNATURE
        response.outputs["scores"].CopyFrom(to_tensor_proto(FIXED_SCORES))
        self._response = response

    async def Predict(
        self, request: predict_pb2.PredictRequest, context
    ) -> predict_pb2.PredictResponse:
        # grpc.aio has already parsed the PredictRequest, as for our server.
        return self._response


async def rest_predict(request: web.Request) -> web.Response:
    PredictBody(await request.read()).read()  # parse the body as ours does
    return web.Response(
        body=b'{"predictions": [[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]}',
        content_type="application/json",
    )


async def serve(port: int, rest_port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(NoopPrediction(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    app = web.Application()
    app.router.add_post("/v1/models/{tail:.*}", rest_predict)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rest_port, reuse_port=True).start()
    await server.wait_for_termination()


def worker(port: int, rest_port: int) -> None:
    asyncio.run(serve(port, rest_port))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noop_server")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--rest_api_port", type=int, default=8501)
    parser.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")  # as our server's workers
    workers = [
        context.Process(target=worker, args=(args.port, args.rest_api_port), daemon=True)
        for _ in range(args.num_workers)
    ]
    for process in workers:
        process.start()
    # SIGTERM ends the workers too: exiting normally lets multiprocessing stop its daemons.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for process in workers:
        process.join()


if __name__ == "__main__":
    main()
