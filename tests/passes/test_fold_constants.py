"""Tests of ``fold-constants``: structure, stats, signature and numerics."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes.fold_constants import FoldConstants

from compressor import pipeline
from compressor.errors import OptionsError
from compressor.model_io import to_proto
from compressor.pipeline import PassContext
from tests.ortutil import (
    assert_same_outputs,
    model_from_text,
    op_counts,
    random_feeds,
    run_ort,
)

CONSTANT_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,3] y, float[2,3] z) {
  shape = Constant <value = int64[2] {4, 3}> ()
  w0 = ConstantOfShape <value = float[1] {0.5}> (shape)
  two = Constant <value = float {2.0}> ()
  w1 = Mul(w0, two)
  w = Add(w1, offset)
  h = MatMul(x, w)
  y = Relu(h)
  dead = Neg(w)
  z = Identity(h)
}
"""


def _chain_model() -> ir.Model:
    offset = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    return model_from_text(CONSTANT_CHAIN, offset=offset)


def _run(model: ir.Model, **options):
    return FoldConstants(options or None).run(model, PassContext())


def test_registered_with_contract():
    # The registry itself, not get_pass(): that imports every pass module, and a broken
    # neighbour should not fail this file.
    cls = pipeline._REGISTRY["fold-constants"]
    assert cls is FoldConstants
    assert cls.provides == frozenset({"constants-folded"})
    assert cls.description


def test_folds_constant_subgraph_into_initializer():
    model = _chain_model()
    feeds = random_feeds(model)
    before = run_ort(model, feeds)

    result = _run(model)

    assert result.modified
    ops = op_counts(result.model)
    for gone in ("Constant", "ConstantOfShape", "Mul", "Add", "Neg"):
        assert ops[gone] == 0, ops
    assert ops["MatMul"] == 1 and ops["Relu"] == 1
    assert result.stats["nodes_before"] == 9
    assert result.stats["nodes_after"] == sum(ops.values())
    assert result.stats["initializers"] == len(result.model.graph.initializers)
    weight = next(n for n in result.model.graph if n.op_type == "MatMul").inputs[1]
    assert weight.is_initializer()
    assert_same_outputs(before, run_ort(result.model, feeds), rtol=0, atol=0)


def test_keeps_graph_input_and_output_names():
    model = _chain_model()
    result = _run(model)
    assert [v.name for v in result.model.graph.inputs] == ["x"]
    assert [v.name for v in result.model.graph.outputs] == ["y", "z"]


def test_nothing_to_fold_is_unmodified():
    model = model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) {
      a = Relu(x)
      y = Sigmoid(a)
    }
    """)
    result = _run(model)
    assert not result.modified
    assert result.stats == {"nodes_before": 2, "nodes_after": 2, "initializers": 0, "initializer_inputs_removed": 0}


def test_quantize_dequantize_are_kept():
    model = model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,4] x) => (float[2,3] y) {
      wq = QuantizeLinear(w, s, zp)
      wd = DequantizeLinear(wq, s, zp)
      y = MatMul(x, wd)
    }
    """, w=np.ones((4, 3), np.float32), s=np.array(0.1, np.float32), zp=np.array(0, np.int8))
    result = _run(model)
    ops = op_counts(result.model)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1


