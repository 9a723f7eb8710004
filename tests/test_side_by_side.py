"""Ranking candidates side by side in one ONNX Runtime session (:mod:`compressor.flow.side_by_side`).

The tiny CNN and its quantization are those of ``tests/test_accuracy_control.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from compressor.targets.onnx import SharedInitializers
from onnx import TensorProto, helper

import compressor.flow.ranking as ranking
import compressor.flow.ranking_stage as ranking_stage
from compressor.data import load_npz
from compressor.flow.side_by_side import UNMERGED, side_by_side
from compressor.inputs import model_input_specs
from compressor.model_io import clone_model, ir_bytes
from compressor.quant.revert import give_back
from tests.test_accuracy_control import _quantize, _run, cnn, write_files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_files(tmp_path_factory.mktemp("acctl"))


GIVEN = [[], ["conv1"], ["conv2"], ["fc1"], ["fc2"], ["fc1", "conv2"]]


def test_copies_side_by_side_compute_what_each_computes_alone(files):
    """Bit for bit, with the quantized weights held once: nothing is merged across the copies."""
    quantized = _quantize(files)
    copies = [give_back(clone_model(quantized.model), quantized.quantization, given) for given in GIVEN]
    model, counts = side_by_side(copies)
    assert counts == [1] * len(GIVEN)
    int8 = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.INT8]
    assert len(int8) == len([v for v in quantized.model.graph.initializers.values() if v.dtype == ir.DataType.INT8])
    x = np.random.default_rng(5).standard_normal((8, 4, 6, 6)).astype(np.float32)
    shared = SharedInitializers(quantized.model, min_elements=16)
    together = shared.session(model, disabled=UNMERGED).run(None, {"x": x})
    for given, copy, out in zip(GIVEN, copies, together):
        np.testing.assert_array_equal(out, _run(copy, x), err_msg=str(given))


def test_the_ranking_errors_of_one_session_are_those_of_one_session_each(files):
    quantized = _quantize(files)
    data = load_npz(files["eval"], model_input_specs(cnn()))
    shared = {"quantized": ir_bytes(quantized.model), "record": quantized.quantization, "mode": "float", "post": [],
              "runtime": "onnxruntime", "data": data, "ref": [_run(cnn(), np.load(files["eval"])["x"])]}
    candidates = [frozenset(given) for given in GIVEN]
    try:
        alone = [ranking.candidate_error(given, shared) for given in candidates]
        assert ranking.candidate_errors(candidates, shared) == alone
    finally:
        ranking.release_decoded()


def _with_subgraph() -> ir.Model:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y_then"])], "then", [],
                               [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch, else_branch=other)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_copies_that_cannot_be_combined_are_refused_not_half_combined(files):
    quantized = _quantize(files)
    assert side_by_side([_with_subgraph(), _with_subgraph()]) is None, "a subgraph reads the outer graph's values"
    other = clone_model(quantized.model)
    other.graph.inputs[0].name = "z"
    assert side_by_side([quantized.model, other]) is None, "inputs that differ"
    other = clone_model(quantized.model)
    other.opset_imports[""] = 21
    assert side_by_side([quantized.model, other]) is None, "opsets that differ (a 16-bit give-back converts to 21)"


def test_a_session_of_copies_side_by_side_is_one_session(files, monkeypatch):
    """On one CPU, under the byte cap, a stage is one session (on more, one per CPU: tests/test_ranking_stage.py)."""
    monkeypatch.setattr(ranking_stage, "usable_cpus", lambda: 1)
    quantized = _quantize(files)
    data = load_npz(files["eval"], model_input_specs(cnn()))
    shared = {"quantized": ir_bytes(quantized.model), "record": quantized.quantization, "mode": "float", "post": [],
              "runtime": "onnxruntime", "data": data, "ref": [_run(cnn(), np.load(files["eval"])["x"])]}
    built = []
    real = SharedInitializers.session
    monkeypatch.setattr(SharedInitializers, "session", lambda self, *a, **k: built.append(1) or real(self, *a, **k))
    try:
        errors = ranking.candidate_errors([frozenset(given) for given in GIVEN], shared)
    finally:
        ranking.release_decoded()
    assert len(built) == 1 and len(errors) == len(GIVEN)
