"""The parent's side of ``train.strategy: multi_worker``: the job the workers read, their launch,
their logs and their end. TensorFlow-free: the workers train, this process only waits.

A *job* is a directory: ``data.npz`` (the training and test images and labels, plain arrays, no
pickle) and ``job.json`` (the ``model`` and ``train`` sections). ``run_workers`` starts one
``python -m tasks.train_worker --job JOB --out OUT`` per index, each the leader of its own process
group with its own ``TF_CONFIG`` (the cluster's addresses and its index), and prefixes every line
a worker prints with ``worker N:`` in the task's log. The chief (index 0) writes the trained
weights and the history into its ``--out`` directory, which ``run_workers`` returns; the other
workers' outputs are discarded. The first worker to fail (or ``timeout_s`` passing) stops every
worker's process group and raises ``WorkerFailed`` with its exit code and the tail of its log;
the groups are stopped whatever happens.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.mnist import Mnist, Split
from tasks.config import REPO_ROOT, ModelConfig, TrainConfig
from tasks.processes import stop_group

DATA_FILE = "data.npz"
JOB_FILE = "job.json"
WEIGHTS_FILE = "model.weights.h5"  # in the chief's --out directory
HISTORY_FILE = "history.json"  # metric -> one value per epoch, the chief's
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 40
POLL_INTERVAL_S = 0.2


class WorkerFailed(RuntimeError):
    """A training worker exited with an error, or the workers ran out of time."""

    def __init__(self, index: int, exit_code: int | None, log_tail: str):
        self.index = index
        self.exit_code = exit_code
        self.log_tail = log_tail
        what = "timed out" if exit_code is None else f"exited with {exit_code}"
        super().__init__(
            f"training worker {index} {what}\n"
            f"--- worker {index} log (last {LOG_TAIL_LINES} lines) ---\n{log_tail}"
        )

    def __reduce__(self):  # Prefect pickles a run's exception: rebuild it from its fields
        return type(self), (self.index, self.exit_code, self.log_tail)


def write_job(directory: Path, data: Mnist, model_cfg: ModelConfig, train_cfg: TrainConfig) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(
        directory / DATA_FILE,
        train_images=data.train.images,
        train_labels=data.train.labels,
        test_images=data.test.images,
        test_labels=data.test.labels,
    )
    sections = {
        "model": model_cfg.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json"),
    }
    (directory / JOB_FILE).write_text(json.dumps(sections))
    return directory


def read_job(directory: Path) -> tuple[Mnist, ModelConfig, TrainConfig]:
    sections = json.loads((directory / JOB_FILE).read_text())
    with np.load(directory / DATA_FILE, allow_pickle=False) as arrays:
        data = Mnist(
            train=Split(arrays["train_images"], arrays["train_labels"]),
            test=Split(arrays["test_images"], arrays["test_labels"]),
        )
    return data, ModelConfig(**sections["model"]), TrainConfig(**sections["train"])


def tf_config(cluster: Sequence[str], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` of ``cluster`` (MultiWorkerMirroredStrategy reads
    it)."""
    return json.dumps(
        {"cluster": {"worker": list(cluster)}, "task": {"type": "worker", "index": index}}
    )


def worker_index() -> int:
    """This process's index in its ``TF_CONFIG``; 0 (the chief) is the one whose result counts."""
    try:
        return int(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
    except (KeyError, ValueError, TypeError):
        raise SystemExit('TF_CONFIG: expected {"cluster": ..., "task": {"index": N}}') from None


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))
    reader: threading.Thread | None = None

    def relay(self, log: logging.Logger | logging.LoggerAdapter) -> None:
        """Every line the worker prints into the task's log, prefixed with its index."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            log.info("worker %d: %s", self.index, line)


def _start(
    job: Path, out: Path, cluster: Sequence[str], index: int, env: dict[str, str]
) -> subprocess.Popen:
    command = [sys.executable, "-m", "tasks.train_worker", "--job", str(job), "--out", str(out)]
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **env, "TF_CONFIG": tf_config(cluster, index)},
    )


def _first_failure(workers: list[_Worker], deadline: float) -> tuple[_Worker, int | None] | None:
    """Waits until every worker has exited well (None), one has failed (it and its exit code) or
    time is up (a worker still running, and None)."""
    while True:
        codes = [w.process.poll() for w in workers]
        for worker, code in zip(workers, codes, strict=True):
            if code not in (None, 0):
                return worker, code
        if all(code == 0 for code in codes):
            return None
        if time.monotonic() > deadline:
            return next(w for w, code in zip(workers, codes, strict=True) if code is None), None
        time.sleep(POLL_INTERVAL_S)


def run_workers(
    job: Path,
    cluster: Sequence[str],
    indices: Sequence[int],
    timeout_s: float,
    log: logging.Logger | logging.LoggerAdapter,
    env: dict[str, str] | None = None,
) -> Path:
    """Runs the workers ``indices`` of ``cluster`` here on ``job``; returns the chief's output
    directory (index 0 must be among them)."""
    deadline = time.monotonic() + timeout_s
    workers: list[_Worker] = []
    try:
        for index in indices:
            out = job / f"worker-{index}"
            worker = _Worker(index, _start(job, out, cluster, index, env or {}))
            worker.reader = threading.Thread(target=worker.relay, args=(log,), daemon=True)
            worker.reader.start()
            workers.append(worker)
        log.info("started %d training workers of %s", len(workers), ", ".join(cluster))
        failed = _first_failure(workers, deadline)
    finally:
        for worker in workers:
            stop_group(worker.process, STOP_GRACE_S)
    for worker in workers:
        assert worker.reader is not None
        worker.reader.join(timeout=STOP_GRACE_S)  # the pipe is closed: the last lines are in
    if failed is not None:
        worker, code = failed
        raise WorkerFailed(worker.index, code, "\n".join(worker.tail))
    return job / "worker-0"
