"""Output Q/DQ on the ``onnx`` target: ONNX Runtime must run the layers as integer kernels.

The check is ONNX Runtime's own optimized graph (``SessionOptions.optimized_model_filepath``
at the extended level, where its QDQ fusion runs): the Convs must become QLinearConv,
the MatMul with a bias Add a QGemm (or QLinearMatMul / MatMulIntegerToFloat), and no float
Conv/Gemm/MatMul may read a DequantizeLinear (the slow "DQ + float" form inputs-only Q/DQ
gave). Numerics: the same 30 dB SQNR floor as ``test_quantize.py`` (8-bit activations over
a calibrated range give ~40 dB per quantized tensor; the output pair is the next layer's
input pair or one more rounding of the same kind, and without VNNI the weights are 7-bit).
Giving every layer back must give exactly the float model again, output pairs included.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from compressor.targets import get_target

from compressor.data import Dataset, load_npz
from compressor.inputs import model_input_specs
from compressor.model_io import to_proto, verify_model
from compressor.pipeline import PassContext, PassResult, build_pass
from compressor.quant.revert import give_back
from tests.ortutil import model_from_text, run_ort

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _floor_db(weights: int, activations: int, weight_db: float = 34.0, act_db: float = 40.0) -> float:
    """SQNR floor of a net with that many rounded weights and activation tensors.

    8-bit activations over a calibrated range give ~40 dB each (``test_quantize.py``),
    7-bit weights (CPUs without VNNI; 8-bit with it) ~6 dB less; independent noises add
    in power. 1 dB of margin: a wrong scale, axis or zero point costs tens of dB.
    """
    noise = weights * 10 ** (-weight_db / 10) + activations * 10 ** (-act_db / 10)
    return -10 * np.log10(noise) - 1.0


#: conv_relu_conv: 6 weights; x, r, c (= p), d, e, gp (= f), h quantized: 7 activation tensors.
SQNR_FLOOR_DB = _floor_db(6, 7)
_FLOAT_COMPUTE = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"})


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def conv_relu_conv(rng: np.random.Generator) -> ir.Model:
    """Conv-Relu-Conv-Relu-MaxPool-Conv-Relu-Conv-GlobalAveragePool, then a 2-D MatMul with a
    bias Add and a Relu (a dense head). conv4 has no Relu; its output is read by the pooling,
    a node unit of its own (QLinearGlobalAveragePool), whose input pair closes conv4's."""
    return model_from_text(f"""{HEADER}
    g (float[N,4,8,8] x) => (float[N,10] y) {{
      [conv1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      r = Relu (a)
      [conv2] c2 = Conv <pads=[1,1,1,1]> (r, w2, b2)
      c = Relu (c2)
      p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (c)
      [conv3] d3 = Conv <pads=[1,1,1,1]> (p, w3, b3)
      d = Relu (d3)
      [conv4] e = Conv (d, w6, b6)
      [gap] gp = GlobalAveragePool (e)
      f = Flatten (gp)
      [fc1] m = MatMul (f, w4)
      mb = Add (m, b4)
      h = Relu (mb)
      [fc2] y = Gemm <transB=1> (h, w5, b5)
    }}""", w1=_w(rng, 16, 4, 3, 3), b1=_w(rng, 16) * 0.1, w2=_w(rng, 16, 16, 3, 3), b2=_w(rng, 16) * 0.1,
        w3=_w(rng, 16, 16, 3, 3), b3=_w(rng, 16) * 0.1, w4=_w(rng, 16, 32), b4=_w(rng, 32) * 0.1,
        w5=_w(rng, 10, 32), b5=_w(rng, 10) * 0.1, w6=_w(rng, 16, 16, 1, 1), b6=_w(rng, 16) * 0.1)


def _dataset(model: ir.Model, tmp_path, x: np.ndarray) -> Dataset:
    np.savez(tmp_path / "calib.npz", x=x)
    return load_npz(tmp_path / "calib.npz", model_input_specs(model), what="calib")


def _quantize(model: ir.Model, calib: Dataset, target: str = "onnx") -> PassResult:
    ctx = PassContext(target=get_target(target), calibration=calib)
    folded = build_pass("fold-constants", None).run(model, ctx)
    ctx.properties.add("constants-folded")
    result = build_pass("quantize", None).run(folded.model, ctx)
    verify_model(result.model, strict_shapes=False)
    return result


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _ort_optimized(model: ir.Model, tmp_path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs after its (extended-level) optimizations, QDQ fusion included."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(tmp_path / "optimized.onnx")


def _float_compute_on_dq(proto: onnx.ModelProto) -> list[str]:
    """Float compute nodes reading a DequantizeLinear output: the slow form."""
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name or n.op_type for n in proto.graph.node
            if n.op_type in _FLOAT_COMPUTE and any(i in dq_out for i in n.input)]


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2)))


