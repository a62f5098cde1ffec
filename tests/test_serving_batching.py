"""Server-side batching (``--enable_batching``) of ``python -m serving``, on real server processes.

TF Serving's half_plus_two model (``y = 0.5 x + 2``, one row per value) makes every row's answer
depend on its own input, so a request that got another request's rows, or padding, shows. Four
servers: ``plain`` (no batching, the reference answers), ``batched`` (a long batch timeout so
concurrent requests merge; allowed_batch_sizes padding; metrics), ``tight`` (a one-batch queue:
load shedding), ``per_model`` (``batching_params.pbtxt`` in the version directory; swaps).
"""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from serving import batching  # noqa: E402
from serving.batching import (
    BATCH_INLINE_BUDGET_S,
    Batcher,
    BatchingParameters,  # noqa: E402
    _merge,
    padded_size,
    read_parameters,
)
from serving.errors import ServingError  # noqa: E402
from serving.model_format import CLASSIFY_METHOD, REGRESS_METHOD  # noqa: E402
from tests import saved_models  # noqa: E402
from tests.servers import (  # noqa: E402
    Server,  # noqa: E402
    classify_request,
    multi_request,
    regress_request,
)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
METRICS = "/monitoring/prometheus/metrics"
MODEL = "half"

pytestmark = pytest.mark.timeout(120)


# -- in-process: parameters, padding, merging ------------------------------------------------------


def test_parameters_file_defaults_and_errors(tmp_path):
    file = tmp_path / "batching.config"
    file.write_text(
        "max_batch_size { value: 8 }\nallowed_batch_sizes: 2\nallowed_batch_sizes: 8\n"
        "pad_variable_length_inputs: true\n"
    )
    params = read_parameters(str(file))
    assert (
        params.max_batch_size,
        params.batch_timeout_micros,
        params.max_enqueued_batches,
        params.allowed_batch_sizes,
        params.pad_variable_length_inputs,
        params.thread_pool_name,
    ) == (8, 0, 10, (2, 8), True, "batch_threads")
    for text, named in [
        ("max_batch_size { value: 0 }", "max_batch_size"),
        ("batch_timeout_micros { value: -1 }", "batch_timeout_micros"),
        ("max_batch_size { value: 8 } allowed_batch_sizes: 4", "allowed_batch_sizes"),
        ("allowed_batch_sizes: 4 allowed_batch_sizes: 2", "allowed_batch_sizes"),
        ("max_batch_size: 8", "max_batch_size"),
        ("no_such_field { value: 1 }", "no_such_field"),
    ]:
        file.write_text(text)
        with pytest.raises(ValueError, match=named) as raised:
            read_parameters(str(file))
        assert str(file) in str(raised.value)


def test_padding_and_merge():
    assert [padded_size((2, 4, 8), n) for n in (1, 2, 3, 5, 8)] == [2, 2, 4, 8, 8]
    assert padded_size((), 5) == 5
    a, b = np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [5.0, 6.0]])
    merged = _merge([a, b], padding=2, pad_inner=False)
    assert merged.tolist() == [[1, 2], [3, 4], [5, 6], [3, 4], [3, 4]]  # last task's first row
    short = np.array([[7.0]])
    assert _merge([a, short], 0, pad_inner=True).tolist() == [[1, 2], [7, 7]]  # its 1st element


# -- in-process: the scheduler on an event loop ----------------------------------------------------


class _Model:
    """A servable stand-in that doubles its input and records each batch and its thread."""

    model_name = "double"

    def __init__(self, timeout_micros: int, seconds_per_batch: float = 0.0) -> None:
        self.batching = BatchingParameters(
            max_batch_size=64,
            batch_timeout_micros=timeout_micros,
            max_enqueued_batches=100,
            num_batch_threads=1,
        )
        self.seconds_per_batch = seconds_per_batch
        self.batches: list[tuple[int, int]] = []  # (rows, thread)

    def run_tensors(self, feeds, fetches):
        end = time.perf_counter() + self.seconds_per_batch
        while time.perf_counter() < end:  # hold the CPU like a model call
            pass
        self.batches.append((len(feeds["x:0"]), threading.get_ident()))
        return {"y:0": feeds["x:0"] * 2}


