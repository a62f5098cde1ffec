"""Soak (a benchmark, not a test): gRPC and REST load for minutes while new versions arrive and
workers are killed.

    python -m benchmarks.soak                       # 5 min, a version every 10 s, a kill a minute
    python -m benchmarks.soak --duration 30 --version-every 5 --kill-every 15

The server runs 2 workers (poll 0.5 s). ``tests.servers.MixedLoad`` sends gRPC Predict (kept
connections) and REST :predict (a new connection each) from client threads throughout; every
``--version-every`` s a new version is published (hidden copy, rename), every ``--kill-every`` s
the oldest worker is SIGKILLed. Each second the server's RSS and open file descriptors (the
supervisor and its children, /proc) are sampled. Reported: failed requests, and how many of them
were *not* in flight on a killed worker (answered more than ``IN_FLIGHT_S`` after every kill:
must be 0); p99 latency per time slice; RSS and descriptors over time, plotted (``--plot``,
default ``benchmarks/out/soak.png``). The soak ends once every killed worker's replacement
serves, so the last sample is of a whole server. ``tests/test_soak.py`` runs a 30-second
variant.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import MODEL, command_line, save_json, scratch_and_version
from benchmarks.heal import WORKERS, wait_for_replacement
from benchmarks.swaps import fresh_store
from tests.processes import descendants, model_server, rss_kib, worker_pids
from tests.saved_models import copy_version
from tests.servers import MixedLoad

# A SIGKILLed worker took up to 4 s to exit on a busy machine; its sockets close only then.
IN_FLIGHT_S = 10.0
SLICES = 30  # p99 is reported per 1/SLICES of the run
START_TIMEOUT_S = 300.0  # a server's start, on a 2-core machine busy with other test suites


@dataclass
class SoakResult:
    duration_s: float
    versions: list[tuple[float, int]] = field(default_factory=list)  # (s into the run, version)
    kills: list[tuple[float, int]] = field(default_factory=list)  # (s into the run, pid)
    requests: int = 0
    failed: int = 0
    failed_not_in_flight: int = 0  # answered later than IN_FLIGHT_S after every kill
    first_errors: list[str] = field(default_factory=list)
    last_version_served: int = 0  # by the last gRPC answer
    p99_ms: list[tuple[float, float]] = field(default_factory=list)  # (slice start s, p99)
    # (s, RSS MiB, open fds of the server, of the supervisor alone: it starts the replacements)
    samples: list[tuple[float, float, int, int]] = field(default_factory=list)

    @property
    def rss_growth(self) -> float:
        """RSS at the end over RSS at the first sample, minus 1."""
        return self.samples[-1][1] / self.samples[0][1] - 1

    @property
    def fd_growth(self) -> int:
        return self.samples[-1][2] - self.samples[0][2]

    @property
    def supervisor_fd_growth(self) -> int:
        return self.samples[-1][3] - self.samples[0][3]


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` (0 once it is gone: /proc)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def soak(
    source: Path, scratch: Path, duration_s: float, version_every_s: float, kill_every_s: float
) -> SoakResult:
    store = fresh_store(scratch / "soak", source)
    log = scratch / "soak" / "server.log"
    result = SoakResult(duration_s)
    flags = (f"--num_workers={WORKERS}",)
    with model_server(store, MODEL, log, 0.5, flags, START_TIMEOUT_S) as server:
        rest_port = int(server.rest_url.rsplit(":", 1)[1])
        with MixedLoad(server.grpc_address, rest_port, MODEL) as load:
            started = time.monotonic()
            _run_schedule(server, store, source, result, started, version_every_s, kill_every_s)
            if result.kills:
                wait_for_replacement(log, len(result.kills))
            _sample(server, result, started)
        _tally(load, result, started)
    return result


def _run_schedule(server, store, source, result, started, version_every_s, kill_every_s) -> None:
    """Until the duration is over: publish, kill and sample when each is due."""
    next_version, next_kill = version_every_s, kill_every_s
    version = 1
    while (now := time.monotonic() - started) < result.duration_s:
        if now >= next_version:
            version += 1
            copy_version(source, store, version)
            result.versions.append((now, version))
            next_version += version_every_s
        if now >= next_kill:
            victim = min(worker_pids(server.process.pid))
            os.kill(victim, signal.SIGKILL)
            result.kills.append((now, victim))
            next_kill += kill_every_s
        _sample(server, result, started)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started - now)))


def _sample(server, result: SoakResult, started: float) -> None:
    pid = server.process.pid
    fds = sum(open_fds(p) for p in [pid, *descendants(pid)])
    result.samples.append((time.monotonic() - started, rss_kib(pid) / 1024, fds, open_fds(pid)))


def _tally(load: MixedLoad, result: SoakResult, started: float) -> None:
    outcomes = load.outcomes
    at = np.array([o[0] - started for o in outcomes])
    latency_ms = np.array([o[3] * 1000 for o in outcomes])
    failed = np.array([o[2] != "ok" for o in outcomes])
    kills = np.array([t for t, _ in result.kills])
    near_a_kill = np.array([bool(((t >= kills) & (t <= kills + IN_FLIGHT_S)).any()) for t in at])
    result.requests = len(outcomes)
    result.failed = int(failed.sum())
    result.failed_not_in_flight = int((failed & ~near_a_kill).sum()) if failed.size else 0
    result.first_errors = [o[2] for o in outcomes if o[2] != "ok"][:5]
    result.last_version_served = next(
        (o[4] for o in reversed(outcomes) if o[1] == "grpc" and o[2] == "ok"), 0
    )
    width = result.duration_s / SLICES
    for start in np.arange(0, result.duration_s, width):
        mask = (at >= start) & (at < start + width) & ~failed
        if mask.any():
            result.p99_ms.append((float(start), float(np.percentile(latency_ms[mask], 99))))


def plot(result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (p99, rss, fds) = plt.subplots(3, 1, sharex=True, figsize=(9, 7))
    p99.plot(*zip(*result.p99_ms), marker=".")
    p99.set_ylabel("p99 ms")
    seconds = [s[0] for s in result.samples]
    rss.plot(seconds, [s[1] for s in result.samples])
    rss.set_ylabel("RSS MiB")
    fds.plot(seconds, [s[2] for s in result.samples], label="server")
    fds.plot(seconds, [s[3] for s in result.samples], label="supervisor")
    fds.legend()
    fds.set_ylabel("open fds")
    fds.set_xlabel("seconds")
    for axis in (p99, rss, fds):
        for t, _ in result.versions:
            axis.axvline(t, color="tab:green", alpha=0.2)
        for t, _ in result.kills:
            axis.axvline(t, color="tab:red", linestyle="--")
    p99.set_title("soak: new version (green), worker SIGKILLed (red)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def markdown(result: SoakResult, command: str, plot_path: str) -> str:
    p99 = [v for _, v in result.p99_ms]
    return "\n".join(
        [
            "## Soak: versions and worker kills under load",
            "",
            f"- command: `{command}`",
            f"- {result.duration_s:.0f} s of gRPC + REST load ({MixedLoad.GRPC_CLIENTS} + "
            f"{MixedLoad.REST_CLIENTS} client threads), {len(result.versions)} versions "
            f"published, {len(result.kills)} workers SIGKILLed; plot: `{plot_path}`",
            f"- requests: {result.requests:,}, failed: {result.failed} "
            f"({result.failed_not_in_flight} not within {IN_FLIGHT_S:g} s of a kill)"
            + (f"; first: {result.first_errors}" if result.failed else ""),
            f"- p99 per {result.duration_s / SLICES:.0f} s slice: median {np.median(p99):.1f} ms, "
            f"max {max(p99):.1f} ms",
            f"- RSS {result.samples[0][1]:.0f} → {result.samples[-1][1]:.0f} MiB "
            f"({result.rss_growth:+.1%}, max {max(s[1] for s in result.samples):.0f}); open fds "
            f"{result.samples[0][2]} → {result.samples[-1][2]} "
            f"(max {max(s[2] for s in result.samples)}; the supervisor's alone "
            f"{result.samples[0][3]} → {result.samples[-1][3]})",
            f"- the last version published, {result.versions[-1][1] if result.versions else 1}, "
            f"is the one the last gRPC answer came from: {result.last_version_served}",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--source", type=Path, help="an exported version directory")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--version-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--plot", type=Path, default=Path("benchmarks/out/soak.png"), help="the PNG to write"
    )
    args = parser.parse_args(argv)
    with scratch_and_version("soak", args.source) as (scratch, source):
        result = soak(source, scratch, args.duration, args.version_every, args.kill_every)
    save_json("soak.json", asdict(result))
    plot(result, args.plot)
    command = command_line("benchmarks.soak", argv)
    print(markdown(result, command, str(args.plot)))


if __name__ == "__main__":
    main()
