"""TF Serving's MNIST tutorial client against our server serving a version our pipeline exported.

``python -m compat.tutorial_client [--serving-src PATH] [--model-base-path DIR] [--num-tests N]``

Without ``--model-base-path``, trains the tutorial's softmax model for ``--epochs`` on data/mnist
with our own tasks (``tasks.train.fit``, ``tasks.export.export``, whose SavedModel carries the
tutorial's ``predict_images`` signature) into a scratch store; with it, serves that directory
(e.g. ``.stack/models/mnist`` from ``make run``: versions exported before ``predict_images``
existed answer the client FAILED_PRECONDITION). Then starts ``python -m serving`` on it and runs
upstream ``tensorflow_serving/example/mnist_client.py --num_tests=N --server=127.0.0.1:PORT`` with
``--work_dir`` holding copies of data/mnist's gzipped IDX files, so that its
``mnist_input_data`` finds them and downloads nothing. Prints the client's ``Inference error
rate`` line; exits 1 when there is none. The client waits for an answer to every request, so an
answer it cannot read (its callback raises, and that request is never counted) makes it wait
forever: it is stopped after ``--timeout`` seconds, and the run says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from compat.checkout import source_tree
from compat.processes import start_group, stop_group

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = "tensorflow_serving/example"
CLIENT = f"{EXAMPLE}/mnist_client.py"
MODEL_NAME = "mnist"  # the name mnist_client.py asks for
ERROR_RATE = "Inference error rate"
SERVER_START_TIMEOUT_S = 300.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compat.tutorial_client",
        description="Run TF Serving's mnist_client.py against python -m serving.",
    )
    parser.add_argument(
        "--serving-src", type=Path, help="a TF Serving checkout (default: the mirror's HEAD)"
    )
    parser.add_argument(
        "--model-base-path", type=Path, help="serve this store (default: train and export one)"
    )
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--num-tests", type=int, default=1000, help="client's --num_tests")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds the client may run (default 300)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory and logs")
    return parser


def train_and_export(store: Path, epochs: int) -> Path:
    """The tutorial's softmax model trained by our tasks, exported as version 1 of ``mnist``
    under ``store``; returns the model's base path."""
    from serving import mnist
    from tasks.config import ExportConfig, ModelConfig, TrainConfig
    from tasks.export import export
    from tasks.train import fit, resolve_devices

    data = mnist.load(mnist.SHIPPED_DIR)
    trained = fit(
        data,
        ModelConfig(kind="softmax"),
        TrainConfig(epochs=epochs, device="cpu"),
        resolve_devices("cpu", []),
    )
    cfg = ExportConfig(base_path=store, model_name=MODEL_NAME)
    exported = export.fn(trained.model, cfg, store / "unused-serving-store", data.test.images)
    return exported.path.parent


def mnist_work_dir(directory: Path) -> Path:
    """A ``--work_dir`` with the four gzipped IDX files mnist_input_data would download."""
    from serving import mnist

    directory.mkdir(parents=True)
    for name in mnist.SHA256:
        shutil.copy(mnist.SHIPPED_DIR / name, directory / name)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base_path: Path, port: int, log: Path):
    argv = [
        sys.executable,
        "-m",
        "serving",
        f"--port={port}",
        f"--model_name={MODEL_NAME}",
        f"--model_base_path={base_path.resolve()}",
    ]
    return start_group(argv, log, dict(os.environ, PYTHONPATH=str(REPO)), REPO)


def wait_available(server, port: int, log: Path) -> int:
    """The version serving once one is AVAILABLE; raises if the server exits or takes too long."""
    import grpc

    from serving.api_client import ModelServer

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with ModelServer(f"127.0.0.1:{port}", MODEL_NAME, rpc_timeout_s=5) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"server exited {server.returncode}:\n{_tail(log)}")
            try:
                version = client.serving_version()
            except grpc.RpcError:
                version = None
            if version is not None:
                return version
            time.sleep(0.5)
    raise SystemExit(f"no version AVAILABLE after {SERVER_START_TIMEOUT_S:g} s:\n{_tail(log)}")


def run_client(example: Path, port: int, work_dir: Path, args, log: Path) -> str | None:
    """mnist_client.py's ``Inference error rate`` line, or None when it printed none (it then
    failed or was stopped at ``args.timeout``, and a line says which)."""
    argv = [
        sys.executable,
        example / "mnist_client.py",
        f"--num_tests={args.num_tests}",
        f"--server=127.0.0.1:{port}",
        f"--work_dir={work_dir}",
    ]
    client = start_group(argv, log, os.environ, example)
    try:
        deadline = time.monotonic() + args.timeout
        while client.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        timed_out = client.poll() is None
    finally:
        stop_group(client)
    output = log.read_text(errors="replace")
    lines = [line for line in output.splitlines() if line.startswith(ERROR_RATE)]
    if lines:
        return lines[-1]
    if timed_out:
        print(
            f"mnist_client.py did not finish within {args.timeout:g} s: it waits for an answer "
            f"to each of its {args.num_tests} requests, and one that it cannot read (its "
            "callback raised, e.g. `scores` not in `float_val`) is never counted"
        )
    else:
        print(f"mnist_client.py exited {client.returncode} without an error rate")
    print(f"client output, last lines:\n{_tail(log)}")
    return None


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="compat-tutorial-"))
    server = None
    try:
        source = source_tree(args.serving_src, work / "checkout", [EXAMPLE])
        base_path = args.model_base_path or train_and_export(work / "models", args.epochs)
        port = free_port()
        server = start_server(base_path, port, work / "server.log")
        version = wait_available(server, port, work / "server.log")
        print(f"{source.description}: {CLIENT} against python -m serving, {base_path} v{version}")
        line = run_client(
            source.root / EXAMPLE, port, mnist_work_dir(work / "mnist"), args, work / "client.log"
        )
        if line:
            print(line)
        return 0 if line else 1
    finally:
        if server is not None:
            stop_group(server)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