class _Handle:
    def __init__(self, servable: _Model) -> None:
        self.servable = servable
        self.released = False

    def release(self) -> None:
        self.released = True


def _submit(batcher, model: _Model, value: float):
    handle = _Handle(model)
    return handle, batcher.submit(
        handle, {"x:0": np.array([value], np.float32)}, ("y:0",), True, lambda values: values
    )


def _on_loop(scenario):
    """Run ``scenario(batcher)`` on a fresh event loop with a one-slot batcher."""

    async def main():
        batcher = Batcher(1, "batch_threads")
        try:
            return await scenario(batcher)
        finally:
            batcher.stop()

    return asyncio.run(main())


def test_no_timeout_runs_a_lone_request_once_the_loop_is_idle(monkeypatch):
    """batch_timeout_micros 0: an idle loop runs the batch at once, not after the busy cap."""
    monkeypatch.setattr(batching, "IDLE_WAIT_CAP_S", 30.0)
    model = _Model(timeout_micros=0)

    async def scenario(batcher):
        start = time.monotonic()
        for value in (1.0, 2.0, 3.0):  # one after the other: a batch each
            handle, future = _submit(batcher, model, value)
            assert (await future)["y:0"].tolist() == [2 * value]
            assert handle.released
        return time.monotonic() - start

    assert _on_loop(scenario) < 5
    assert [rows for rows, _ in model.batches] == [1, 1, 1]


def _one_a_loop_iteration(model: _Model, n: int):
    """A scenario: ``n`` requests arrive one a loop iteration, as gRPC's server takes them in;
    their answers."""

    async def scenario(batcher):
        loop = asyncio.get_running_loop()
        futures = []

        def arrive(i: int) -> None:
            futures.append(_submit(batcher, model, float(i))[1])
            if i < n - 1:
                loop.call_soon(arrive, i + 1)

        arrive(0)
        return [(await f)["y:0"].tolist() for f in futures]

    return scenario


def test_no_timeout_gathers_what_arrives_while_the_loop_is_busy(monkeypatch):
    """Requests taken in one per loop iteration (as gRPC's server does) while the loop stays
    busy join one batch; it runs when the loop has nothing else to do."""
    monkeypatch.setattr(batching, "IDLE_WAIT_CAP_S", 30.0)
    model = _Model(timeout_micros=0)

    assert _on_loop(_one_a_loop_iteration(model, 10)) == [[2.0 * i] for i in range(10)]
    assert [rows for rows, _ in model.batches] == [10]


def test_no_timeout_runs_within_the_cap_on_a_loop_that_never_idles(monkeypatch):
    monkeypatch.setattr(batching, "IDLE_WAIT_CAP_S", 0.05)
    model = _Model(timeout_micros=0)

    async def scenario(batcher):
        loop = asyncio.get_running_loop()
        busy = True

        def spin() -> None:  # something always ready to run
            if busy:
                loop.call_soon(spin)

        spin()
        start = time.monotonic()
        result = await _submit(batcher, model, 4.0)[1]
        busy = False
        return result["y:0"].tolist(), time.monotonic() - start

    answer, took = _on_loop(scenario)
    assert answer == [8.0] and 0.04 <= took < 5


def test_the_idle_check_reads_the_loop_and_falls_back_to_running_batches_at_once(monkeypatch):
    """Whether the loop has callbacks ready is read from asyncio's private ``_ready``; a loop
    without it counts as idle: batches without a timeout then run at the next iteration (smaller
    batches, every request still answered)."""
    monkeypatch.setattr(batching, "IDLE_WAIT_CAP_S", 30.0)

    async def probe() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: None)
        busy = batching.has_ready_callbacks(loop)
        await asyncio.sleep(0.01)
        return busy, batching.has_ready_callbacks(loop)

    assert asyncio.run(probe()) == (True, False)
    assert batching.has_ready_callbacks(object()) is False  # type: ignore[arg-type]

    monkeypatch.setattr(batching, "has_ready_callbacks", lambda loop: False)
    model = _Model(timeout_micros=0)

    assert _on_loop(_one_a_loop_iteration(model, 10)) == [[2.0 * i] for i in range(10)]
    assert sum(rows for rows, _ in model.batches) == 10


