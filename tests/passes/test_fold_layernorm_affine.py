"""Tests of ``fold-layernorm-affine``: MatMul (+Add) and Gemm readers, negative cases."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes.fold_layernorm_affine import FoldLayerNormAffine

from compressor import pipeline
from compressor.model_io import verify_model
from compressor.pipeline import PassContext
from tests.ortutil import (
    assert_same_outputs,
    model_from_text,
    op_counts,
    random_feeds,
    run_ort,
)

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)
D = 8


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _ln(**extra: np.ndarray) -> dict[str, np.ndarray]:
    return {"gamma": RNG.uniform(0.5, 2.0, D).astype(np.float32), "beta": _f32(D), **extra}


def _fold(model: ir.Model):
    feeds = random_feeds(model)
    before = run_ort(model, feeds)
    outputs = [v.name for v in model.graph.outputs]
    result = FoldLayerNormAffine().run(model, PassContext(properties={"constants-folded"}))
    assert [v.name for v in result.model.graph.outputs] == outputs
    if result.modified:
        verify_model(result.model, strict_shapes=True)
    return result, before, run_ort(result.model, feeds)


def _assert_identity_ln(model: ir.Model) -> None:
    ln = next(n for n in model.graph if n.op_type == "LayerNormalization")
    assert len(ln.inputs) == 2, "the bias input should be dropped"
    np.testing.assert_array_equal(ln.inputs[1].const_value.numpy(), np.ones(D, np.float32))


def test_registered_with_contract():
    assert pipeline._REGISTRY["fold-layernorm-affine"] is FoldLayerNormAffine
    assert FoldLayerNormAffine.min_opset is None  # no LayerNormalization below opset 17: never upgrade
    assert FoldLayerNormAffine.requires == frozenset({"constants-folded"})


def test_matmul_add_merges_bias():
    model = model_from_text(f"""{HEADER}
    g (float[2,5,{D}] x) => (float[2,5,6] y) {{
      n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, gamma, beta)
      h = MatMul(n, w)
      y = Add(h, c)
    }}""", **_ln(w=_f32(D, 6), c=_f32(6)))
    result, before, after = _fold(model)
    assert result.modified
    assert result.stats == {"ln_folded": 1, "consumers_rewritten": 1, "ln_skipped": 0, "skipped_reasons": {}}
    assert op_counts(result.model) == {"LayerNormalization": 1, "MatMul": 1, "Add": 1}
    _assert_identity_ln(result.model)
    assert set(result.model.graph.initializers) == {
        n.inputs[i].name for n in result.model.graph for i in range(1, len(n.inputs))
    }
    assert_same_outputs(before, after)


def test_matmul_without_bias_gets_an_add():
    model = model_from_text(f"""{HEADER}
    g (float[3,{D}] x) => (float[3,6] y) {{
      n = LayerNormalization(x, gamma, beta)
      y = MatMul(n, w)
    }}""", **_ln(w=_f32(D, 6)))
    result, before, after = _fold(model)
    assert op_counts(result.model) == {"LayerNormalization": 1, "MatMul": 1, "Add": 1}
    assert result.model.graph.outputs[0].producer().op_type == "Add"
    assert_same_outputs(before, after)


def test_no_beta_needs_no_add():
    model = model_from_text(f"""{HEADER}
    g (float[3,{D}] x) => (float[3,6] y) {{
      n = LayerNormalization(x, gamma)
      y = MatMul(n, w)
    }}""", gamma=RNG.uniform(0.5, 2.0, D).astype(np.float32), w=_f32(D, 6))
    result, before, after = _fold(model)
    assert result.stats["ln_folded"] == 1
    assert op_counts(result.model) == {"LayerNormalization": 1, "MatMul": 1}
    assert_same_outputs(before, after)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [False, True])
def test_gemm(trans_b, with_c):
    inputs, extra = ("n, w, c", {"c": _f32(1, 6)}) if with_c else ("n, w", {})
    model = model_from_text(f"""{HEADER}
    g (float[4,{D}] x) => (float[4,6] y) {{
      n = LayerNormalization(x, gamma, beta)
      y = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> ({inputs})
    }}""", **_ln(w=_f32(6, D) if trans_b else _f32(D, 6), **extra))
    result, before, after = _fold(model)
    assert result.stats["ln_folded"] == 1
    assert op_counts(result.model) == {"LayerNormalization": 1, "Gemm": 1}
    _assert_identity_ln(result.model)
    assert_same_outputs(before, after)


def test_attention_projections_all_fold():
    model = model_from_text(f"""{HEADER}
    g (float[2,5,{D}] x) => (float[2,5,{D}] q, float[2,5,{D}] k, float[2,5,{D}] v) {{
      n = LayerNormalization(x, gamma, beta)
      hq = MatMul(n, wq)
      q = Add(hq, bq)
      hk = MatMul(n, wk)
      k = Add(bk, hk)
      v = MatMul(n, wq)
    }}""", **_ln(wq=_f32(D, D), bq=_f32(D), wk=_f32(D, D), bk=_f32(D)))
    result, before, after = _fold(model)
    assert result.stats["ln_folded"] == 1 and result.stats["consumers_rewritten"] == 3
    assert op_counts(result.model)["Add"] == 3
    assert_same_outputs(before, after)


def test_non_linear_consumer_is_skipped():
    # pre-LN transformer: the residual Add reads the LN output directly
    model = model_from_text(f"""{HEADER}
    g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{
      n = LayerNormalization(x, gamma, beta)
      h = MatMul(n, w)
      y = Add(h, n)
    }}""", **_ln(w=_f32(D, D)))
    result, before, after = _fold(model)
    assert not result.modified
    assert result.stats["ln_folded"] == 0 and result.stats["ln_skipped"] == 1
    (reason,) = result.stats["skipped_reasons"]
    assert reason == "reader: Add (reading the LN output as input 1) is not a MatMul/Gemm with a constant weight"
    ln = result.model.graph.node(0)
    assert [v.name for v in ln.inputs] == ["x", "gamma", "beta"]
    assert_same_outputs(before, after, rtol=0, atol=0)


def test_graph_output_and_non_constant_weight_are_skipped():
    model = model_from_text(f"""{HEADER}
    g (float[3,{D}] x, float[{D},4] w2) => (float[3,{D}] n, float[3,4] y) {{
      n = LayerNormalization(x, gamma, beta)
      m = LayerNormalization(x, gamma, beta)
      y = MatMul(m, w2)
    }}""", **_ln())
    result, _, _ = _fold(model)
    assert not result.modified
    assert result.stats["ln_skipped"] == 2
    assert set(result.stats["skipped_reasons"]) == {
        "its output is a graph output",
        "reader: its weight is not a constant initializer (run fold-constants first)",
    }


def test_without_layernorm_is_unmodified():
    model = model_from_text(f"""{HEADER}
    g (float[3,{D}] x) => (float[3,6] y) {{
      y = MatMul(x, w)
    }}""", w=_f32(D, 6))
    result, _, _ = _fold(model)
    assert not result.modified
    assert result.stats == {"ln_folded": 0, "consumers_rewritten": 0, "ln_skipped": 0, "skipped_reasons": {}}


def test_second_run_finds_nothing():
    model = model_from_text(f"""{HEADER}
    g (float[3,{D}] x) => (float[3,6] y) {{
      n = LayerNormalization(x, gamma, beta)
      y = MatMul(n, w)
    }}""", **_ln(w=_f32(D, 6)))
    first, _, _ = _fold(model)
    second, _, _ = _fold(first.model)
    assert first.modified and not second.modified
    assert second.stats["ln_skipped"] == 0
