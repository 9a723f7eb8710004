"""Node units without weights on the ``onnx`` target: SiLU, Concat and residual Add run in int8.

ONNX Runtime's QDQ selectors (``qdq_selector_action_transformer.cc``) fuse
``DQ(x) -> Sigmoid -> Q`` into QLinearSigmoid, ``DQ, DQ -> Mul/Add -> Q`` into
QLinearMul/QLinearAdd and ``DQ... -> Concat -> Q`` into QLinearConcat. Checked on the
graph ONNX Runtime itself optimizes (``optimized_model_filepath``): the ops are there, they
read each other's uint8 outputs directly (each output pair is the next unit's input pair:
the fusions chain), and no float compute op reads a DequantizeLinear except a layer whose
output is the graph output. Numerics: the SQNR floor of ``test_output_qdq.py`` (~40 dB per
rounded 8-bit activation tensor, ~34 dB per 7-bit weight, noises adding in power).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from compressor.model_io import to_proto
from compressor.quant.revert import give_back
from tests.ortutil import model_from_text, run_ort
from tests.passes.test_output_qdq import (
    HEADER,
    _clone,
    _dataset,
    _floor_db,
    _normal,
    _ort_optimized,
    _quantize,
    _sqnr_db,
    _w,
)

#: Float ops that must not read a DequantizeLinear in the optimized graph ("DQ + float").
_FLOAT_ON_DQ = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "Sigmoid", "Mul", "Add", "Concat",
                          "QuickGelu"})


def silu_net(rng: np.random.Generator, mid: int = 16) -> ir.Model:
    """Conv -> SiLU (``a * Sigmoid(a)``) -> Conv (``mid`` channels) -> Relu -> Conv (the graph output).

    16 output channels: fewer stay float on ``onnx`` (``OpQuant.min_output_channels``)."""
    return model_from_text(f"""{HEADER}
    g (float[N,4,8,8] x) => (float[N,16,8,8] y) {{
      [conv1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      [sig] s = Sigmoid (a)
      [silu] m = Mul (a, s)
      [conv2] c = Conv <pads=[1,1,1,1]> (m, w2, b2)
      r = Relu (c)
      [conv3] y = Conv <pads=[1,1,1,1]> (r, w3, b3)
    }}""", w1=_w(rng, 16, 4, 3, 3), b1=_w(rng, 16) * 0.1, w2=_w(rng, mid, 16, 3, 3), b2=_w(rng, mid) * 0.1,
        w3=_w(rng, 16, mid, 3, 3), b3=_w(rng, 16) * 0.1)


def concat_net(rng: np.random.Generator) -> ir.Model:
    """Two Conv-Relu branches, Concat, Conv-Relu, Conv (the graph output)."""
    return model_from_text(f"""{HEADER}
    g (float[N,4,8,8] x) => (float[N,16,8,8] y) {{
      [conv1] a1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
      r1 = Relu (a1)
      [conv2] a2 = Conv <pads=[1,1,1,1]> (x, w2, b2)
      r2 = Relu (a2)
      [cat] k = Concat <axis=1> (r1, r2)
      [conv3] c = Conv <pads=[1,1,1,1]> (k, w3, b3)
      r3 = Relu (c)
      [conv4] y = Conv <pads=[1,1,1,1]> (r3, w4, b4)
    }}""", w1=_w(rng, 16, 4, 3, 3), b1=_w(rng, 16) * 0.1, w2=_w(rng, 16, 4, 3, 3), b2=_w(rng, 16) * 0.1,
        w3=_w(rng, 16, 32, 3, 3), b3=_w(rng, 16) * 0.1, w4=_w(rng, 16, 16, 3, 3), b4=_w(rng, 16) * 0.1)


def residual_net(rng: np.random.Generator) -> ir.Model:
    """Conv-Relu, Conv, residual Add of the two, Conv-Relu, Conv (the graph output)."""
    return model_from_text(f"""{HEADER}
    g (float[N,4,8,8] x) => (float[N,16,8,8] y) {{
      [conv1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      r = Relu (a)
      [conv2] b = Conv <pads=[1,1,1,1]> (r, w2, b2)
      [res] s = Add (r, b)
      [conv3] c = Conv <pads=[1,1,1,1]> (s, w3, b3)
      r3 = Relu (c)
      [conv4] y = Conv <pads=[1,1,1,1]> (r3, w4, b4)
    }}""", w1=_w(rng, 16, 4, 3, 3), b1=_w(rng, 16) * 0.1, w2=_w(rng, 16, 16, 3, 3), b2=_w(rng, 16) * 0.1,
        w3=_w(rng, 16, 16, 3, 3), b3=_w(rng, 16) * 0.1, w4=_w(rng, 16, 16, 3, 3), b4=_w(rng, 16) * 0.1)


#: net, the layers quantize finds, the QLinear ops expected in ORT's graph, the float
#: layer (its output is the graph output: no pair, so float with its weight), weights and
#: activation tensors rounded.
CASES = {
    "silu": (silu_net, ["conv1", "sig", "silu", "conv2"], {"QLinearConv": 2, "QLinearSigmoid": 1, "QLinearMul": 1},
             "conv3", 2, 5),  # x a s m r
    "concat": (concat_net, ["conv1", "conv2", "cat", "conv3"], {"QLinearConv": 3, "QLinearConcat": 1},
               "conv4", 3, 5),  # x r1 r2 k r3
    "residual": (residual_net, ["conv1", "conv2", "res", "conv3"], {"QLinearConv": 3, "QLinearAdd": 1},
                 "conv4", 3, 5),  # x r b s r3
}


def _float_on_dq(proto: onnx.ModelProto) -> list[str]:
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sorted(n.name or n.op_type for n in proto.graph.node
                  if n.op_type in _FLOAT_ON_DQ and any(i in dq_out for i in n.input))


@pytest.mark.parametrize("case", sorted(CASES))
def test_units_run_as_qlinear_ops(tmp_path, case):
    build, layers, qlinear, last, weights, activations = CASES[case]
    model = build(np.random.default_rng(0))
    feeds = {"x": _normal(2, 16, 4, 8, 8)}
    ref = run_ort(model, feeds)[0]
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 64, 4, 8, 8)))
    assert result.stats["layers"] == layers
    optimized = _ort_optimized(result.model, tmp_path)
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert {op: ops[op] for op in qlinear} == qlinear, ops
    assert result.stats["skipped_layers"][last].startswith("node unit left open")
    assert _float_on_dq(optimized) == [last]  # only the float layer writing the graph output
    # The fusions chain: every QLinear op reads uint8 from the one before, no DQ -> Q between.
    producers = {o: n.op_type for n in optimized.graph.node for o in n.output}
    for node in optimized.graph.node:
        if node.op_type in ("QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearConcat"):
            assert {producers[i] for i in node.input if i in producers} <= {"QLinearConv", "QLinearSigmoid"}, node
    out = ort.InferenceSession(to_proto(result.model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert _sqnr_db(ref, out) > _floor_db(weights, activations)


def test_give_back_of_units(tmp_path):
    model = silu_net(np.random.default_rng(0))
    feeds = {"x": _normal(2, 8, 4, 8, 8)}
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 32, 4, 8, 8)))
    record = result.quantization
    # Every layer back: no Q/DQ left, exactly the float model's outputs.
    back = give_back(_clone(result.model), record, record.names)
    assert not [n for n in back.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    np.testing.assert_array_equal(run_ort(back, feeds)[0], run_ort(model, feeds)[0])
    # The Sigmoid back: it reads a, not a's pair; its output keeps the pair the Mul reads.
    one = give_back(_clone(result.model), record, ["sig"])
    sig = next(n for n in one.graph if n.op_type == "Sigmoid")
    assert sig.inputs[0].name == "a"
    quantized = {n.inputs[0].name for n in one.graph if n.op_type == "QuantizeLinear"}
    assert {"a", "s", "m"} <= quantized


def test_unit_writing_a_graph_output_stays_float(tmp_path):
    """Conv -> SiLU -> output: the SiLU's output gets no pair, so neither the Sigmoid nor the
    Mul is quantized (their input pairs would only round), nor the Conv (float with its
    weight: without an output pair ORT would dequantize the weight at every call)."""
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[N,4,8,8] x) => (float[N,16,8,8] y) {{
      [conv1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      [sig] s = Sigmoid (a)
      [silu] y = Mul (a, s)
    }}""", w1=_w(rng, 16, 4, 3, 3), b1=_w(rng, 16) * 0.1)
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 16, 4, 8, 8)))
    assert result.stats["layers"] == []
    assert result.stats["skipped_layers"]["conv1"].startswith("node unit left open")
    assert not [n for n in result.model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


@pytest.mark.parametrize("target", ["openvino", "tensorrt"])
def test_other_targets_keep_units_float(tmp_path, target):
    model = silu_net(np.random.default_rng(0))
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 16, 4, 8, 8)), target)
    assert result.stats["layers"] == ["conv1", "conv2", "conv3"]
    quantized = {n.inputs[0].name for n in result.model.graph if n.op_type == "QuantizeLinear"}
    assert "s" not in quantized and "a" not in quantized


