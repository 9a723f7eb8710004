"""Tests of ``quantize``: Q/DQ structure, what stays float, numerics, options, SmoothQuant.

Every model is a tiny graph built here, run through ``fold-constants`` then ``quantize``
for the ``onnx`` target (ONNX Runtime CPU), and compared with the float model on held-out
random inputs through ONNX Runtime.

Quality floor (``SQNR_FLOOR_DB``): 8-bit activations over a calibrated range give about
40 dB per quantized tensor (a uniform grid of 255 steps over ~±4σ of a Gaussian:
``10·log10(12·255²/8²)``), and symmetric per-channel weights about the same; the errors of
two stacked layers add, and on CPUs without VNNI the target asks for 7-bit weights, so
the measured figures for the nets below are 33-37 dB (7-bit weights; more with 8-bit). A
30 dB floor leaves ~3 dB of margin (the noise would have to double) yet fails on any real
regression (a wrong scale, axis or zero point costs tens of dB).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes._graph import add_initializer, label
from compressor.passes._placement import find_layers
from compressor.passes._smoothquant import SmoothQuantOptions, smooth_layers
from compressor.targets import base as target_base
from compressor.targets import get_target
from compressor.targets.onnx import ort_session

from compressor.data import Dataset, load_npz
from compressor.errors import DataError
from compressor.inputs import model_input_specs
from compressor.model_io import verify_model
from compressor.pipeline import PassContext, PassResult, build_pass
from compressor.quant.math import dequantize_array
from compressor.quant.spec import QuantSpec
from compressor.quant.taps import collect_statistics
from tests.ortutil import assert_same_outputs, model_from_text, onnx_specs_target, op_counts, run_ort

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
SQNR_FLOOR_DB = 30.0
F32_MIN = float(np.finfo(np.float32).min)


# ---------------------------------------------------------------------------- helpers


def _w(rng: np.random.Generator, *shape: int, fan_in: int | None = None) -> np.ndarray:
    """He-like random weights, so activations stay O(1) through the layers."""
    fan_in = fan_in or shape[0]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _normal(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _dataset(model: ir.Model, tmp_path, arrays: dict[str, np.ndarray], name: str = "calib.npz") -> Dataset:
    path = tmp_path / name
    np.savez(path, **arrays)
    return load_npz(path, model_input_specs(model), what="calib")


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _quantize(model: ir.Model, calib: Dataset, **options) -> PassResult:
    """``fold-constants`` then ``quantize`` (with ``options``) for the ``onnx`` target's specs
    (:func:`~tests.ortutil.onnx_specs_target`: without its speed rules)."""
    ctx = PassContext(target=onnx_specs_target(), calibration=calib)
    folded = build_pass("fold-constants", None).run(model, ctx)
    ctx.properties.add("constants-folded")
    result = build_pass("quantize", options).run(folded.model, ctx)
    verify_model(result.model, strict_shapes=False)
    return result


def _run_target(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run as the ``onnx`` target does: ONNX Runtime with its optimizations (int8 kernels)."""
    return ort_session(model).run(None, feeds)


def _sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / ((ref - out) ** 2).sum()))


def _cosine(ref: np.ndarray, out: np.ndarray) -> float:
    a, b = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def _node(model: ir.Model, name: str) -> ir.Node:
    """The node named ``name`` (or ``Op -> output`` for unnamed nodes, as the pass reports them)."""
    for node in model.graph:
        if label(node) == name:
            return node
    raise AssertionError(f"no node {name!r} in the graph")


def _qdq_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def _weight_qmax(op_type: str) -> int:
    """The largest |q| of the target's weight spec (63 on CPUs without VNNI, else 127)."""
    spec = get_target("onnx").capabilities.quantizable[op_type].weights
    bits = spec.bits or 8
    return 2 ** (bits - 1) - 1


def _activation_source(value: ir.Value) -> ir.Value:
    """Assert ``value`` is ``DQ(Q(x, s, z), s, z)``; return the float ``x``."""
    dq = value.producer()
    assert dq is not None and dq.op_type == "DequantizeLinear", f"{value.name}: not read through DequantizeLinear"
    q = dq.inputs[0].producer()
    assert q is not None and q.op_type == "QuantizeLinear", f"{value.name}: DequantizeLinear of a non-Q tensor"
    assert q.inputs[1] is dq.inputs[1] and q.inputs[2] is dq.inputs[2], "Q and DQ must share scale and zero point"
    zp = dq.inputs[2].const_value.numpy()
    assert zp.dtype == np.uint8 and zp.shape == (), "onnx target: uint8 per-tensor activations"
    assert "axis" not in dq.attributes
    return q.inputs[0]


