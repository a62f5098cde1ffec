"""The data plane in-process, over a real half_plus_two version: one call per API, the same
answers with batching off and on; and where its jobs run (``serving.jobs``): cheap kinds of job
on the event loop, expensive ones on the thread pool."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.jobs import COST_WINDOW, INLINE_BUDGET_S, JobRunner

pytestmark = pytest.mark.timeout(120)


# -- jobs ------------------------------------------------------------------------------------------


def _busy(seconds: float) -> None:
    """Hold the CPU (and the GIL) like a model call would: a sleep would free the loop."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _thread_of(job_seconds: float):
    def job() -> int:
        _busy(job_seconds)
        return threading.get_ident()

    return job


async def _threads(jobs: JobRunner, kind: str, job_seconds: float, n: int) -> list[int]:
    return [await jobs.run(kind, _thread_of(job_seconds)) for _ in range(n)]


def _with_jobs(scenario) -> None:
    jobs = JobRunner(2, "predict")
    try:
        asyncio.run(scenario(jobs))
    finally:
        jobs.close()


def test_cheap_jobs_run_on_the_loop_and_expensive_ones_on_the_pool():
    async def scenario(jobs: JobRunner) -> None:
        loop_thread = threading.get_ident()
        cheap = await _threads(jobs, "cheap", 0, 5)
        # Never seen: the pool measures it first; from then on it is known to be cheap.
        assert cheap[0] != loop_thread
        assert cheap[1:] == [loop_thread] * 4
        expensive = await _threads(jobs, "expensive", 2 * INLINE_BUDGET_S, 5)
        assert loop_thread not in expensive
        # Kinds are judged apart: the expensive one did not move the cheap one off the loop.
        assert await _threads(jobs, "cheap", 0, 1) == [loop_thread]

    _with_jobs(scenario)


def test_a_kind_that_becomes_expensive_moves_to_the_pool():
    async def scenario(jobs: JobRunner) -> None:
        loop_thread = threading.get_ident()
        await _threads(jobs, "model", 0, 2)
        # A few slow runs (a preempted thread, say) do not move it ...
        slow = await _threads(jobs, "model", 2 * INLINE_BUDGET_S, COST_WINDOW - 1)
        assert slow == [loop_thread] * (COST_WINDOW - 1)
        # ... a window of them does (the model behind the kind got bigger).
        await _threads(jobs, "model", 2 * INLINE_BUDGET_S, 1)
        assert loop_thread not in await _threads(jobs, "model", 2 * INLINE_BUDGET_S, 3)

    _with_jobs(scenario)


def test_failed_jobs_are_not_measured():
    def fail() -> None:
        raise ValueError("no such model")

    async def scenario(jobs: JobRunner) -> None:
        for _ in range(3):
            with pytest.raises(ValueError):
                await jobs.run("unknown model", fail)
        assert not jobs.costs.cheap("unknown model")

    _with_jobs(scenario)


# -- the data plane's calls ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_plus_two(tmp_path_factory):
    """Loads the half_plus_two model (``y = 0.5 x + 2``) as a new version, batched as with
    ``--enable_batching``."""
    from serving.servable import load_servable
    from serving.tf_runtime import import_tensorflow_for_serving
    from serving.types import BatchingParameters
    from tests import saved_models

    import_tensorflow_for_serving()
    base = tmp_path_factory.mktemp("half_plus_two")
    saved_models.write_half_plus_two(base, 1, warmup=False)

    def load():
        servable = load_servable("half", 1, str(base / "1"), False)
        servable.batching = BatchingParameters(batch_timeout_micros=20_000, num_batch_threads=1)
        return servable

    return load


class Call:
    """A front end's call: ``read`` gives what it decoded, ``answer`` records the result; it
    counts how often it was read, and where it was answered."""

    def __init__(self, request) -> None:
        self.request = request
        self.reads = 0

    def read(self):
        self.reads += 1
        if isinstance(self.request, Exception):
            raise self.request
        return self.request

    def answer(self, result):
        return result


def _examples(*values: float) -> list[bytes]:
    from tests.saved_models import x_example

    return [x_example(v).SerializeToString() for v in values]


