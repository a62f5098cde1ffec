"""A worker killed under load (scenario f): what fails, and how long until full capacity again.

    python -m benchmarks.heal            # builds the model (~10 s), then one run of f
    python -m benchmarks.heal --source DIR/1 --kills 3

The server runs 2 workers; the load generator of scenario d (``benchmarks/swaps.py``: separate
processes, ``--processes`` × ``--in-flight`` concurrent batch-1 gRPC Predict calls, every answer
checked) runs throughout. After ``LEAD_S`` one worker is SIGKILLed; the next kill waits until its
replacement serves. Per kill:

* failed requests: any answer that is not OK with the right scores (only those in flight on the
  killed worker may fail: at most processes × in-flight);
* seconds until full capacity: from the kill to the supervisor's "worker N replaced" log line,
  the moment the replacement serves every version and its ports take connections (it includes
  starting a Python process and importing TensorFlow); then checked from outside: fresh
  connections reach both workers again;
* requests/s of the load before the kill and between the kill and full capacity (one worker).

The generator's HTTP/2 connections are kept: those on the killed worker reconnect to the survivor
and stay there, so it is the *new* connections that the replacement's capacity serves.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from benchmarks.common import MODEL, command_line, save_json, scratch_and_version
from benchmarks.swaps import LoadGenerator, Records, fresh_store, reference_request
from tests.processes import connections_per_worker, model_server, worker_pids

WORKERS = 2
LEAD_S = 4.0  # of steady load before the first kill
GAP_S = 3.0  # of steady load after a replacement serves, before the next kill
REPLACED_TIMEOUT_S = 180.0
REPLACED = re.compile(r"^(\S+ \S+) INFO MainProcess serving.workers: worker \d+ replaced by pid")


@dataclass
class Kill:
    pid: int
    killed: float  # time.time(): compared with the server log's wall-clock stamps
    replaced: float  # the supervisor logged the replacement serving
    failed: int
    rate_before: float  # requests/s in the GAP_S before the kill
    rate_reduced: float  # requests/s from the kill until the replacement serves
    fresh_connections_per_worker: list[int]

    @property
    def to_full_capacity_s(self) -> float:
        return self.replaced - self.killed


@dataclass
class HealResult:
    processes: int
    in_flight: int
    requests: int
    failed: int
    first_errors: list[str]
    kills: list[dict]


def logged_replacements(log: Path) -> list[float]:
    """Wall-clock times of the "worker N replaced" lines of a server log."""
    stamps = [REPLACED.match(line) for line in log.read_text(errors="replace").splitlines()]
    return [datetime.fromisoformat(m.group(1)).timestamp() for m in stamps if m]


def wait_for_replacement(log: Path, count: int) -> float:
    deadline = time.monotonic() + REPLACED_TIMEOUT_S
    while len(stamps := logged_replacements(log)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no replacement within {REPLACED_TIMEOUT_S:g} s")
        time.sleep(0.1)
    return stamps[count - 1]


def kill_one(server, log: Path, number: int) -> tuple[int, float, float, list[int]]:
    """SIGKILL the oldest worker; wait until its replacement serves."""
    victim = min(worker_pids(server.process.pid))
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for_replacement(log, number)
    per_worker = connections_per_worker(server.grpc_address, worker_pids(server.process.pid), 24)
    return victim, killed, replaced, per_worker


def worker_killed(
    source: Path, scratch: Path, kills: int = 2, processes: int = 2, in_flight: int = 8
) -> HealResult:
    """Scenario f: ``kills`` workers SIGKILLed one after another under continuous load."""
    store = fresh_store(scratch / "heal", source)
    log = scratch / "heal" / "server.log"
    done: list[tuple[int, float, float, list[int]]] = []
    with model_server(store, MODEL, log, 1.0, (f"--num_workers={WORKERS}",)) as server:
        generator = LoadGenerator(server.grpc_address, processes, in_flight)
        try:
            generator.start(*reference_request(server.grpc_address))
            for number in range(1, kills + 1):
                time.sleep(LEAD_S if number == 1 else GAP_S)
                done.append(kill_one(server, log, number))
            time.sleep(GAP_S)
            records = generator.stop()
        finally:
            generator.close()
    result = HealResult(
        processes,
        in_flight,
        int(records.code.size),
        int((records.code != 0).sum()),
        records.errors[:5],
        [asdict(k) | {"to_full_capacity_s": k.to_full_capacity_s} for k in per_kill(records, done)],
    )
    for kill in result.kills:
        print(
            f"  f killed pid {kill['pid']}: {kill['failed']} failed, full capacity after "
            f"{kill['to_full_capacity_s']:.1f} s, {kill['rate_before']:.0f} -> "
            f"{kill['rate_reduced']:.0f} req/s meanwhile, fresh connections per worker "
            f"{kill['fresh_connections_per_worker']}",
            flush=True,
        )
    print(f"  f {result.requests} requests, failed {result.failed}", flush=True)
    return result


def per_kill(records: Records, done: list[tuple[int, float, float, list[int]]]) -> list[Kill]:
    """Each kill's figures; its failures are those answered from it until the next kill."""
    offset = time.time() - time.monotonic()  # the generator's stamps are CLOCK_MONOTONIC
    answered = records.done + offset
    failed = records.code != 0
    ends = [killed for _, killed, _, _ in done[1:]] + [float("inf")]
    return [
        Kill(
            pid,
            killed,
            replaced,
            int((failed & (answered >= killed) & (answered < end)).sum()),
            _rate(answered, killed - GAP_S, killed),
            _rate(answered, killed, replaced),
            per_worker,
        )
        for (pid, killed, replaced, per_worker), end in zip(done, ends)
    ]


