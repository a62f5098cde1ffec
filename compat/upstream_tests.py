"""TF Serving's own model-server tests against our server, one result per test.

``python -m compat.upstream_tests [--serving-src PATH] [--only testFoo ...] [--timeout S]``

Runs ``tensorflow_serving/model_servers/tensorflow_model_server_test.py`` (all its tests but the
TF Lite ones) as Bazel would, with ``python -m serving`` in the place of the
``tensorflow_model_server`` binary, and prints a table of the results and the totals; exits 1
when a test did not pass. The tree the test expects, under a scratch directory:

- ``srcdir/`` (``TEST_SRCDIR``): ``tf_serving/tensorflow_serving/model_servers/
  tensorflow_model_server``, a shell script that runs ``<this python> -m serving "$@"`` from this
  repository's root, the command line as the test wrote it; and ``.../servables/tensorflow/
  testdata``, the checkout's test data;
- ``python/`` (the test's ``PYTHONPATH``): a ``tensorflow_serving`` package made of the installed
  ``tensorflow-serving-api`` wheel's modules and the checkout's ``model_servers/test_util/
  tensorflow_model_server_test_base.py``, which the wheel does not ship.

The tests run in one process (``compat/upstream_child.py``), so that tests which start a server
with the same arguments share it, as upstream. A test that runs longer than ``--timeout`` is
recorded as timed out, its process group (servers included) is killed, and a new process runs
the tests after it. Every server is stopped at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from compat.checkout import Source, source_tree
from compat.processes import start_group, stop_group

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "upstream_child.py"
MODEL_SERVERS = "tensorflow_serving/model_servers"
TEST_FILE = f"{MODEL_SERVERS}/tensorflow_model_server_test.py"
TEST_BASE = f"{MODEL_SERVERS}/test_util/tensorflow_model_server_test_base.py"
TESTDATA = "tensorflow_serving/servables/tensorflow/testdata"
TEST_CLASS = "TensorflowModelServerTest"
# TF Lite models are outside what our server serves (docs/tf-serving-compat.md).
EXCLUDED_MARK = "TfLite"
NOT_PASSED = ("failed", "error", "timeout", "crashed", "not run")


@dataclass
class Result:
    outcome: str  # passed | failed | error | skipped | timeout | crashed | not run
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Layout:
    """The scratch tree one run uses."""

    work: Path
    srcdir: Path = field(init=False)
    python: Path = field(init=False)
    tmp: Path = field(init=False)
    log: Path = field(init=False)
    events: Path = field(init=False)
    socket: Path = field(init=False)

    def __post_init__(self) -> None:
        self.srcdir = self.work / "srcdir"
        self.python = self.work / "python"
        self.tmp = self.work / "tmp"
        self.log = self.work / "tests.log"
        self.events = self.work / "events.jsonl"
        self.socket = self.work / "grpc.sock"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compat.upstream_tests",
        description="Run TF Serving's tensorflow_model_server_test.py against python -m serving.",
    )
    parser.add_argument(
        "--serving-src", type=Path, help="a TF Serving checkout (default: the mirror's HEAD)"
    )
    parser.add_argument(
        "--only", action="append", metavar="TEST", help="run this test only (repeatable)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one test may take (default 300)"
    )
    parser.add_argument(
        "--grpc-socket-path",
        type=Path,
        help="the tests' UDS path (default: one in the scratch directory; upstream's is "
        "/tmp/tf-serving.sock, which runs side by side would share)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory and log")
    return parser


def test_names(test_file: Path) -> list[str]:
    """The test methods of the test class, in the order unittest runs them, read from the
    source (no TensorFlow import here)."""
    tree = ast.parse(test_file.read_text())
    (test_class,) = [
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == TEST_CLASS
    ]
    return sorted(
        node.name
        for node in test_class.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
    )


def prepare(source: Source, layout: Layout) -> None:
    """TEST_SRCDIR with our server as the binary and the checkout's test data; the overlay
    package on the test's PYTHONPATH."""
    servers = layout.srcdir / "tf_serving" / MODEL_SERVERS
    servers.mkdir(parents=True)
    binary = servers / "tensorflow_model_server"
    binary.write_text(
        "#!/bin/sh\n"
        "# Our model server in the place of TF Serving's binary; the arguments as given.\n"
        f"cd {shlex.quote(str(REPO))} || exit 1\n"
        f"PYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} -m serving"
        ' "$@"\n'
    )
    binary.chmod(0o755)
    testdata = layout.srcdir / "tf_serving" / TESTDATA
    testdata.parent.mkdir(parents=True)
    testdata.symlink_to(source.root / TESTDATA)
    _overlay_package(source, layout.python / "tensorflow_serving")
    layout.tmp.mkdir()


def _overlay_package(source: Source, package: Path) -> None:
    """``tensorflow_serving``: the wheel's modules (linked) plus the checkout's test base."""
    import tensorflow_serving

    (wheel,) = tensorflow_serving.__path__
    package.mkdir(parents=True)
    for entry in Path(wheel).iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    test_util = package / "model_servers" / "test_util"
    test_util.mkdir(parents=True)
    (package / "model_servers" / "__init__.py").touch()
    (test_util / "__init__.py").touch()
    shutil.copy(source.root / TEST_BASE, test_util / Path(TEST_BASE).name)


