"""validate: the quality gate between export and push.

It judges the model exactly as it will be served: the SavedModel loaded back from disk, called
through its ``serving_default`` signature, never the in-memory Keras model. It passes when the
error rate on the 10,000 MNIST test images is within ``validate.max_error_rate`` and does not
exceed the error rate of the version serving now (measured on the same images through the
server's public API) by more than ``validate.max_regression``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from serving.api_client import ModelServer
from serving.mnist import NUM_CLASSES, Split
from serving.model_format import DEFAULT_SIGNATURE
from tasks.config import ValidateConfig
from tasks.export import ExportResult
from tasks.logs import logger


class ValidationError(RuntimeError):
    """The gate could not be evaluated (not: the model failed the gate)."""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    error_rate: float
    baseline_error_rate: float | None  # None: nothing was serving (the first push)
    baseline_version: int | None
    confusion: np.ndarray  # [10, 10] counts, rows = true label, columns = predicted
    # The first test images and the scores the exported model gives them: push checks that the
    # server answers exactly these for the pushed version.
    canary_images: np.ndarray
    canary_scores: np.ndarray
    # Error rates on the evaluation batches of the data store, reported beside the gate's.
    slice_error_rates: dict[str, float]


def _error_rate(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(scores, axis=1) != labels))


def exported_scores(export: ExportResult, *image_sets: np.ndarray) -> list[np.ndarray]:
    """The scores the SavedModel on disk gives each set of images (loaded once for all)."""
    import tensorflow as tf  # deferred: a 6 s import only the tasks that run models need

    signature = tf.saved_model.load(str(export.path)).signatures[DEFAULT_SIGNATURE]
    return [
        signature(images=tf.constant(images, tf.float32))["scores"].numpy() for images in image_sets
    ]


def baseline(servers: list[str], model_name: str, test: Split) -> tuple[int | None, float | None]:
    """The version the first server serves now and its error rate on ``test``; (None, None) if
    none."""
    if not servers:
        return None, None
    try:
        with ModelServer(servers[0], model_name) as server:
            version = server.serving_version()
            if version is None:
                return None, None
            return version, _error_rate(
                server.predict_scores(test.images, version=version), test.labels
            )
    except Exception as error:  # grpc.RpcError and friends: say which server and why
        raise ValidationError(
            f"cannot measure the serving baseline on {servers[0]}: {error}"
        ) from error


def judge(
    error_rate: float, baseline_error_rate: float | None, cfg: ValidateConfig
) -> tuple[bool, str]:
    if error_rate > cfg.max_error_rate:
        return (
            False,
            f"error rate {error_rate:.4f} exceeds validate.max_error_rate {cfg.max_error_rate:.4f}",
        )
    if baseline_error_rate is not None and error_rate > baseline_error_rate + cfg.max_regression:
        return False, (
            f"error rate {error_rate:.4f} regresses on the serving model's "
            f"{baseline_error_rate:.4f} by more than validate.max_regression "
            f"{cfg.max_regression:.4f}"
        )
    against = "" if baseline_error_rate is None else f", serving model {baseline_error_rate:.4f}"
    return True, f"error rate {error_rate:.4f} (bound {cfg.max_error_rate:.4f}{against})"


@task(cache_policy=NO_CACHE)
def validate(
    export: ExportResult,
    test: Split,
    cfg: ValidateConfig,
    servers: list[str],
    slices: dict[str, Split] | None = None,
) -> Verdict:
    log = logger()
    slices = slices or {}
    scores, *slice_scores = exported_scores(
        export, test.images, *(split.images for split in slices.values())
    )
    slice_error_rates = {
        name: _error_rate(found, split.labels)
        for (name, split), found in zip(slices.items(), slice_scores, strict=True)
    }
    for name, rate in slice_error_rates.items():
        log.info("evaluation slice %s: error rate %.4f", name, rate)
    error_rate = _error_rate(scores, test.labels)
    baseline_version, baseline_error_rate = baseline(servers, export.model_name, test)
    passed, reason = judge(error_rate, baseline_error_rate, cfg)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (test.labels, np.argmax(scores, axis=1)), 1)
    log.info(
        "gate %s for %s version %d: %s",
        "passed" if passed else "FAILED",
        export.model_name,
        export.version,
        reason,
    )
    canaries = slice(0, cfg.num_canary_images)
    return Verdict(
        passed=passed,
        reason=reason,
        error_rate=error_rate,
        baseline_error_rate=baseline_error_rate,
        baseline_version=baseline_version,
        confusion=confusion,
        canary_images=test.images[canaries],
        canary_scores=scores[canaries],
        slice_error_rates=slice_error_rates,
    )