def _weight(value: ir.Value, axis: int, op_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assert ``value`` is DQ of an int8 initializer, symmetric, per channel on ``axis``.

    Returns:
        The int8 weight, its scales and the dequantized float weight.
    """
    dq = value.producer()
    assert dq is not None and dq.op_type == "DequantizeLinear", f"{value.name}: weight not read through DQ"
    wq_value = dq.inputs[0]
    assert wq_value.producer() is None and wq_value.is_initializer() and not wq_value.is_graph_input()
    wq = wq_value.const_value.numpy()
    assert wq.dtype == np.int8, f"{wq_value.name} is stored as {wq.dtype}, not int8"
    zp = dq.inputs[2].const_value.numpy()
    assert zp.dtype == np.int8 and not zp.any(), "weight zero points must be 0 (symmetric)"
    assert dq.attributes["axis"].as_int() == axis
    scale = dq.inputs[1].const_value.numpy()
    assert scale.shape == (wq.shape[axis],), "one scale per output channel"
    # Symmetric per channel: every channel's largest |w| lands on the grid's end.
    qmax = _weight_qmax(op_type)
    others = tuple(a for a in range(wq.ndim) if a != axis)
    assert (np.abs(wq.astype(np.int16)).max(axis=others) == qmax).all()
    w = dequantize_array(wq, scale, zp, QuantSpec("int8", True, axis))
    return wq, scale, w


def _assert_weight_matches(w_float: np.ndarray, w_deq: np.ndarray, scale: np.ndarray, axis: int) -> None:
    """Round to nearest: every dequantized weight is within half a step of the original."""
    shape = [1] * w_float.ndim
    shape[axis] = -1
    assert (np.abs(w_deq - w_float) <= scale.reshape(shape) / 2 * (1 + 1e-5)).all()


# ---------------------------------------------------------------------------- models


def conv_relu_conv(rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    weights = {"w1": _w(rng, 16, 3, 3, 3, fan_in=27), "b1": _w(rng, 16) * 0.1,
               "w2": _w(rng, 8, 16, 3, 3, fan_in=144), "b2": _w(rng, 8) * 0.1}
    model = model_from_text(f"""{HEADER}
    g (float[N,3,16,16] x) => (float[N,8,12,12] y, float[N,16,14,14] c1) {{
      [conv1] c1 = Conv <kernel_shape = [3, 3]> (x, w1, b1)
      [relu] r = Relu(c1)
      [conv2] y = Conv <kernel_shape = [3, 3]> (r, w2, b2)
    }}""", **weights)
    return model, weights


def mlp(rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """MatMul with a constant weight + Add bias -> Relu -> Gemm transB=1 (torch's Linear)."""
    weights = {"w1": _w(rng, 64, 128), "b1": _w(rng, 128) * 0.1, "w2": _w(rng, 32, 128, fan_in=128),
               "b2": _w(rng, 32) * 0.1}
    model = model_from_text(f"""{HEADER}
    g (float[N,64] x) => (float[N,32] y, float[N,128] h) {{
      [fc1] h0 = MatMul(x, w1)
      [fc1_bias] h = Add(h0, b1)
      [relu] r = Relu(h)
      [fc2] y = Gemm <transB = 1> (r, w2, b2)
    }}""", **weights)
    return model, weights


S, D = 6, 16


def attention(rng: np.random.Generator) -> ir.Model:
    """One attention head with an additive mask built from an int64 ``attention_mask``.

    ``bias = (1 - float(mask)) * finfo(float32).min`` is added to the scores (the HF
    pattern); ``pooled = float(mask) @ y`` sums the real tokens (mean-pooling's numerator).
    """
    return model_from_text(f"""{HEADER}
    g (float[N,{S},{D}] x, int64[N,{S}] attention_mask) => (float[N,{S},{D}] y, float[N,1,{D}] pooled) {{
      [q_proj] q0 = MatMul(x, wq)
      [q_bias] q = Add(q0, bq)
      [k_proj] k = MatMul(x, wk)
      [v_proj] v = MatMul(x, wv)
      kt = Transpose <perm = [0, 2, 1]> (k)
      [scores] s = MatMul(q, kt)
      ss = Mul(s, scale)
      mf = Cast <to = 1> (attention_mask)
      inv = Sub(one, mf)
      bias = Mul(inv, fmin)
      bias3 = Unsqueeze(bias, axes1)
      [add_mask] masked = Add(ss, bias3)
      p = Softmax <axis = -1> (masked)
      [context] c = MatMul(p, v)
      [o_proj] y = MatMul(c, wo)
      mf3 = Unsqueeze(mf, axes1)
      [pool] pooled = MatMul(mf3, y)
    }}""", wq=_w(rng, D, D), bq=_w(rng, D) * 0.1, wk=_w(rng, D, D), wv=_w(rng, D, D), wo=_w(rng, D, D),
        scale=np.array(1 / np.sqrt(D), np.float32), one=np.array(1.0, np.float32),
        fmin=np.array(F32_MIN, np.float32), axes1=np.array([1], np.int64))


def _attention_feeds(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, S + 1, n)
    mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int64)
    return {"x": rng.standard_normal((n, S, D)).astype(np.float32), "attention_mask": mask}


# ---------------------------------------------------------------------------- structure


def test_conv_relu_conv_structure(tmp_path):
    model, weights = conv_relu_conv(np.random.default_rng(0))
    result = _quantize(model, _dataset(model, tmp_path, {"x": _normal(1, 64, 3, 16, 16)}))
    assert result.modified
    assert result.stats["layers"] == ["conv1", "conv2"]
    assert result.stats["layers_quantized"] == 2 and result.stats["layers_float"] == 0
    assert result.stats["skipped_layers"] == {} and result.stats["skipped_tensors"] == {}
    q = result.model
    assert op_counts(q) == {"Conv": 2, "Relu": 1, "QuantizeLinear": 2, "DequantizeLinear": 4}
    for name, src, wname in (("conv1", "x", "w1"), ("conv2", "r", "w2")):
        conv = _node(q, name)
        assert _activation_source(conv.inputs[0]).name == src
        _, scale, w = _weight(conv.inputs[1], axis=0, op_type="Conv")
        _assert_weight_matches(weights[wname], w, scale, axis=0)
        assert conv.inputs[2].name in {f"{b}{suffix}" for b in [{"conv1": "b1", "conv2": "b2"}[name]]
                                       for suffix in ("", "_corrected")}, "the bias stays float"
        assert conv.inputs[2].dtype == ir.DataType.FLOAT
    # After Relu the range is [0, hi]: the asymmetric zero point is 0, so 0 stays exact.
    assert q.graph.initializers["r_zero_point"].const_value.numpy() == 0
    # The fp32 weights are gone from the graph: only int8 copies remain.
    assert "w1" not in q.graph.initializers and "w2" not in q.graph.initializers


@pytest.mark.parametrize("trans_b, axis", [(1, 0), (0, 1)])
def test_matmul_add_bias_and_gemm_structure(tmp_path, trans_b, axis):
    rng = np.random.default_rng(0)
    w1, b1 = _w(rng, 64, 128), _w(rng, 128) * 0.1
    w2 = _w(rng, 32, 128, fan_in=128) if trans_b else _w(rng, 128, 32)
    model = model_from_text(f"""{HEADER}
    g (float[N,64] x) => (float[N,32] y) {{
      [fc1] h0 = MatMul(x, w1)
      [fc1_bias] h = Add(h0, b1)
      [relu] r = Relu(h)
      [fc2] y = Gemm <transB = {trans_b}> (r, w2, b2)
    }}""", w1=w1, b1=b1, w2=w2, b2=_w(rng, 32) * 0.1)
    result = _quantize(model, _dataset(model, tmp_path, {"x": _normal(1, 128, 64)}))
    q = result.model
    assert result.stats["layers"] == ["fc1", "fc2"]
    matmul, gemm = _node(q, "fc1"), _node(q, "fc2")
    assert _activation_source(matmul.inputs[0]).name == "x"
    _, scale, w = _weight(matmul.inputs[1], axis=1, op_type="MatMul")  # W [K, N]: channels on the last axis
    _assert_weight_matches(w1, w, scale, axis=1)
    # The bias Add reads the MatMul's float output directly: no Q/DQ between them.
    assert _node(q, "fc1_bias").inputs[0] is matmul.outputs[0]
    assert _activation_source(gemm.inputs[0]).name == "r"
    _, scale, w = _weight(gemm.inputs[1], axis=axis, op_type="Gemm")  # transB=1: B is [N, K]
    _assert_weight_matches(w2, w, scale, axis=axis)
    assert gemm.inputs[2].name in ("b2", "b2_corrected") and gemm.inputs[2].dtype == ir.DataType.FLOAT


def test_attention_structure_and_mask_path_stays_float(tmp_path):
    model = attention(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, _attention_feeds(1, 64))
    feeds = _attention_feeds(2, 32)
    ref = run_ort(model, feeds)
    result = _quantize(_clone(model), calib, attention="off")  # every layer int8: no transformer preset
    q = result.model
    stats = result.stats
    assert stats["layers"] == ["q_proj", "k_proj", "v_proj", "scores", "context", "o_proj", "pool"]
    # The activation x activation MatMuls: both inputs through Q/DQ, no weight.
    scores, context = _node(q, "scores"), _node(q, "context")
    assert [_activation_source(v).name for v in scores.inputs] == ["q", "kt"]
    assert [_activation_source(v).name for v in context.inputs] == ["p", "v"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _weight(_node(q, name).inputs[1], axis=1, op_type="MatMul")
    quantized = {n.inputs[0].name for n in q.graph if n.op_type == "QuantizeLinear"}
    # k (k_proj's output) is read only in 8 bits (Transpose -> kt, the scores' input): its
    # pair, over kt's range (carried), closes k_proj's node unit (QLinearMatMul).
    assert quantized == {"x", "q", "k", "kt", "p", "v", "c", "mf3", "y"}

    # No Q/DQ anywhere on the additive mask path: every tensor computed from
    # attention_mask that ends up added to the scores is read by float ops only, and the
    # mask Add reads the mask bias itself.
    mask_path = {"mf", "inv", "bias", "bias3"}
    for node in q.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not {v.name for v in node.inputs if v is not None} & mask_path, node.name
    add = _node(q, "add_mask")
    assert add.inputs[1].name == "bias3" and add.inputs[1].producer().op_type == "Unsqueeze"
    # mf3 also derives from attention_mask alone, but it is a MatMul's activation (the
    # pooling numerator), not a mask or shape operand: data, quantized. Its values are 0
    # and 1, which the uint8 grid over [0, 1] holds exactly.
    assert _activation_source(_node(q, "pool").inputs[0]).name == "mf3"
    assert stats["skipped_tensors"] == {} and stats["skipped_layers"] == {}
    assert stats["tensors_float"] == 0 and stats["layers_float"] == 0

    out = _run_target(q, feeds)
    assert np.isfinite(out[0]).all() and np.isfinite(out[1]).all()
    assert _sqnr_db(ref[0], out[0]) >= SQNR_FLOOR_DB - 3  # six stacked quantized layers
    assert _cosine(ref[1], out[1]) >= 0.999


def byte_image_cnn(rng: np.random.Generator) -> ir.Model:
    """A classifier whose input is a uint8 image turned into float features in the graph."""
    return model_from_text(f"""{HEADER}
    g (uint8[N,3,16,16] pixels) => (float[N,8,12,12] y) {{
      pf = Cast <to = 1> (pixels)
      x = Div(pf, k255)
      [conv1] c1 = Conv <kernel_shape = [3, 3]> (x, w1, b1)
      r = Relu(c1)
      [conv2] y = Conv <kernel_shape = [3, 3]> (r, w2, b2)
    }}""", k255=np.array(255.0, np.float32), w1=_w(rng, 16, 3, 3, 3, fan_in=27), b1=_w(rng, 16) * 0.1,
        w2=_w(rng, 8, 16, 3, 3, fan_in=144), b2=_w(rng, 8) * 0.1)


def _pixels(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 16, 16)).astype(np.uint8)


def test_integer_input_turned_into_conv_features_is_quantized(tmp_path):
    """uint8 -> Cast -> Div(255) -> Conv: computed from an integer input only, but a compute
    op's activation, not a mask or shape operand, so it is data and gets Q/DQ."""
    model = byte_image_cnn(np.random.default_rng(0))
    feeds = {"pixels": _pixels(2, 32)}
    ref = run_ort(model, feeds)
    result = _quantize(_clone(model), _dataset(model, tmp_path, {"pixels": _pixels(1, 64)}))
    assert result.stats["layers"] == ["conv1", "conv2"] and result.stats["skipped_tensors"] == {}
    assert "nothing_quantized" not in result.stats
    assert _activation_source(_node(result.model, "conv1").inputs[0]).name == "x"
    # Same budget as the float-input conv net: two stacked layers, 8-bit activations.
    assert _sqnr_db(ref[0], _run_target(result.model, feeds)[0]) >= SQNR_FLOOR_DB


def masks_by_use(rng: np.random.Generator) -> ir.Model:
    """Tensors computed from ``attention_mask`` alone, used as a mask, a shape, or data.

    ``sel`` is the mask chosen by a ``Where`` and added to the scores before the Softmax;
    ``total`` becomes a Range's limit (a shape path); ``mf3`` is the pooling numerator's
    activation (data), and ``Shape(mf3)`` reads only its shape.
    """
    return model_from_text(f"""{HEADER}
    g (float[N,{S},{D}] x, int64[N,{S}] attention_mask) => (float[N,{S},{D}] y, float[N,1,{D}] pooled,
                                                             float[N,1,{S}] ones, int64[M] pos) {{
      [q_proj] q = MatMul(x, wq)
      [k_proj] k = MatMul(x, wk)
      kt = Transpose <perm = [0, 2, 1]> (k)
      [scores] s = MatMul(q, kt)
      mf = Cast <to = 1> (attention_mask)
      keep = Greater(mf, half)
      sel = Where(keep, zero, fmin)
      sel3 = Unsqueeze(sel, axes1)
      [add_mask] masked = Add(s, sel3)
      p = Softmax <axis = -1> (masked)
      [context] y = MatMul(p, x)
      mf3 = Unsqueeze(mf, axes1)
      [pool] pooled = MatMul(mf3, y)
      m3shape = Shape(mf3)
      ones = ConstantOfShape(m3shape)
      total = ReduceSum <keepdims = 0> (mf)
      lens = Cast <to = 7> (total)
      pos = Range(zero_i, lens, one_i)
    }}""", wq=_w(rng, D, D), wk=_w(rng, D, D), half=np.array(0.5, np.float32), zero=np.array(0.0, np.float32),
        fmin=np.array(F32_MIN, np.float32), axes1=np.array([1], np.int64), zero_i=np.array(0, np.int64),
        one_i=np.array(1, np.int64))


def test_mask_uses_names_how_each_integer_derived_tensor_is_used():
    from compressor.passes._placement import mask_uses

    uses = mask_uses(masks_by_use(np.random.default_rng(0)).graph)
    assert "add_mask" in uses["sel3"] and "Softmax" in uses["sel3"]  # joined with the scores
    assert "Where" in uses["mf"]  # through Greater -> Where: the mask's own source
    assert "Range" in uses["total"]  # through Cast to int64: a shape operand
    assert "ConstantOfShape" in uses["m3shape"]
    assert "mf3" not in uses  # a MatMul's activation (data); Shape() reads no values


def test_where_mask_stays_float_and_integer_data_is_quantized(tmp_path):
    model = masks_by_use(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, _attention_feeds(1, 64))
    result = _quantize(_clone(model), calib)
    q, stats = result.model, result.stats
    assert "add_mask" not in stats["layers"]  # onnx target: Add is no layer; the mask is never quantized
    for node in q.graph:
        if node.op_type == "QuantizeLinear":
            assert node.inputs[0].name not in {"mf", "sel", "sel3"}, node.name
    assert _activation_source(_node(q, "pool").inputs[0]).name == "mf3"


@pytest.mark.parametrize("target", ["tensorrt", "onnx"])
def test_mask_add_stays_float_where_adds_are_quantized(tmp_path, target):
    """TensorRT quantizes residual Adds: the Add of the scores and a Where-selected mask stays float."""
    model = masks_by_use(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, _attention_feeds(1, 64))
    ctx = PassContext(target=get_target(target), calibration=calib)
    folded = build_pass("fold-constants", None).run(model, ctx)
    ctx.properties.add("constants-folded")
    result = build_pass("quantize", {"attention": "off"}).run(folded.model, ctx)  # the mask rule alone
    add = _node(result.model, "add_mask")
    assert add.inputs[1].name == "sel3" and add.inputs[1].producer().op_type == "Unsqueeze"
    if target == "tensorrt":
        assert "used as a mask/shape path" in result.stats["skipped_tensors"]["sel3"]
        assert "add_mask" in result.stats["skipped_tensors"]["sel3"]


def test_nothing_quantized_is_said_with_every_reason(tmp_path, caplog):
    model, _ = mlp(np.random.default_rng(0))
    with caplog.at_level("WARNING", logger="compressor.passes.quantize"):
        result = _quantize(model, _dataset(model, tmp_path, {"x": _normal(1, 32, 64)}), scope={"exclude": ["re:fc2"]},
                           ops=["Gemm"])
    why = result.stats["nothing_quantized"]
    assert why.startswith("all 1 candidate layer(s) kept float") and "outside the recipe's scope (fc2)" in why
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"quantize: nothing was quantized: {why}"]


