"""Attention layers found by structure, and ``quantize``'s ``float_activations`` option."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes._attention import attention_projections

from compressor.model_io import upgrade_opset
from compressor.options import OptionsError
from compressor.pipeline import build_pass
from tests.ortutil import model_from_text, run_ort
from tests.passes.test_quantize import (
    HEADER,
    SQNR_FLOOR_DB,
    _activation_source,
    _attention_feeds,
    _clone,
    _dataset,
    _node,
    _quantize,
    _run_target,
    _sqnr_db,
    _w,
    attention,
)

H, S, D = 2, 6, 16


def multihead(rng: np.random.Generator, *, residual_on_k: bool = False, header: str = HEADER,
              softmax_axis: int = -1) -> ir.Model:
    """Two heads the way exporters write them: bias Add, Reshape by a computed shape,
    Transpose, keys pre-scaled by a constant; optionally a residual Add on the key branch."""
    k_src = "kr = Add(kb, x)\n      kh = Reshape(kr, shp)" if residual_on_k else "kh = Reshape(kb, shp)"
    return model_from_text(f"""{header}
    g (float[N,{S},{D}] x) => (float[N,{H},{S},8] y) {{
      s0 = Shape(x)
      n = Slice(s0, zero, one)
      shp = Concat <axis = 0> (n, tail)
      [q_proj] q0 = MatMul(x, wq)
      qb = Add(q0, bq)
      qh = Reshape(qb, shp)
      qt = Transpose <perm = [0, 2, 1, 3]> (qh)
      [k_proj] k0 = MatMul(x, wk)
      kb = Add(k0, bk)
      {k_src}
      kt = Transpose <perm = [0, 2, 3, 1]> (kh)
      ks = Mul(kt, scale)
      [v_proj] v0 = MatMul(x, wv)
      vh = Reshape(v0, shp)
      vt = Transpose <perm = [0, 2, 1, 3]> (vh)
      [scores] s = MatMul(qt, ks)
      p = Softmax <axis = {softmax_axis}> (s)
      [context] y = MatMul(p, vt)
    }}""", wq=_w(rng, D, D), bq=_w(rng, D), wk=_w(rng, D, D), bk=_w(rng, D), wv=_w(rng, D, D),
        zero=np.array([0], np.int64), one=np.array([1], np.int64), tail=np.array([S, H, 8], np.int64),
        scale=np.array(1 / np.sqrt(8), np.float32))


def fused_qkv(rng: np.random.Generator) -> ir.Model:
    return model_from_text(f"""{HEADER}
    g (float[N,{S},{D}] x) => (float[N,{S},{D}] y) {{
      [qkv_proj] qkv = MatMul(x, w)
      q, k, v = Split <axis = -1, num_outputs = 3> (qkv)
      kt = Transpose <perm = [0, 2, 1]> (k)
      [scores] s = MatMul(q, kt)
      p = Softmax <axis = -1> (s)
      [context] y = MatMul(p, v)
    }}""", w=_w(rng, D, 3 * D))


def test_roles_of_a_single_head_with_mask():
    roles = attention_projections(attention(np.random.default_rng(0)).graph)
    assert roles == {"q_proj": {"attention-queries"}, "k_proj": {"attention-keys"}, "v_proj": {"attention-values"},
                     "scores": {"attention-scores"}, "context": {"attention-context"}}


def test_roles_through_reshape_transpose_bias_and_scale():
    roles = attention_projections(multihead(np.random.default_rng(0)).graph)
    assert roles == {"q_proj": {"attention-queries"}, "k_proj": {"attention-keys"}, "v_proj": {"attention-values"},
                     "scores": {"attention-scores"}, "context": {"attention-context"}}


def test_roles_survive_the_upgrade_of_an_old_softmax():
    """An opset-12 graph (paddle2onnx's PP-OCRv4 recogniser, batch left dynamic): ``quantize``
    upgrades it to opset 13, and ONNX's version converter, which cannot see the scores' rank,
    writes the Softmax as ``Flatten -> Softmax -> Reshape``. Before, that hid both attention
    blocks of PP-OCRv4's neck and it was quantized as a CNN."""
    old = multihead(np.random.default_rng(0), header=HEADER.replace(": 17]", ": 12]"), softmax_axis=3)
    upgraded = upgrade_opset(old, 13)
    softmax = next(node for node in upgraded.graph if node.op_type == "Softmax")
    assert softmax.inputs[0].producer().op_type == "Flatten"  # what the converter wrote
    assert [reader.op_type for reader, _ in softmax.outputs[0].uses()] == ["Reshape"]
    assert attention_projections(upgraded.graph) == {
        "q_proj": {"attention-queries"}, "k_proj": {"attention-keys"}, "v_proj": {"attention-values"},
        "scores": {"attention-scores"}, "context": {"attention-context"}}


def test_a_residual_add_is_not_a_bias():
    """``k + x`` mixes two activations: the key is not a projection of one layer any more."""
    roles = attention_projections(multihead(np.random.default_rng(0), residual_on_k=True).graph)
    assert roles == {"q_proj": {"attention-queries"}, "v_proj": {"attention-values"},
                     "scores": {"attention-scores"}, "context": {"attention-context"}}


def test_fused_qkv_projection_has_every_role():
    roles = attention_projections(fused_qkv(np.random.default_rng(0)).graph)
    assert roles == {"qkv_proj": {"attention-queries", "attention-keys", "attention-values"},
                     "scores": {"attention-scores"}, "context": {"attention-context"}}


def test_no_softmax_no_roles():
    model = model_from_text(f"""{HEADER}
    g (float[N,{D}] x) => (float[N,{D}] y) {{
      h = MatMul(x, w1)
      y = MatMul(h, w2)
    }}""", w1=_w(np.random.default_rng(0), D, D), w2=_w(np.random.default_rng(1), D, D))
    assert attention_projections(model.graph) == {}


def test_float_keys_and_context_keep_their_inputs_float(tmp_path):
    model = attention(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, _attention_feeds(1, 64))
    feeds = _attention_feeds(2, 32)
    ref = run_ort(model, feeds)
    result = _quantize(_clone(model), calib, float_activations=["attention-keys", "attention-context"],
                       attention="off")  # no SmoothQuant from the preset: x stays the graph input
    q, stats = result.model, result.stats
    k_proj = _node(q, "k_proj")
    assert k_proj.inputs[0].name == "x" and k_proj.inputs[0].producer() is None  # the graph input itself
    # An int8 weight through DQ, on the full grid even where the target asks for 7-bit
    # weights (no integer kernel reads this one: its input is float).
    dq = k_proj.inputs[1].producer()
    assert dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value.numpy().dtype == np.int8
    assert (np.abs(dq.inputs[0].const_value.numpy().astype(np.int16)).max(axis=0) == 127).all()
    # The query and value projections read the same x through Q/DQ.
    for name in ("q_proj", "v_proj"):
        assert _node(q, name).inputs[0].producer().op_type == "DequantizeLinear"
        assert _activation_source(_node(q, name).inputs[0]).name == "x"
    # probs · V has no weight: it stays wholly float.
    context = _node(q, "context")
    assert [v.name for v in context.inputs] == ["p", "v"] and all(v.producer().op_type != "DequantizeLinear"
                                                                  for v in context.inputs)
    assert stats["weight_only_layers"] == {"k_proj": "activation kept float (float_activations: attention-keys)"}
    assert stats["layers_weight_only"] == 1
    assert stats["skipped_layers"]["context"] == "activation kept float (float_activations: attention-context)"
    assert stats["layers"] == ["q_proj", "v_proj", "scores", "o_proj", "pool"]  # pool: mask as data (0/1)
    out = _run_target(q, feeds)
    assert _sqnr_db(ref[0], out[0]) >= SQNR_FLOOR_DB - 3


def test_float_activations_change_only_the_layers_with_those_roles(tmp_path):
    model = multihead(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, {"x": np.random.default_rng(1).standard_normal((16, S, D)).astype(np.float32)})
    plain = _quantize(_clone(model), calib, attention="off").stats
    keys = _quantize(_clone(model), calib, float_activations=["attention-keys", "attention-values"]).stats
    assert set(keys["weight_only_layers"]) == {"k_proj", "v_proj"}
    assert set(plain["layers"]) - set(keys["layers"]) == {"k_proj", "v_proj"}


def test_unknown_role_is_refused():
    with pytest.raises(OptionsError, match="'keys' is not one of 'attention-queries', 'attention-keys'"):
        build_pass("quantize", {"float_activations": ["keys"]})


# ------------------------------------------------------------------ attention: auto (one int8 recipe)


def _quantize_for(target, model: ir.Model, calib, **options):
    """``fold-constants`` then ``quantize`` for ``target`` (a name or a target object)."""
    from compressor.targets import get_target

    from compressor.pipeline import PassContext

    ctx = PassContext(target=get_target(target) if isinstance(target, str) else target, calibration=calib)
    folded = build_pass("fold-constants", None).run(model, ctx)
    ctx.properties.add("constants-folded")
    return build_pass("quantize", options or None).run(folded.model, ctx)


def test_attention_found_by_structure_gets_the_transformer_preset(tmp_path):
    model = attention(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, _attention_feeds(1, 64))
    feeds = _attention_feeds(2, 32)
    ref = run_ort(model, feeds)
    result = _quantize(_clone(model), calib)  # no option: what the int8 recipe runs
    stats = result.stats
    assert stats["attention_blocks"] == 1
    assert stats["attention_preset"] == ["float_activations", "smoothquant", "eltwise"]
    assert stats["weight_only_layers"] == {"k_proj": "activation kept float (float_activations: attention-keys)"}
    assert stats["skipped_layers"]["context"] == "activation kept float (float_activations: attention-context)"
    assert stats["smoothquant_groups"] >= 1
    assert stats["layers"] == ["q_proj", "v_proj", "scores", "o_proj", "pool"]
    assert _sqnr_db(ref[0], _run_target(result.model, feeds)[0]) >= SQNR_FLOOR_DB - 3


def test_options_a_recipe_sets_win_over_the_preset(tmp_path):
    model = attention(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, _attention_feeds(1, 64))
    stats = _quantize(_clone(model), calib, float_activations=[], smoothquant={"alpha": 0.5}).stats
    assert stats["attention_preset"] == ["eltwise"]
    assert "k_proj" in stats["layers"] and "context" in stats["layers"] and stats["weight_only_layers"] == {}


@pytest.mark.parametrize("net", ["conv", "mlp"])
def test_models_without_attention_are_quantized_exactly_as_before(tmp_path, net):
    from compressor.model_io import model_bytes
    from tests.passes.test_quantize import _normal, conv_relu_conv, mlp

    model, _ = (conv_relu_conv if net == "conv" else mlp)(np.random.default_rng(0))
    x = _normal(1, 64, 3, 16, 16) if net == "conv" else _normal(1, 128, 64)
    calib = _dataset(model, tmp_path, {"x": x})
    auto = _quantize(_clone(model), calib, bias_correction=True)
    off = _quantize(_clone(model), calib, bias_correction=True, attention="off")
    assert auto.stats["attention_blocks"] == 0 and auto.stats["attention_preset"] == []
    assert model_bytes(auto.model) == model_bytes(off.model)


def hybrid(rng: np.random.Generator) -> ir.Model:
    """A convolution with a residual join, then an attention block with a residual add."""
    return model_from_text(f"""{HEADER}
    g (float[N,{D},{S}] x) => (float[N,{S},{D}] y) {{
      [conv] c = Conv <kernel_shape = [1]> (x, wc, bc)
      [conv_join] r = Add(c, x)
      t = Transpose <perm = [0, 2, 1]> (r)
      [q_proj] q = MatMul(t, wq)
      [k_proj] k = MatMul(t, wk)
      [v_proj] v = MatMul(t, wv)
      kt = Transpose <perm = [0, 2, 1]> (k)
      [scores] s = MatMul(q, kt)
      p = Softmax <axis = -1> (s)
      [context] a = MatMul(p, v)
      [o_proj] o = MatMul(a, wo)
      [residual] y = Add(o, t)
    }}""", wc=_w(rng, D, D, 1, fan_in=D), bc=_w(rng, D) * 0.1, wq=_w(rng, D, D), wk=_w(rng, D, D),
        wv=_w(rng, D, D), wo=_w(rng, D, D))


def test_preset_keeps_the_transformer_residual_float_and_the_conv_join_int8(tmp_path):
    """TensorRT quantizes residual Adds: in a model with attention only a convolution's join stays int8."""
    model = hybrid(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, {"x": np.random.default_rng(1).standard_normal((32, D, S)).astype(np.float32)})
    auto = _quantize_for("tensorrt", _clone(model), calib).stats
    off = _quantize_for("tensorrt", _clone(model), calib, attention="off").stats
    assert "conv_join" in auto["layers"] and "residual" not in auto["layers"]
    assert auto["skipped_layers"]["residual"] == "residual join in a model with attention (attention: auto)"
    assert {"conv_join", "residual"} <= set(off["layers"])
    explicit = _quantize_for("tensorrt", _clone(model), calib, eltwise=True).stats
    assert {"conv_join", "residual"} <= set(explicit["layers"])


def test_preset_widens_the_roles_on_a_target_without_a_float_path(tmp_path):
    """qnn-htp has no float path (``fallback: int16``): keys and probs · V get 16-bit activations,
    and at 8-bit activations the scores Q·Kᵀ too."""
    model = attention(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, _attention_feeds(1, 64))
    result = _quantize_for("qnn-htp", _clone(model), calib)
    assert result.stats["layers_widened_by_preset"] == ["context", "k_proj", "scores"]
    assert result.stats["weight_only_layers"] == {}
    for name, bits16 in (("k_proj", True), ("context", True), ("scores", True), ("q_proj", False)):
        dq = _node(result.model, name).inputs[0].producer()
        assert dq.op_type == "DequantizeLinear"
        assert (dq.inputs[2].const_value.numpy().dtype.itemsize == 2) == bits16, name


def test_preset_smooths_only_8_bit_activations(tmp_path):
    """Issue 13 (MiniLM ``w8a16-npu`` on HTP): with 16-bit activations the preset leaves
    SmoothQuant off (it moves activation outliers into int8 weights, which then lose more
    than the 16-bit activations gain); a recipe that sets it still gets it."""
    model = attention(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, _attention_feeds(1, 64))
    eight = _quantize_for("qnn-htp", _clone(model), calib).stats
    sixteen = _quantize_for("qnn-htp", _clone(model), calib, activations="int16").stats
    asked = _quantize_for("qnn-htp", _clone(model), calib, activations="int16", smoothquant={"alpha": 0.9}).stats
    assert eight["attention_preset"] == ["float_activations", "smoothquant", "eltwise"]
    assert eight["smoothquant_groups"] >= 1
    assert sixteen["attention_preset"] == ["float_activations", "eltwise"] and sixteen["smoothquant_groups"] == 0
    assert asked["smoothquant_groups"] == eight["smoothquant_groups"]


# ------------------------------------------------------------------ Q·Kᵀ in int8 on OpenVINO


def bert_head(rng: np.random.Generator) -> ir.Model:
    """One BERT attention block as torch exports it: bias Adds, head Reshape/Transpose,
    the scale and the additive mask after Q·Kᵀ, Softmax, probs · V."""
    return model_from_text(f"""{HEADER}
    g (float[N,{S},{D}] x, float[N,1,1,{S}] mask) => (float[N,{H},{S},8] y) {{
      [q_proj] q0 = MatMul(x, wq)
      qb = Add(q0, bq)
      qh = Reshape(qb, shp)
      qt = Transpose <perm = [0, 2, 1, 3]> (qh)
      [k_proj] k0 = MatMul(x, wk)
      kb = Add(k0, bk)
      kh = Reshape(kb, shp)
      kt = Transpose <perm = [0, 2, 3, 1]> (kh)
      [v_proj] v0 = MatMul(x, wv)
      vh = Reshape(v0, shp)
      vt = Transpose <perm = [0, 2, 1, 3]> (vh)
      [scores] s = MatMul(qt, kt)
      ss = Mul(s, scale)
      sm = Add(ss, mask)
      p = Softmax <axis = -1> (sm)
      [context] y = MatMul(p, vt)
    }}""", wq=_w(rng, D, D), bq=_w(rng, D), wk=_w(rng, D, D), bk=_w(rng, D), wv=_w(rng, D, D),
        shp=np.array([0, -1, H, 8], np.int64), scale=np.array(1 / np.sqrt(8), np.float32))


def test_openvino_runs_the_scores_matmul_in_int8(tmp_path):
    """The runtime report, not an assumption: with zero points on Q·Kᵀ's operands the CPU
    plugin folds it into its f32 attention Subgraph; signed symmetric, Q·Kᵀ runs int8.

    Where, depends on the CPU (the plugin's ``is_supported_matmul``, transformation_pipeline.cpp):
    without VNNI it leaves an int8 Q·Kᵀ out of its attention Subgraph, so Q·Kᵀ is an int8
    ``MatMul`` beside a float ``probs · V`` one; with VNNI (or AMX) it fuses the whole
    block, int8 Q·Kᵀ included, into one Subgraph that runs on i8 inputs (measured on an
    AVX-512 VNNI/BF16 EPYC: ``jit_avx512_i8``, inputs i8, i8, f32, f32)."""
    import dataclasses
    import types

    ov = pytest.importorskip("openvino")
    from compressor.targets import base as target_base
    from compressor.targets import get_target
    from compressor.targets.openvino import OpenVinoRunner

    from compressor.model_io import save_model

    model = bert_head(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((32, S, D)).astype(np.float32), "mask": np.zeros((32, 1, 1, S), np.float32)}
    calib = _dataset(model, tmp_path, feeds)
    target = get_target("openvino")
    asymmetric = types.SimpleNamespace(name="openvino-asymmetric", capabilities=dataclasses.replace(
        target.capabilities, quantizable={**target.capabilities.quantizable, "MatMul": dataclasses.replace(
            target.capabilities.quantizable["MatMul"], activation_only=None)}))
    matmuls, subgraphs = {}, {}
    for name, tgt in (("symmetric", target), ("asymmetric", asymmetric)):
        result = _quantize_for(tgt, _clone(model), calib)
        assert "scores" in result.stats["layers"]
        save_model(result.model, tmp_path / f"{name}.onnx")
        ov.save_model(ov.convert_model(str(tmp_path / f"{name}.onnx")), str(tmp_path / f"{name}.xml"))
        runner = OpenVinoRunner(tmp_path / f"{name}.xml")
        runner({k: v[:2] for k, v in feeds.items()})
        layers = runner.layer_precisions()
        matmuls[name] = [layer["int8"] for layer in layers if layer["type"] == "MatMul"]
        subgraphs[name] = [layer["int8"] for layer in layers if layer["type"] == "Subgraph"]
    if target_base.cpu_has_vnni():
        assert (matmuls["symmetric"], subgraphs["symmetric"]) == ([], [True])  # int8 attention, fused
    else:
        assert matmuls["symmetric"] == [True, False]  # Q·Kᵀ int8; probs · V float (attention: auto)
    # folded into the f32 Subgraph: the failure mode the spec avoids
    assert matmuls["asymmetric"] == [] and not any(subgraphs["asymmetric"])
