"""Passes inside control-flow bodies (``passes/_control_flow.py``, the fold passes' case 5).

Each model is a tiny graph built here with ``onnx.helper``: an ``If`` on a sample rate
(``sr == 16000``, as silero-vad's) whose branches hold the compute, or a ``Loop``.

Numeric bound of a quantized 1x1 Conv ``y = W x + b`` (inputs within their calibrated
range, so nothing clips): each operand is off by at most half a step of its grid,
``|dx| <= s_x / 2`` and ``|dW_c| <= s_c / 2``, so
``|y_q - y| <= s_x / 2 · sum_k |W_ck| + s_c / 2 · sum_k |x_k| + s_x s_c / 4 · K``,
plus float32 summation (``K · 2^-23 · sum |W x|``): one step of each grid, propagated.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from compressor.passes.fold_batchnorm import FoldBatchNorm
from compressor.passes.fold_layernorm_affine import FoldLayerNormAffine
from onnx import TensorProto, helper, numpy_helper

from compressor.data import Dataset
from compressor.inputs import model_input_specs
from compressor.model_io import verify_model
from compressor.pass_manager import PassManager
from compressor.pipeline import PassContext, build_pass
from compressor.quant.revert import give_back
from tests.ortutil import onnx_specs_target, run_ort

RNG = np.random.default_rng(0)
C_IN, C_OUT = 8, 16


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, outputs, initializers=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _sr_if(then_branch: onnx.GraphProto, else_branch: onnx.GraphProto) -> ir.Model:
    """``y = If(sr == 16000, then_branch, else_branch)``; both branches read the outer ``x``."""
    nodes = [helper.make_node("Constant", [], ["rate"], value=numpy_helper.from_array(np.array(16000, np.int64))),
             helper.make_node("Equal", ["sr", "rate"], ["is16k"], name="is16k"),
             helper.make_node("If", ["is16k"], ["y"], name="choose", then_branch=then_branch,
                              else_branch=else_branch)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN, 4, 4]),
                          helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C_OUT, 4, 4])])


def _conv_branch(name: str, weight: np.ndarray, bias: np.ndarray, bn: dict[str, np.ndarray] | None = None):
    """A branch computing ``Conv(x)`` (then BatchNormalization with ``bn``), weights its own initializers."""
    inits = [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")]
    out = f"{name}_y"
    nodes = [helper.make_node("Conv", ["x", f"{name}_w", f"{name}_b"], [f"{name}_conv" if bn else out],
                              name=f"{name}_conv")]
    if bn:
        inits += [numpy_helper.from_array(v, f"{name}_{k}") for k, v in bn.items()]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}_conv", *(f"{name}_{k}" for k in bn)], [out],
                                      name=f"{name}_bn"))
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)


def _bn() -> dict[str, np.ndarray]:
    return {"gamma": _f32(C_OUT), "beta": _f32(C_OUT), "mean": _f32(C_OUT),
            "var": RNG.uniform(0.5, 2.0, C_OUT).astype(np.float32)}


def _feeds(x: np.ndarray, sr: int) -> dict[str, np.ndarray]:
    return {"x": x, "sr": np.array(sr, np.int64)}


def _dataset(model: ir.Model, x: np.ndarray, sr: int) -> Dataset:
    """``len(x)`` samples, each one whole input, all at sample rate ``sr``."""
    return Dataset({"x": x, "sr": np.full((len(x),), sr, np.int64)}, model_input_specs(model),
                   {"x": True, "sr": True}, None, "test", f"{sr}-{len(x)}")


def _body(model: ir.Model, attr: str) -> ir.Graph:
    node = next(n for n in model.graph if n.op_type in ("If", "Loop"))
    return node.attributes[attr].value


def _ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for n in graph]


# ---------------------------------------------------------------------------- folding


def test_batchnorm_inside_both_branches_is_folded_exactly():
    """Conv+BN in each ``If`` branch: both folded, outputs the same on either branch, the
    branches' outputs keep their names and count, the outer ``x`` is untouched."""
    model = _sr_if(_conv_branch("hi", _f32(C_OUT, C_IN, 1, 1), _f32(C_OUT), _bn()),
                   _conv_branch("lo", _f32(C_OUT, C_IN, 1, 1), _f32(C_OUT), _bn()))
    x = _f32(1, C_IN, 4, 4)
    before = {sr: run_ort(model, _feeds(x, sr))[0] for sr in (16000, 8000)}
    assert FoldBatchNorm.walks_subgraphs
    result = FoldBatchNorm().run(model, PassContext(properties={"constants-folded"}))
    assert result.modified and result.stats["bn_folded"] == 2
    for attr, name in (("then_branch", "hi"), ("else_branch", "lo")):
        body = _body(result.model, attr)
        assert _ops(body) == ["Conv"]
        assert [v.name for v in body.outputs] == [f"{name}_y"]
    assert [v.name for v in result.model.graph.inputs] == ["x", "sr"]
    verify_model(result.model, strict_shapes=False)
    for sr, ref in before.items():
        np.testing.assert_allclose(run_ort(result.model, _feeds(x, sr))[0], ref, rtol=1e-5, atol=1e-5)