def _normal(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_onnx_runtime_runs_integer_kernels(tmp_path):
    model = conv_relu_conv(np.random.default_rng(0))
    feeds = {"x": _normal(2, 16, 4, 8, 8)}
    ref = run_ort(model, feeds)[0]
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 64, 4, 8, 8)))
    assert result.stats["layers"] == ["conv1", "conv2", "conv3", "conv4", "gap", "fc1", "fc2"]
    optimized = _ort_optimized(result.model, tmp_path)
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["QLinearConv"] == 4, ops
    assert ops["QLinearGlobalAveragePool"] == 1, ops
    # conv1, conv2, conv3 (after their Relu), conv4 and gap (read in 8 bits: by gap, by fc1
    # through the Flatten) and fc1 (after its bias Add and Relu); fc2 (its output is the graph
    # output) gets no pair (lowering moves its bias into an Add: test_onnx_node_units.py).
    assert result.stats["layer_outputs_quantized"] == 6
    assert ops["QGemm"] + ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] >= 1, ops
    # The MaxPool runs on conv2's uint8 output: the DQ -> MaxPool -> Q around it is dropped
    # (same scale and zero point on both sides).
    producers = {o: n.op_type for n in optimized.graph.node for o in n.output}
    pool = next(n for n in optimized.graph.node if n.op_type == "MaxPool")
    assert producers[pool.input[0]] == "QLinearConv"
    # Only fc2 (its output is the graph output) computes in float before lowering.
    assert sorted(_float_compute_on_dq(optimized)) == ["fc2"]
    # Relu is folded into conv1's QLinearConv (its output pair's zero point is 0).
    assert ops["Relu"] == 0, ops
    out = ort.InferenceSession(to_proto(result.model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert _sqnr_db(ref, out) > SQNR_FLOOR_DB


def test_max_pooled_tensor_shares_the_output_range(tmp_path):
    """``MaxPool`` picks values already on conv2's output grid: the next pair is the same grid."""
    model = conv_relu_conv(np.random.default_rng(0))
    q = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 32, 4, 8, 8))).model
    quant = {n.inputs[0].name: n for n in q.graph if n.op_type == "QuantizeLinear"}
    for a, b in (("c", "p"),):
        for i in (1, 2):
            assert np.array_equal(quant[a].inputs[i].const_value.numpy(), quant[b].inputs[i].const_value.numpy())


def test_give_back_removes_the_output_pairs(tmp_path):
    model = conv_relu_conv(np.random.default_rng(0))
    feeds = {"x": _normal(2, 8, 4, 8, 8)}
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 32, 4, 8, 8)))
    record = result.quantization
    assert [a.value for a in record["conv2"].outputs] == ["c"]  # the MaxPool reads c's pair (after the Relu)
    assert record["conv4"].outputs == ()
    assert record["fc1"].outputs == ()  # its output pair (after the bias Add and Relu) is fc2's input pair
    # Every layer back: no Q/DQ left, exactly the float model's outputs.
    back = give_back(_clone(result.model), record, record.names)
    assert not [n for n in back.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    np.testing.assert_array_equal(run_ort(back, feeds)[0], run_ort(model, feeds)[0])
    # conv2 back: the MaxPool reads c itself; the pair on p (conv3's input) stays.
    one = give_back(_clone(result.model), record, ["conv2"])
    pool = next(n for n in one.graph if n.op_type == "MaxPool")
    assert pool.inputs[0].name == "c"
    assert "p" in {n.inputs[0].name for n in one.graph if n.op_type == "QuantizeLinear"}
    assert "c" not in {n.inputs[0].name for n in one.graph if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("target", ["openvino", "tensorrt"])
def test_other_targets_quantize_inputs_only(tmp_path, target):
    model = conv_relu_conv(np.random.default_rng(0))
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 16, 4, 8, 8)), target)
    assert result.stats["layer_outputs_quantized"] == 0
    quantized = {n.inputs[0].name for n in result.model.graph if n.op_type == "QuantizeLinear"}
    record = result.quantization
    assert all(record[name].outputs == () for name in record.names)
    if target == "openvino":  # c is read through conv3's input pair, moved up the MaxPool (passes/_pair_site)
        assert [(a.node, a.value) for a in record["conv3"].activations] == [("p", "c")]
    else:
        assert "c" not in quantized  # conv2's output, read by the MaxPool only


def test_no_output_pair_on_the_way_to_a_graph_output(tmp_path):
    """A head (conv -> Reshape -> Sigmoid -> output) keeps float outputs: no rounding of the model's own outputs."""
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[N,4,8,8] x) => (float[N,1024] y) {{
      [conv1] a = Conv <pads=[1,1,1,1]> (x, w1, b1)
      r = Relu (a)
      [head] c2 = Conv <pads=[1,1,1,1]> (r, w2, b2)
      c = Relu (c2)
      f = Flatten (c)
      y = Sigmoid (f)
    }}""", w1=_w(rng, 16, 4, 3, 3), b1=_w(rng, 16) * 0.1, w2=_w(rng, 16, 16, 3, 3), b2=_w(rng, 16) * 0.1)
    result = _quantize(_clone(model), _dataset(model, tmp_path, _normal(1, 16, 4, 8, 8)))
    assert result.stats["layers"] == ["conv1"]  # head: no output pair, float with its weight
    assert result.stats["layer_outputs_quantized"] == 1  # conv1's (after its Relu)
    quantized = {n.inputs[0].name for n in result.model.graph if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "r"}