def test_nothing_quantized_is_no_warning_where_the_target_quantizes_every_tensor_after(tmp_path, caplog):
    """qnn-htp has no float path: its qnn-legalize quantizes every tensor after ``quantize``, so a model with
    no layer for ``quantize`` (ONNX's ``test_operator_selu``) is not a no-op there."""
    from compressor.targets import get_target

    model, _ = mlp(np.random.default_rng(0))
    ctx = PassContext(target=get_target("qnn-htp"), calibration=_dataset(model, tmp_path, {"x": _normal(1, 32, 64)}),
                      properties={"constants-folded"})
    with caplog.at_level("INFO", logger="compressor.passes.quantize"):
        result = build_pass("quantize", {"ops": ["Conv"]}).run(model, ctx)
    why = result.stats["nothing_quantized"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in caplog.records][-1] == (
        f"quantize: no layer quantized here ({why}); the target's passes quantize every tensor after it (it has no "
        "float path)")


# ---------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("net", ["conv", "mlp"])
def test_sqnr_floor_per_layer(tmp_path, net, calibrator):
    """Per layer and overall, on held-out inputs, as the target runs it and as written."""
    model, _ = (conv_relu_conv if net == "conv" else mlp)(np.random.default_rng(0))
    shape = (3, 16, 16) if net == "conv" else (64,)
    feeds = {"x": _normal(2, 64, *shape)}
    ref = run_ort(model, feeds)
    result = _quantize(_clone(model), _dataset(model, tmp_path, {"x": _normal(1, 128, *shape)}),
                       calibrator=calibrator)
    assert result.stats["layers_quantized"] == 2
    names = [v.name for v in result.model.graph.outputs]  # [final output, first layer's output]
    for outputs in (_run_target(result.model, feeds), run_ort(result.model, feeds)):
        for name, want, got in zip(names, ref, outputs):
            assert _sqnr_db(want, got) >= SQNR_FLOOR_DB, f"{net}/{calibrator}: {name}"


