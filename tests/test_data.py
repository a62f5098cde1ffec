"""tasks.data: the data store, data validation and its command line, on MNIST's held-back rows.

Every anomaly class is produced from a real batch and must be rejected with its name, leaving the
store's spans and the latest snapshot as they were; the quarantine keeps the files and the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving import mnist
from tasks.config import REPO_ROOT, DataConfig
from tasks.data import holdout
from tasks.data.formats import write_idx_pair, write_npz
from tasks.data.store import DataStore, DataStoreError


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> Path:
    """MNIST's last 10,000 training rows as five .npz batches of 2,000."""
    out = tmp_path_factory.mktemp("held")
    written = holdout.write_batches(DataConfig(), out, 5)
    assert [rows for _, rows in written] == [2000] * 5
    return out


@pytest.fixture
def store(tmp_path) -> DataStore:
    return DataStore(DataConfig(store=tmp_path / "store"))


def arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as batch:
        return batch["images"], batch["labels"]


def test_holdout_batches_are_the_rows_the_base_leaves_out(held):
    images, labels = mnist.read_pair(REPO_ROOT / "data" / "mnist", "train")
    first, first_labels = arrays(held / "batch-1.npz")
    np.testing.assert_array_equal(first, images[50_000:52_000])
    np.testing.assert_array_equal(first_labels, labels[50_000:52_000])


def test_schema_is_inferred_from_the_base_once_and_kept(store):
    schema = store.schema()
    assert schema.image_shape == (28, 28) and schema.label_domain == tuple(range(10))
    assert 30 < schema.pixel_mean < 37 and 75 < schema.pixel_std < 82  # MNIST's known figures
    assert sum(schema.class_frequencies) == pytest.approx(1.0)
    kept = json.loads((store.root / "schema.json").read_text())
    assert kept["inferred_from"] == store.base_span().digest


def test_an_accepted_batch_is_a_span_in_the_next_snapshot(store, held):
    before = store.snapshot()
    result = store.add(held / "batch-1.npz", "batch-1")
    assert result.verdict == "accepted" and result.anomalies == ()
    span = result.span
    assert span.rows == 2000 and sum(span.class_counts) == 2000
    assert (store.root / "spans" / span.digest / "images.npy").is_file()
    after = store.snapshot()
    assert after.id != before.id
    assert after.rows == before.rows + 2000 == 52_000
    assert [s.name for s in after.spans] == ["base", "batch-1"]
    split = store.training_split(after)
    assert split.images.shape == (52_000, 784) and split.images.dtype == np.float32
    images, _ = arrays(held / "batch-1.npz")
    np.testing.assert_allclose(split.images[-2000:], images.reshape(2000, 784) / 255.0)


def test_the_same_content_twice_is_a_no_op_whatever_its_format(store, held, tmp_path):
    first = store.add(held / "batch-2.npz", "batch-2")
    images, labels = arrays(held / "batch-2.npz")
    as_idx = write_idx_pair(tmp_path / "batch-2-idx", images, labels)
    flat = write_npz(tmp_path / "flat.npz", images.reshape(-1, 784).astype(np.int64), labels)
    snapshot = store.snapshot()
    for again in (held / "batch-2.npz", as_idx, flat):
        result = store.add(again)
        assert result.verdict == "duplicate"
        assert result.span == first.span
    assert store.snapshot().id == snapshot.id
    assert len(store.spans()) == 1 and store.quarantined() == []


