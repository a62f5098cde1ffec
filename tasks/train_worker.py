"""One worker of ``train.strategy: multi_worker``: ``python -m tasks.train_worker``.

* ``--job JOB --out OUT``: started by the ``train`` task (``tasks.multi_worker``) on the job it
  wrote, with ``TF_CONFIG`` naming the cluster and this worker's index; the chief (index 0)
  writes the weights and the history into ``OUT``, which the task reads.
* ``--config FILE [--set key=value ...] --index N``: the machine ``train.cluster[N]`` (N >= 1; 0 is
  the chief, the flow's machine), started by hand or by a scheduler (README, "Training across
  machines"); ``TF_CONFIG`` is made from ``train.cluster`` and N. It loads the pinned
  ``data.snapshot`` from its own data store, trains, and keeps nothing.

Every worker trains and saves (MultiWorkerMirroredStrategy wants all of them to run the same
steps); only the chief's output is kept. Logs go to stdout, one line per epoch, as in the task.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from tasks import multi_worker


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.train_worker", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--job", type=Path, help="a job directory written by the train task")
    source.add_argument("--config", type=Path, help="the pipeline's config (a cluster machine)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="where the chief writes its result (--job)")
    parser.add_argument("--index", type=int, help="its place in train.cluster (--config)")
    return parser.parse_args(argv)


def _cluster_peer_inputs(config: Path, overrides: list[str], index: int | None):
    """What machine ``index`` of ``train.cluster`` trains on: its config, the pinned snapshot of
    its data store; sets its ``TF_CONFIG``."""
    from tasks import data
    from tasks.config import load_config
    from tasks.data.store import DataStore

    cfg = load_config(config, overrides)
    cluster = cfg.train.cluster
    if cluster is None:
        raise SystemExit(f"{config}: train.cluster is not set: nothing to join")
    if index is None or not 1 <= index < len(cluster):
        raise SystemExit(
            f"--index: expected 1 to {len(cluster) - 1}, this machine's place in train.cluster "
            "(0 is the chief: the flow's train task on its machine)"
        )
    os.environ["TF_CONFIG"] = multi_worker.tf_config(cluster, index)
    taken = DataStore(cfg.data).snapshot(cfg.data.snapshot)
    return data.load(cfg.data, taken).mnist, cfg.model, cfg.train


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    log = logging.getLogger("train_worker")
    if args.job is not None:
        inputs = multi_worker.read_job(args.job)
    else:
        inputs = _cluster_peer_inputs(args.config, args.set, args.index)
    data, model_cfg, train_cfg = inputs
    index = multi_worker.worker_index()
    from tasks.train import MultiWorkerPlan, fit  # TensorFlow: once the inputs are known good

    # Before anything else in TensorFlow: the strategy sets up this process's collective runtime.
    plan = MultiWorkerPlan.from_tf_config(train_cfg.worker_count)
    result = fit(data, model_cfg, train_cfg, plan, logger=log)
    kept = index == 0 and args.out is not None
    with tempfile.TemporaryDirectory(prefix="train-worker-") as discarded:
        out = args.out if kept else Path(discarded)
        out.mkdir(parents=True, exist_ok=True)
        result.model.save_weights(out / multi_worker.WEIGHTS_FILE)
        (out / multi_worker.HISTORY_FILE).write_text(json.dumps(result.history))
    log.info("worker %d done%s", index, f": result in {out}" if kept else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
