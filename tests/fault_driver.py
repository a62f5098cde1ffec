"""One pipeline step in a process of its own, for ``tests/test_faults.py`` to SIGKILL or to starve
of disk space:

    python -m tests.fault_driver ACTION JSON

* ``export`` ``{"base_path", "serving_base_path"}``: a small Keras MLP through ``tasks.export``;
* ``publish`` ``{"export_path", "version", "model_base_path"}``:
  ``tasks.model_store.LocalStore.publish``;
* ``push`` ``{"export_path", "version", "baseline", "push": {PushConfig keys}}``:
  ``tasks.push.push`` of a ``tests.saved_models`` version that answers ``version % 10``.

Optional keys: ``"pause_s"`` holds the step at a point inside it (export: before the warmup file,
with the SavedModel half written under its staging name; publish: after the first file copied),
so that the test's SIGKILL lands there; ``"file_size_limit"`` sets RLIMIT_FSIZE to that many bytes,
SIGXFSZ ignored, so that a larger write fails with EFBIG as on a full disk. It prints one JSON line,
``{"version": n}`` or ``{"error": class name, "message": text}``, and exits 0 or 1.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action would kill the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def _pause_after_first_copy(pause_s: float) -> None:
    copy2 = shutil.copy2

    def copy_then_pause(source: str, destination: str, **kwargs: object) -> object:
        result = copy2(source, destination, **kwargs)
        time.sleep(pause_s)
        return result

    shutil.copy2 = copy_then_pause


def export(args: dict) -> int:
    import numpy as np

    import tasks.export as export_module
    from tasks.config import ExportConfig, ModelConfig
    from tasks.train import build_model

    if args.get("pause_s"):
        write_warmup = export_module._write_warmup

        def pause_then_write(*a: object) -> object:
            time.sleep(args["pause_s"])
            return write_warmup(*a)

        export_module._write_warmup = pause_then_write
    model = build_model(ModelConfig(kind="mlp", hidden_units=16))
    cfg = ExportConfig(base_path=args["base_path"], warmup_requests=1)
    images = np.zeros((1, 784), np.float32)
    return export_module.export.fn(model, cfg, Path(args["serving_base_path"]), images).version


def publish(args: dict) -> int:
    from tasks.model_store import LocalStore

    if args.get("pause_s"):
        _pause_after_first_copy(args["pause_s"])
    LocalStore(args["model_base_path"], "mnist").publish(Path(args["export_path"]), args["version"])
    return args["version"]


def push(args: dict) -> int:
    from tasks.config import PushConfig
    from tasks.export import ExportResult
    from tasks.push import push
    from tests.saved_models import expected_scores
    from tests.test_push import verdict

    exported = ExportResult("mnist", args["version"], Path(args["export_path"]))
    blessed = verdict(True, expected_scores(args["version"] % 10, 2), args["baseline"])
    return push.fn(exported, blessed, PushConfig(**args["push"])).version


def main(action: str, arguments: str) -> int:
    args = json.loads(arguments)
    if "file_size_limit" in args:
        import tasks.export  # noqa: F401 -- imported (bytecode caches written) before the limit
        import tasks.push  # noqa: F401

        _limit_file_size(args["file_size_limit"])
    try:
        version = {"export": export, "publish": publish, "push": push}[action](args)
    except Exception as error:
        print(json.dumps({"error": type(error).__name__, "message": str(error)}), flush=True)
        return 1
    print(json.dumps({"version": version}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
