"""Serving benchmarks: each figure beside its baseline, measured in the same run.

    make bench                      # = python -m benchmarks.run --write benchmarks/RESULTS.md
    python -m benchmarks.run --duration 5 --concurrency 1 8 64

Load comes from a separate process, h2load (Debian's nghttp2-client), with pre-encoded bodies:
gRPC over HTTP/2, REST over HTTP/1.1. Scenarios:
  a. gRPC Predict, batch-1 requests: our server against the no-op server (the Python gRPC ceiling);
  b. REST :predict: ours against the no-op endpoint and against `mlflow models serve` of the same
     model from the MLflow registry;
  c. the model alone, in-process, at batch 1 and 128 (the compute limit);
  d. hot swaps under load: versions published like push does while a multiprocess gRPC generator
     checks every answer (benchmarks/swaps.py);
  e. the server's RSS after 1 swap and after 50 swaps, under a light load (benchmarks/swaps.py);
  f. a worker SIGKILLed under load: requests failed, seconds until full capacity again
     (benchmarks/heal.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from benchmarks import heal, payloads, swaps
from benchmarks.common import (
    BATCHING_PARAMETERS,
    GRPC_PREDICT_PATH,
    MODEL,
    REST_PREDICT_PATH,
    build_model,
    h2load,
)
from benchmarks.paired import Paired, paired
from serving.flags import DEFAULT_WORKERS
from serving.model_format import DEFAULT_SIGNATURE
from tasks.config import REPO_ROOT
from tests.processes import free_port, model_server, running, wait_for_http


@dataclass(frozen=True)
class Measurement:
    scenario: str
    target: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    succeeded: int
    failed: int


def measure(
    scenario: str,
    target: str,
    url: str,
    body: Path,
    grpc: bool,
    levels: list[int],
    duration_s: float,
    scratch: Path,
) -> list[Measurement]:
    results = []
    for concurrency in levels:
        rps, latencies, ok, failed = h2load(
            url, body, concurrency, duration_s, grpc, scratch / "h2load.log"
        )
        result = Measurement(
            scenario,
            target,
            concurrency,
            rps,
            float(np.percentile(latencies, 50)),
            float(np.percentile(latencies, 99)),
            ok,
            failed,
        )
        print(
            f"  {scenario} {target:28s} c={concurrency:<3d} {rps:8.0f} req/s  "
            f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  failed {failed}",
            flush=True,
        )
        results.append(result)
    return results


@contextmanager
def our_server(
    store: Path, log: Path, extra_flags: tuple[str, ...] = ()
) -> Iterator[tuple[int, int]]:
    with model_server(store, MODEL, log, poll_s=1, extra_flags=extra_flags) as server:
        yield int(server.grpc_address.rsplit(":", 1)[1]), int(server.rest_url.rsplit(":", 1)[1])


@contextmanager
def noop_server(log: Path, workers: int) -> Iterator[tuple[int, int]]:
    grpc_port, rest_port = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "benchmarks.noop_server",
        f"--port={grpc_port}",
        f"--rest_api_port={rest_port}",
        f"--num_workers={workers}",
    ]
    with running(command, log) as process:
        wait_for_http(f"http://127.0.0.1:{rest_port}/", process, log)
        yield grpc_port, rest_port


@contextmanager
def mlflow_models_serve(directory: Path, log: Path) -> Iterator[int]:
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{MODEL}/1",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # It execs `uvicorn` by name: the venv's bin must be on PATH.
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{directory / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with running(command, log, env) as process:
        wait_for_http(f"http://127.0.0.1:{port}/ping", process, log, timeout_s=180)
        yield port


def in_process(store: Path) -> list[Measurement]:
    """The model alone through the server's servable: the compute limit per batch size."""
    from serving.servable import load_servable

    servable = load_servable(MODEL, 1, str(store / "1"), True)
    signature = servable.signature(DEFAULT_SIGNATURE)
    results = []
    for batch in (1, 128):
        inputs = {"images": np.random.default_rng(0).random((batch, 784), np.float32)}
        outputs = servable.validate(signature, inputs, ())
        for _ in range(50):
            servable.run(signature, inputs, outputs)
        times = []
        for _ in range(500):
            started = time.perf_counter()
            servable.run(signature, inputs, outputs)
            times.append((time.perf_counter() - started) * 1000)
        times = np.array(times)
        result = Measurement(
            "c",
            f"model in-process batch {batch}",
            1,
            1000 / times.mean() * batch,
            float(np.percentile(times, 50)),
            float(np.percentile(times, 99)),
            len(times),
            0,
        )
        print(
            f"  c model batch {batch:<4d} {result.p50_ms:.3f} ms p50, "
            f"{result.requests_per_s:,.0f} images/s",
            flush=True,
        )
        results.append(result)
    servable.close()
    return results