@pytest.mark.parametrize("net", ["conv", "mlp"])
def test_weight_grid_and_int8_kernels_on_either_cpu_branch(tmp_path, net, vnni):
    """The ``onnx`` target's weight grid, forced to each CPU branch (``vnni`` fixture) on any CPU.

    Without VNNI the target asks for 7-bit weights (``|q| <= 63``), with VNNI for the full
    int8 grid (``|q| <= 127``); either way every channel's largest weight lands on the
    grid's end and every weight is within half a step of the float one. Numerics:

    * as written (Q/DQ run as float ops): the SQNR floor of the module docstring;
    * on ONNX Runtime's int8 kernels (the first layer's output has one reader, so ONNX
      Runtime fuses DQ -> Conv/Gemm -> Relu -> Q into QLinearConv/QGemm): the same integer
      maths, so the kernels may differ from the float emulation only where they round the
      requantized ``r`` the other way, one step ``s_r`` per input of the second layer:
      ``|y_kernel - y_written| <= s_r * sum|W2| (+ float summation)``. That holds where the
      grid fits the CPU's kernels: 7-bit weights everywhere, 8-bit only with VNNI (with
      8-bit weights the AVX2 kernels saturate: measured 28 dB and errors of ``20 s_r``).
    """
    model, weights = (conv_relu_conv if net == "conv" else mlp)(np.random.default_rng(0))
    model.graph.outputs.pop()  # only y: the first layer's output is read by its Relu alone
    shape = (3, 16, 16) if net == "conv" else (64,)
    feeds = {"x": _normal(2, 64, *shape)}
    ref = run_ort(model, feeds)[0]
    q = _quantize(_clone(model), _dataset(model, tmp_path, {"x": _normal(1, 128, *shape)})).model

    qmax = 127 if vnni else 63
    second = {"conv": ("conv2", 0, "Conv", "w2"), "mlp": ("fc2", 0, "Gemm", "w2")}[net]
    first = {"conv": ("conv1", 0, "Conv", "w1"), "mlp": ("fc1", 1, "MatMul", "w1")}[net]
    assert _weight_qmax(first[2]) == _weight_qmax(second[2]) == qmax
    for name, axis, op_type, wname in (first, second):
        wq, scale, w = _weight(_node(q, name).inputs[1], axis=axis, op_type=op_type)  # max |q| per channel == qmax
        _assert_weight_matches(weights[wname], w, scale, axis=axis)
    w2 = w  # the second layer's dequantized weight, output channels on axis 0

    written = run_ort(q, feeds)[0]
    assert _sqnr_db(ref, written) >= SQNR_FLOOR_DB

    if vnni and target_base.cpu_has_vnni() is not True:
        return  # 8-bit weights on this CPU's int8 kernels saturate: nothing exact to compare
    kernels = _run_target(q, feeds)[0]
    assert _sqnr_db(ref, kernels) >= SQNR_FLOOR_DB
    s_r = float(q.graph.initializers["r_scale"].const_value.numpy())
    r_max = (255 - int(q.graph.initializers["r_zero_point"].const_value.numpy())) * s_r
    fan_in = w2[0].size
    per_channel = np.abs(w2).reshape(len(w2), -1).sum(axis=1) * (s_r + 2 * fan_in * 2.0**-24 * r_max)
    bound = per_channel.reshape((1, -1) + (1,) * (ref.ndim - 2))
    excess = np.abs(kernels - written) - bound
    assert (excess <= 0).all(), f"{(excess > 0).sum()} outputs beyond one step of r, worst by {excess.max():.3g}"


