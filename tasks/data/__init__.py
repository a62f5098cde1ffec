"""data: the snapshot a run trains on, from the data store (``store``), after validation
(``validation``) let each batch in.

``snapshot`` is the Prefect task: the pinned snapshot (``data.snapshot``) or the base plus every
batch accepted by the time the run starts, shown as a table artifact. ``load`` reads it into the
arrays training takes; the test set stays MNIST's fixed 10,000 images, so error rates compare
across versions, and evaluation batches come back as named slices. The command line is
``python -m tasks.data`` (``__main__``).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from serving import mnist
from serving.mnist import Mnist, Split
from tasks.config import DataConfig
from tasks.data.store import DataStore, Snapshot
from tasks.logs import logger


@dataclass(frozen=True)
class TrainingData:
    snapshot: Snapshot
    mnist: Mnist  # train: the snapshot; test: MNIST's 10,000 test images
    slices: dict[str, Split]  # evaluation batches, by name


@task(name="data", cache_policy=NO_CACHE)
def snapshot(cfg: DataConfig) -> Snapshot:
    """The snapshot to train on, recorded in the store so that ``data.snapshot`` can pin it."""
    store = DataStore(cfg)
    taken = store.snapshot(None if cfg.snapshot == "latest" else cfg.snapshot)
    logger().info(
        "training snapshot %s: %d rows in %d spans (%s)%s",
        taken.id,
        taken.rows,
        len(taken.spans),
        ", ".join(f"{span.name} {span.rows}" for span in taken.spans),
        f"; evaluation slices: {', '.join(s.name for s in taken.eval_spans)}"
        if taken.eval_spans
        else "",
    )
    create_table_artifact(
        key="training-snapshot",
        table=[
            {
                "span": span.digest[:12],
                "name": span.name,
                "kind": span.kind,
                "rows": span.rows,
                "added": span.added or "(base)",
            }
            for span in (*taken.spans, *taken.eval_spans)
        ],
        description=f"Snapshot {taken.id}: {taken.rows} training rows",
    )
    return taken


def load(cfg: DataConfig, taken: Snapshot) -> TrainingData:
    store = DataStore(cfg)
    return TrainingData(
        snapshot=taken,
        mnist=Mnist(train=store.training_split(taken), test=mnist.load_test(cfg.dir)),
        slices={span.name: store.eval_split(span) for span in taken.eval_spans},
    )
