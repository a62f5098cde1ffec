"""compat/: the checkout export (blobs the git directory lacks are reported, not fatal), the test
list read from source, the stand-in binary running our server, and process groups stopped whole.
TF Serving's tests themselves run with ``python -m compat.upstream_tests``, not here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from compat import upstream_tests
from compat.checkout import Source, export_commit
from compat.processes import start_group, stop_group
from compat.upstream_tests import Layout, prepare

TESTDATA = "tensorflow_serving/servables/tensorflow/testdata"


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t")
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, check=True, text=True, env=env
    ).stdout.strip()


def test_export_writes_the_commit_and_reports_absent_blobs(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "a" / "data").mkdir(parents=True)
    (repo / "a" / "text.py").write_text("print('hi')\n")
    (repo / "a" / "data" / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (repo / "a" / "run.sh").write_text("#!/bin/sh\n")
    (repo / "a" / "run.sh").chmod(0o755)
    (repo / "a" / "big.pb").write_bytes(b"absent from the mirror")
    (repo / "outside.txt").write_text("not asked for")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "x")
    big = _git(repo, "rev-parse", "HEAD:a/big.pb")
    (repo / ".git" / "objects" / big[:2] / big[2:]).unlink()  # as a mirror without large files

    dest = tmp_path / "out"
    missing = export_commit(repo / ".git", _git(repo, "rev-parse", "HEAD"), ["a"], dest)

    assert missing == ["a/big.pb"]
    assert (dest / "a" / "text.py").read_text() == "print('hi')\n"
    assert (dest / "a" / "data" / "blob.bin").read_bytes() == bytes(range(256)) * 4
    assert os.access(dest / "a" / "run.sh", os.X_OK)
    assert not (dest / "a" / "big.pb").exists() and not (dest / "outside.txt").exists()


def test_test_names_are_the_test_methods_in_unittest_order(tmp_path: Path) -> None:
    source = tmp_path / "t.py"
    source.write_text(
        "class Other:\n  def testNo(self): pass\n"
        "class TensorflowModelServerTest(Base):\n"
        "  def test_b(self): pass\n  def testZ(self): pass\n  def _TestHelper(self): pass\n"
        "  def setUp(self): pass\n  def testA(self): pass\n"
    )
    assert upstream_tests.test_names(source) == ["testA", "testZ", "test_b"]


def test_stand_in_binary_runs_our_server_with_the_arguments_as_given(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    base = checkout / "tensorflow_serving/model_servers/test_util"
    base.mkdir(parents=True)
    (base / "tensorflow_model_server_test_base.py").write_text("BASE = 1\n")
    (checkout / TESTDATA).mkdir(parents=True)
    layout = Layout(tmp_path / "work")
    prepare(Source(checkout, "test checkout"), layout)

    tf_serving = layout.srcdir / "tf_serving/tensorflow_serving"
    assert (tf_serving / "servables/tensorflow/testdata").resolve() == (checkout / TESTDATA)
    binary = tf_serving / "model_servers/tensorflow_model_server"
    answer = subprocess.run([binary, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr
    assert "--num_workers" in answer.stdout  # our own flag: it is our server that answered
    overlay = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u; "
            "assert u.find_spec('tensorflow_serving.apis.predict_pb2'); "
            "from tensorflow_serving.model_servers.test_util import "
            "tensorflow_model_server_test_base as b; print(b.BASE)",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(layout.python)),
        cwd=tmp_path,
    )
    assert overlay.stdout.strip() == "1", overlay.stderr


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_stop_group_stops_what_the_leader_left_behind(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # A child that ignores SIGTERM, and a grandchild orphaned when its parent exits.
    script = (
        f"(trap '' TERM; sleep 300) & echo $! >> {pids}; (sleep 300 & echo $! >> {pids}) ; wait"
    )
    leader = start_group(["sh", "-c", script], tmp_path / "log", os.environ, tmp_path)
    deadline = time.monotonic() + 10
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = [int(pid) for pid in pids.read_text().split()]
    assert all(_alive(pid) for pid in started)

    stop_group(leader, grace_s=1)

    assert leader.returncode is not None
    assert not any(_alive(pid) for pid in started)