def test_a_timeout_is_waited_for_even_on_an_idle_loop():
    model = _Model(timeout_micros=200_000)

    async def scenario(batcher):
        start = time.monotonic()
        _, first = _submit(batcher, model, 1.0)
        await asyncio.sleep(0.05)  # the loop idles meanwhile
        _, second = _submit(batcher, model, 2.0)
        await asyncio.gather(first, second)
        return time.monotonic() - start

    assert _on_loop(scenario) >= 0.19
    assert [rows for rows, _ in model.batches] == [2]


def test_a_cancelled_request_leaves_its_batch_whole():
    """A client that gives up while its request waits in a batch (a gRPC deadline cancels the
    handler) costs the others nothing: the batch runs, they get their answers, and every
    request's version pin is released."""
    model = _Model(timeout_micros=50_000)

    async def scenario(batcher):
        submitted = [_submit(batcher, model, float(i)) for i in range(3)]
        submitted[1][1].cancel()
        answers = [(await f)["y:0"].tolist() for i, (_, f) in enumerate(submitted) if i != 1]
        return answers, [handle.released for handle, _ in submitted]

    answers, released = _on_loop(scenario)
    assert answers == [[0.0], [4.0]]
    assert released == [True, True, True]
    assert [rows for rows, _ in model.batches] == [3]


def test_a_batch_makes_every_answer_before_any_request_resumes():
    """Each request's ``answer`` (its response encoding) runs as the batch finishes, all of
    them before the first awaiting request resumes, so the batch's responses go out together;
    an answer that fails fails its own request only."""
    model = _Model(timeout_micros=50_000)
    made: list[float] = []
    resumed: list[tuple[float, int]] = []

    def answer(values):
        value = float(values["y:0"][0])
        made.append(value)
        if value == 2.0:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "cannot encode")
        return value

    async def one(batcher, value: float):
        future = batcher.submit(
            _Handle(model), {"x:0": np.array([value], np.float32)}, ("y:0",), True, answer
        )
        try:
            result = await future
        except ServingError as e:
            result = e.message
        resumed.append((value, len(made)))
        return result

    async def scenario(batcher):
        return await asyncio.gather(*(one(batcher, float(i)) for i in range(3)))

    assert _on_loop(scenario) == [0.0, "cannot encode", 4.0]
    assert [rows for rows, _ in model.batches] == [3]
    assert sorted(made) == [0.0, 2.0, 4.0]
    assert all(count == 3 for _, count in resumed)  # all made before the first resumed


def test_cheap_batches_run_on_the_loop_and_expensive_ones_on_a_batch_thread():
    cheap, expensive = _Model(0), _Model(0, seconds_per_batch=2 * BATCH_INLINE_BUDGET_S)
    expensive.model_name = "slow"

    async def scenario(batcher):
        for model in (cheap, expensive):
            for i in range(4):
                await _submit(batcher, model, float(i))[1]
        return threading.get_ident()

    loop_thread = _on_loop(scenario)
    # Never seen: a batch thread measures the first; from then on it is known to be cheap.
    assert [thread == loop_thread for _, thread in cheap.batches] == [False, True, True, True]
    assert loop_thread not in [thread for _, thread in expensive.batches]


# -- servers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_template(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("half")
    saved_models.write_half_plus_two(base, 1, warmup=False)
    return base / "1"


