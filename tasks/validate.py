"""validate: the quality gate between export and push.

It judges the model exactly as it will be served: the SavedModel loaded back from disk, called
through its ``serving_default`` signature, never the in-memory Keras model. It passes when the
error rate on the 10,000 MNIST test images is within ``validate.max_error_rate`` (and each digit's
within ``validate.max_class_error_rate``, where set) and, when a version serves, the candidate is
not worse than it: the serving version's predictions on the same images, through the server's
public API, are paired with the candidate's (``tasks.comparison``), and the gate blocks when the
upper end of the confidence interval of the error-rate difference exceeds
``validate.max_regression`` overall or ``validate.max_class_regression`` on any digit. A
difference that is noise passes; a real regression, even on one digit, does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from grpc import StatusCode
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State
from prefect.tasks import exponential_backoff

from serving.api_client import ModelServer
from serving.mnist import NUM_CLASSES, Split
from serving.model_format import DEFAULT_SIGNATURE
from tasks.comparison import Comparison, compare
from tasks.config import ValidateConfig
from tasks.export import ExportResult
from tasks.logs import artifact_key, logger


class ValidationError(RuntimeError):
    """The gate could not be evaluated (not: the model failed the gate)."""


@dataclass(frozen=True)
class Judgement:
    passed: bool
    reason: str
    overall: Comparison | None  # against the serving model; None on the first push
    per_class: dict[int, Comparison]  # the same, on each digit's images
    class_error_rates: dict[int, float]


def _interval(comparison: Comparison, confidence: float) -> str:
    return (
        f"difference {comparison.difference:+.4f}, {confidence:.0%} interval "
        f"[{comparison.low:+.4f}, {comparison.high:+.4f}], McNemar p={comparison.p_value:.3g}"
    )


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    error_rate: float
    baseline_error_rate: float | None  # None: nothing was serving (the first push)
    baseline_version: int | None
    judgement: Judgement  # the paired comparison behind the decision, overall and per digit
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


def baseline(
    servers: list[str], model_name: str, test: Split
) -> tuple[int | None, np.ndarray | None]:
    """The version the first server serves now and its predicted classes for ``test``; (None,
    None) when nothing serves."""
    if not servers:
        return None, None
    try:
        with ModelServer(servers[0], model_name) as server:
            version = server.serving_version()
            if version is None:
                return None, None
            scores = server.predict_scores(test.images, version=version)
            return version, np.argmax(scores, axis=1)
    except Exception as error:  # grpc.RpcError and friends: say which server and why
        raise ValidationError(
            f"cannot measure the serving baseline on {servers[0]}: {error}"
        ) from error


def judge(
    predicted: np.ndarray, labels: np.ndarray, champion: np.ndarray | None, cfg: ValidateConfig
) -> Judgement:
    """The gate on the candidate's predicted classes, paired with the champion's on the same
    images: the absolute bounds, then non-inferiority overall and per digit."""
    wrong = predicted != labels
    class_error_rates = {k: float(wrong[labels == k].mean()) for k in range(NUM_CLASSES)}
    overall, per_class = None, {}
    if champion is not None:
        champion_wrong = champion != labels

        def paired(images: np.ndarray) -> Comparison:
            return compare(
                wrong[images], champion_wrong[images], cfg.confidence, cfg.bootstrap_resamples
            )

        overall = paired(np.ones_like(wrong))
        per_class = {k: paired(labels == k) for k in range(NUM_CLASSES)}
    return Judgement(
        *_decide(float(wrong.mean()), class_error_rates, overall, per_class, cfg),
        overall,
        per_class,
        class_error_rates,
    )


def _decide(
    error_rate: float,
    class_error_rates: dict[int, float],
    overall: Comparison | None,
    per_class: dict[int, Comparison],
    cfg: ValidateConfig,
) -> tuple[bool, str]:
    if error_rate > cfg.max_error_rate:
        return False, (
            f"error rate {error_rate:.4f} exceeds validate.max_error_rate {cfg.max_error_rate:.4f}"
        )
    for digit, bound in sorted(cfg.max_class_error_rate.items()):
        if class_error_rates[digit] > bound:
            return False, (
                f"digit {digit}: error rate {class_error_rates[digit]:.4f} exceeds "
                f"validate.max_class_error_rate[{digit}] {bound:.4f}"
            )
    bound = f"error rate {error_rate:.4f} (bound {cfg.max_error_rate:.4f})"
    if overall is None:
        return True, f"{bound}; nothing serving to compare with"
    if overall.high > cfg.max_regression:
        return False, (
            f"{bound} against the serving model's {overall.champion_error:.4f}: "
            f"{_interval(overall, cfg.confidence)}, above validate.max_regression "
            f"{cfg.max_regression:.4f}"
        )
    for digit, comparison in per_class.items():
        if comparison.high > cfg.max_class_regression:
            return False, (
                f"digit {digit}: error rate {comparison.candidate_error:.4f} against the serving "
                f"model's {comparison.champion_error:.4f}: "
                f"{_interval(comparison, cfg.confidence)}, above validate.max_class_regression "
                f"{cfg.max_class_regression:.4f}"
            )
    return True, (
        f"{bound}, serving model {overall.champion_error:.4f}: "
        f"{_interval(overall, cfg.confidence)}, within validate.max_regression "
        f"{cfg.max_regression:.4f}, every digit within {cfg.max_class_regression:.4f}"
    )


def is_transient(task, task_run, state) -> bool:
    """Retry only a server that was briefly unreachable, never a failed gate (a returned state)."""
    error = state.result(raise_on_failure=False)
    cause = getattr(error, "__cause__", None)
    code = getattr(cause, "code", None)
    return (
        isinstance(error, ValidationError) and callable(code) and code() == StatusCode.UNAVAILABLE
    )


def gate_table(judgement: Judgement, cfg: ValidateConfig) -> list[dict[str, str]]:
    """One row for the whole test set and one per digit: what the gate compared and decided."""
    rows = []
    for what, comparison, margin in (
        ("all digits", judgement.overall, cfg.max_regression),
        *((f"digit {k}", c, cfg.max_class_regression) for k, c in judgement.per_class.items()),
    ):
        if comparison is None:
            continue
        rows.append(
            {
                "metric": f"error rate, {what}",
                "candidate": f"{comparison.candidate_error:.4f}",
                "champion": f"{comparison.champion_error:.4f}",
                "difference": f"{comparison.difference:+.4f}",
                "interval": f"[{comparison.low:+.4f}, {comparison.high:+.4f}]",
                "McNemar p": f"{comparison.p_value:.3g}",
                "bound": f"{margin:.4f}",
                "decision": "ok" if comparison.high <= margin else "BLOCKS",
            }
        )
    return rows


# A server that is restarting answers UNAVAILABLE for a moment: retried, with backoff and jitter.
@task(
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=is_transient,
    timeout_seconds=600,
)
def validate(
    export: ExportResult,
    test: Split,
    cfg: ValidateConfig,
    servers: list[str],
    slices: dict[str, Split] | None = None,
) -> Verdict | State:
    """The verdict; a failed gate is this task's Failed state, its message the reason, its data
    the verdict (an expected outcome: no exception, no traceback)."""
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
    baseline_version, champion = baseline(servers, export.model_name, test)
    judgement = judge(np.argmax(scores, axis=1), test.labels, champion, cfg)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (test.labels, np.argmax(scores, axis=1)), 1)
    decision = "passed" if judgement.passed else "FAILED"
    log.info(
        "gate %s for %s version %d: %s",
        decision,
        export.model_name,
        export.version,
        judgement.reason,
    )
    if judgement.overall is not None:
        create_table_artifact(
            key=artifact_key("gate", export.model_name),
            table=gate_table(judgement, cfg),
            description=f"Gate {decision} for {export.model_name} version {export.version} "
            f"against version {baseline_version}: {judgement.reason}",
        )
    canaries = slice(0, cfg.num_canary_images)
    verdict = Verdict(
        passed=judgement.passed,
        reason=judgement.reason,
        error_rate=float(np.mean(np.argmax(scores, axis=1) != test.labels)),
        baseline_error_rate=judgement.overall.champion_error if judgement.overall else None,
        baseline_version=baseline_version,
        judgement=judgement,
        confusion=confusion,
        canary_images=test.images[canaries],
        canary_scores=scores[canaries],
        slice_error_rates=slice_error_rates,
    )
    if not verdict.passed:
        return Failed(
            message=f"gate failed for {export.model_name} version {export.version}: "
            f"{verdict.reason}",
            data=verdict,
        )
    return verdict