def test_size_limit_keeps_large_constant_of_shape():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,512] x) => (float[1,1024] y) {
      shape = Constant <value = int64[2] {512, 1024}> ()
      w = ConstantOfShape <value = float[1] {0.01}> (shape)
      y = MatMul(x, w)
    }
    """
    small = _run(model_from_text(text), max_folded_mb=1.0)  # the weight is 2 MiB
    assert op_counts(small.model)["ConstantOfShape"] == 1
    large = _run(model_from_text(text), max_folded_mb=4.0)
    assert op_counts(large.model)["ConstantOfShape"] == 0
    assert large.model.graph.node(0).inputs[1].const_value.shape == (512, 1024)


def _initializer_input_model(ir_version: int) -> ir.Model:
    model = model_from_text(f"""
    <ir_version: {ir_version}, opset_import: ["" : 9]>
    g (float[2,3] x, float[3] b) => (float[2,3] y) {{
      s = Mul(b, b)
      y = Add(x, s)
    }}
    """, b=np.arange(3, dtype=np.float32))
    model.ir_version = ir_version
    return model


def test_ir3_initializer_inputs_are_constants():
    model = _initializer_input_model(3)
    assert model.graph.inputs[1].is_initializer()
    result = _run(model)
    assert [v.name for v in result.model.graph.inputs] == ["x"]
    assert result.stats["initializer_inputs_removed"] == 1
    assert op_counts(result.model) == {"Add": 1}
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], x + np.arange(3) ** 2)


def test_initializer_inputs_policy():
    kept = _run(_initializer_input_model(8), initializer_inputs="keep")
    assert [v.name for v in kept.model.graph.inputs] == ["x", "b"]
    assert op_counts(kept.model) == {"Mul": 1, "Add": 1}
    auto_ir8 = _run(_initializer_input_model(8), initializer_inputs="auto")
    assert [v.name for v in auto_ir8.model.graph.inputs] == ["x", "b"]
    old_file = _initializer_input_model(3)
    assert to_proto(old_file).ir_version >= 8 and old_file.ir_version == 3  # serialising leaves the model alone
    auto_ir3 = _run(old_file, initializer_inputs="auto")
    assert [v.name for v in auto_ir3.model.graph.inputs] == ["x"]
    removed = _run(_initializer_input_model(8))  # the default
    assert [v.name for v in removed.model.graph.inputs] == ["x"]
    assert op_counts(removed.model) == {"Add": 1}


def test_options_are_validated():
    with pytest.raises(OptionsError, match="max_folded_mb"):
        FoldConstants({"max_folded_mib": 3})
    with pytest.raises(OptionsError, match="positive"):
        FoldConstants({"max_folded_mb": 0})
    with pytest.raises(OptionsError):
        FoldConstants({"initializer_inputs": "sometimes"})


def test_light_resnet50_weights_become_initializers(light_resnet50_path):
    model = ir.load(str(light_resnet50_path))
    assert op_counts(model)["ConstantOfShape"] == 239
    feeds = random_feeds(model)
    before = run_ort(model, feeds)

    result = _run(model)

    ops = op_counts(result.model)
    assert ops["ConstantOfShape"] == 0
    assert ops["BatchNormalization"] == 53 and ops["Conv"] == 53
    assert [v.name for v in result.model.graph.inputs] == ["gpu_0/data_0"]
    assert [v.name for v in result.model.graph.outputs] == ["gpu_0/softmax_1"]
    for conv in (n for n in result.model.graph if n.op_type == "Conv"):
        assert conv.inputs[1].is_initializer() and not conv.inputs[1].is_graph_input()
    assert result.stats["nodes_after"] == 176
    assert_same_outputs(before, run_ort(result.model, feeds), rtol=1e-5, atol=1e-6)


SEQUENCES = """
<ir_version: 7, opset_import: ["" : {opset}]>
g (float[2,3] x, float[2,3] y, int64[2] splits) => (float[2,3,2] stacked, int64 count) {{
  seq = SequenceConstruct(x, y)
  stacked = ConcatFromSequence <axis = -1, new_axis = 1> (seq)
  parts = SplitToSequence <axis = 0> (x, splits)
  count = SequenceLength(parts)
}}
"""


@pytest.mark.parametrize("opset", [12, 18])
def test_sequence_rewrites_match_the_opset(opset):
    """onnxscript rewrites ConcatFromSequence/SplitToSequence with opset-13+ Unsqueeze/Split
    whatever the opset: withheld for older models (they made opset-12 graphs invalid)."""
    from compressor.model_io import verify_model

    model = model_from_text(SEQUENCES.format(opset=opset))
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": -np.ones((2, 3), np.float32),
             "splits": np.array([1, 1], np.int64)}
    before = run_ort(model, feeds)
    result = _run(model)
    verify_model(result.model, strict_shapes=True)
    assert_same_outputs(before, run_ort(result.model, feeds))
    ops = op_counts(result.model)
    if opset < 13:
        assert ops["ConcatFromSequence"] == 1 and ops["SplitToSequence"] == 1
    else:
        assert ops["ConcatFromSequence"] == 0, "the rewrite is withheld only while it runs on an older model"