def _rate(answered: np.ndarray, start: float, end: float) -> float:
    return float(((answered >= start) & (answered < end)).sum() / (end - start))


def markdown(result: HealResult, command: str) -> str:
    in_flight = result.processes * result.in_flight
    lines = [
        "## f. A worker killed under load",
        "",
        f"- command: `{command}` (alone: `python -m benchmarks.heal`)",
        f"- {WORKERS} workers; load: {result.processes} processes × {result.in_flight} in-flight "
        "batch-1 gRPC Predict calls (the generator of d, every answer checked), kept connections",
        "- per kill: the oldest worker SIGKILLed; *full capacity* = kill → the supervisor's "
        '"worker N replaced" line (the replacement serves every version and takes connections: '
        "a new Python process, TensorFlow's import, the loads and warmup); then 24 fresh "
        "connections are spread over both workers",
        "",
        "| kill | failed | s to full capacity | req/s before / until then | fresh connections "
        "per worker |",
        "|---|---|---|---|---|",
    ]
    for number, k in enumerate(result.kills, 1):
        lines.append(
            f"| {number} | {k['failed']} | {k['to_full_capacity_s']:.1f} | "
            f"{k['rate_before']:,.0f} / {k['rate_reduced']:,.0f} | "
            f"{k['fresh_connections_per_worker']} |"
        )
    worst = max((k["failed"] for k in result.kills), default=0)
    lines += [
        "",
        f"- failed requests: {result.failed} of {result.requests:,}; at most {worst} per kill, "
        f"within the {in_flight} that can be in flight on the killed worker: "
        + ("**met**" if worst <= in_flight else "**missed**")
        + (f" (first: {result.first_errors})" if result.failed else ""),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.heal", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--source", type=Path, help="an exported version directory (default: build one)"
    )
    parser.add_argument("--kills", type=int, default=2, help="workers killed one after another")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args(argv)
    with scratch_and_version("heal", args.source) as (scratch, source):
        result = worker_killed(source, scratch, args.kills, args.processes, args.in_flight)
    save_json("heal.json", asdict(result))
    print(markdown(result, command_line("benchmarks.heal", argv)))


if __name__ == "__main__":
    main()