def test_batchnorm_in_a_body_after_an_outer_conv_is_left_alone():
    """A body's BN whose Conv is in the main graph (the BN is the Conv's only reader): folding
    it would change an outer value, which the other branch would then compute too."""
    bn = _bn()
    inits = [numpy_helper.from_array(v, f"b_{k}") for k, v in bn.items()]
    body = helper.make_graph([helper.make_node("BatchNormalization", ["c", *(f"b_{k}" for k in bn)], ["b_y"],
                                               name="b_bn")], "b", [],
                             [helper.make_tensor_value_info("b_y", TensorProto.FLOAT, None)], inits)
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["o_y"])], "o", [],
                              [helper.make_tensor_value_info("o_y", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="outer_conv"),
             helper.make_node("If", ["flag"], ["y"], name="choose", then_branch=body, else_branch=other)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN, 4, 4]),
                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C_OUT, 4, 4])],
                   [numpy_helper.from_array(_f32(C_OUT, C_IN, 1, 1), "w")])
    w_before = model.graph.initializers["w"].const_value.numpy().copy()
    result = FoldBatchNorm().run(model, PassContext(properties={"constants-folded"}))
    assert result.stats["bn_folded"] == 0 and not result.modified
    assert "BatchNormalization" in _ops(_body(result.model, "then_branch"))
    np.testing.assert_array_equal(result.model.graph.initializers["w"].const_value.numpy(), w_before)