def test_calibrators_clip_outliers_differently(tmp_path):
    """minmax keeps a few huge calibration values in range; percentile clips them."""
    model, _ = mlp(np.random.default_rng(0))
    x = _normal(1, 128, 64)
    x.flat[np.random.default_rng(3).choice(x.size, 4, replace=False)] = 40.0  # 0.05% outliers
    calib = _dataset(model, tmp_path, {"x": x})
    feeds = {"x": _normal(2, 64, 64)}
    ref = run_ort(model, feeds)
    scales, sqnr = {}, {}
    for calibrator, extra in (("minmax", {}), ("percentile", {"percentile": 99.9}), ("mse", {})):
        result = _quantize(_clone(model), calib, calibrator=calibrator, **extra)
        scales[calibrator] = float(result.model.graph.initializers["x_scale"].const_value.numpy())
        sqnr[calibrator] = _sqnr_db(ref[0], _run_target(result.model, feeds)[0])
    assert scales["minmax"] == pytest.approx((40.0 - x.min()) / 255, rel=1e-6)  # uint8: [lo, 40] in 255 steps
    assert scales["percentile"] < scales["minmax"] / 4
    assert scales["mse"] <= scales["minmax"]
    assert sqnr["percentile"] > sqnr["minmax"] + 6  # a 4x finer grid on the values that matter


