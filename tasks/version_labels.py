"""The model config file of a replica rolled out by its version labels (``mode: labels``).

TF Serving's documented canary pattern (serving_config.md, "Assigning String Labels to Model
Versions, To Simplify Canary and Rollback"): the server, started with ``--model_config_file``,
serves the versions its ``model_version_policy { specific { ... } }`` names, and clients ask for
the label ``stable`` (or ``canary``) in ``ModelSpec.version_label``; a rollout moves the labels
with ``HandleReloadConfigRequest``. TF Serving has no call that reads a server's config, and a
restarted server reads its file again: push reads the file, changes only this model's versions
and its two labels, writes the file back (atomically) and sends the whole config.

A label may only be moved onto a version that is AVAILABLE (unless
``--allow_version_labels_for_unavailable_models``, and even then only a new label): so a version
is first loaded next to the old one, then labelled. What this module accepts as a starting
point -- the model's entry under a ``specific`` policy, labels ``stable`` and perhaps ``canary``,
both on one version -- is what a finished rollout leaves behind.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

STABLE, CANARY = "stable", "canary"

ModelServerConfig = model_server_config_pb2.ModelServerConfig


class LabelsError(ValueError):
    """The config file cannot be rolled out by its labels; the message names the file."""


def read_config(path: Path) -> ModelServerConfig:
    try:
        return text_format.Parse(path.read_text(), ModelServerConfig())
    except (OSError, text_format.ParseError) as error:
        raise LabelsError(f"{path}: {error}") from None


def write_config(path: Path, config: ModelServerConfig) -> None:
    """Written under a hidden name next to it, then renamed: a server that re-reads the file
    (``--model_config_file_poll_wait_seconds``) or restarts never sees half of it."""
    staging = path.with_name(f".{path.name}.push-{uuid.uuid4().hex}")
    staging.write_text(text_format.MessageToString(config))
    os.replace(staging, path)


def entry_of(config: ModelServerConfig, model_name: str) -> model_server_config_pb2.ModelConfig:
    for entry in config.model_config_list.config:
        if entry.name == model_name:
            return entry
    raise KeyError(model_name)


def stable_version(config: ModelServerConfig, model_name: str, path: Path) -> int:
    """The version the label ``stable`` names, once the entry is checked: present, a specific
    policy (under latest the server would swap by itself as the version is published), no labels
    but ``stable`` and ``canary``, and those two on the same version (else a rollout is half
    done)."""
    try:
        entry = entry_of(config, model_name)
    except KeyError:
        raise LabelsError(f"{path}: no model_config_list entry for model {model_name}") from None
    policy = entry.model_version_policy.WhichOneof("policy_choice")
    if policy != "specific":
        raise LabelsError(
            f"{path}: model {model_name}: model_version_policy is {policy or 'latest'}, not "
            "specific (the versions push loads and labels)"
        )
    labels = dict(entry.version_labels)
    others = sorted(set(labels) - {STABLE, CANARY})
    if others:
        raise LabelsError(
            f"{path}: model {model_name}: labels {', '.join(others)}: push moves only "
            f"{STABLE} and {CANARY}"
        )
    if STABLE not in labels:
        raise LabelsError(f"{path}: model {model_name}: no {STABLE} label")
    if labels.get(CANARY, labels[STABLE]) != labels[STABLE]:
        raise LabelsError(
            f"{path}: model {model_name}: {CANARY} is on version {labels[CANARY]}, {STABLE} on "
            f"{labels[STABLE]}: a rollout was left half done"
        )
    return labels[STABLE]


def labelled(
    config: ModelServerConfig, model_name: str, versions: set[int], labels: dict[str, int]
) -> ModelServerConfig:
    """``config`` with this model's entry serving exactly ``versions``, labelled ``labels``;
    everything else (other models, this model's other fields) as it was."""
    changed = ModelServerConfig()
    changed.CopyFrom(config)
    entry = entry_of(changed, model_name)
    entry.model_version_policy.specific.ClearField("versions")
    entry.model_version_policy.specific.versions.extend(sorted(versions))
    entry.ClearField("version_labels")
    entry.version_labels.update(labels)
    return changed