def _start(
    tmp_path_factory, template: Path, name: str, params: str | None, extra: list[str]
) -> Server:
    directory = tmp_path_factory.mktemp(name)
    saved_models.copy_version(template, directory / "models", 1)
    # Each worker process batches its own requests: one worker, so that every request of a test
    # meets the same batcher (REST and gRPC sharing it, one queue filling up).
    flags = ["--num_workers=1", *extra]
    if params is not None:
        (directory / "monitoring.config").write_text(
            f'prometheus_config {{ enable: true path: "{METRICS}" }}'
        )
        (directory / "batching.config").write_text(params)
        flags += [
            "--enable_batching",
            f"--batching_parameters_file={directory / 'batching.config'}",
            f"--monitoring_config_file={directory / 'monitoring.config'}",
        ]
    server = Server(directory / "models", directory / "server.log", model_name=MODEL, extra=flags)
    return server


@pytest.fixture(scope="module")
def servers(half_template, tmp_path_factory):
    """Start all four at once (each takes seconds to import TensorFlow and load)."""
    started = {
        "plain": _start(tmp_path_factory, half_template, "plain", None, []),
        "batched": _start(
            tmp_path_factory,
            half_template,
            "batched",
            "max_batch_size { value: 8 } batch_timeout_micros { value: 100000 } "
            "max_enqueued_batches { value: 1000 } num_batch_threads { value: 2 } "
            "allowed_batch_sizes: 2 allowed_batch_sizes: 4 allowed_batch_sizes: 8",
            [],
        ),
        "tight": _start(
            tmp_path_factory,
            half_template,
            "tight",
            "max_batch_size { value: 4 } batch_timeout_micros { value: 1000000 } "
            "max_enqueued_batches { value: 1 } num_batch_threads { value: 1 }",
            [],
        ),
        "per_model": _start(
            tmp_path_factory,
            half_template,
            "per_model",
            "",
            ["--enable_per_model_batching_parameters"],
        ),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def predict(server: Server, x: np.ndarray, timeout: float = 10) -> predict_pb2.PredictResponse:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    return server.predict_stub.Predict(request, timeout=timeout)


def y_of(response: predict_pb2.PredictResponse) -> np.ndarray:
    return tf.make_ndarray(response.outputs["y"])


def rest_y(server: Server, x: np.ndarray) -> np.ndarray:
    status, body = server.http("POST", f"/v1/models/{MODEL}:predict", {"instances": x.tolist()})
    assert status == 200, body
    return np.asarray(body["predictions"], dtype=np.float32)


def histogram(server: Server, name: str) -> tuple[float, float]:
    """(sum, count) of an unlabelled histogram on the metrics page."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{server.rest_port}{METRICS}", timeout=10
    ) as page:
        text = page.read().decode()
    values = {}
    for suffix in ("sum", "count"):
        match = re.search(rf"^{re.escape(name)}_{suffix} (\S+)$", text, re.M)
        values[suffix] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def inputs(count: int, seed: int = 0) -> list[np.ndarray]:
    """Requests of 1..8 rows of distinct values."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=int(rng.integers(1, 9))).astype(np.float32) * 100 for _ in range(count)]


# -- batched answers -------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_mixed_sizes_answer_as_without_batching(servers):
    """gRPC and REST at once, 1..8 rows each, merged and padded to 2/4/8: byte-identical to the
    server without batching, and batches of more than one request did form."""
    plain, batched = servers["plain"], servers["batched"]
    requests = inputs(96)
    expected = [y_of(predict(plain, x)) for x in requests]
    sum_before, count_before = histogram(
        batched, ":tensorflow:serving:batching_session:processed_batch_size"
    )
    with ThreadPoolExecutor(32) as pool:
        grpc_answers = list(pool.map(lambda x: y_of(predict(batched, x)), requests))
        rest_answers = list(pool.map(lambda x: rest_y(batched, x), requests))
    for want, got_grpc, got_rest in zip(expected, grpc_answers, rest_answers):
        assert got_grpc.tobytes() == want.tobytes()
        np.testing.assert_allclose(got_rest, want, rtol=1e-6)
    total, count = histogram(batched, ":tensorflow:serving:batching_session:processed_batch_size")
    batches, rows = count - count_before, total - sum_before
    assert batches < 2 * len(requests)  # requests shared batches
    assert rows >= sum(len(x) for x in requests) * 2  # padding included


@pytest.mark.slow
def test_requests_of_other_shapes_are_batched_apart(servers):
    """Predict does not check shapes against the signature (x is [-1,1]): concurrent requests of
    shapes [k], [k,1] and [] each get their own answer, as from the server without batching --
    same-shaped tails batch together, the scalar (no dim 0) runs alone -- and batches formed."""
    plain, batched = servers["plain"], servers["batched"]
    rows = [x.reshape(-1, 1) if i % 3 == 1 else x for i, x in enumerate(inputs(60, seed=2))]
    requests = [*rows, np.float32(7.0), np.float32(-1.0)]
    expected = [y_of(predict(plain, x)) for x in requests]
    assert [e.ndim for e in expected[:2]] == [1, 2] and expected[-1].shape == ()  # as x's
    name = ":tensorflow:serving:batching_session:processed_batch_size"
    _, count_before = histogram(batched, name)
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda x: y_of(predict(batched, x)), requests))
    for x, want, answer in zip(requests, expected, got):
        assert answer.shape == want.shape and answer.tobytes() == want.tobytes(), x
    _, count = histogram(batched, name)
    assert count - count_before < len(rows)  # requests shared batches