def test_options_per_tensor_weights_int16_activations_and_ops(tmp_path):
    model, _ = mlp(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 128, 64)})
    feeds = {"x": _normal(2, 64, 64)}
    ref = run_ort(model, feeds)[0]
    per_tensor = _quantize(_clone(model), calib, weights="int8-per-tensor").model
    for name in ("fc1", "fc2"):
        dq = _node(per_tensor, name).inputs[1].producer()
        assert "axis" not in dq.attributes and dq.inputs[1].const_value.numpy().shape == ()
        assert not dq.inputs[2].const_value.numpy().any()
    wide = _quantize(_clone(model), calib, activations="int16").model
    assert wide.opset_imports[""] >= 21  # 16-bit QuantizeLinear needs opset 21
    zps = [n.inputs[2].const_value.numpy() for n in wide.graph if n.op_type == "QuantizeLinear"]
    assert len(zps) == 2 and all(z.dtype == np.uint16 for z in zps)
    int8 = _quantize(_clone(model), calib).model
    assert _sqnr_db(ref, _run_target(wide, feeds)[0]) > _sqnr_db(ref, _run_target(int8, feeds)[0])
    only_gemm = _quantize(_clone(model), calib, ops=["Gemm"])
    assert only_gemm.stats["layers"] == ["fc2"] and _node(only_gemm.model, "fc1").inputs[1].name == "w1"


def test_activation_matmuls_off_keeps_them_float(tmp_path):
    model = attention(np.random.default_rng(0))
    result = _quantize(model, _dataset(model, tmp_path, _attention_feeds(1, 16)), activation_matmuls=False,
                       attention="off")
    assert result.stats["layers"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    for name in ("scores", "context"):
        assert result.stats["skipped_layers"][name] == "both inputs are activations (activation_matmuls is off)"
        assert all(v.producer().op_type != "DequantizeLinear" for v in _node(result.model, name).inputs)


# ---------------------------------------------------------------------------- nothing to do / scope


def test_nothing_to_quantize_is_unmodified(tmp_path):
    model = model_from_text(f"""{HEADER}
    g (float[N,8] x, float[N,8] z) => (float[N,8] y) {{
      r = Relu(x)
      y = Add(r, z)
    }}""")
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, 8), "z": _normal(2, 16, 8)})
    result = _quantize(model, calib)
    assert not result.modified
    assert result.stats["layers_quantized"] == 0 and result.stats["layers"] == []
    assert result.stats["nothing_quantized"].startswith("the model has no layer the target quantizes (")
    assert op_counts(result.model) == {"Relu": 1, "Add": 1}


