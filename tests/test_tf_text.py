"""A SavedModel whose graph uses TF Text's ops loads and serves, as in TF Serving (whose binary
links those ops in): our server registers them when its workers import TensorFlow
(``serving.tf_runtime``)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_text as tf_text
from tensorflow.core.protobuf import saved_model_pb2

from tests.servers import AVAILABLE

pytestmark = pytest.mark.slow


def _export_tokenizer(path: Path) -> None:
    """``text`` string [N] -> ``tokens`` string [N, longest] (padded with "") and ``counts``
    int64 [N], split on whitespace by TF Text's ``WhitespaceTokenizer``."""

    class Tokenizer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
            tokens = tf_text.WhitespaceTokenizer().tokenize(text)
            return {"tokens": tokens.to_tensor(default_value=""), "counts": tokens.row_lengths()}

    module = Tokenizer()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def _op_types(saved_model_dir: Path) -> set[str]:
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    (meta_graph,) = saved_model.meta_graphs
    graph = meta_graph.graph_def
    return {node.op for node in graph.node} | {
        node.op for function in graph.library.function for node in function.node_def
    }


def test_model_with_tf_text_ops_serves(tmp_path: Path, start_server) -> None:
    base = tmp_path / "tokenizer"
    _export_tokenizer(base / "1")
    # The model needs an op that only TF Text registers: it tests the registration.
    text_ops = {op for op in _op_types(base / "1") if "WhitespaceTokenize" in op}
    assert text_ops, "the tokenizer's graph has no TF Text op"

    server = start_server(base, model_name="tokenizer")
    server.wait_for(lambda states: states.get(1, (0,))[0] == AVAILABLE, "version 1 AVAILABLE")
    text = np.array([b"a bb  ccc", b"one", b""], dtype=object)
    response = server.predict(None, inputs={"text": text})

    tokens = tf.make_ndarray(response.outputs["tokens"])
    counts = tf.make_ndarray(response.outputs["counts"])
    assert tokens.tolist() == [[b"a", b"bb", b"ccc"], [b"one", b"", b""], [b"", b"", b""]]
    assert counts.tolist() == [3, 1, 0]
    assert response.model_spec.version.value == 1