def ratio_lines(results: list[Measurement]) -> list[str]:
    by_key = {(r.scenario, r.target, r.concurrency): r for r in results}
    lines = []
    for (scenario, target, concurrency), result in sorted(by_key.items()):
        if target.startswith("ours"):
            for baseline in ("no-op", "mlflow models serve"):
                base = by_key.get((scenario, baseline, concurrency))
                if base and base.requests_per_s:
                    lines.append(
                        f"| {scenario} | {concurrency} | {target} / {baseline} | "
                        f"{result.requests_per_s / base.requests_per_s:.2f}x |"
                    )
    return lines


# The target figures against the no-op are also measured in paired rounds (benchmarks/paired.py).
PAIRED_TARGET = "ours batching"
PAIRED_CONCURRENCY = 64
# The bars of the serving-speed issue: (scenario, concurrency, baseline, minimum ratio of our best).
TARGETS = (("a", 64, "no-op", 0.8), ("b", 64, "no-op", 0.7), ("b", 64, "mlflow models serve", 50.0))
# What follows this line in RESULTS.md is written by people (the why behind the numbers) and is
# kept when the numbers are rewritten.
ANALYSIS_MARKER = "<!-- analysis: written by hand, kept across runs -->"


def target_lines(results: list[Measurement], pairs: dict[str, Paired]) -> list[str]:
    """The verdict on each bar. Against the no-op it is the paired median (``pairs``, by
    scenario) where there is one: the one-shot figures are minutes apart, and this machine
    drifts by ±10 % in minutes."""
    lines = []
    for scenario, concurrency, baseline, bar in TARGETS:
        ours = [
            r
            for r in results
            if r.scenario == scenario
            and r.concurrency == concurrency
            and r.target.startswith("ours")
        ]
        base = next(
            (
                r
                for r in results
                if (r.scenario, r.target, r.concurrency) == (scenario, baseline, concurrency)
            ),
            None,
        )
        if not ours or base is None or not base.requests_per_s:
            continue
        best = max(ours, key=lambda r: r.requests_per_s)
        ratio = best.requests_per_s / base.requests_per_s
        figure = f"{ratio:.2f}x"
        pair = (
            pairs.get(scenario)
            if baseline == "no-op" and concurrency == PAIRED_CONCURRENCY
            else None
        )
        if pair is not None:
            figure = (
                f"{pair.ratio:.2f}x paired ({PAIRED_TARGET} / no-op, {pair.spread()}; "
                f"one-shot {ratio:.2f}x, {best.target})"
            )
            ratio = pair.ratio
        verdict = "met" if ratio >= bar else f"missed by {bar / ratio:.2f}x"
        lines.append(
            f"- {scenario} at {concurrency} concurrent, ours / {baseline} ≥ {bar:g}x: "
            f"**{figure}: {verdict}**"
        )
    return lines