def test_an_unnamed_node_is_spelled_as_every_pass_and_target_spells_it(tmp_path):
    """``Op -> output``, the one spelling (``label``): quantize's stats, the sparsity passes'
    stats and a target's offender list name an unnamed node alike, so a name from one
    report (accuracy control's layers, a scope) finds the node in another."""
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[N,16] x) => (float[N,8] y) {{
      y = MatMul(x, w)
    }}""", w=_w(rng, 16, 8))
    node = next(iter(model.graph))
    assert label(node) == "MatMul -> y"
    pruned = build_pass("prune-magnitude", {"sparsity": 0.5}).run(_clone(model), PassContext())
    assert list(pruned.stats["per_layer"]) == ["MatMul -> y"]
    refused = target_base.check_capabilities(_clone(model), target_base.Capabilities(supported_ops=frozenset()))
    assert [where for where, _ in refused] == ["MatMul -> y"]
    result = _quantize(model, _dataset(model, tmp_path, {"x": _normal(1, 32, 16)}))
    assert result.stats["layers"] == ["MatMul -> y"] and result.quantization.names == ["MatMul -> y"]


def test_everything_out_of_scope_is_unmodified(tmp_path):
    model, _ = mlp(np.random.default_rng(0))
    result = _quantize(model, _dataset(model, tmp_path, {"x": _normal(1, 32, 64)}), scope={"exclude": ["re:.*"]})
    assert not result.modified and not _qdq_nodes(result.model)
    assert result.stats["skipped_layers"] == {"fc1": "outside the recipe's scope", "fc2": "outside the recipe's scope"}


@pytest.mark.parametrize("pattern", ["fc2", "re:fc[2-9]", "re:w2"], ids=["exact", "regex-node", "regex-weight"])
def test_scope_exclude_keeps_layer_float(tmp_path, pattern):
    model, _ = mlp(np.random.default_rng(0))
    result = _quantize(model, _dataset(model, tmp_path, {"x": _normal(1, 32, 64)}), scope={"exclude": [pattern]})
    q = result.model
    assert result.stats["layers"] == ["fc1"]
    assert result.stats["skipped_layers"] == {"fc2": "outside the recipe's scope"}
    gemm = _node(q, "fc2")
    assert gemm.inputs[0].name == "r" and gemm.inputs[0].producer().op_type == "Relu"
    assert gemm.inputs[1].name == "w2" and gemm.inputs[1].const_value.dtype == ir.DataType.FLOAT
    _weight(_node(q, "fc1").inputs[1], axis=1, op_type="MatMul")


# ---------------------------------------------------------------------------- data problems


def test_sentinel_values_keep_tensor_float(tmp_path):
    """-3.4e38 (finfo.min, an additive mask's fill) in the data read by a MatMul."""
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[N,16] x, float[N,16] m) => (float[N,8] y, float[N,8] z) {{
      [clean] y = MatMul(x, w1)
      [masked] z = MatMul(m, w2)
    }}""", w1=_w(rng, 16, 8), w2=_w(rng, 16, 8))
    m = _normal(2, 32, 16)
    m[:, 12:] = F32_MIN  # a quarter of the values are the sentinel
    result = _quantize(model, _dataset(model, tmp_path, {"x": _normal(1, 32, 16), "m": m}))
    stats = result.stats
    assert stats["layers"] == ["clean"]
    assert set(stats["skipped_tensors"]) == {"m"}
    assert "25% of values are sentinels" in stats["skipped_tensors"]["m"]
    assert "keep float" in stats["skipped_tensors"]["m"]
    assert stats["skipped_layers"]["masked"].startswith("activation kept float")
    assert "sentinels" in stats["skipped_layers"]["masked"]
    masked = _node(result.model, "masked")
    assert masked.inputs[0].name == "m" and masked.inputs[1].name == "w2"  # untouched, float
    assert result.modified


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_calibration_data_is_refused_naming_the_tensor(tmp_path, bad):
    model, _ = mlp(np.random.default_rng(0))
    x = _normal(1, 16, 64)
    x[3, :3] = bad
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    with pytest.raises(DataError) as err:
        load_npz(path, model_input_specs(model), what="calib")
    message = str(err.value)
    assert message == f"calib {path}: 'x' holds 3 non-finite values (NaN or inf); clean the data"


def test_weights_stored_int8_are_four_times_smaller(tmp_path):
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[N,256] x) => (float[N,512] y) {{
      [fc] y = MatMul(x, w)
    }}""", w=_w(rng, 256, 512))
    before = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    result = _quantize(model, _dataset(model, tmp_path, {"x": _normal(1, 16, 256)}))
    stats = result.stats
    assert stats["weight_mb_fp32"] == pytest.approx(256 * 512 * 4 / 1e6, abs=1e-3)
    assert stats["weight_mb_int8"] == pytest.approx(256 * 512 / 1e6, abs=1e-3)
    assert 3.9 <= stats["weight_mb_fp32"] / stats["weight_mb_int8"] <= 4.1
    after = sum(v.const_value.nbytes for v in result.model.graph.initializers.values())
    assert after <= 0.26 * before  # int8 weight + 512 float scales + zero points


# ---------------------------------------------------------------------------- SmoothQuant


def layernorm_block(rng: np.random.Generator) -> ir.Model:
    """Two SmoothQuant cases with outlier channels from the LayerNorms' gamma.

    ``h`` is read only by the two MatMuls (case 1: folded into LN's gamma/beta); ``h2`` is
    also read by a residual Add (case 2: a Mul on the MatMul's branch only).
    """
    gamma = np.ones(D * 2, np.float32)
    gamma[[3, 17]] = 25.0
    return model_from_text(f"""{HEADER}
    g (float[N,8,32] x) => (float[N,8,32] y) {{
      [ln1] h = LayerNormalization <axis = -1> (x, gamma, beta)
      [fc_a] a = MatMul(h, w1)
      [fc_b] b = MatMul(h, w2)
      s = Add(a, b)
      [ln2] h2 = LayerNormalization <axis = -1> (s, gamma2, beta2)
      [fc_c] r = MatMul(h2, w3)
      [residual] y = Add(r, h2)
    }}""", gamma=gamma, beta=_w(rng, 32) * 0.1, w1=_w(rng, 32, 32), w2=_w(rng, 32, 32),
        gamma2=gamma[::-1].copy(), beta2=_w(rng, 32) * 0.1, w3=_w(rng, 32, 32))


def test_smooth_layers_is_exact_in_float(tmp_path):
    model = layernorm_block(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 64, 8, 32)})
    target = get_target("onnx")
    ctx = PassContext(target=target, calibration=calib)
    model = build_pass("fold-constants", None).run(model, ctx).model  # as in the pipeline: shapes known
    feeds = {"x": _normal(2, 32, 8, 32)}
    ref = run_ort(model, feeds)
    before = collect_statistics(model, ["h", "h2"], calib, channel_axes={"h": -1, "h2": -1})

    layers, _ = find_layers(model.graph, target.capabilities)
    assert smooth_layers(model, layers, calib, SmoothQuantOptions(alpha=0.5), skip=set()) == 2
    verify_model(model, strict_shapes=False)
    assert_same_outputs(ref, run_ort(model, feeds), rtol=1e-4, atol=1e-4)

    ln1, ln2 = _node(model, "ln1"), _node(model, "ln2")
    # Case 1: 1/s went into ln1's gamma and beta, no op added; case 2: one Mul on fc_c's branch.
    assert ln1.inputs[1].name != "gamma" and ln1.inputs[2].name != "beta"
    assert op_counts(model)["Mul"] == 1
    mul = _node(model, "fc_c").inputs[0].producer()
    assert mul.op_type == "Mul" and mul.inputs[0] is ln2.outputs[0]
    assert _node(model, "residual").inputs[1] is ln2.outputs[0], "the residual still reads the unsmoothed h2"
    for layer in ("fc_a", "fc_b", "fc_c"):
        assert _node(model, layer).inputs[1].name.endswith("_smoothed")
    # The point of it: the activations' per-channel ranges are flatter.
    after = collect_statistics(model, ["h", mul.outputs[0].name], calib,
                               channel_axes={"h": -1, mul.outputs[0].name: -1})
    for old, new in ((before["h"], after["h"]), (before["h2"], after[mul.outputs[0].name])):
        spread = lambda st: st.channel_absmax.max() / np.median(st.channel_absmax)  # noqa: E731
        assert spread(new) < spread(old) / 2


