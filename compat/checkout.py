"""A TF Serving source tree to run upstream code from: a checkout the user names, or files of a
git directory's commit written out under a scratch directory.

``git archive`` would be the obvious export, but it stops at the first blob the repository does
not hold, and a mirror may lack its largest files (e.g. testdata/tf_text_regression's
``saved_model.pb``). The export here writes every blob it can read and returns the paths of those
it could not, so that a caller can say which tests lack their data.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MIRROR = Path("/work/.mirror/tensorflow+serving/repo")
_SYMLINK_MODE = "120000"
_EXECUTABLE_MODE = "100755"


@dataclass(frozen=True)
class Source:
    root: Path  # holds tensorflow_serving/
    description: str  # for a report's first line: where the code came from
    missing: tuple[str, ...] = ()  # files of the commit that the git directory does not hold


def source_tree(serving_src: Path | None, scratch: Path, paths: Sequence[str]) -> Source:
    """``serving_src`` as it is, or ``paths`` of the mirror's HEAD exported under ``scratch``."""
    if serving_src is not None:
        root = Path(serving_src).resolve()
        if not (root / "tensorflow_serving").is_dir():
            raise SystemExit(f"--serving-src {root}: no tensorflow_serving/ directory in it")
        return Source(root, f"TF Serving checkout {root}")
    if not MIRROR.is_dir():
        raise SystemExit(f"no TF Serving mirror at {MIRROR}: pass --serving-src PATH")
    commit = _git(MIRROR, "rev-parse", "HEAD").decode().strip()
    missing = export_commit(MIRROR, commit, paths, scratch)
    return Source(scratch, f"TF Serving {commit[:12]} (mirror {MIRROR})", tuple(missing))


def export_commit(git_dir: Path, commit: str, paths: Sequence[str], dest: Path) -> list[str]:
    """Write the files under ``paths`` at ``commit`` into ``dest``; return those whose blobs
    ``git_dir`` does not hold."""
    entries = []
    for record in _git(git_dir, "ls-tree", "-r", "-z", commit, "--", *paths).split(b"\0"):
        if record:
            meta, path = record.split(b"\t", 1)
            mode, kind, sha = meta.decode().split()
            if kind == "blob":
                entries.append((mode, sha, path.decode()))
    blobs = _read_blobs(git_dir, [sha for _, sha, _ in entries])
    missing = []
    for mode, sha, path in entries:
        content = blobs.get(sha)
        if content is None:
            missing.append(path)
            continue
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == _SYMLINK_MODE:
            os.symlink(content.decode(), target)
            continue
        target.write_bytes(content)
        if mode == _EXECUTABLE_MODE:
            target.chmod(0o755)
    return missing


def _read_blobs(git_dir: Path, shas: Sequence[str]) -> dict[str, bytes]:
    """The blobs of ``shas`` that ``git_dir`` holds, read by one ``git cat-file --batch``."""
    out = subprocess.run(
        ["git", f"--git-dir={git_dir}", "cat-file", "--batch"],
        input="".join(f"{sha}\n" for sha in shas).encode(),
        capture_output=True,
        check=True,
    ).stdout
    blobs, offset = {}, 0
    while offset < len(out):
        end = out.index(b"\n", offset)
        header = out[offset:end].decode().split()
        offset = end + 1
        if header[-1] == "missing":
            continue
        size = int(header[2])
        blobs[header[0]] = out[offset : offset + size]
        offset += size + 1  # the content, then a newline
    return blobs


def _git(git_dir: Path, *args: str) -> bytes:
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], capture_output=True, check=True
    ).stdout