@pytest.mark.slow
def test_rest_and_grpc_share_a_batch(servers):
    """One REST and one gRPC request of one row, sent together: one batch of 2 (no padding);
    separate batchers would have run two batches, each padded from 1 to 2."""
    batched = servers["batched"]
    name = ":tensorflow:serving:batching_session:processed_batch_size"
    sum_before, count_before = histogram(batched, name)
    barrier = threading.Barrier(2)

    def send(kind: str) -> np.ndarray:
        x = np.array([3.0 if kind == "grpc" else 5.0], np.float32)
        barrier.wait()
        return y_of(predict(batched, x)) if kind == "grpc" else rest_y(batched, x)

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(send, ["grpc", "rest"]))
    assert [a.tolist() for a in answers] == [[3.5], [4.5]]
    total, count = histogram(batched, name)
    assert (total - sum_before, count - count_before) == (2, 1)


@pytest.mark.slow
def test_classify_regress_and_multi_inference_are_batched_too(servers):
    """Batching is per session run, as TF Serving's BatchingSession: concurrent Classify, Regress
    and MultiInference calls (gRPC, and REST :classify / :regress) share batches, and answer
    byte for byte what the server without batching answers."""
    plain, batched = servers["plain"], servers["batched"]
    xs = [tuple(x.tolist()) for x in inputs(24, seed=1)]
    calls = {
        "classify": lambda server, x: server.predict_stub.Classify(
            classify_request("classify_x_to_y", x), timeout=10
        ).result,
        "regress": lambda server, x: server.predict_stub.Regress(
            regress_request(xs=x), timeout=10
        ).result,
        "multi": lambda server, x: server.predict_stub.MultiInference(
            multi_request(
                (MODEL, "classify_x_to_y", CLASSIFY_METHOD),
                (MODEL, "regress_x_to_y", REGRESS_METHOD),
                xs=x,
            ),
            timeout=10,
        ).results,
        "rest classify": lambda server, x: server.http(
            "POST",
            f"/v1/models/{MODEL}:classify",
            {"signature_name": "classify_x_to_y", "examples": [{"x": v} for v in x]},
        ),
        "rest regress": lambda server, x: server.http(
            "POST",
            f"/v1/models/{MODEL}:regress",
            {"signature_name": "regress_x_to_y", "examples": [{"x": v} for v in x]},
        ),
    }
    name = ":tensorflow:serving:batching_session:processed_batch_size"
    for kind, call in calls.items():
        expected = [call(plain, x) for x in xs]
        _, count_before = histogram(batched, name)
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(functools.partial(call, batched), xs))
        _, count = histogram(batched, name)
        assert got == expected, kind
        assert 0 < count - count_before < len(xs), kind  # batched, and requests shared batches


