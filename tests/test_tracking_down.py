"""A run whose MLflow tracking server does not answer: at the start it fails within seconds,
naming the tracking URI and its key, before any work (MLflow's client alone would retry for about
a minute, then raise its traceback); before the push it stops, nothing pushed.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.train_and_serve import roll_out, train_and_serve
from tasks.config import load_config
from tasks.export import ExportResult
from tasks.processes import free_port
from tasks.tracking import PROBE_TIMEOUT_S, RunTracker, TrackingServerDown, require_tracking_server
from tests.saved_models import write_version

MODEL = "mnist"


def nothing_listens() -> str:
    return f"http://127.0.0.1:{free_port()}"


class Unavailable(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(503)

    def log_message(self, *args: object) -> None:
        pass


def test_the_probe_fails_at_once_naming_the_uri_and_its_key() -> None:
    uri = nothing_listens()
    started = time.monotonic()
    with pytest.raises(TrackingServerDown, match="it stops") as raised:
        require_tracking_server(uri, "it stops")
    assert time.monotonic() - started < 1.0
    message = str(raised.value)
    assert f"MLflow tracking server {uri} (mlflow.tracking_uri) does not answer" in message


def test_the_probe_waits_for_a_hung_server_only_its_timeout() -> None:
    with socket.socket() as hung:  # accepts connections (the backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingServerDown, match=uri):
            require_tracking_server(uri, "it stops")
        assert time.monotonic() - started < PROBE_TIMEOUT_S + 1


def test_the_probe_passes_a_server_that_answers_any_status_and_uris_of_no_server() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        require_tracking_server(f"http://127.0.0.1:{server.server_address[1]}", "unused")
    finally:
        server.shutdown()
        server.server_close()
    require_tracking_server("sqlite:///nowhere/mlflow.db", "unused")
    require_tracking_server("file:///nowhere/mlruns", "unused")


@pytest.mark.slow
def test_a_run_with_its_tracking_server_down_fails_within_seconds_before_any_work(
    tmp_path: Path,
) -> None:
    uri = nothing_listens()
    overrides = [
        f"mlflow.tracking_uri={uri}",
        f"data.store={tmp_path / 'data'}",
        f"export.base_path={tmp_path / 'exports'}",
        f"push.model_base_path={tmp_path / 'models'}",
        f'push.replicas=[{{name: local, grpc: "127.0.0.1:{free_port()}"}}]',
    ]
    with prefect_test_harness(server_startup_timeout=180):
        started = time.monotonic()
        state = train_and_serve(overrides=overrides, return_state=True)
        seconds = time.monotonic() - started

    assert state.is_failed()
    assert f"MLflow tracking server {uri} (mlflow.tracking_uri)" in state.message, state.message
    assert seconds < 10, f"failed after {seconds:.1f} s"
    print(f"failed after {seconds:.2f} s: {state.message}")
    assert not any(tmp_path.iterdir()), "the run did work before failing"


def test_nothing_is_pushed_when_the_tracking_server_is_down_at_the_push(tmp_path: Path) -> None:
    uri = nothing_listens()
    exported = ExportResult(MODEL, 1, write_version(tmp_path / "exports" / MODEL, 1, 3))
    store = tmp_path / "models"
    cfg = load_config(overrides=[f"push.model_base_path={store}", f"mlflow.tracking_uri={uri}"])

    with pytest.raises(TrackingServerDown, match=f"{MODEL} version 1 is not pushed"):
        # The verdict is never read: the probe comes before the push.
        roll_out(exported, None, cfg, RunTracker(uri, "a-run"), "1")  # type: ignore[arg-type]

    assert not store.exists() or not any(store.rglob("saved_model.pb"))
