"""What a person reads in the Prefect UI: one logger for task code (Prefect's run logger inside a
run, so lines show in the UI; the module logger outside one: unit tests, plain scripts) and the
keys of the artifacts the tasks publish."""

from __future__ import annotations

import logging
import re

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("train_and_serve")


def artifact_key(kind: str, model_name: str) -> str:
    """``kind-model``, as Prefect wants artifact keys: lowercase letters, digits and dashes. One
    key per kind and model, so an artifact's history is that model's runs."""
    return re.sub(r"[^a-z0-9-]", "-", f"{kind}-{model_name}".lower())
