"""tasks.lineage: when a run has nothing new to train on (pure decisions, no services)."""

from __future__ import annotations

from tasks import lineage
from tasks.lineage import TrainingInputs

INPUTS = TrainingInputs("0123456789abcdef", 52_000, "c" * 16, "d" * 16)


def champion(**changed: str) -> dict[str, str]:
    return {"export_version": "3", "prefect_flow_run_id": "x", **INPUTS.tags(), **changed}


def test_the_champions_inputs_while_it_serves_are_nothing_new():
    message = lineage.nothing_new(INPUTS, champion(), serving_version=3)
    assert message.startswith("nothing new since version 3 (snapshot 0123456789abcdef")


def test_anything_different_is_something_new():
    assert lineage.nothing_new(INPUTS, None, 3) is None  # no champion yet
    assert lineage.nothing_new(INPUTS, champion(), None) is None  # nothing serves
    assert lineage.nothing_new(INPUTS, champion(), 2) is None  # the servers serve another
    for key in ("snapshot", "config_digest", "code_digest", "training_rows"):
        assert lineage.nothing_new(INPUTS, champion(**{key: "other"}), 3) is None, key
    legacy = {"export_version": "3"}  # trained before lineage was recorded
    assert lineage.nothing_new(INPUTS, legacy, 3) is None


def test_the_code_digest_is_stable_and_covers_the_training_code():
    assert lineage.code_digest() == lineage.code_digest()
    covered = {p.as_posix() for pattern in lineage.CODE for p in lineage.REPO_ROOT.glob(pattern)}
    assert any(path.endswith("tasks/train.py") for path in covered)
    assert any(path.endswith("tasks/data/store.py") for path in covered)
