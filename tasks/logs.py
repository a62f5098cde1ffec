"""One logger for task code: Prefect's run logger inside a run (so lines show in the Prefect UI),
the module logger outside one (unit tests, plain scripts)."""

from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("train_and_serve")