def test_layer_the_target_keeps_float_reads_the_pairs(tmp_path):
    """conv2 has 8 output channels (fewer than ``min_output_channels``: float with its weight)
    but reads the SiLU's output pair, so the SiLU still runs as QLinearSigmoid/QLinearMul."""
    model = silu_net(np.random.default_rng(0), mid=8)
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 32, 4, 8, 8)))
    assert result.stats["layers"] == ["conv1", "sig", "silu"]
    assert result.stats["skipped_layers"]["conv2"].startswith("too few output channels")
    conv2 = next(n for n in result.model.graph if n.name == "conv2")
    assert conv2.inputs[0].producer().op_type == "DequantizeLinear"  # the SiLU's output pair
    assert conv2.inputs[1].name == "w2"  # its weight float
    ops = Counter(n.op_type for n in _ort_optimized(result.model, tmp_path).graph.node)
    assert ops["QLinearMul"] == 1 and ops["QLinearSigmoid"] == 1 and ops["QLinearConv"] == 1, ops


def test_lowering_runs_a_gemm_at_the_graph_output_in_int8(tmp_path):
    """fc2 (Gemm with a bias, its output the graph output) keeps inputs-only Q/DQ; lowering
    moves its bias into an Add, so ORT runs it as QGemm with a float output instead of
    dequantizing its weight at every call. The same sum in float: equal to rounding."""
    from tests.passes.test_output_qdq import conv_relu_conv

    from compressor.targets.onnx import OnnxTarget

    model = conv_relu_conv(np.random.default_rng(0))
    feeds = {"x": _normal(2, 8, 4, 8, 8)}
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 32, 4, 8, 8)))
    assert "fc2" in result.stats["layers"]
    path = OnnxTarget().lower(_clone(result.model), tmp_path / "art")[0]
    lowered = ir.load(path)
    assert [v.name for v in lowered.graph.outputs] == ["y"]
    assert next(n for n in lowered.graph if n.name == "fc2_bias").op_type == "Add"
    ops = Counter(n.op_type for n in _ort_optimized(lowered, tmp_path).graph.node)
    assert ops["QGemm"] == 2 and ops["Gemm"] + ops["FusedGemm"] == 0, ops  # fc1 (after its Relu) and fc2
    before = ort.InferenceSession(to_proto(result.model).SerializeToString(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = before.run(None, feeds)[0]
    np.testing.assert_allclose(after.run(None, feeds)[0], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