@pytest.mark.parametrize("floor_quantile", [0.0, 0.1])
def test_smoothquant_floor_bounds_the_stretch_of_quiet_channels(tmp_path, floor_quantile):
    """A channel with tiny activations gets s << 1 without the floor, and X/s stretches it."""
    model = layernorm_block(np.random.default_rng(0))
    x = _normal(1, 64, 8, 32)
    calib = _dataset(model, tmp_path, {"x": x})
    target = get_target("onnx")
    ctx = PassContext(target=target, calibration=calib)
    model = build_pass("fold-constants", None).run(model, ctx).model
    ln1 = _node(model, "ln1")
    gamma = ln1.inputs[1].const_value.numpy().copy()
    gamma[5] = 1e-3  # a quiet channel of h
    ln1.replace_input_with(1, add_initializer(model.graph, "gamma_quiet", gamma))
    feeds = {"x": _normal(2, 32, 8, 32)}
    ref = run_ort(model, feeds)
    layers, _ = find_layers(model.graph, target.capabilities)
    smooth_layers(model, layers, calib, SmoothQuantOptions(alpha=0.9, floor_quantile=floor_quantile), skip=set())
    assert_same_outputs(ref, run_ort(model, feeds), rtol=1e-4, atol=1e-4)  # exact either way
    stretch = gamma[5] / _node(model, "ln1").inputs[1].const_value.numpy()[5]  # = s of the quiet channel
    if floor_quantile:
        assert stretch > 0.1, "the floor (10% quantile of s) keeps the quiet channel near the others"
    else:
        assert stretch < 0.05


def test_smoothquant_option_keeps_outputs_close(tmp_path):
    model = layernorm_block(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 64, 8, 32)})
    feeds = {"x": _normal(2, 32, 8, 32)}
    ref = run_ort(model, feeds)[0]
    plain = _quantize(_clone(model), calib)
    smooth = _quantize(_clone(model), calib, smoothquant={"alpha": 0.5})
    assert plain.stats["smoothquant_groups"] == 0 and smooth.stats["smoothquant_groups"] == 2
    assert smooth.stats["layers"] == ["fc_a", "fc_b", "fc_c"]
    out_plain, out_smooth = _run_target(plain.model, feeds)[0], _run_target(smooth.model, feeds)[0]
    assert _cosine(ref, out_smooth) >= 0.99
    # Outlier channels (gamma 25) leave plain int8 at ~24 dB; smoothed it measures ~34 dB.
    assert _sqnr_db(ref, out_smooth) > _sqnr_db(ref, out_plain) + 6


def test_smoothquant_smooths_activations_of_unknown_shape(tmp_path):
    """Shape inference stops at a Reshape to a computed shape (PP-OCRv4's neck with its batch
    left dynamic): the activations then have no shape, and their channels are still the
    readers' weight rows. The same groups and the same model as with shapes."""
    model = layernorm_block(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 64, 8, 32)})

    ctx = PassContext(target=onnx_specs_target(), calibration=calib)
    folded = build_pass("fold-constants", None).run(model, ctx).model  # infers types and shapes
    ctx.properties.add("constants-folded")
    shaped = build_pass("quantize", {"smoothquant": {"alpha": 0.5}}).run(_clone(folded), ctx)
    shapeless = _clone(folded)
    for node in shapeless.graph:
        for value in node.outputs:
            value.shape = None  # the types stay
    unshaped = build_pass("quantize", {"smoothquant": {"alpha": 0.5}}).run(shapeless, ctx)
    assert shaped.stats["smoothquant_groups"] == unshaped.stats["smoothquant_groups"] == 2
    feeds = {"x": _normal(2, 8, 8, 32)}
    assert_same_outputs(run_ort(shaped.model, feeds), run_ort(unshaped.model, feeds), rtol=0, atol=0)


def test_smoothquant_on_conv_net(tmp_path):
    model, _ = conv_relu_conv(np.random.default_rng(0))
    feeds = {"x": _normal(2, 16, 3, 16, 16)}
    ref = run_ort(model, feeds)[0]
    result = _quantize(_clone(model), _dataset(model, tmp_path, {"x": _normal(1, 64, 3, 16, 16)}),
                       smoothquant={"alpha": 0.5})
    assert result.stats["smoothquant_groups"] == 0  # nothing to smooth: Conv channels are not the last axis
    assert _sqnr_db(ref, _run_target(result.model, feeds)[0]) >= SQNR_FLOOR_DB


def test_smoothquant_leaves_sentinel_tensors_alone(tmp_path):
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[N,16] m) => (float[N,8] z) {{
      [masked] z = MatMul(m, w)
    }}""", w=_w(rng, 16, 8))
    m = _normal(2, 32, 16)
    m[:, 12:] = F32_MIN
    result = _quantize(model, _dataset(model, tmp_path, {"m": m}), smoothquant={"alpha": 0.5})
    assert result.stats["smoothquant_groups"] == 0
    assert "sentinels" in result.stats["skipped_tensors"]["m"]
    assert op_counts(result.model) == {"MatMul": 1} and not result.modified