def test_layernorm_affine_inside_a_branch_is_folded_exactly():
    """LayerNormalization -> MatMul inside a branch: the affine part moves into the branch's weight."""
    d = 8
    inits = [numpy_helper.from_array(_f32(d), "t_gamma"), numpy_helper.from_array(_f32(d), "t_beta"),
             numpy_helper.from_array(_f32(d, d), "t_w")]
    then = helper.make_graph([helper.make_node("LayerNormalization", ["x", "t_gamma", "t_beta"], ["t_n"], name="t_ln"),
                              helper.make_node("MatMul", ["t_n", "t_w"], ["t_y"], name="t_mm")], "t", [],
                             [helper.make_tensor_value_info("t_y", TensorProto.FLOAT, None)], inits)
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e_y"])], "e", [],
                              [helper.make_tensor_value_info("e_y", TensorProto.FLOAT, None)])
    model = _model([helper.make_node("If", ["flag"], ["y"], name="choose", then_branch=then, else_branch=other)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, d]),
                    helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, d])])
    feeds = {"x": _f32(2, d), "flag": np.array(True)}
    ref = run_ort(model, feeds)[0]
    result = FoldLayerNormAffine().run(model, PassContext(properties={"constants-folded"}))
    assert result.stats["ln_folded"] == 1
    assert [v.name for v in _body(result.model, "then_branch").outputs] == ["t_y"]
    np.testing.assert_allclose(run_ort(result.model, feeds)[0], ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- quantization


def _quantize(model: ir.Model, calib: Dataset):
    """``fold-constants`` then ``quantize`` (minmax) through the pass manager, the onnx specs."""
    ctx = PassContext(target=onnx_specs_target(), calibration=calib, properties={"captured"})
    passes = [build_pass("fold-constants", {}), build_pass("quantize", {"calibrator": "minmax"})]
    return PassManager(passes).run(model, ctx)


def _bound(w: np.ndarray, x: np.ndarray, s_x: float, s_w: np.ndarray) -> np.ndarray:
    """The module docstring's bound for a 1x1 Conv, per output element (``1 x C_OUT x H x W``)."""
    w2 = np.abs(w.reshape(C_OUT, C_IN)).astype(np.float64)
    ax = np.abs(x[0]).reshape(C_IN, -1).astype(np.float64)
    bound = (s_x / 2 * w2.sum(1)[:, None] + s_w[:, None] / 2 * ax.sum(0)[None, :] + s_x * s_w[:, None] / 4 * C_IN
             + C_IN * 2.0**-23 * (w2 @ ax))
    return bound.reshape(1, C_OUT, *x.shape[2:])


def test_taken_branch_is_quantized_from_calibration_and_the_other_stays_float():
    """Calibration at 16 kHz: the then branch's Conv gets Q/DQ with the range the data has
    there (no main-graph output could tap it), within a step of each grid of fp32; the else
    branch nothing reaches stays float (exactly fp32 at 8 kHz) and the report says why."""
    w_hi, w_lo = _f32(C_OUT, C_IN, 1, 1), _f32(C_OUT, C_IN, 1, 1)
    model = _sr_if(_conv_branch("hi", w_hi, _f32(C_OUT)), _conv_branch("lo", w_lo, _f32(C_OUT)))
    x = _f32(16, 1, C_IN, 4, 4)
    ref = {sr: [run_ort(model, _feeds(s, sr))[0] for s in x] for sr in (16000, 8000)}
    result = _quantize(model, _dataset(model, x, 16000))
    quantize = result.reports[-1]
    q = result.model

    then, other = _body(q, "then_branch"), _body(q, "else_branch")
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= set(_ops(then))
    assert _ops(other) == ["Conv"], "never a half-rewritten body"
    assert quantize.stats["subgraphs_quantized"] == {"If 'choose'.then_branch": 1}
    assert quantize.stats["layers"] == ["hi_conv"]
    assert quantize.stats["subgraphs_left_as_is"] == {
        "If 'choose'.else_branch": "1 nodes; no calibration data reaches it (every sample takes the then branch); "
                                   "left float"}
    (layer,) = quantize.quantization.layers
    (act,) = layer.activations
    assert (act.lo, act.hi) == (float(min(x.min(), 0)), float(max(x.max(), 0)))  # the range inside the branch
    verify_model(q, strict_shapes=False)

    conv = next(n for n in then if n.op_type == "Conv")
    s_x, s_w = (float(conv.inputs[0].producer().inputs[1].const_value.numpy()),
                conv.inputs[1].producer().inputs[1].const_value.numpy().astype(np.float64).reshape(-1))
    for sample, expected in zip(x, ref[16000]):
        got = run_ort(q, _feeds(sample, 16000))[0]
        excess = np.abs(got.astype(np.float64) - expected) - _bound(w_hi, sample, s_x, s_w)
        assert (excess <= 0).all(), f"{(excess > 0).sum()} outputs beyond one step, worst by {excess.max():.3g}"
    for sample, expected in zip(x, ref[8000]):
        np.testing.assert_array_equal(run_ort(q, _feeds(sample, 8000))[0], expected)


def test_a_body_layer_is_given_back_in_its_body():
    """Accuracy control's edit finds the quantized Conv inside its branch and restores it exactly."""
    model = _sr_if(_conv_branch("hi", _f32(C_OUT, C_IN, 1, 1), _f32(C_OUT)),
                   _conv_branch("lo", _f32(C_OUT, C_IN, 1, 1), _f32(C_OUT)))
    x = _f32(8, 1, C_IN, 4, 4)
    ref = run_ort(model, _feeds(x[0], 16000))[0]
    result = _quantize(model, _dataset(model, x, 16000))
    back = give_back(result.model, result.reports[-1].quantization, ["hi_conv"])
    assert _ops(_body(back, "then_branch")) == ["Conv"]
    verify_model(back, strict_shapes=False)
    np.testing.assert_allclose(run_ort(back, _feeds(x[0], 16000))[0], ref, rtol=1e-6, atol=1e-6)


def test_both_branches_stay_float_when_the_data_takes_both():
    model = _sr_if(_conv_branch("hi", _f32(C_OUT, C_IN, 1, 1), _f32(C_OUT)),
                   _conv_branch("lo", _f32(C_OUT, C_IN, 1, 1), _f32(C_OUT)))
    x = _f32(4, 1, C_IN, 4, 4)
    data = Dataset({"x": x, "sr": np.array([16000, 8000, 16000, 8000], np.int64)}, model_input_specs(model),
                   {"x": True, "sr": True}, None, "test", "mixed")
    quantize = _quantize(model, data).reports[-1]
    assert quantize.stats["layers_quantized"] == 0
    assert set(quantize.stats["subgraphs_left_as_is"]) == {"If 'choose'.then_branch", "If 'choose'.else_branch"}
    assert all("differs between calibration samples" in why for why in quantize.stats["subgraphs_left_as_is"].values())


def test_loop_body_is_named_as_left_float():
    """A Loop's body (a MatMul carried over the iterations) stays float and the report says why."""
    w = _f32(8, 8)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "w"], ["h_out"], name="step")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"], name="first"),
             helper.make_node("Loop", ["trips", "", "h0"], ["y"], name="loop", body=body)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(3, np.int64), "trips")])
    data = Dataset({"x": _f32(8, 1, 8)}, model_input_specs(model), {"x": True}, None, "test", "loop")
    result = _quantize(model, data)
    quantize = result.reports[-1]
    assert quantize.stats["layers"] == ["first"]
    assert quantize.stats["subgraphs_left_as_is"] == {
        "Loop 'loop'.body": "2 nodes; Loop body: its tensors' ranges over the iterations are not taken; left float"}
    assert _ops(_body(result.model, "body")) == ["Identity", "MatMul"]


def test_a_target_that_runs_bodies_slower_keeps_them_float_and_says_why():
    """``Capabilities.quantize_in_bodies`` (data, not the target's name) keeps every body float."""
    import dataclasses

    model = _sr_if(_conv_branch("hi", _f32(C_OUT, C_IN, 1, 1), _f32(C_OUT)),
                   _conv_branch("lo", _f32(C_OUT, C_IN, 1, 1), _f32(C_OUT)))
    target = onnx_specs_target()
    why = "this backend runs Q/DQ inside If bodies unfused (slower than float); left float"
    target.capabilities = dataclasses.replace(target.capabilities, quantize_in_bodies=why)
    ctx = PassContext(target=target, calibration=_dataset(model, _f32(4, 1, C_IN, 4, 4), 16000),
                      properties={"captured"})
    result = PassManager([build_pass("fold-constants", {}), build_pass("quantize", {})]).run(model, ctx)
    assert result.reports[-1].stats["subgraphs_left_as_is"] == {
        "If 'choose'.then_branch": f"1 nodes; {why}", "If 'choose'.else_branch": f"1 nodes; {why}"}
    assert [_ops(_body(result.model, attr)) for attr in ("then_branch", "else_branch")] == [["Conv"], ["Conv"]]
