"""``tasks.events`` without a Prefect server: importing it is cheap, and an event that cannot be
delivered is an error, not a silent drop. Its delivery to a real server, and the trigger it fires,
are in ``test_prefect_trigger.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tasks.config import REPO_ROOT
from tasks.events import DATA_LANDED, EventNotDelivered, emit_data_landed, span_resource_id
from tests.processes import free_port


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )


def test_import_loads_neither_tensorflow_nor_prefect():
    result = _python(
        "import sys, tasks.events; "
        "print(sorted(m for m in ('tensorflow', 'prefect') if m in sys.modules))",
        os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_names():
    assert DATA_LANDED == "train-and-serve.data.landed"
    assert span_resource_id("ab12") == "train-and-serve.data.span.ab12"


def test_unreachable_api_is_an_error_naming_it():
    url = f"http://127.0.0.1:{free_port()}/api"
    started = time.monotonic()
    with pytest.raises(EventNotDelivered, match=url):
        emit_data_landed("ab12", "batch", 3, api_url=url)
    assert time.monotonic() - started < 15


def test_no_api_url_is_an_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)  # no profile that sets one either
    result = _python(
        "from tasks.events import emit_data_landed; emit_data_landed('ab12', 'batch', 3)", env
    )
    assert result.returncode != 0
    assert "EventNotDelivered" in result.stderr and "PREFECT_API_URL is not set" in result.stderr
