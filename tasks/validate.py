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
class PairedCheck:
    """One non-inferiority test the gate makes against the serving version."""

    group: str  # "all digits", "digit 7", "slice fresh"
    comparison: Comparison
    margin: float
    key: str  # the configuration key of the margin

    @property
    def blocks(self) -> bool:
        return self.comparison.high > self.margin


@dataclass(frozen=True)
class Judgement:
    passed: bool
    reason: str
    checks: tuple[PairedCheck, ...]  # all digits, each digit, each slice; none on a first push
    class_error_rates: dict[int, float]

    @property
    def overall(self) -> Comparison | None:
        return self.checks[0].comparison if self.checks else None


def _interval(comparison: Comparison, confidence: float) -> str:
    return (
        f"difference {comparison.difference:+.4f}, {confidence:.0%} interval "
        f"[{comparison.low:+.4f}, {comparison.high:+.4f}], McNemar p={comparison.p_value:.3g}"
    )


@dataclass(frozen=True)
class Verdict:
    error_rate: float
    baseline_version: int | None  # None: nothing was serving (the first push)
    judgement: Judgement  # the decision and the paired comparisons behind it
    confusion: np.ndarray  # [10, 10] counts, rows = true label, columns = predicted
    # The first test images and the scores the exported model gives them: push checks that the
    # server answers exactly these for the pushed version.
    canary_images: np.ndarray
    canary_scores: np.ndarray
    # Error rates on the evaluation batches of the data store, reported beside the gate's.
    slice_error_rates: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.judgement.passed

    @property
    def reason(self) -> str:
        return self.judgement.reason

    @property
    def baseline_error_rate(self) -> float | None:
        """The serving version's error rate on the same images; None on the first push."""
        overall = self.judgement.overall
        return None if overall is None else overall.champion_error


# Scores that differ by more than float32 round-off mean the server runs another model.
CANARY_TOLERANCE = 1e-5


def canary_mismatch(served: np.ndarray, verdict: Verdict) -> str | None:
    """How a server's scores for the canary images differ from those validate computed from the
    export, or None when they are the same (push and infra validation ask every server)."""
    if served.shape != verdict.canary_scores.shape:
        return f"scores of shape {served.shape}, validate computed {verdict.canary_scores.shape}"
    worst = float(np.max(np.abs(served - verdict.canary_scores)))
    if worst > CANARY_TOLERANCE:
        return (
            f"other scores than validate computed from the export (max difference {worst:.3g}, "
            f"tolerance {CANARY_TOLERANCE:g})"
        )
    return None


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
    servers: list[str], model_name: str, *image_sets: np.ndarray
) -> tuple[int | None, list[np.ndarray | None]]:
    """The version the first server serves now and its predicted classes for each image set;
    (None, [None, ...]) when nothing serves."""
    nothing = (None, [None] * len(image_sets))
    if not servers:
        return nothing
    try:
        with ModelServer(servers[0], model_name) as server:
            version = server.serving_version()
            if version is None:
                return nothing
            return version, [
                np.argmax(server.predict_scores(images, version=version), axis=1)
                for images in image_sets
            ]
    except Exception as error:  # grpc.RpcError and friends: say which server and why
        raise ValidationError(
            f"cannot measure the serving baseline on {servers[0]}: {error}"
        ) from error


@dataclass(frozen=True)
class Predictions:
    """Predicted classes on one set of images: the candidate's, and the serving version's."""

    candidate: np.ndarray
    labels: np.ndarray
    champion: np.ndarray | None


def judge(
    test: Predictions, cfg: ValidateConfig, slices: dict[str, Predictions] | None = None
) -> Judgement:
    """The gate: the absolute bounds on the test set, then, when a version serves, non-inferiority
    on the same images overall, per digit and per evaluation slice."""
    wrong = test.candidate != test.labels
    class_error_rates = {k: float(wrong[test.labels == k].mean()) for k in range(NUM_CLASSES)}
    checks: list[PairedCheck] = []
    if test.champion is not None:

        def paired(of: Predictions, rows: np.ndarray, group: str, margin: str) -> PairedCheck:
            comparison = compare(
                (of.candidate != of.labels)[rows],
                (of.champion != of.labels)[rows],
                cfg.confidence,
                cfg.bootstrap_resamples,
            )
            return PairedCheck(group, comparison, getattr(cfg, margin), f"validate.{margin}")

        everything = np.ones(len(test.labels), bool)
        checks.append(paired(test, everything, "all digits", "max_regression"))
        checks += [
            paired(test, test.labels == k, f"digit {k}", "max_class_regression")
            for k in range(NUM_CLASSES)
        ]
        checks += [
            paired(of, np.ones(len(of.labels), bool), f"slice {name}", "max_slice_regression")
            for name, of in (slices or {}).items()
        ]
    passed, reason = _decide(float(wrong.mean()), class_error_rates, checks, cfg)
    return Judgement(passed, reason, tuple(checks), class_error_rates)


def _decide(
    error_rate: float,
    class_error_rates: dict[int, float],
    checks: list[PairedCheck],
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
    if not checks:
        return True, f"{bound}; nothing serving to compare with"
    for check in checks:
        if check.blocks:
            comparison = check.comparison
            return False, (
                f"{check.group}: error rate {comparison.candidate_error:.4f} against the serving "
                f"model's {comparison.champion_error:.4f}: "
                f"{_interval(comparison, cfg.confidence)}, above {check.key} {check.margin:.4f}"
            )
    overall = checks[0].comparison
    return True, (
        f"{bound}, serving model {overall.champion_error:.4f}: "
        f"{_interval(overall, cfg.confidence)}; every digit and slice within its margin"
    )


def is_transient(task, task_run, state) -> bool:
    """Retry only a server that was briefly unreachable, never a failed gate (a returned state)."""
    error = state.result(raise_on_failure=False)
    cause = getattr(error, "__cause__", None)
    code = getattr(cause, "code", None)
    return (
        isinstance(error, ValidationError) and callable(code) and code() == StatusCode.UNAVAILABLE
    )


def gate_table(judgement: Judgement) -> list[dict[str, str]]:
    """One row per paired check (all digits, each digit, each slice): what it compared, decided."""
    return [
        {
            "metric": f"error rate, {check.group}",
            "candidate": f"{check.comparison.candidate_error:.4f}",
            "champion": f"{check.comparison.champion_error:.4f}",
            "difference": f"{check.comparison.difference:+.4f}",
            "interval": f"[{check.comparison.low:+.4f}, {check.comparison.high:+.4f}]",
            "McNemar p": f"{check.comparison.p_value:.3g}",
            "bound": f"{check.margin:.4f}",
            "decision": "BLOCKS" if check.blocks else "ok",
        }
        for check in judgement.checks
    ]


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
    baseline_version, (champion, *slice_champions) = baseline(
        servers, export.model_name, test.images, *(split.images for split in slices.values())
    )
    predicted = np.argmax(scores, axis=1)
    judgement = judge(
        Predictions(predicted, test.labels, champion),
        cfg,
        {
            name: Predictions(np.argmax(found, axis=1), split.labels, theirs)
            for (name, split), found, theirs in zip(
                slices.items(), slice_scores, slice_champions, strict=True
            )
        },
    )
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (test.labels, predicted), 1)
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
            table=gate_table(judgement),
            description=f"Gate {decision} for {export.model_name} version {export.version} "
            f"against version {baseline_version}: {judgement.reason}",
        )
    canaries = slice(0, cfg.num_canary_images)
    verdict = Verdict(
        error_rate=_error_rate(scores, test.labels),
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