def run_tests(
    source: Source, layout: Layout, names: list[str], timeout_s: float, socket: Path
) -> dict[str, Result]:
    """Run ``names`` in test processes, a new one after each timeout or crash, until each has
    a result."""
    env = dict(
        os.environ,
        TEST_SRCDIR=str(layout.srcdir),
        TEST_TMPDIR=str(layout.tmp),
        PYTHONPATH=str(layout.python),
        TF_CPP_MIN_LOG_LEVEL="2",
        # The Keras tests save models with Keras 2's signatures (input "x", output "y"); Keras 3
        # names them "inputs"/"output_0", which TF Serving itself would refuse for that request.
        TF_USE_LEGACY_KERAS="1",
    )
    results: dict[str, Result] = {}
    while remaining := [name for name in names if name not in results]:
        argv = [sys.executable, CHILD, source.root / TEST_FILE, socket, layout.events, *remaining]
        child = start_group(argv, layout.log, env, layout.work)
        try:
            started = _watch(child, layout.events, results, timeout_s)
        finally:
            stop_group(child)
        if not started:  # the process ended before its first test: it would again
            for name in remaining:
                results[name] = Result("not run", detail=f"test process exited {child.returncode}")
    return results


def _watch(child, events_path: Path, results: dict[str, Result], timeout_s: float) -> bool:
    """Record the child's results until it exits or its current test runs past ``timeout_s``;
    return whether it started any test."""
    offset, started_any = events_path.stat().st_size if events_path.exists() else 0, False
    current: tuple[str, float] | None = None
    while True:
        exited = child.poll() is not None
        offset, events = _read_events(events_path, offset)
        for event in events:
            name = event["test"]
            if event["event"] == "start":
                current, started_any = (name, time.monotonic()), True
                continue
            result = Result(event["outcome"], event["seconds"], event["detail"])
            if results.get(name, result).outcome == "passed" or name not in results:
                results[name] = result  # a tearDown error after a pass still counts
            _progress(name, result, len(results))
            current = None
        if current and time.monotonic() - current[1] > timeout_s:
            results[current[0]] = Result(
                "timeout", timeout_s, f"still running after {timeout_s:g} s"
            )
            _progress(current[0], results[current[0]], len(results))
            return True
        if exited:
            if current:
                detail = f"test process exited {child.returncode} during the test"
                results[current[0]] = Result("crashed", time.monotonic() - current[1], detail)
            return started_any
        time.sleep(0.2)


def _read_events(path: Path, offset: int) -> tuple[int, list[dict]]:
    """The complete lines appended since ``offset``, parsed, and the offset after them."""
    if not path.exists():
        return offset, []
    with open(path, "rb") as events:
        events.seek(offset)
        data = events.read()
    complete = data[: data.rfind(b"\n") + 1]
    return offset + len(complete), [json.loads(line) for line in complete.splitlines()]


def _progress(name: str, result: Result, done: int) -> None:
    print(f"[{done}] {name}: {result.outcome} ({result.seconds:.1f} s)", flush=True)


def report(
    source: Source, names: list[str], excluded: list[str], results: dict[str, Result]
) -> str:
    width = max(len(name) for name in names)
    lines = [
        f"{source.description}: {TEST_FILE} against python -m serving",
        f"{'test':<{width}}  {'result':<8} {'seconds':>7}  detail",
    ]
    for name in names:
        result = results[name]
        detail = " ".join(result.detail.split())[:160]
        lines.append(f"{name:<{width}}  {result.outcome:<8} {result.seconds:>7.1f}  {detail}")
    counts = {outcome: 0 for outcome in ("passed", "skipped", *NOT_PASSED)}
    for result in results.values():
        counts[result.outcome] += 1
    totals = ", ".join(f"{count} {outcome}" for outcome, count in counts.items() if count)
    lines.append(f"{counts['passed']}/{len(names)} passed ({totals})")
    if excluded:
        lines.append(f"left out (TF Lite): {', '.join(excluded)}")
    if source.missing:
        lines.append(f"absent from the checkout: {', '.join(source.missing)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="compat-upstream-"))
    layout = Layout(work)
    try:
        source = source_tree(args.serving_src, work / "checkout", [MODEL_SERVERS, TESTDATA])
        every = test_names(source.root / TEST_FILE)
        excluded = [name for name in every if EXCLUDED_MARK in name]
        names = [name for name in every if name not in excluded]
        if args.only:
            unknown = sorted(set(args.only) - set(every))
            if unknown:
                raise SystemExit(f"--only: no such test {', '.join(unknown)} in {TEST_FILE}")
            names = [name for name in every if name in args.only]
        prepare(source, layout)
        print(f"{len(names)} tests, log {layout.log}", flush=True)
        results = run_tests(
            source, layout, names, args.timeout, args.grpc_socket_path or layout.socket
        )
        print(report(source, names, excluded if not args.only else [], results))
        return int(any(results[name].outcome in NOT_PASSED for name in names))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
