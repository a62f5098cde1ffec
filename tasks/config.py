"""The pipeline's configuration: YAML files in ``configs/``, validated into typed objects.

``load_config(path, overrides)`` reads a file, applies ``dotted.key=value`` overrides (values parsed
as YAML, so ``train.epochs=3`` is an int and ``push.stages=[1,all]`` a list) and validates the
result. Every error is a ``ConfigError`` whose message names the offending key, and it is raised
before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from serving.object_store import S3Url, is_s3

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "mnist.yaml"
# The Prefect global concurrency limit (limit 1) that every deployment's runs share while they
# train and push; `make run` creates it.
CONCURRENCY_LIMIT = "train-and-serve"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dir: Path = REPO_ROOT / "data" / "mnist"
    store: Path = REPO_ROOT / ".stack" / "data"
    # The base is MNIST's first base_rows training images; the rest can arrive as batches.
    base_rows: int = Field(50_000, gt=0, le=60_000)
    snapshot: str = Field("latest", pattern=r"^(latest|[0-9a-f]{16})$")
    drift: Literal["reject", "warn"] = "reject"
    max_class_distance: float = Field(0.1, gt=0, le=1)
    max_pixel_shift: float = Field(0.2, gt=0)


class ModelConfig(_Section):
    kind: Literal["softmax", "mlp", "cnn"] = "softmax"
    hidden_units: int = Field(128, gt=0)


class TrainConfig(_Section):
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(100, gt=0)
    learning_rate: float = Field(0.5, gt=0)
    device: str = "auto"
    log_device_placement: bool = False
    seed: int = 0
    # auto: this process, on train.device's plan. multi_worker: MultiWorkerMirroredStrategy over
    # train.workers local processes, or as the chief (worker 0) of train.cluster's machines.
    strategy: Literal["auto", "multi_worker"] = "auto"
    workers: int | None = Field(None, ge=2)
    cluster: list[str] | None = None  # every worker's host:port, the chief's (this machine's) first
    worker_timeout_s: float = Field(3600.0, gt=0)  # multi_worker: from the launch to the last exit

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|gpu|gpu:\d+", value):
            raise ValueError("must be auto, cpu, gpu or gpu:N")
        return value

    @field_validator("cluster")
    @classmethod
    def _addresses(cls, cluster: list[str] | None) -> list[str] | None:
        if cluster is None:
            return None
        bad = [a for a in cluster if not re.fullmatch(r"[^\s:]+:\d+", a)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: expected host:port")
        if len(cluster) < 2 or len(set(cluster)) != len(cluster):
            raise ValueError("expected at least two distinct host:port addresses")
        return cluster

    @model_validator(mode="after")
    def _workers_for_the_strategy(self) -> TrainConfig:
        given = [key for key in ("workers", "cluster") if getattr(self, key) is not None]
        if self.strategy == "auto" and given:
            raise ValueError(f"train.{given[0]}: only with train.strategy=multi_worker")
        if self.strategy == "multi_worker" and len(given) != 1:
            raise ValueError(
                "train.strategy=multi_worker: set exactly one of train.workers (N >= 2 local "
                "processes) and train.cluster (host:port of every machine)"
            )
        if self.strategy == "multi_worker" and self.device != "auto":
            raise ValueError(
                "train.device: leave it auto with train.strategy=multi_worker (each machine's "
                "worker trains on all its GPUs, else its CPU; local workers on the CPU)"
            )
        return self

    @property
    def worker_count(self) -> int:
        """How many processes train together: 1, train.workers or len(train.cluster)."""
        return self.workers or len(self.cluster or ()) or 1


DEFAULT_STORE = str(REPO_ROOT / ".stack" / "models")


def _store_path(value: Any) -> Any:
    """A directory (a string or a path), or ``s3://bucket/prefix`` (serving.object_store)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str) and is_s3(value):
        S3Url.parse(value)  # raises, naming the URL, when it has no bucket
    return value


# Where a model store (the exports, or a serving store) lives: ``<it>/<model>/<version>/``.
StorePath = Annotated[str, BeforeValidator(_store_path)]


class ExportConfig(_Section):
    # A directory, or s3://bucket/prefix (the version claimed there; tasks.export).
    base_path: StorePath = str(REPO_ROOT / ".stack" / "exports")
    model_name: str = Field("mnist", pattern=r"^[A-Za-z0-9_.-]+$")
    warmup_requests: int = Field(4, ge=0, le=1000)


