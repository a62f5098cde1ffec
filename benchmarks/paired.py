"""Paired comparison of two servers: both up at once, loaded in turn, round after round.

This 2-core machine is shared: the same figure drifts by ±10 % between runs minutes apart, more
than most single changes are worth. Loading A and B alternately for a few seconds each lets the
drift hit both alike; the median of the per-round ratios A/B is the figure to quote.

    python -m benchmarks.paired --api rest --a "ours batching" --b no-op
    python -m benchmarks.paired --api grpc --a "ours batching" --b "ours batching" --b-tree ../old

A side is one of benchmarks.run's targets (ours, "ours batching", no-op), run from this checkout
or from another one (``--a-tree``/``--b-tree``: a worktree of an older commit, say) with this
venv.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from benchmarks import payloads
from benchmarks.common import (
    BATCHING_PARAMETERS,
    GRPC_PREDICT_PATH,
    MODEL,
    REST_PREDICT_PATH,
    build_model,
    h2load,
)
from serving.flags import DEFAULT_WORKERS
from tasks.config import REPO_ROOT
from tests.processes import free_port, wait_for_http

TARGETS = ("ours", "ours batching", "no-op")


@contextmanager
def server(
    target: str, tree: Path, store: Path, scratch: Path, name: str, workers: int
) -> Iterator[tuple[int, int]]:
    """One side's server, run from ``tree``; yields its (gRPC, REST) ports once REST answers."""
    grpc_port, rest_port = free_port(), free_port()
    ports = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", f"--num_workers={workers}"]
    if target == "no-op":
        command = [sys.executable, "-m", "benchmarks.noop_server", *ports]
        ready = f"http://127.0.0.1:{rest_port}/"
    else:
        command = [
            sys.executable,
            "-m",
            "serving",
            *ports,
            f"--model_name={MODEL}",
            f"--model_base_path={store}",
        ]
        if target == "ours batching":
            parameters = scratch / "batching_parameters.pbtxt"
            parameters.write_text(BATCHING_PARAMETERS)
            command += ["--enable_batching", f"--batching_parameters_file={parameters}"]
        ready = f"http://127.0.0.1:{rest_port}/v1/models/{MODEL}"
    log = scratch / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=tree, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_http(ready, process, log)
        yield grpc_port, rest_port
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass(frozen=True)
class Paired:
    """Requests/s of sides A and B, round by round."""

    rates: list[tuple[float, float]]

    @property
    def ratio(self) -> float:
        """The median per-round A/B: the figure to quote."""
        return statistics.median(a / b for a, b in self.rates)

    def spread(self) -> str:
        ratios = [a / b for a, b in self.rates]
        return f"rounds {min(ratios):.3f}-{max(ratios):.3f}"


def paired(
    api: str,
    sides: list[tuple[str, Path]],
    store: Path,
    scratch: Path,
    rounds: int,
    duration_s: int,
    concurrency: int,
    workers: int,
) -> Paired:
    """Serve the model in ``store`` from both ``sides`` ((target, checkout)) at once and load
    them in turn, ``rounds`` times ``duration_s`` seconds each."""
    grpc = api == "grpc"
    body = payloads.write_all(scratch / "bodies", MODEL)[api]
    path = GRPC_PREDICT_PATH if grpc else REST_PREDICT_PATH
    rates: list[tuple[float, float]] = []
    with ExitStack() as stack:
        urls = []
        for name, (target, tree) in zip(("a", "b"), sides):
            grpc_port, rest_port = stack.enter_context(
                server(target, tree.resolve(), store, scratch, f"{api}-{name}", workers)
            )
            urls.append(f"http://127.0.0.1:{grpc_port if grpc else rest_port}{path}")
        for round_ in range(1, rounds + 1):
            a, b = (
                h2load(url, body, concurrency, duration_s, grpc, scratch / "h2load.log")[0]
                for url in urls
            )
            rates.append((a, b))
            print(
                f"  round {round_}: A {a:8.0f} req/s   B {b:8.0f} req/s   A/B {a / b:.3f}",
                flush=True,
            )
    return Paired(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paired", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--api", choices=("grpc", "rest"), required=True)
    parser.add_argument("--a", choices=TARGETS, required=True)
    parser.add_argument("--b", choices=TARGETS, required=True)
    parser.add_argument("--a-tree", type=Path, default=REPO_ROOT, help="checkout A runs from")
    parser.add_argument("--b-tree", type=Path, default=REPO_ROOT, help="checkout B runs from")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--duration", type=int, default=5, help="seconds of load per side and round"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="paired-") as scratch_name:
        scratch = Path(scratch_name)
        print("building the model (1 epoch) ...", flush=True)
        store = build_model(scratch)
        result = paired(
            args.api,
            [(args.a, args.a_tree), (args.b, args.b_tree)],
            store,
            scratch,
            args.rounds,
            args.duration,
            args.concurrency,
            args.workers,
        )
    print(
        f"A = {args.a} ({args.a_tree}), B = {args.b} ({args.b_tree}), {args.api}, "
        f"{args.concurrency} concurrent, {args.workers} workers: median A/B {result.ratio:.3f} "
        f"({result.spread()})"
    )


if __name__ == "__main__":
    main()
