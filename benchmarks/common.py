"""What the benchmarks share: the model they serve, how it is built, the batching they serve it
with, the paths they load, and the load generator (h2load) they measure it by. ``run`` and the
scenario modules it runs (``paired``, ``swaps``) import it; it imports none of them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

MODEL = "mnist"
# Where the load goes: a gRPC Predict is a POST to the method's path, over HTTP/2.
GRPC_PREDICT_PATH = "/tensorflow.serving.PredictionService/Predict"
REST_PREDICT_PATH = f"/v1/models/{MODEL}:predict"
# TF Serving's advice for CPUs: batch threads = cores, start with no timeout (a lone request is not
# held back), as many queued batches as clients so 64 concurrent clients are never shed.
BATCHING_PARAMETERS = """\
max_batch_size { value: 64 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: 2 }
"""


def h2load(
    url: str, body: Path, concurrency: int, duration_s: float, grpc: bool, log: Path
) -> tuple[float, np.ndarray, int, int]:
    """Requests/s, per-request latencies (ms), succeeded and failed counts of one h2load run."""
    headers = (
        ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        if grpc
        else ["-H", "content-type: application/json", "--h1"]
    )
    command = [
        "h2load",
        f"--clients={concurrency}",
        "--max-concurrent-streams=1",
        "--threads=1",
        f"--duration={duration_s:g}",
        "--warm-up-time=1",
        f"--data={body}",
        f"--log-file={log}",
        *headers,
        url,
    ]
    log.unlink(missing_ok=True)  # h2load appends to an existing log
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", output).group(1))
    counts = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", output
    )
    latencies = np.loadtxt(log, usecols=2, ndmin=1) / 1000.0 if log.stat().st_size else np.zeros(1)
    return rps, latencies, int(counts.group(1)), int(counts.group(2))


def build_model(directory: Path) -> Path:
    """A softmax regression trained for one epoch, exported as version 1 of the store (~10 s)."""
    from serving import mnist
    from tasks.config import ExportConfig, ModelConfig, TrainConfig
    from tasks.export import export
    from tasks.train import fit, resolve_devices

    data = mnist.load(mnist.SHIPPED_DIR)
    trained = fit(data, ModelConfig(), TrainConfig(epochs=1), resolve_devices("cpu", []))
    exported = export.fn(
        trained.model,
        ExportConfig(base_path=directory / "exports"),
        directory / "models",
        data.test.images[:4],
    )
    store = directory / "models" / MODEL
    store.mkdir(parents=True)
    shutil.copytree(exported.path, store / "1")
    register_in_mlflow(directory, trained.model, data.test.images[:3])
    return store


@contextmanager
def scratch_and_version(name: str, source: Path | None) -> Iterator[tuple[Path, Path]]:
    """A temporary directory for a run of benchmark ``name``, and the version it serves:
    ``source`` (an exported version directory), or version 1 of a model built there now."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as scratch_name:
        scratch = Path(scratch_name)
        if source is None:
            print("building the model (1 epoch) ...", flush=True)
            source = build_model(scratch / "model") / "1"
        yield scratch, source


def save_json(name: str, data: Any) -> None:
    """A run's raw figures as ``benchmarks/out/<name>`` (not committed)."""
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / name).write_text(json.dumps(data, indent=1))


def command_line(module: str, argv: list[str] | None) -> str:
    """How this run was started, for RESULTS.md."""
    return f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:]).strip()


def register_in_mlflow(directory: Path, keras_model, example_images) -> None:
    from tasks.config import MlflowConfig
    from tasks.tracking import register_model, tracked_run

    cfg = MlflowConfig(
        tracking_uri=f"sqlite:///{directory / 'mlflow.db'}",
        experiment="bench",
        artifact_location=str(directory / "mlartifacts"),
    )
    with tracked_run(cfg, "bench", {}, {}) as tracker:
        register_model(tracker, keras_model, MODEL, {}, example_images)