def paired_lines(pairs: dict[str, Paired]) -> list[str]:
    if not pairs:
        return []
    lines = [
        "## Paired rounds (targets a and b)",
        "",
        f"`{PAIRED_TARGET}` and the no-op up at once, loaded in turn at "
        f"{PAIRED_CONCURRENCY} concurrent (benchmarks/paired.py): drift between the two "
        "sides' loads is seconds, not minutes.",
        "",
        "| scenario | round | ours req/s | no-op req/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for scenario, pair in sorted(pairs.items()):
        lines += [
            f"| {scenario} | {i} | {a:,.0f} | {b:,.0f} | {a / b:.3f} |"
            for i, (a, b) in enumerate(pair.rates, 1)
        ]
        lines.append(f"| {scenario} | median | | | **{pair.ratio:.3f}** |")
    return lines + [""]


def write_results(
    path: Path,
    results: list[Measurement],
    pairs: dict[str, Paired],
    command: str,
    seconds: float,
    workers: int,
    sections: str = "",
) -> None:
    analysis = ""
    if path.exists() and ANALYSIS_MARKER in path.read_text():
        analysis = path.read_text().split(ANALYSIS_MARKER, 1)[1]
    rows = [
        f"| {r.scenario} | {r.target} | {r.concurrency} | {r.requests_per_s:,.0f} | "
        f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.failed} |"
        for r in results
    ]
    text = "\n".join(
        [
            "# Benchmark results",
            "",
            "Written by `benchmarks/run.py`; every ratio compares figures measured in the same "
            "run.",
            "",
            f"- command: `{command}`",
            f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, took {seconds:.0f} s",
            f"- machine: {platform.machine()}, {os.cpu_count()} cores (shared, noisy), "
            f"Python {platform.python_version()}",
            "- load: h2load, a separate process; gRPC over HTTP/2, REST over HTTP/1.1; "
            "batch-1 MNIST requests",
            f"- process layout: {workers} worker process(es) sharing the ports, for our server "
            "and the no-op alike",
            "",
            "| scenario | target | concurrency | req/s (c: images/s) | p50 ms | p99 ms | failed |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "## Ratios",
            "",
            "| scenario | concurrency | ratio | value |",
            "|---|---|---|---|",
            *ratio_lines(results),
            "",
            "Targets:",
            "",
            *target_lines(results, pairs),
            "",
            *paired_lines(pairs),
            *([sections] if sections else []),
            ANALYSIS_MARKER,
        ]
    )
    path.write_text(text + analysis)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds of load per figure")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--skip-mlflow", action="store_true", help="leave out `mlflow models serve` (slow)"
    )
    parser.add_argument(
        "--skip-swaps", action="store_true", help="leave out d and e (hot swaps, memory)"
    )
    parser.add_argument(
        "--skip-heal", action="store_true", help="leave out f (a worker killed under load)"
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=4,
        help="rounds of the paired a and b target figures (0: leave them out)",
    )
    parser.add_argument("--write", type=Path, help="write the results as Markdown to this file")
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="worker processes of our server and of the no-op (default: cores)",
    )
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client (make bench does)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch_name:
        scratch = Path(scratch_name)
        print("building the model (1 epoch) and registering it in MLflow ...", flush=True)
        store = build_model(scratch)
        bodies = payloads.write_all(scratch / "bodies", MODEL)
        results: list[Measurement] = []
        batching_file = scratch / "batching_parameters.pbtxt"
        batching_file.write_text(BATCHING_PARAMETERS)
        batching_flags = ("--enable_batching", f"--batching_parameters_file={batching_file}")
        layout = (f"--num_workers={args.workers}",)
        for target, server in (
            ("ours", our_server(store, scratch / "ours.log", layout)),
            (
                "ours batching",
                our_server(store, scratch / "ours-batching.log", layout + batching_flags),
            ),
            ("no-op", noop_server(scratch / "noop.log", args.workers)),
        ):
            with server as (grpc_port, rest_port):
                results += measure(
                    "a",
                    target,
                    f"http://127.0.0.1:{grpc_port}{GRPC_PREDICT_PATH}",
                    bodies["grpc"],
                    True,
                    args.concurrency,
                    args.duration,
                    scratch,
                )
                results += measure(
                    "b",
                    target,
                    f"http://127.0.0.1:{rest_port}{REST_PREDICT_PATH}",
                    bodies["rest"],
                    False,
                    args.concurrency,
                    args.duration,
                    scratch,
                )
        pairs: dict[str, Paired] = {}
        if args.paired_rounds and PAIRED_CONCURRENCY in args.concurrency:
            for scenario, api in (("a", "grpc"), ("b", "rest")):
                print(
                    f"{scenario}: paired rounds, {PAIRED_TARGET} and the no-op in turn ...",
                    flush=True,
                )
                pairs[scenario] = paired(
                    api,
                    [(PAIRED_TARGET, REPO_ROOT), ("no-op", REPO_ROOT)],
                    store,
                    scratch,
                    args.paired_rounds,
                    args.duration,
                    PAIRED_CONCURRENCY,
                    args.workers,
                )
        if not args.skip_mlflow:
            with mlflow_models_serve(scratch, scratch / "mlflow-serve.log") as port:
                results += measure(
                    "b",
                    "mlflow models serve",
                    f"http://127.0.0.1:{port}/invocations",
                    bodies["mlflow"],
                    False,
                    args.concurrency,
                    args.duration,
                    scratch,
                )
        results += in_process(store)
        hot, memory = [], None
        if not args.skip_swaps:
            print("d/e: hot swaps under load, memory across swaps ...", flush=True)
            hot, memory = swaps.run_all(
                store / "1",
                scratch,
                polls=[1.0, 0.1],
                swaps=5,
                rss_swaps=50,
                processes=2,
                in_flight=8,
            )
        healed = None
        if not args.skip_heal:
            print("f: a worker killed under load ...", flush=True)
            healed = heal.worker_killed(store / "1", scratch)
    (REPO_ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (REPO_ROOT / "benchmarks" / "out" / "results.json").write_text(
        json.dumps([asdict(r) for r in results], indent=1)
    )
    (REPO_ROOT / "benchmarks" / "out" / "swaps.json").write_text(swaps.to_json(hot, memory))
    if args.write:
        command = (
            "python -m benchmarks.run " + shlex.join(argv if argv is not None else sys.argv[1:])
        ).strip()
        write_results(
            args.write,
            results,
            pairs,
            command,
            time.monotonic() - started,
            args.workers,
            swaps.markdown(hot, memory, command)
            + (heal.markdown(healed, command) if healed else ""),
        )
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
