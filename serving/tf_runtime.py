"""Importing TensorFlow for a serving process, and the process-global state that goes with it.

``import_tensorflow_for_serving`` imports TensorFlow and sets, for the whole process, the oneDNN
default, the garbage collector's view of TensorFlow's objects and its thresholds: what a serving
process wants, and what tools that import TensorFlow for other ends (training, export) must not
get. Each setting is its own function below, with the measurements that chose it. Call it once
per serving process, before the first version loads.
"""

from __future__ import annotations

import gc
import os


def import_tensorflow_for_serving() -> None:
    """Import TensorFlow once, and move its objects out of the garbage collector's sight.

    Sets process-global state, each setting with its reasons below: TensorFlow's own kernels
    rather than oneDNN's (``_prefer_eigen_kernels``), TensorFlow's objects frozen out of the
    collector (``_freeze_imported_objects``), the young generation collected less often
    (``_collect_young_objects_less_often``). Call it before the first version loads, so no
    version's objects are frozen with TensorFlow's.
    """
    _prefer_eigen_kernels()
    import tensorflow  # noqa: F401

    _freeze_imported_objects()
    _collect_young_objects_less_often()


def _prefer_eigen_kernels() -> None:
    """TensorFlow's kernels are its own (Eigen) unless the user sets ``TF_ENABLE_ONEDNN_OPTS=1``,
    as in TF Serving's standard (non-MKL) build: for serving-sized calls oneDNN's per-call
    overhead costs more than it saves (MNIST softmax, in-process: batch 1 17 -> 11 us, batch 64
    130 -> 37 us, batch 128 175 -> 151 us without it). A model whose big kernels gain from oneDNN
    can have it back with the variable. Read when TensorFlow is imported: set before."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _freeze_imported_objects() -> None:
    """TensorFlow's ~400k module-level objects live as long as the process. Every unload runs a
    full ``gc.collect`` (routing: to free the closed graph's reference cycles), which would walk
    them all, ~190 ms holding the GIL: a stall every in-flight request waited out (benchmark d).
    Frozen, the collection walks only what was created since (the servables) and takes ~1 ms."""
    gc.freeze()


def _collect_young_objects_less_often() -> None:
    """The young generation is collected every 20,000 allocations instead of 700: a request
    allocates dozens of container objects that die with it, and the fewer collections find
    nearly all of them gone already (REST at 64 concurrent, 2 workers: 1.04x requests/s in a
    paired run, all four rounds ahead, with the older generations collected after 20 of the
    younger's collections instead of 10). Cyclic garbage lives a little longer; unloads still
    collect in full."""
    gc.set_threshold(20_000, 20, 20)