def _bad_batches(held: Path, tmp: Path) -> dict[str, Path]:
    images, labels = arrays(held / "batch-3.npz")
    raw = (held / "batch-3.npz").read_bytes()
    threes = labels == 3
    bad = {
        "wrong_shape": write_npz(tmp / "shape.npz", images[:, :27, :], labels),
        "wrong_dtype": write_npz(tmp / "dtype.npz", images / 255.0, labels),
        "out_of_range": write_npz(tmp / "range.npz", images.astype(np.int16) * 2, labels),
        "nan_values": write_npz(
            tmp / "nan.npz", np.where(images > 250, np.nan, images.astype(np.float32)), labels
        ),
        "label_out_of_domain": write_npz(tmp / "labels.npz", images, labels + 1),
        "count_mismatch": write_npz(tmp / "count.npz", images, labels[:-1]),
        "empty_batch": write_npz(tmp / "none.npz", images[:0], labels[:0]),
        "class_distribution_drift": write_npz(tmp / "threes.npz", images[threes], labels[threes]),
        "pixel_distribution_drift": write_npz(tmp / "inverted.npz", 255 - images, labels),
        "missing_array": write_npz(tmp / "nolabels.npz", images, labels).with_name("x.npz"),
    }
    np.savez(bad["missing_array"], images=images)
    (tmp / "empty.npz").write_bytes(b"")
    bad["empty_file"] = tmp / "empty.npz"
    (tmp / "cut.npz").write_bytes(raw[: len(raw) // 2])
    bad["truncated_file"] = tmp / "cut.npz"
    (tmp / "noise.npz").write_bytes(os.urandom(4096))
    bad["corrupt_file"] = tmp / "noise.npz"
    idx = write_idx_pair(tmp / "cut-idx", images, labels)
    image_file = idx / "images-idx3-ubyte.gz"
    image_file.write_bytes(image_file.read_bytes()[:-5000])
    bad["truncated_file (IDX)"] = idx
    return bad


def test_every_anomaly_is_rejected_by_name_and_nothing_is_published(store, held, tmp_path):
    store.add(held / "batch-1.npz")
    spans, snapshot = store.spans(), store.snapshot()
    bad = _bad_batches(held, tmp_path)
    for expected, path in bad.items():
        result = store.add(path)
        kinds = {anomaly.kind for anomaly in result.anomalies}
        assert result.verdict == "quarantined", (expected, result)
        assert expected.split()[0] in kinds, (expected, kinds)
        report = json.loads((result.quarantine / "report.json").read_text())
        assert expected.split()[0] in {anomaly["kind"] for anomaly in report["anomalies"]}
        assert list((result.quarantine / "files").iterdir()), "the batch's files are kept"
    assert store.spans() == spans
    assert store.snapshot().id == snapshot.id
    assert not [p for p in (store.root / "spans").iterdir() if p.name.startswith(".")]
    assert len(store.quarantined()) == len(bad)


class Tripwire:
    """Unpickling it makes a directory: the trace a loader that unpickles leaves."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_batch_of_pickled_objects_is_rejected_without_unpickling_them(store, held, tmp_path):
    images, labels = arrays(held / "batch-1.npz")
    marker = tmp_path / "unpickled"
    objects = np.array([Tripwire(marker), *labels[1:].tolist()], dtype=object)
    path = tmp_path / "objects.npz"
    np.savez(path, images=images, labels=objects)  # object arrays are saved as pickles

    result = store.add(path)

    assert result.verdict == "quarantined"
    [anomaly] = result.anomalies
    assert anomaly.kind == "corrupt_file" and "Object arrays cannot be loaded" in anomaly.detail
    assert not marker.exists(), "the batch was unpickled"
    np.load(path, allow_pickle=True)["labels"]  # what loading it would have done
    assert marker.exists()


def test_drift_is_accepted_with_a_warning_when_data_drift_is_warn(tmp_path, held):
    images, labels = arrays(held / "batch-4.npz")
    inverted = write_npz(tmp_path / "inverted.npz", 255 - images, labels)
    warn = DataStore(DataConfig(store=tmp_path / "store", drift="warn"))
    result = warn.add(inverted)
    assert result.verdict == "accepted"
    assert [a.kind for a in result.anomalies] == ["pixel_distribution_drift"]
    assert result.span.warnings and "pixel_distribution_drift" in result.span.warnings[0]
    broken = write_npz(tmp_path / "broken.npz", images, labels + 10)
    assert warn.add(broken).verdict == "quarantined"  # warn covers drift, never structure


def test_a_pinned_snapshot_reproduces_its_spans_after_more_data_lands(store, held):
    store.add(held / "batch-1.npz")
    pinned = store.snapshot()
    store.add(held / "batch-2.npz")
    assert store.snapshot().id != pinned.id
    again = store.snapshot(pinned.id)
    assert again == pinned
    np.testing.assert_array_equal(
        store.training_split(again).labels, store.training_split(pinned).labels
    )
    with pytest.raises(DataStoreError, match="data.snapshot: no snapshot"):
        store.snapshot("0123456789abcdef")


def test_an_eval_batch_is_a_slice_not_training_data(store, held):
    before = store.snapshot()
    result = store.add(held / "batch-5.npz", "fresh-eval", kind="eval")
    after = store.snapshot()
    assert result.verdict == "accepted"
    assert after.id == before.id and after.rows == before.rows
    assert [span.name for span in after.eval_spans] == ["fresh-eval"]
    assert len(store.eval_split(after.eval_spans[0]).labels) == 2000


def test_a_damaged_span_is_refused_at_load(store, held):
    span = store.add(held / "batch-1.npz").span
    labels = store.root / "spans" / span.digest / "labels.npy"
    values = np.load(labels)
    values[0] = (values[0] + 1) % 10
    np.save(labels, values)
    with pytest.raises(DataStoreError, match="does not match its digest"):
        store.training_split(store.snapshot())


def cli(*args: str, store: Path, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks.data",
            "--set",
            f"data.store={store}",
            "--set",
            f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            *args,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"},  # nothing listens
    )


@pytest.mark.slow
def test_the_command_line_adds_lists_and_quarantines(tmp_path, held):
    store = tmp_path / "store"
    added = cli("add", str(held / "batch-1.npz"), store=store, tmp=tmp_path)
    assert added.returncode == 0, added.stderr
    assert "accepted batch-1 as train span" in added.stdout
    assert "warning: Prefect not told" in added.stdout  # the store keeps the batch regardless
    again = cli("add", str(held / "batch-1.npz"), store=store, tmp=tmp_path)
    assert again.returncode == 0 and "already in the store" in again.stdout
    images, labels = arrays(held / "batch-2.npz")
    inverted = write_npz(tmp_path / "inverted.npz", 255 - images, labels)
    rejected = cli("add", str(inverted), store=store, tmp=tmp_path)
    assert rejected.returncode == 1
    assert "REJECTED inverted" in rejected.stdout and "pixel_distribution_drift" in rejected.stdout
    listed = cli("list", store=store, tmp=tmp_path)
    assert listed.returncode == 0
    assert "batch-1" in listed.stdout and "quarantined: pixel_distribution_drift" in listed.stdout
    assert "52000 training rows" in listed.stdout
    schema = json.loads(cli("schema", store=store, tmp=tmp_path).stdout)
    assert schema["label_domain"] == list(range(10))
    bad_key = cli("--set", "data.drift=maybe", "list", store=store, tmp=tmp_path)
    assert bad_key.returncode == 2 and "data.drift" in bad_key.stderr


@pytest.mark.slow
def test_every_verdict_is_a_run_in_mlflow_with_its_report(tmp_path, held):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    cli("add", str(held / "batch-1.npz"), store=store, tmp=tmp_path)
    images, labels = arrays(held / "batch-2.npz")
    cli("add", str(write_npz(tmp_path / "bad.npz", images, labels + 10)), store=store, tmp=tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("train-and-serve-data")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert runs["add batch-1"].data.tags["mlflow.source.name"] == "tasks/data"
    assert runs["add batch-1"].data.tags["verdict"] == "accepted"
    assert (
        runs["add batch-1"].inputs.dataset_inputs[0].dataset.digest
        == (runs["add batch-1"].data.tags["span"][:16])
    )
    bad = runs["add bad"]
    assert bad.info.status == "FAILED" and bad.data.tags["anomalies"] == "label_out_of_domain"
    report = client.download_artifacts(bad.info.run_id, "validation/report.json", str(tmp_path))
    assert json.loads(Path(report).read_text())["anomalies"][0]["kind"] == "label_out_of_domain"