@pytest.mark.slow
def test_request_larger_than_a_batch_is_invalid_argument(servers):
    with pytest.raises(grpc.RpcError) as raised:
        predict(servers["tight"], np.zeros(5, np.float32))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Task size 5 is larger than maximum input batch size 4" in raised.value.details()
    status, body = servers["tight"].http(
        "POST", f"/v1/models/{MODEL}:predict", {"instances": [0.0] * 5}
    )
    assert status == 400 and "larger than maximum input batch size" in body["error"]


@pytest.mark.slow
def test_full_queue_answers_unavailable_at_once(servers):
    """Queue of one batch of 4 rows that waits 1 s: of a burst of 3-row requests one opens the
    batch, the others find the queue full and are refused at once, never hang."""
    tight = servers["tight"]
    barrier = threading.Barrier(10)

    def send(i: int) -> tuple[str, float, np.ndarray | None]:
        x = np.full(3, float(i), np.float32)
        barrier.wait()
        start = time.monotonic()
        try:
            y = y_of(predict(tight, x))
            return "ok", time.monotonic() - start, y
        except grpc.RpcError as e:
            return e.code().name, time.monotonic() - start, None

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(send, range(10)))
    refused = [took for code, took, _ in results if code == "UNAVAILABLE"]
    answered = [(i, y) for i, (code, _, y) in enumerate(results) if code == "ok"]
    assert refused and answered, results
    assert len(refused) + len(answered) == 10, results
    assert max(refused) < 0.5, results
    for i, y in answered:
        assert y.tolist() == [0.5 * i + 2] * 3


# -- per-model parameters and swaps ----------------------------------------------------------------


def _publish(server: Server, template: Path, version: int, params: str) -> None:
    def fill(path: Path) -> None:
        shutil.copytree(template, path)
        (path / "batching_params.pbtxt").write_text(params)

    saved_models._publish(server.base_path, version, fill)


@pytest.mark.slow
def test_per_model_parameters_and_swap_under_load(servers, half_template):
    """Version 1 has no batching_params.pbtxt (not batched: 3 rows pass); version 2 brings one
    with max_batch_size 2 (3 rows refused). Requests flow through the swap with no failure."""
    server = servers["per_model"]
    assert y_of(predict(server, np.ones(3, np.float32))).tolist() == [2.5] * 3
    stop = threading.Event()
    failures: list[str] = []
    versions: set[int] = set()

    def load(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            x = rng.normal(size=int(rng.integers(1, 3))).astype(np.float32)
            try:
                if seed % 2:
                    response = predict(server, x)
                    versions.add(response.model_spec.version.value)
                    y = y_of(response)
                else:
                    y = rest_y(server, x)
                if y.tobytes() != (np.float32(0.5) * x + np.float32(2)).tobytes():
                    failures.append(f"wrong answer for {x}: {y}")
            except (grpc.RpcError, AssertionError) as e:
                failures.append(repr(e))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        _publish(
            server,
            half_template,
            2,
            "max_batch_size { value: 2 } batch_timeout_micros { value: 2000 }",
        )
        server.wait_for(
            lambda s: s.get(2, (0,))[0] == 30 and s.get(1, (0,))[0] == 50,
            "version 2 AVAILABLE and version 1 END",
        )
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:5]
    assert versions == {1, 2}
    with pytest.raises(grpc.RpcError) as raised:
        predict(server, np.ones(3, np.float32))
    assert "maximum input batch size 2" in raised.value.details()


@pytest.mark.slow
def test_bad_per_model_file_fails_that_load_only(servers, half_template):
    server = servers["per_model"]
    _publish(server, half_template, 3, "max_batch_size { value: -1 }")
    server.wait_for(lambda s: s.get(3, (0,))[0] == 50, "version 3 END")
    assert "batching_params.pbtxt" in server.states()[3][2]
    assert "max_batch_size" in server.states()[3][2]
    assert y_of(predict(server, np.ones(2, np.float32))).tolist() == [2.5, 2.5]  # v2 serves
