"""The configuration: defaults, overrides, and errors that name the key."""

import pytest

from tasks.config import REPO_ROOT, ConfigError, load_config


def test_default_config_matches_the_tutorial_setup():
    cfg = load_config()
    assert cfg.model.kind == "softmax"
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate) == (5, 100, 0.5)
    assert cfg.export.model_name == "mnist"
    assert cfg.mlflow.experiment == "train-and-serve"
    assert (
        cfg.data.dir == REPO_ROOT / "data" / "mnist"
    )  # relative paths are taken from the repo root


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(
        overrides=[
            "train.epochs=3",
            "train.device=gpu:1",
            'push.replicas=[{name: a, grpc: "a:1"}, {name: b, grpc: "b:2", model_base_path: s, '
            "mode: labels, model_config_file: b.config}]",
            "validate.max_error_rate=0.2",
            "export.base_path=/tmp/x",
        ]
    )
    assert cfg.train.epochs == 3
    assert cfg.train.device == "gpu:1"
    assert cfg.push.servers == ["a:1", "b:2"]
    # a replica without a store of its own polls push.model_base_path; paths from the repo root
    assert [r.model_base_path for r in cfg.push.replicas] == [
        str(REPO_ROOT / ".stack" / "models"),
        str(REPO_ROOT / "s"),
    ]
    assert [(r.mode, r.model_config_file) for r in cfg.push.replicas] == [
        ("store", None),
        ("labels", REPO_ROOT / "b.config"),
    ]
    assert cfg.validate_.max_error_rate == 0.2
    assert cfg.export.base_path == "/tmp/x"
    assert load_config(overrides=["export.base_path=s3://b/e"]).export.base_path == "s3://b/e"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.epoch=3", "train.epoch: unknown key"),
        ("trian.epochs=3", "trian: unknown key"),
        ("train.epochs=zero", "train.epochs"),
        ("train.epochs=0", "train.epochs"),
        ("train.device=tpu", "train.device"),
        ("model.kind=transformer", "model.kind"),
        ("validate.max_error_rate=1.5", "validate.max_error_rate"),
        ('push.replicas=[{name: a, grpc: "nohostport"}]', "push.replicas.0.grpc"),
        ('push.replicas=[{name: a, grpc: "h:1"}, {name: a, grpc: "h:2"}]', "same name: a"),
        ("push.servers=[a:1]", "push.servers: unknown key"),
        (
            'push.replicas=[{name: a, grpc: "h:1", mode: labels}]',
            "push.replicas.0: Value error, replica a: mode labels needs model_config_file",
        ),
        ('push.replicas=[{name: a, grpc: "h:1", mode: label}]', "push.replicas.0.mode"),
        ("push.stages=[2, 1, all]", "push.stages"),
        ("push.stages=[1]", "push.stages"),
        ("push.bake_s=200", "push.bake_deadline_s must be at least push.bake_s"),
        ("push.model_base_path=s3:///models", "push.model_base_path: Value error, s3:///models"),
        ("export.base_path=s3://", "export.base_path: Value error, s3://: no bucket"),
        ("train.epochs.deep=1", "train.epochs"),
        ("noequals", "noequals"),
        ("data.drift=ignore", "data.drift"),
        ("data.snapshot=yesterday", "data.snapshot"),
        ("data.base_rows=70000", "data.base_rows"),
        ("data.max_class_distance=0", "data.max_class_distance"),
        ("validate.max_class_error_rate={12: 0.1}", "validate.max_class_error_rate"),
        ("validate.confidence=1", "validate.confidence"),
        ("validate.infra.timeout_s=0", "validate.infra.timeout_s"),
        ("validate.infra.server_binary=/no/such/tensorflow_model_server", "not an executable"),
        ("validate.infra.server=x", "validate.infra.server: unknown key"),
    ],
)
def test_bad_keys_and_values_fail_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_config(overrides=[override])


def test_a_bake_needs_every_replica_s_metrics_page():
    blind = (
        'push.replicas=[{name: a, grpc: "h:1", metrics_url: "http://h:2/m"}, '
        '{name: b, grpc: "h:3"}]'
    )
    assert load_config(overrides=[blind]).push.bake_s == 0
    with pytest.raises(ConfigError, match="push.replicas: b: no metrics_url"):
        load_config(overrides=[blind, "push.bake_s=5"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: -1\n")
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(bad)


def test_flat_params_cover_every_key():
    flat = load_config().flat()
    assert flat["train.epochs"] == "5"
    assert flat["validate.max_regression"] == "0.01"
    assert "push.replicas" in flat and "mlflow.tracking_uri" in flat


def test_the_data_store_path_is_taken_from_the_repo_root(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  store: somewhere/data\n")
    assert load_config(config).data.store == REPO_ROOT / "somewhere" / "data"


def test_the_training_digest_follows_what_shapes_the_weights_only():
    base = load_config().training_digest()
    assert load_config(overrides=["train.epochs=6"]).training_digest() != base
    assert load_config(overrides=["model.kind=mlp"]).training_digest() != base
    for elsewhere in ("train.device=cpu", "push.timeout_s=5", "validate.max_error_rate=0.2"):
        assert load_config(overrides=[elsewhere]).training_digest() == base, elsewhere