class InfraConfig(_Section):
    """The sandbox server infra validation starts on the candidate alone (tasks.infra_validate)."""

    enabled: bool = True
    timeout_s: float = Field(120.0, gt=0)  # from the sandbox's start to the version AVAILABLE
    # A tensorflow_model_server binary (a path, or a name on PATH); None: our python -m serving.
    server_binary: Path | None = None

    @field_validator("server_binary")
    @classmethod
    def _executable(cls, binary: Path | None) -> Path | None:
        if binary is None:
            return None
        if len(binary.parts) > 1 and not binary.is_absolute():
            binary = REPO_ROOT / binary
        found = shutil.which(str(binary))
        if found is None:
            raise ValueError(f"{binary}: not an executable file (nor a program on PATH)")
        return Path(found)


class ValidateConfig(_Section):
    max_error_rate: float = Field(0.12, ge=0, le=1)
    # Non-inferiority margins: the upper end of the interval of (candidate - serving) error rate.
    max_regression: float = Field(0.01, ge=0, le=1)
    max_class_regression: float = Field(0.05, ge=0, le=1)
    max_slice_regression: float = Field(0.05, ge=0, le=1)  # each evaluation batch of the store
    max_class_error_rate: dict[int, float] = {}  # digit -> bound, for the digits that need one
    confidence: float = Field(0.95, ge=0.5, lt=1)
    bootstrap_resamples: int = Field(2000, ge=1000)
    num_canary_images: int = Field(16, gt=0)
    infra: InfraConfig = InfraConfig()

    @field_validator("max_class_error_rate")
    @classmethod
    def _digits(cls, bounds: dict[int, float]) -> dict[int, float]:
        for digit, bound in bounds.items():
            if not 0 <= digit <= 9 or not 0 <= bound <= 1:
                raise ValueError(f"{digit}: {bound}: expected a digit 0-9 and a bound in [0, 1]")
        return bounds


ALL = "all"  # the last rollout stage: every replica