def _answers(servable, batching: bool) -> dict:
    """Every API's answer through a DataPlane over ``servable``, four Predicts at once."""
    from serving import batching as batching_module
    from serving.core import (
        DataPlane,
        ExamplesInput,
        InferenceTask,
        ModelSpec,
        MultiInferenceInput,
        PredictInput,
    )
    from serving.model_format import CLASSIFY_METHOD, REGRESS_METHOD
    from serving.routing import RoutingTable

    routing = RoutingTable()
    routing.add("half", servable)
    model = ModelSpec("half")

    async def scenario() -> dict:
        batcher = batching_module.Batcher(1, "batch_threads") if batching else None
        data_plane = DataPlane(routing, control=None, num_threads=2, batcher=batcher)
        try:
            predicts = [
                Call(PredictInput("", {"x": np.array([x], np.float32)})) for x in (0.0, 1, 2, 3)
            ]
            results = await asyncio.gather(
                *(data_plane.predict(model, 8, call) for call in predicts)
            )
            tasks = [
                InferenceTask("half", None, None, "classify_with_labels", CLASSIFY_METHOD),
                InferenceTask("half", None, None, "regress_x_to_y", REGRESS_METHOD),
            ]
            return {
                "predict": [r.outputs["y"].tolist() for r in results],
                "reads": [call.reads for call in predicts],
                "classify": await data_plane.classify(
                    model, 8, Call(ExamplesInput("classify_with_labels", _examples(1, 3)))
                ),
                "regress": await data_plane.regress(
                    model, 8, Call(ExamplesInput("regress_x_to_y", _examples(4)))
                ),
                "multi": await data_plane.multi_inference(
                    "half", 8, Call(MultiInferenceInput(tasks, _examples(2)))
                ),
            }
        finally:
            data_plane.close()

    return asyncio.run(scenario())


def test_every_api_answers_the_same_with_batching_off_and_on(half_plus_two):
    servable = half_plus_two()
    try:
        plain, batched = _answers(servable, False), _answers(servable, True)
    finally:
        servable.close()
    assert plain["predict"] == [[2.0], [2.5], [3.0], [3.5]]
    assert plain["reads"] == [1, 1, 1, 1]
    assert plain["classify"].value.scores.tolist() == [[2.5], [3.5]]
    assert plain["classify"].value.classes.tolist() == [[b"half_plus_two"]] * 2
    assert plain["regress"].value.values.tolist() == [4.0]
    assert [r.signature_name for r in plain["multi"]] == ["classify_with_labels", "regress_x_to_y"]
    assert plain["multi"][1].value.values.tolist() == [3.0]
    for key in ("predict", "reads"):
        assert batched[key] == plain[key], key
    for key in ("classify", "regress"):
        assert repr(batched[key]) == repr(plain[key]), key
    assert repr(batched["multi"]) == repr(plain["multi"])


def test_a_request_that_fails_before_the_model_runs_leaves_no_version_pinned(half_plus_two):
    """A front end's decoding error, or inputs the signature rejects, reach the request, batching
    off and on; the version it routed to is not left pinned (removing it does not wait)."""
    from serving import batching as batching_module
    from serving.core import DataPlane, ModelSpec, PredictInput
    from serving.errors import ServingError, invalid
    from serving.routing import RoutingTable

    for batching in (False, True):
        routing = RoutingTable()
        routing.add("half", half_plus_two())

        async def scenario(batching=batching, routing=routing) -> None:
            batcher = batching_module.Batcher(1, "batch_threads") if batching else None
            data_plane = DataPlane(routing, control=None, num_threads=2, batcher=batcher)
            wrong_input = PredictInput("", {"z": np.array([1.0], np.float32)})
            try:
                for request, error in (
                    (invalid("cannot decode"), "cannot decode"),
                    (wrong_input, "input size does not match signature"),
                ):
                    with pytest.raises(ServingError, match=error):
                        await data_plane.predict(ModelSpec("half"), 8, Call(request))
            finally:
                data_plane.close()

        asyncio.run(scenario())
        start = time.monotonic()
        routing.remove("half", 1, wait_s=5)  # waits for pinned requests: none may be left
        assert time.monotonic() - start < 1, batching
