"""How the server uses TensorFlow's runtime beyond a plain ``import``: the two places that a
TensorFlow upgrade, or a new process that imports TensorFlow, must be checked against.

- ``import_tensorflow_for_serving`` imports TensorFlow, registers TF Text's ops, and sets, for the
  whole process, the oneDNN default, the garbage collector's view of TensorFlow's objects and its
  thresholds: what a serving process wants, and what tools that import TensorFlow for other ends
  (training, export) must not get. Each setting is its own function below, with the
  measurements that chose it. Call it once per serving process, before the first version loads.
- ``session_config`` is the ConfigProto every version's session runs with: TF Serving's session
  flags over our default of running a graph's ops in the calling thread.
- ``session_callable`` is the one use of a private TensorFlow API, the fast C++ session callable,
  with the public ``Session.make_callable`` as its fallback where the private method is gone or
  has changed: an upgrade then costs speed, and the feeds of a shape their placeholder does not
  admit (which TF Serving runs, and the fast callable too) fail with INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from serving import textproto
from serving.types import SessionSettings

log = logging.getLogger("serving.tf_runtime")

DEFAULT_SESSION = SessionSettings()

# Runs the session: the feed arrays positionally, the fetched arrays back in fetch order.
SessionCallable = Callable[..., Sequence[np.ndarray]]


def import_tensorflow_for_serving() -> None:
    """Import TensorFlow once with TF Text's ops, and move its objects out of the garbage
    collector's sight.

    Sets process-global state, each setting with its reasons below: TensorFlow's own kernels
    rather than oneDNN's (``_prefer_eigen_kernels``), TF Text's ops registered
    (``_register_text_ops``), TensorFlow's objects frozen out of the collector
    (``_freeze_imported_objects``), the young generation collected less often
    (``_collect_young_objects_less_often``). Call it before the first version loads, so no
    version's objects are frozen with TensorFlow's.
    """
    _prefer_eigen_kernels()
    import tensorflow  # noqa: F401

    _register_text_ops()
    _freeze_imported_objects()
    _collect_young_objects_less_often()


def _prefer_eigen_kernels() -> None:
    """TensorFlow's kernels are its own (Eigen) unless the user sets ``TF_ENABLE_ONEDNN_OPTS=1``,
    as in TF Serving's standard (non-MKL) build: for serving-sized calls oneDNN's per-call
    overhead costs more than it saves (MNIST softmax, in-process: batch 1 17 -> 11 us, batch 64
    130 -> 37 us, batch 128 175 -> 151 us without it). A model whose big kernels gain from oneDNN
    can have it back with the variable. Read when TensorFlow is imported: set before."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _register_text_ops() -> None:
    """TF Serving's binary links TF Text's ops in (its ``model_servers/BUILD``), so that a
    SavedModel which tokenizes in its graph loads; without them its load fails with "Op type not
    registered". Importing ``tensorflow_text`` registers them all before any load, rather than
    only after a load failed on one (a second path, and a first load that fails for nothing); it
    adds a small fraction to a worker's start time and memory (its op libraries' code is page
    cache that the workers share)."""
    import tensorflow_text  # noqa: F401


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


@functools.cache  # one parse per worker: every load asks with the same settings
def session_config(settings: SessionSettings = DEFAULT_SESSION) -> Any:
    """The ``tf.compat.v1.ConfigProto`` of a version's session; ``ValueError`` naming
    ``--tensorflow_session_config_file`` when its text does not parse (the worker asks once at
    startup, so that a bad file stops the server).

    Built as TF Serving builds it: the config file, then the flags over it (a GPU memory fraction,
    the thread counts), except that a thread flag left at 0 keeps the file's value instead of
    resetting it to "auto", and that inter-op parallelism defaults to -1: the graph's ops run in
    the calling thread. Every call already comes from a thread of ours (the data plane's pool or
    a batch), and handing the graph to TensorFlow's inter-op pool and waiting for it costs thread
    wake-ups on every call; intra-op parallelism (one op on several cores) stays TensorFlow's.
    The answer is shared: callers must not change it.
    """
    from tensorflow.core.protobuf import config_pb2

    config = textproto.parse(
        settings.config_text,
        config_pb2.ConfigProto(),
        f"--tensorflow_session_config_file: {settings.config_file}",
    )
    if not config.inter_op_parallelism_threads:  # unset in the file (or 0, "auto")
        config.inter_op_parallelism_threads = -1
    if settings.intra_op_parallelism:
        config.intra_op_parallelism_threads = settings.intra_op_parallelism
    if settings.inter_op_parallelism:
        config.inter_op_parallelism_threads = settings.inter_op_parallelism
    if settings.per_process_gpu_memory_fraction:
        config.gpu_options.per_process_gpu_memory_fraction = (
            settings.per_process_gpu_memory_fraction
        )
    return config


def session_callable(session: Any, feeds: Sequence[str], fetches: Sequence[str]) -> SessionCallable:
    """A callable that runs ``session`` from the ``feeds`` graph tensors (its arguments, in this
    order) to the ``fetches`` (its answer, in this order).

    C++ ``Session::MakeCallable`` through ``_make_callable_from_options`` (what Keras's TF1
    backend uses), not the public ``make_callable``: with a feed list, that one goes through
    all of ``Session.run``'s Python feed and fetch handling each call (~150 us under the GIL
    at batch 1, several times the graph itself). Feeds must then be arrays of the placeholder's
    dtype; their shape is the graph's to take or refuse, as in TF Serving. Where the private
    method is missing or takes other arguments (a TensorFlow upgrade), the public one answers the
    same, slower, except that its ``Session.run`` refuses (``ValueError``) a feed whose shape the
    placeholder's does not admit; logged once, as a WARNING.
    """
    from tensorflow.core.protobuf import config_pb2

    try:
        return session._make_callable_from_options(
            config_pb2.CallableOptions(feed=feeds, fetch=fetches)
        )
    except (AttributeError, TypeError) as e:
        _log_public_callable_fallback(f"{type(e).__name__}: {e}")
    return session.make_callable(list(fetches), feed_list=list(feeds))


@functools.cache
def _log_public_callable_fallback(reason: str) -> None:
    """Once per reason: every callable of a process fails the same way, one line says it all."""
    log.warning(
        "Session._make_callable_from_options unavailable (%s): using the public "
        "Session.make_callable (~150 us more per batch-1 model call)",
        reason,
    )