class ReplicaConfig(_Section):
    """One model server (ours or ``tensorflow_model_server``) that push rolls out to."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # in messages and MLflow metric names
    grpc: str = Field(pattern=r"^[^\s:]+:\d+$")  # host:port
    # The store this server polls; filled from push.model_base_path when not given (shared).
    model_base_path: StorePath
    # Its Prometheus page (--monitoring_config_file), read while a stage bakes.
    metrics_url: str | None = Field(None, pattern=r"^https?://\S+$")
    # store: the server swaps to the newest version by itself (tasks.push); labels: a server run
    # with --model_config_file, rolled out by moving its version labels stable and canary
    # (tasks.version_labels), with model_config_file the file it was started with.
    mode: Literal["store", "labels"] = "store"
    model_config_file: Path | None = None

    @model_validator(mode="after")
    def _labels_need_the_config_file(self) -> ReplicaConfig:
        if self.mode == "labels" and self.model_config_file is None:
            raise ValueError(
                f"replica {self.name}: mode labels needs model_config_file (the server's "
                "--model_config_file)"
            )
        return self


class PushConfig(_Section):
    model_base_path: StorePath = DEFAULT_STORE
    replicas: list[ReplicaConfig] = [
        ReplicaConfig(name="local", grpc="127.0.0.1:8500", model_base_path=DEFAULT_STORE)
    ]
    # Replicas on the new version after each stage (cumulative), e.g. [1, all]: one canary, then
    # the rest. Replicas that share a store change together.
    stages: list[int | Literal["all"]] = [1, ALL]
    # Each stage, once its replicas serve the version, watches their live metrics this long
    # against the replicas still on the old version; 0: no bake (no live checks).
    bake_s: float = Field(0.0, ge=0)
    # A check still inconclusive (too few requests) this long after the bake began fails.
    bake_deadline_s: float = Field(120.0, gt=0)
    max_error_rate: float = Field(0.01, ge=0, le=1)  # server-side errors / requests, on canaries
    max_p99_ratio: float = Field(1.5, gt=0)  # p99 latency of canaries / of old replicas
    min_requests: int = Field(100, ge=1)  # on canaries (and on old replicas, for the p99 ratio)
    timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shared_store(cls, data: Any) -> Any:
        """Replicas without a store of their own poll push.model_base_path."""
        if isinstance(data, dict) and isinstance(data.get("replicas"), list):
            shared = data.get("model_base_path", DEFAULT_STORE)
            data = {
                **data,
                "replicas": [
                    {"model_base_path": shared, **r} if isinstance(r, dict) else r
                    for r in data["replicas"]
                ],
            }
        return data

    @field_validator("replicas")
    @classmethod
    def _distinct(cls, replicas: list[ReplicaConfig]) -> list[ReplicaConfig]:
        for attribute in ("name", "grpc"):
            values = [getattr(r, attribute) for r in replicas]
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"two replicas with the same {attribute}: {', '.join(repeated)}")
        return replicas

    @field_validator("stages")
    @classmethod
    def _increasing(cls, stages: list[int | str]) -> list[int | str]:
        counts = [s for s in stages if s != ALL]
        if not stages or stages[-1] != ALL or len(counts) != len(stages) - 1:
            raise ValueError("expected increasing replica counts ending with all, e.g. [1, all]")
        if any(c < 1 for c in counts) or counts != sorted(set(counts)):
            raise ValueError("replica counts must be positive and increasing")
        return stages

    @model_validator(mode="after")
    def _bake_needs_metrics(self) -> PushConfig:
        if self.bake_s > 0:
            blind = [r.name for r in self.replicas if r.metrics_url is None]
            if blind:
                raise ValueError(
                    f"push.replicas: {', '.join(blind)}: no metrics_url, which push.bake_s > 0 "
                    "reads"
                )
        if self.bake_deadline_s < self.bake_s:
            raise ValueError("push.bake_deadline_s must be at least push.bake_s")
        return self

    @property
    def servers(self) -> list[str]:
        """Every replica's gRPC address, in order (validate's baseline asks the first)."""
        return [replica.grpc for replica in self.replicas]


# TrainConfig's keys that say where training runs, not what it learns: one worker or several
# train on the same global batches (tasks.train_worker) and reach the same weights.
_WHERE_IT_TRAINS = {
    "device",
    "log_device_placement",
    "strategy",
    "workers",
    "cluster",
    "worker_timeout_s",
}


class MlflowConfig(_Section):
    tracking_uri: str = "http://127.0.0.1:5000"
    experiment: str = "train-and-serve"
    data_experiment: str = "train-and-serve-data"  # one run per batch added to the data store
    # Used only when the experiment does not exist yet; None lets the tracking server decide.
    artifact_location: str | None = None
    system_metrics_interval_s: float = Field(2.0, gt=0)  # CPU, memory, disk, GPU while training


class PipelineConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    push: PushConfig = PushConfig()
    mlflow: MlflowConfig = MlflowConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _cluster_pins_the_snapshot(self) -> PipelineConfig:
        # Every machine of a cluster loads the data itself: "latest" could differ between them.
        if self.train.cluster is not None and self.data.snapshot == "latest":
            raise ValueError("train.cluster: needs data.snapshot pinned to a snapshot id")
        return self

    def training_digest(self) -> str:
        """A digest of the keys that shape the trained weights (the data is the snapshot's part;
        where training runs is not part of what it learns)."""
        shaping = {
            "model": self.model.model_dump(mode="json"),
            "train": self.train.model_dump(mode="json", exclude=_WHERE_IT_TRAINS),
        }
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, str]:
        """``{"train.epochs": "5", ...}``: the whole configuration as MLflow params."""
        flat: dict[str, str] = {}
        for section, values in self.model_dump(mode="json", by_alias=True).items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = str(value)
        return flat


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {raw!r}: {exc}") from None
    return key, value


def _relative_to(base: Path, tree: dict[str, Any]) -> None:
    """Relative paths in a config file are relative to the repository root, wherever it runs
    from."""

    def section(name: str) -> dict[str, Any]:
        return tree[name] if isinstance(tree.get(name), dict) else {}

    replicas = section("push").get("replicas")
    holders = [
        (section("data"), "dir"),
        (section("data"), "store"),
        (section("export"), "base_path"),
        (section("push"), "model_base_path"),
    ]
    if isinstance(replicas, list):
        for key in ("model_base_path", "model_config_file"):
            holders += [(r, key) for r in replicas if isinstance(r, dict)]
    for holder, key in holders:
        value = holder.get(key)
        if isinstance(value, str) and not is_s3(value) and not Path(value).is_absolute():
            holder[key] = str(base / value)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections")
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(tree, key, value)
    _relative_to(REPO_ROOT, tree)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            problems.append(f"{key}: {message}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
