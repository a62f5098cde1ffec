"""A model store on S3-compatible object storage: moto's real S3 API on loopback, our server
polling ``s3://`` and push publishing there."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import keras
import numpy as np
import pytest
import tensorflow as tf

import tasks.export as export_module
from serving import object_store
from serving.manager import Manager
from serving.model_config import ModelConfigController, ModelServerConfig, single_model
from serving.object_store import S3Url
from serving.types import State
from tasks.config import ExportConfig, ModelConfig, PushConfig
from tasks.export import ExportResult, export
from tasks.model_store import S3Store
from tasks.push import PushError, push
from tasks.train import build_model
from tests import saved_models
from tests.processes import s3_server
from tests.saved_models import expected_scores, make_template
from tests.servers import AVAILABLE, END, Server, images
from tests.test_export import exports_at_once
from tests.test_push import verdict
from tests.test_serving_units import OneWorkerInProcess

pytestmark = pytest.mark.slow

BUCKET = "models"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    directory = tmp_path_factory.mktemp("s3")
    with s3_server(directory) as server:
        object_store.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    directory = tmp_path_factory.mktemp("templates")
    return {bias: make_template(directory / str(bias), bias) for bias in (3, 7)}


@contextmanager
def serving(base_path: str, log: Path) -> Iterator[Server]:
    """Our server polling ``base_path``; a long start bound, as TensorFlow imports slowly on a
    busy machine."""
    server = Server(base_path, log)
    try:
        server.wait_ready(timeout=180)
        yield server
    finally:
        server.stop()


def keys(url: S3Url) -> list[str]:
    listing = object_store.client().list_objects_v2(Bucket=url.bucket, Prefix=url.key(""))
    return [obj["Key"] for obj in listing.get("Contents", [])]


def served_class(server: Server) -> int:
    return int(np.argmax(server.predict(images()).outputs["scores"].float_val))


def test_upload_puts_saved_model_pb_last_and_delete_takes_it_first(s3, templates):
    url = S3Url.parse(f"s3://{BUCKET}/order/mnist").child("1")
    uploaded = []
    s3_client = object_store.client()
    s3_client.meta.events.register(
        "before-parameter-build.s3.PutObject", lambda params, **_: uploaded.append(params["Key"])
    )
    try:
        object_store.upload_version(templates[3], url)
    finally:
        s3_client.meta.events.unregister("before-parameter-build.s3.PutObject")
    assert uploaded[-1] == url.key("saved_model.pb")
    assert len(uploaded) > 1 and object_store.version_exists(url)
    assert list(object_store.list_versions(S3Url.parse(f"s3://{BUCKET}/order/mnist"))) == [1]
    object_store.delete_version(url)
    assert keys(url) == [] and not object_store.version_exists(url)


def test_listing_skips_versions_without_saved_model_pb(s3, templates):
    base = S3Url.parse(f"s3://{BUCKET}/partial/mnist")
    object_store.upload_version(templates[3], base.child("1"))
    object_store.client().put_object(
        Bucket=BUCKET, Key=base.child("2").key("variables/variables.index"), Body=b"half"
    )
    object_store.client().put_object(Bucket=BUCKET, Key=base.key("notaversion/x"), Body=b"")
    assert list(object_store.list_versions(base)) == [1]
    # Two names for version 3, the first by name incomplete: the complete one is version 3.
    object_store.client().put_object(Bucket=BUCKET, Key=base.child("003").key("x"), Body=b"")
    object_store.upload_version(templates[7], base.child("03"))
    assert {v: r.url.prefix for v, r in object_store.list_versions(base).items()} == {
        1: base.child("1").prefix,
        3: base.child("03").prefix,
    }
    store = S3Store(f"s3://{BUCKET}/partial", "mnist")
    assert store.versions() == {1, 2, 3}
    # has_complete asks of the name push writes, 3, as in a directory store
    assert [store.has_complete(v) for v in (1, 2, 3)] == [True, False, False]


def test_server_serves_swaps_and_withdraws_versions_from_s3(s3, templates, tmp_path):
    base = S3Url.parse(f"s3://{BUCKET}/serve/mnist")
    object_store.upload_version(templates[3], base.child("1"))
    with serving(str(base), tmp_path / "server.log") as server:
        server.wait_for(lambda s: s.get(1, (0,))[0] == AVAILABLE, "version 1 from S3")
        np.testing.assert_allclose(
            server.predict(images()).outputs["scores"].float_val, expected_scores(3)[0], atol=1e-6
        )
        object_store.upload_version(templates[7], base.child("2"))
        server.wait_for(lambda s: s.get(2, (0,))[0] == AVAILABLE, "version 2 from S3")
        assert served_class(server) == 7
        object_store.delete_version(base.child("2"))  # a rollback: version 1 serves again
        server.wait_for(
            lambda s: s.get(1, (0,))[0] == AVAILABLE and s.get(2, (0,))[0] == END,
            "version 2 withdrawn, 1 back",
        )
        assert served_class(server) == 3


def test_an_unreachable_store_keeps_what_serves(templates, tmp_path):
    """The S3 endpoint goes away under a serving server (its own moto, stopped): the server keeps
    version 1 and says why, instead of unloading it as "no versions"."""
    base = S3Url.parse("s3://outage/mnist")
    with ExitStack() as stopped_last:
        with s3_server(tmp_path):
            object_store.client().create_bucket(Bucket="outage")
            object_store.upload_version(templates[3], base.child("1"))
            server = Server(str(base), tmp_path / "server.log")
            stopped_last.callback(server.stop)
            server.wait_ready(timeout=180)
            server.wait_for(lambda s: s.get(1, (0,))[0] == AVAILABLE, "version 1 from S3")
        # moto has stopped; the server runs on
        deadline = time.monotonic() + 60
        while "cannot read" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "cannot read s3://outage/mnist" in server.log()
        time.sleep(1)  # several more polls
        assert server.states()[1][0] == AVAILABLE
        assert served_class(server) == 3


def test_push_rolls_out_into_an_s3_store_and_withdraws_a_bad_version(s3, tmp_path):
    base = f"s3://{BUCKET}/push"
    exports = tmp_path / "exports" / "mnist"
    store = S3Store(base, "mnist")
    store.publish(saved_models.write_version(exports, 1, 1), 1)
    with serving(f"{base}/mnist", tmp_path / "server.log") as server:
        server.wait_for(lambda s: s.get(1, (0,))[0] == AVAILABLE, "version 1 from S3")
        cfg = PushConfig(
            model_base_path=base, replicas=[{"name": "s3", "grpc": f"127.0.0.1:{server.port}"}]
        )
        two = ExportResult("mnist", 2, saved_models.write_version(exports, 2, 2))
        report = push.fn(two, verdict(True, expected_scores(2, 2), 1), cfg)
        assert [r.outcome for r in report.replicas] == ["promoted"]
        assert served_class(server) == 2
        # Version 3 answers its canary images unlike validate said: withdrawn from S3 again.
        three = ExportResult("mnist", 3, saved_models.write_version(exports, 3, 3))
        with pytest.raises(PushError, match="canary images"):
            push.fn(three, verdict(True, expected_scores(4, 2), 2), cfg)
        assert store.versions() == {1, 2}
        server.wait_for(lambda s: s.get(3, (0,))[0] in (END, 0), "version 3 gone")
        assert served_class(server) == 2


# --- export into an s3:// base --------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(3)
    return build_model(ModelConfig(kind="mlp", hidden_units=8))


@pytest.fixture
def local_tmp(tmp_path, monkeypatch):
    """Exports keep their local copies under this test's directory, not the host's $TMPDIR."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def relative_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_claim_is_taken_once(s3):
    store = S3Store(f"s3://{BUCKET}/claims", "mnist")
    assert store.claim(5) and not store.claim(5)
    assert store.versions() == {5} and not store.has_complete(5)
    assert object_store.list_versions(store.root) == {}  # a claim is not a version to a server


