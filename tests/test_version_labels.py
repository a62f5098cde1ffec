"""The config file of a labels replica: what push accepts as a starting point, what it changes,
and how it writes it (no server needed)."""

from __future__ import annotations

import pytest

from tasks.config import PushConfig
from tasks.push import PushError, push
from tasks.version_labels import (
    LabelsError,
    labelled,
    read_config,
    stable_version,
    write_config,
)
from tests.processes import free_port
from tests.servers import config_text, model_entry
from tests.test_push import fake_export, store_versions, verdict


def entry(policy: str = "specific { versions: 1 }", **labels: int) -> str:
    return model_entry("mnist", "/models/mnist", policy, labels)


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        (config_text(model_entry("other", "/o")), "no model_config_list entry for model mnist"),
        (config_text(entry("latest { num_versions: 1 }")), "policy is latest, not specific"),
        (config_text(entry("", stable=1)), "policy is latest, not specific"),
        (config_text(entry(stable=1, beta=1)), "labels beta: push moves only stable and canary"),
        (config_text(entry(canary=1)), "no stable label"),
        (
            config_text(entry("specific { versions: 1 versions: 2 }", stable=1, canary=2)),
            "canary is on version 2, stable on 1: a rollout was left half done",
        ),
    ],
    ids=["no-entry", "latest", "no-policy", "other-label", "no-stable", "half-done"],
)
def test_a_config_push_cannot_start_from_is_refused_naming_the_file(tmp_path, text, refusal):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(LabelsError, match=f"^{path}: .*{refusal}"):
        stable_version(read_config(path), "mnist", path)


def test_the_entry_push_accepts_names_its_stable_version(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(config_text(entry("specific { versions: 3 versions: 4 }", stable=4, canary=4)))
    assert stable_version(read_config(path), "mnist", path) == 4


def test_only_this_model_s_versions_and_labels_change_and_the_file_is_replaced_whole(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(config_text(entry(stable=1), model_entry("other", "/o", "", {"x": 7})))
    before = read_config(path)
    write_config(path, labelled(before, "mnist", {2, 1}, {"stable": 1, "canary": 2}))
    after = read_config(path)
    mnist, other = after.model_config_list.config
    assert list(mnist.model_version_policy.specific.versions) == [1, 2]
    assert dict(mnist.version_labels) == {"stable": 1, "canary": 2}
    assert (mnist.base_path, mnist.model_platform) == ("/models/mnist", "tensorflow")
    assert other == before.model_config_list.config[1]
    assert [p.name for p in tmp_path.iterdir()] == ["models.config"]  # no staging file left


def test_a_labels_replica_with_a_config_push_cannot_use_is_refused_before_anything_is_published(
    tmp_path,
):
    config = tmp_path / "models.config"
    config.write_text(config_text(entry("latest {}", stable=1)))
    store = tmp_path / "models"
    replica = {"name": "a", "grpc": f"127.0.0.1:{free_port()}", "mode": "labels"}
    cfg = PushConfig(model_base_path=store, replicas=[{**replica, "model_config_file": config}])
    with pytest.raises(PushError, match=rf"^replica a: {config}: .* not specific .*nothing pushed"):
        push.fn(fake_export(tmp_path, 2), verdict(True), cfg)
    assert store_versions(store) == []  # at most the rollout lock
