"""The data store: the base data and the labeled batches that arrive over time, as immutable spans.

Layout under ``data.store`` (default ``.stack/data/``)::

    schema.json                 inferred once from the base data (``validation.Schema``)
    spans/<digest>/             one accepted batch: span.json, images.npy (uint8 [N, 28, 28]),
                                labels.npy (uint8 [N]); named by the digest of that content
    snapshots/<id>.json         the spans one run trained on, to reproduce it (``data.snapshot``)
    quarantine/<when>-<name>/   a rejected batch: a copy of its files and report.json

The base is MNIST's training split from ``data.dir`` (SHA-256 verified), its first
``data.base_rows`` rows; it is not copied. Everything is published by writing under a temporary
name and renaming, so a reader sees a span, a snapshot or a quarantine entry whole or not at all,
and nothing once published changes. A snapshot's id is a digest over its training spans' digests,
in order: the same data, the same id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np

from serving import mnist
from serving.mnist import NUM_CLASSES, Split
from tasks.config import DataConfig
from tasks.data.formats import UnreadableBatch, read_batch
from tasks.data.validation import Anomaly, Checked, DriftLimits, Schema, check, infer_schema

SPAN_FORMAT = b"train-and-serve span v1\n"
SNAPSHOT_ID_CHARS = 16
Kind = Literal["base", "train", "eval"]


class DataStoreError(ValueError):
    """A request the store cannot serve (an unknown snapshot, a damaged span); says which."""


@dataclass(frozen=True)
class Span:
    digest: str
    name: str
    kind: Kind  # "base": MNIST's training rows; "train": a batch to train on; "eval": a slice
    rows: int
    class_counts: tuple[int, ...]
    added: str  # ISO 8601, UTC
    source: str  # where it came from
    warnings: tuple[str, ...] = ()  # drift accepted under data.drift: warn

    @classmethod
    def from_json(cls, tree: dict) -> Span:
        return cls(
            **{
                **tree,
                "class_counts": tuple(tree["class_counts"]),
                "warnings": tuple(tree.get("warnings", ())),
            }
        )


@dataclass(frozen=True)
class Snapshot:
    id: str
    spans: tuple[Span, ...]  # what it trains on: the base, then batches in the order they landed
    eval_spans: tuple[Span, ...] = ()  # evaluation slices, reported beside the fixed test set

    @property
    def rows(self) -> int:
        return sum(span.rows for span in self.spans)

    @property
    def class_counts(self) -> tuple[int, ...]:
        return tuple(int(n) for n in np.sum([span.class_counts for span in self.spans], axis=0))

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "rows": self.rows,
            "class_counts": list(self.class_counts),
            "spans": [asdict(span) for span in self.spans],
            "eval_spans": [asdict(span) for span in self.eval_spans],
        }


@dataclass(frozen=True)
class AddResult:
    verdict: Literal["accepted", "duplicate", "quarantined"]
    span: Span | None  # the new span, or the one already holding this content
    anomalies: tuple[Anomaly, ...] = ()
    quarantine: Path | None = None
    report: dict = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def span_digest(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(SPAN_FORMAT)
    digest.update(np.ascontiguousarray(images, np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, np.uint8).tobytes())
    return digest.hexdigest()


def _write_json(path: Path, tree: dict) -> None:
    staging = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    staging.write_text(json.dumps(tree, indent=2) + "\n")
    os.replace(staging, path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64] or "batch"


class DataStore:
    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.root = cfg.store
        self.limits = DriftLimits(cfg.max_class_distance, cfg.max_pixel_shift)
        for directory in ("spans", "snapshots", "quarantine"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)

    # -- the base --------------------------------------------------------------------------

    @cached_property
    def _mnist_train(self) -> tuple[np.ndarray, np.ndarray]:
        return mnist.read_pair(self.cfg.dir, "train")

    def _base_arrays(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self._mnist_train
        return images[:rows], labels[:rows]

    def base_span(self) -> Span:
        rows = self.cfg.base_rows
        source = f"{mnist.source_digest('train')} rows 0:{rows}"
        _, labels = self._base_arrays(rows)
        return Span(
            digest=hashlib.sha256(SPAN_FORMAT + source.encode()).hexdigest(),
            name="base",
            kind="base",
            rows=rows,
            class_counts=tuple(int(n) for n in np.bincount(labels, minlength=NUM_CLASSES)),
            added="",
            source=f"MNIST train rows 0:{rows} ({self.cfg.dir})",
        )

    def schema(self) -> Schema:
        """The schema in the store; inferred from the base and kept the first time it is asked."""
        path = self.root / "schema.json"
        if path.exists():
            return Schema.from_json(json.loads(path.read_text()))
        images, labels = self._base_arrays(self.cfg.base_rows)
        schema = infer_schema(images, labels, self.base_span().digest)
        _write_json(path, schema.to_json())
        return schema

    # -- batches ----------------------------------------------------------------------------

    def spans(self) -> list[Span]:
        """Accepted batches (train and eval), in the order they landed."""
        spans = [
            Span.from_json(json.loads((directory / "span.json").read_text()))
            for directory in (self.root / "spans").iterdir()
            if not directory.name.startswith(".") and (directory / "span.json").is_file()
        ]
        return sorted(spans, key=lambda span: (span.added, span.digest))

    def quarantined(self) -> list[dict]:
        reports = [
            json.loads((directory / "report.json").read_text())
            for directory in sorted((self.root / "quarantine").iterdir())
            if not directory.name.startswith(".") and (directory / "report.json").is_file()
        ]
        return sorted(reports, key=lambda report: report["checked_at"])

    def add(self, path: Path, name: str | None = None, kind: Kind = "train") -> AddResult:
        """Validate the batch at ``path``, then publish it as a span or quarantine it, reported."""
        name = name or path.stem
        try:
            batch = read_batch(path)
        except UnreadableBatch as error:
            anomaly = Anomaly(error.anomaly, error.detail)
            return self._quarantine(
                path, name, kind, (path,), Checked(None, None, (anomaly,), None)
            )
        checked = check(batch.images, batch.labels, self.schema(), self.limits)
        if checked.images is not None:  # readable: a duplicate is a no-op whatever else it has
            digest = span_digest(checked.images, checked.labels)
            existing = self._span(digest)
            if existing is not None:
                return AddResult(
                    "duplicate", existing, report=self._report(path, name, kind, checked)
                )
        if checked.rejected(self.cfg.drift):
            return self._quarantine(path, name, kind, batch.files, checked)
        span = Span(
            digest=digest,
            name=name,
            kind=kind,
            rows=checked.stats.rows,
            class_counts=checked.stats.class_counts,
            added=_now(),
            source=str(path.resolve()),
            warnings=tuple(f"{a.kind}: {a.detail}" for a in checked.anomalies),
        )
        if not self._publish(span, checked):
            return AddResult("duplicate", self._span(digest))  # the same content, added meanwhile
        return AddResult(
            "accepted", span, checked.anomalies, None, self._report(path, name, kind, checked)
        )

    def _span(self, digest: str) -> Span | None:
        path = self.root / "spans" / digest / "span.json"
        return Span.from_json(json.loads(path.read_text())) if path.is_file() else None

    def _publish(self, span: Span, checked: Checked) -> bool:
        staging = self.root / "spans" / f".tmp-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            np.save(staging / "images.npy", checked.images)
            np.save(staging / "labels.npy", checked.labels)
            (staging / "span.json").write_text(json.dumps(asdict(span), indent=2) + "\n")
            try:
                staging.rename(self.root / "spans" / span.digest)
            except OSError:  # the target exists: another add published this content first
                return False
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _report(self, path: Path, name: str, kind: Kind, checked: Checked) -> dict:
        stats = checked.stats
        return {
            "name": name,
            "kind": kind,
            "source": str(path.resolve()),
            "checked_at": _now(),
            "anomalies": [asdict(anomaly) for anomaly in checked.anomalies],
            "statistics": asdict(stats) if stats else None,
            "schema": str(self.root / "schema.json"),
        }

    def _quarantine(
        self, path: Path, name: str, kind: Kind, files: tuple[Path, ...], checked: Checked
    ) -> AddResult:
        report = self._report(path, name, kind, checked)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.root / "quarantine" / f"{stamp}-{_safe(name)}-{uuid.uuid4().hex[:6]}"
        staging = target.with_name(f".tmp-{target.name}")
        (staging / "files").mkdir(parents=True)
        for file in files:
            if file.is_dir():
                shutil.copytree(file, staging / "files" / file.name)
            elif file.is_file():
                shutil.copy2(file, staging / "files" / file.name)
        report["quarantine"] = str(target)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        staging.rename(target)
        return AddResult("quarantined", None, checked.anomalies, target, report)

    # -- snapshots --------------------------------------------------------------------------

    def snapshot(self, pinned: str | None = None) -> Snapshot:
        """The spans a run trains on: ``pinned``'s, or the base plus every accepted batch now."""
        if pinned:
            path = self.root / "snapshots" / f"{pinned}.json"
            if not path.is_file():
                known = sorted(p.stem for p in (self.root / "snapshots").glob("*.json"))
                raise DataStoreError(
                    f"data.snapshot: no snapshot {pinned!r} in {self.root} "
                    f"(known: {', '.join(known) or 'none'})"
                )
            tree = json.loads(path.read_text())
            return Snapshot(
                tree["id"],
                tuple(Span.from_json(span) for span in tree["spans"]),
                tuple(Span.from_json(span) for span in tree["eval_spans"]),
            )
        batches = self.spans()
        training = (self.base_span(), *(span for span in batches if span.kind == "train"))
        ids = "\n".join(span.digest for span in training).encode()
        snapshot = Snapshot(
            hashlib.sha256(ids).hexdigest()[:SNAPSHOT_ID_CHARS],
            training,
            tuple(span for span in batches if span.kind == "eval"),
        )
        manifest = self.root / "snapshots" / f"{snapshot.id}.json"
        if not manifest.exists():
            _write_json(manifest, snapshot.to_json())
        return snapshot

    def _arrays(self, span: Span) -> tuple[np.ndarray, np.ndarray]:
        if span.kind == "base":  # read from data.dir, whose files load() verifies
            return self._base_arrays(span.rows)
        directory = self.root / "spans" / span.digest
        images = np.load(directory / "images.npy", allow_pickle=False)
        labels = np.load(directory / "labels.npy", allow_pickle=False)
        if span_digest(images, labels) != span.digest:
            raise DataStoreError(f"span {span.name} ({directory}) does not match its digest")
        return images, labels

    def training_split(self, snapshot: Snapshot) -> Split:
        arrays = [self._arrays(span) for span in snapshot.spans]
        return mnist.to_split(
            np.concatenate([images for images, _ in arrays]),
            np.concatenate([labels for _, labels in arrays]),
        )

    def eval_split(self, span: Span) -> Split:
        return mnist.to_split(*self._arrays(span))