def test_concurrent_exports_into_s3_get_distinct_complete_versions(
    s3, model, local_tmp, monkeypatch
):
    """Two exports at once, both scanning a stale "next is 3" where 3 is claimed (an export that
    died): each claim of 3 is refused, and one of them also loses 4 to the other."""
    exports = S3Store(f"s3://{BUCKET}/race", "mnist")
    serving = local_tmp / "serving"
    assert exports.claim(3)
    monkeypatch.setattr(export_module, "next_version", lambda *stores: 3)
    cfg = ExportConfig(base_path=f"s3://{BUCKET}/race", warmup_requests=1)
    results = exports_at_once(2, model, cfg, serving, images(2))
    assert sorted(r.version for r in results) == [4, 5]
    assert sorted(object_store.list_versions(exports.root)) == [4, 5]
    for result in results:
        version = exports.root.child(str(result.version))
        uploaded = {key.removeprefix(version.key("")) for key in keys(version)}
        assert uploaded == relative_files(result.path) | {".claim"}
        assert {"saved_model.pb", "variables/variables.index"} <= uploaded
        assert result.path.parent == exports.local_dir() and result.path.name == str(result.version)
        scores = tf.saved_model.load(str(result.path)).signatures["serving_default"](
            images=tf.constant(images(2))
        )["scores"]
        np.testing.assert_allclose(scores.numpy(), model.predict(images(2), verbose=0), atol=1e-6)
    assert sorted(p.name for p in exports.local_dir().iterdir()) == ["4", "5"]  # no staging left


