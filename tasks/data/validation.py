"""Data validation before anything trains: a schema inferred once from the base data, and the
anomalies of a batch against it (the idea of TFX's SchemaGen + ExampleValidator).

``check`` returns the batch in the store's form (images uint8 ``[N, 28, 28]``, labels uint8
``[N]``) and every anomaly it found, each named (``Anomaly.kind``). Structural anomalies (shape,
dtype, NaN, range, label domain, counts) always reject a batch; drift (class frequencies by their
L-infinity distance, as TFDV measures it, and a shift of the pixel mean or standard deviation)
rejects it unless ``data.drift`` is ``warn``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from serving.mnist import NUM_CLASSES

IMAGE_SHAPE = (28, 28)
PIXEL_RANGE = (0, 255)


@dataclass(frozen=True)
class Anomaly:
    kind: str  # e.g. "wrong_shape", "class_distribution_drift"
    detail: str
    drift: bool = False  # a distribution anomaly (``data.drift: warn`` accepts it)


@dataclass(frozen=True)
class Statistics:
    rows: int
    class_counts: tuple[int, ...]
    pixel_mean: float
    pixel_std: float

    @property
    def class_frequencies(self) -> np.ndarray:
        return np.asarray(self.class_counts, np.float64) / max(self.rows, 1)


@dataclass(frozen=True)
class Schema:
    image_shape: tuple[int, int]
    dtype: str
    pixel_range: tuple[int, int]
    label_domain: tuple[int, ...]
    class_frequencies: tuple[float, ...]
    pixel_mean: float
    pixel_std: float
    inferred_from: str  # the digest of the span it was inferred from

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, tree: dict) -> Schema:
        return cls(
            image_shape=tuple(tree["image_shape"]),
            dtype=tree["dtype"],
            pixel_range=tuple(tree["pixel_range"]),
            label_domain=tuple(tree["label_domain"]),
            class_frequencies=tuple(tree["class_frequencies"]),
            pixel_mean=float(tree["pixel_mean"]),
            pixel_std=float(tree["pixel_std"]),
            inferred_from=tree["inferred_from"],
        )


@dataclass(frozen=True)
class DriftLimits:
    max_class_distance: float  # L-infinity distance between class frequencies
    max_pixel_shift: float  # |Δ pixel mean| and |Δ pixel std|, in units of the schema's std


def statistics(images: np.ndarray, labels: np.ndarray) -> Statistics:
    pixels = images.astype(np.float64)
    return Statistics(
        rows=len(labels),
        class_counts=tuple(int(n) for n in np.bincount(labels, minlength=NUM_CLASSES)),
        pixel_mean=float(pixels.mean()) if pixels.size else 0.0,
        pixel_std=float(pixels.std()) if pixels.size else 0.0,
    )


def infer_schema(images: np.ndarray, labels: np.ndarray, digest: str) -> Schema:
    stats = statistics(images, labels)
    return Schema(
        image_shape=IMAGE_SHAPE,
        dtype="uint8",
        pixel_range=PIXEL_RANGE,
        label_domain=tuple(range(NUM_CLASSES)),
        class_frequencies=tuple(float(f) for f in stats.class_frequencies),
        pixel_mean=stats.pixel_mean,
        pixel_std=stats.pixel_std,
        inferred_from=digest,
    )


@dataclass(frozen=True)
class Checked:
    images: np.ndarray | None  # uint8 [N, 28, 28]; None when the batch is structurally unusable
    labels: np.ndarray | None
    anomalies: tuple[Anomaly, ...]
    stats: Statistics | None

    def rejected(self, drift_policy: str) -> bool:
        return any(not a.drift or drift_policy == "reject" for a in self.anomalies)


def _as_uint8(values: np.ndarray, what: str, low: int, high: int, out_of_range: str) -> tuple:
    """``values`` as uint8 if every one is a whole number in [low, high]; else the anomaly."""
    if values.dtype.kind == "f":
        if np.isnan(values).any():
            return None, Anomaly("nan_values", f"{what}: {int(np.isnan(values).sum())} NaN")
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            return None, Anomaly(
                "wrong_dtype", f"{what}: {values.dtype} values that are not whole numbers"
            )
    elif values.dtype.kind not in "ui":
        return None, Anomaly("wrong_dtype", f"{what}: dtype {values.dtype}, expected integers")
    if values.size and (values.min() < low or values.max() > high):
        return None, Anomaly(
            out_of_range,
            f"{what}: values from {values.min()} to {values.max()}, expected {low}..{high}",
        )
    return values.astype(np.uint8), None


def _structure(images: np.ndarray, labels: np.ndarray) -> list[Anomaly]:
    problems = []
    pixels = int(np.prod(IMAGE_SHAPE))
    if not (images.ndim == 3 and images.shape[1:] == IMAGE_SHAPE) and not (
        images.ndim == 2 and images.shape[1] == pixels
    ):
        problems.append(
            Anomaly(
                "wrong_shape", f"images: shape {images.shape}, expected [N, 28, 28] or [N, 784]"
            )
        )
    if labels.ndim != 1:
        problems.append(Anomaly("wrong_shape", f"labels: shape {labels.shape}, expected [N]"))
    if images.ndim >= 1 and labels.ndim >= 1 and len(images) != len(labels):
        problems.append(Anomaly("count_mismatch", f"{len(images)} images but {len(labels)} labels"))
    elif images.ndim >= 1 and len(images) == 0:
        problems.append(Anomaly("empty_batch", "the batch has no rows"))
    return problems


def _drift(stats: Statistics, schema: Schema, limits: DriftLimits) -> list[Anomaly]:
    problems = []
    distance = float(np.max(np.abs(stats.class_frequencies - np.asarray(schema.class_frequencies))))
    if distance > limits.max_class_distance:
        problems.append(
            Anomaly(
                "class_distribution_drift",
                f"class frequencies at L-infinity distance {distance:.3f} from the schema's "
                f"(data.max_class_distance {limits.max_class_distance})",
                drift=True,
            )
        )
    mean_shift = abs(stats.pixel_mean - schema.pixel_mean) / schema.pixel_std
    std_shift = abs(stats.pixel_std - schema.pixel_std) / schema.pixel_std
    if max(mean_shift, std_shift) > limits.max_pixel_shift:
        problems.append(
            Anomaly(
                "pixel_distribution_drift",
                f"pixel mean {stats.pixel_mean:.1f} and std {stats.pixel_std:.1f} against the "
                f"schema's {schema.pixel_mean:.1f} and {schema.pixel_std:.1f}: shifted by "
                f"{max(mean_shift, std_shift):.2f} std (data.max_pixel_shift "
                f"{limits.max_pixel_shift})",
                drift=True,
            )
        )
    return problems


def check(images: np.ndarray, labels: np.ndarray, schema: Schema, limits: DriftLimits) -> Checked:
    structural = _structure(images, labels)
    if structural:
        return Checked(None, None, tuple(structural), None)
    pixels, pixel_problem = _as_uint8(images, "images", *schema.pixel_range, "out_of_range")
    domain = schema.label_domain
    classes, label_problem = _as_uint8(
        labels, "labels", min(domain), max(domain), "label_out_of_domain"
    )
    problems = [p for p in (pixel_problem, label_problem) if p is not None]
    if problems:
        return Checked(None, None, tuple(problems), None)
    pixels = pixels.reshape(len(pixels), *IMAGE_SHAPE)
    stats = statistics(pixels, classes)
    return Checked(pixels, classes, tuple(_drift(stats, schema, limits)), stats)