def test_a_failed_upload_leaves_its_claim_and_no_version(s3, model, local_tmp):
    exports = S3Store(f"s3://{BUCKET}/broken", "mnist")
    cfg = ExportConfig(base_path=f"s3://{BUCKET}/broken", warmup_requests=1)

    def network_down(params, **_):
        if params["Key"].endswith("saved_model.pb"):
            raise ConnectionError("network down")

    s3_client = object_store.client()
    s3_client.meta.events.register("before-parameter-build.s3.PutObject", network_down)
    try:
        with pytest.raises(ConnectionError, match="network down"):
            export.fn(model, cfg, local_tmp / "serving", images(1))
    finally:
        s3_client.meta.events.unregister("before-parameter-build.s3.PutObject", network_down)
    assert keys(exports.root) == [exports.root.child("1").key(".claim")]
    claim = object_store.client().get_object(Bucket=BUCKET, Key=keys(exports.root)[0])
    assert json.loads(claim["Body"].read())["pid"] == os.getpid()
    assert list(exports.local_dir().iterdir()) == []  # no local copy, no staging left
    # Version 1 is never given again; a local copy of an earlier store's 2 is replaced.
    stale = exports.local_dir() / "2"
    stale.mkdir()
    (stale / "stale").write_text("from a bucket emptied since")
    result = export.fn(model, cfg, local_tmp / "serving", images(1))
    assert (result.version, result.path) == (2, stale)
    assert "stale" not in relative_files(stale) and (stale / "saved_model.pb").is_file()
    assert list(object_store.list_versions(exports.root)) == [2]


# --- a slow download under a server's controller ---------------------------------------------


def model_list(**base_paths: str) -> ModelServerConfig:
    config = ModelServerConfig()
    for name, base_path in base_paths.items():
        config.model_config_list.config.add(name=name, base_path=base_path)
    return config


def test_a_slow_download_holds_up_no_reload(s3, templates, tmp_path, monkeypatch):
    """A poll of an s3:// model stuck downloading its new version: a reload that adds a model
    applies and loads it meanwhile; the download then ends and its version loads too."""
    base = S3Url.parse(f"s3://{BUCKET}/slow/mnist")
    object_store.upload_version(templates[3], base.child("1"))
    manager = Manager(OneWorkerInProcess().load, enable_warmup=False)
    controller = ModelConfigController(manager)
    downloading, release = threading.Event(), threading.Event()
    manager.start()
    try:
        controller.start(single_model("remote", str(base)))
        object_store.upload_version(templates[7], base.child("2"))
        download = object_store.download

        def slow(url: S3Url, into: Path) -> None:
            downloading.set()
            assert release.wait(60)
            download(url, into)

        monkeypatch.setattr(object_store, "download", slow)
        poll = threading.Thread(target=controller.poll_sources)
        poll.start()
        assert downloading.wait(30)
        saved_models.copy_version(templates[3], tmp_path / "local", 1)
        reload = model_list(remote=str(base), local=str(tmp_path / "local"))
        controller.reload(reload, timeout_s=60)  # before the change: stuck behind the poll
        assert not release.is_set() and poll.is_alive()
        assert [s.state for s in manager.statuses("local")] == [State.AVAILABLE]
        release.set()
        poll.join(60)
        assert manager.wait_until_idle(60)
        assert {s.version: s.state for s in manager.statuses("remote")}[2] == State.AVAILABLE
    finally:
        release.set()
        manager.stop()
        controller.close()
