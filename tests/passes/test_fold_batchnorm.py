"""Tests of ``fold-batchnorm``: every producer case, the negative cases, and ResNet-50."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes.fold_batchnorm import FoldBatchNorm
from compressor.passes.fold_constants import FoldConstants

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


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _bn_params(c: int, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        f"{prefix}gamma": _f32(c),
        f"{prefix}beta": _f32(c),
        f"{prefix}mean": _f32(c),
        f"{prefix}var": RNG.uniform(0.5, 2.0, c).astype(np.float32),
    }


def _fold(model: ir.Model):
    """Run the pass; return its result and the outputs before/after on random inputs."""
    feeds = random_feeds(model)
    before = run_ort(model, feeds)
    result = FoldBatchNorm().run(model, PassContext(properties={"constants-folded"}))
    return result, before, run_ort(result.model, feeds)


def _assert_folded(model: ir.Model, n: int = 1):
    result, before, after = _fold(model)
    assert result.modified
    assert result.stats["bn_folded"] == n and result.stats["bn_skipped"] == 0
    assert op_counts(result.model)["BatchNormalization"] == 0
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    verify_model(result.model, strict_shapes=True)
    assert_same_outputs(before, after)
    return result


def test_registered_with_contract():
    assert pipeline._REGISTRY["fold-batchnorm"] is FoldBatchNorm
    assert FoldBatchNorm.requires == frozenset({"constants-folded"})
    assert FoldBatchNorm.provides == frozenset({"bn-folded"})


@pytest.mark.parametrize("bias", [False, True])
def test_conv(bias):
    inputs, extra = ("x, w, b", {"b": _f32(4)}) if bias else ("x, w", {})
    model = model_from_text(f"""{HEADER}
    g (float[2,3,8,8] x) => (float[2,4,6,6] y) {{
      c = Conv <kernel_shape = [3, 3]> ({inputs})
      y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
    }}""", w=_f32(4, 3, 3, 3), **extra, **_bn_params(4))
    result = _assert_folded(model)
    conv = result.model.graph.node(0)
    assert conv.op_type == "Conv" and len(conv.inputs) == 3
    # the folded conv produces the value the BN produced, under its name; old weights are gone
    assert conv.outputs[0] is result.model.graph.outputs[0]
    assert set(result.model.graph.initializers) == {conv.inputs[1].name, conv.inputs[2].name}


def test_grouped_conv():
    model = model_from_text(f"""{HEADER}
    g (float[1,4,6,6] x) => (float[1,6,6,6] y) {{
      c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 2> (x, w)
      y = BatchNormalization(c, gamma, beta, mean, var)
    }}""", w=_f32(6, 2, 3, 3), **_bn_params(6))
    _assert_folded(model)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group):
    model = model_from_text(f"""{HEADER}
    g (float[1,4,5,5] x) => (float[1,6,10,10] y) {{
      c = ConvTranspose <kernel_shape = [2, 2], strides = [2, 2], group = {group}> (x, w, b)
      y = BatchNormalization(c, gamma, beta, mean, var)
    }}""", w=_f32(4, 6 // group, 2, 2), b=_f32(6), **_bn_params(6))
    _assert_folded(model)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [False, True])
def test_gemm(trans_b, with_c):
    inputs = "x, w, c" if with_c else "x, w"
    w = _f32(5, 3) if trans_b else _f32(3, 5)
    model = model_from_text(f"""{HEADER}
    g (float[4,3] x) => (float[4,5] y) {{
      h = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> ({inputs})
      y = BatchNormalization(h, gamma, beta, mean, var)
    }}""", w=w, c=_f32(1, 5), **_bn_params(5))
    result = _assert_folded(model)
    gemm = result.model.graph.node(0)
    assert gemm.attributes["beta"].as_float() == 1.0


def test_matmul_without_bias_gets_an_add():
    model = model_from_text(f"""{HEADER}
    g (float[4,3] x) => (float[4,5] y) {{
      h = MatMul(x, w)
      y = BatchNormalization(h, gamma, beta, mean, var)
    }}""", w=_f32(3, 5), **_bn_params(5))
    result = _assert_folded(model)
    assert op_counts(result.model) == {"MatMul": 1, "Add": 1}


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add(bias_first):
    add = "Add(b, h)" if bias_first else "Add(h, b)"
    model = model_from_text(f"""{HEADER}
    g (float[4,3] x) => (float[4,5] y) {{
      h = MatMul(x, w)
      a = {add}
      y = BatchNormalization(a, gamma, beta, mean, var)
    }}""", w=_f32(3, 5), b=_f32(5), **_bn_params(5))
    result = _assert_folded(model)
    assert op_counts(result.model) == {"MatMul": 1, "Add": 1}


def test_shared_weight_is_not_mutated():
    w = _f32(4, 3, 1, 1)
    model = model_from_text(f"""{HEADER}
    g (float[1,3,4,4] x) => (float[1,4,4,4] y, float[1,4,4,4] z) {{
      c = Conv(x, w)
      y = BatchNormalization(c, gamma, beta, mean, var)
      z = Conv(x, w)
    }}""", w=w, **_bn_params(4))
    result, before, after = _fold(model)
    assert result.stats["bn_folded"] == 1
    assert_same_outputs(before, after)
    plain = next(n for n in result.model.graph if n.outputs[0].name == "z")
    assert plain.inputs[1].name == "w"
    np.testing.assert_array_equal(plain.inputs[1].const_value.numpy(), w)


def test_producer_with_two_consumers_is_skipped():
    model = model_from_text(f"""{HEADER}
    g (float[1,3,4,4] x) => (float[1,4,4,4] y, float[1,4,4,4] z) {{
      c = Conv(x, w)
      y = BatchNormalization(c, gamma, beta, mean, var)
      z = Relu(c)
    }}""", w=_f32(4, 3, 1, 1), **_bn_params(4))
    result, before, after = _fold(model)
    assert not result.modified
    assert result.stats["bn_folded"] == 0 and result.stats["bn_skipped"] == 1
    assert result.stats["skipped_reasons"] == {
        "the output of its producer is also read by another node or is a graph output": 1
    }
    assert op_counts(result.model)["BatchNormalization"] == 1
    assert_same_outputs(before, after, rtol=0, atol=0)


def test_overridable_bn_parameter_is_skipped():
    model = model_from_text(f"""{HEADER}
    g (float[1,3,4,4] x, float[4] gamma) => (float[1,4,4,4] y) {{
      c = Conv(x, w)
      y = BatchNormalization(c, gamma, beta, mean, var)
    }}""", w=_f32(4, 3, 1, 1), **_bn_params(4))
    result = FoldBatchNorm().run(model, PassContext())
    assert not result.modified
    (reason,) = result.stats["skipped_reasons"]
    assert reason == "BN scale is a graph input that callers may override"


def test_matmul_on_3d_input_is_skipped():
    model = model_from_text(f"""{HEADER}
    g (float[2,4,3] x) => (float[2,4,5] y) {{
      h = MatMul(x, w)
      y = BatchNormalization(h, gamma, beta, mean, var)
    }}""", w=_f32(3, 5), **_bn_params(4))
    result = FoldBatchNorm().run(model, PassContext())
    assert result.stats["bn_skipped"] == 1
    assert "rank-3" in next(iter(result.stats["skipped_reasons"]))


def test_training_mode_bn_is_skipped():
    model = model_from_text(f"""{HEADER}
    g (float[2,3,4,4] x) => (float[2,4,4,4] y, float[4] m) {{
      c = Conv(x, w)
      y, m, v = BatchNormalization <training_mode = 1> (c, gamma, beta, mean, var)
    }}""", w=_f32(4, 3, 1, 1), **_bn_params(4))
    result = FoldBatchNorm().run(model, PassContext())
    assert not result.modified and result.stats["bn_skipped"] == 1


def test_standalone_bn_is_left_alone():
    model = model_from_text(f"""{HEADER}
    g (float[2,4,3,3] x) => (float[2,4,3,3] y) {{
      r = Relu(x)
      y = BatchNormalization(r, gamma, beta, mean, var)
    }}""", **_bn_params(4))
    result = FoldBatchNorm().run(model, PassContext())
    assert not result.modified
    assert result.stats == {"bn_folded": 0, "bn_skipped": 0, "skipped_reasons": {}}
    assert op_counts(result.model) == {"Relu": 1, "BatchNormalization": 1}


def _logits_output(model: ir.Model) -> None:
    """Also return the pre-softmax logits: light_resnet50's softmax is flat (all weights 0.02)."""
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    model.graph.outputs.append(gemm.outputs[0])


def test_light_resnet50(light_resnet50_path):
    model = ir.load(str(light_resnet50_path))
    _logits_output(model)
    feeds = random_feeds(model)
    before = run_ort(model, feeds)
    output_names = [v.name for v in model.graph.outputs]
    ctx = PassContext()
    model = FoldConstants().run(model, ctx).model
    ctx.properties |= FoldConstants.provides

    # Random weights and BN statistics, so that every channel differs (the file's are all 0.02).
    rng = np.random.default_rng(1)
    for value in model.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype == np.float32 and array.ndim > 1:  # weights, scaled by fan-in
            new = rng.standard_normal(array.shape) / np.sqrt(array[0].size)
        elif array.dtype == np.float32 and array.ndim == 1:  # BN statistics and biases
            new = rng.uniform(0.5, 1.5, array.shape)
        else:
            continue
        value.const_value = ir.tensor(new.astype(np.float32), name=value.name)
    random_before = run_ort(model, feeds)

    result = FoldBatchNorm().run(model, ctx)

    assert result.stats == {"bn_folded": 53, "bn_skipped": 0, "skipped_reasons": {}}
    assert op_counts(result.model)["BatchNormalization"] == 0
    assert [v.name for v in result.model.graph.outputs] == output_names
    after = run_ort(result.model, feeds)
    assert_same_outputs(random_before, after, rtol=1e-3, atol=1e-4 * np.abs(random_before[1]).max())
    # the file's own weights: folding after fold-constants changes nothing measurable
    plain = ir.load(str(light_resnet50_path))
    _logits_output(plain)
    ctx = PassContext()
    plain = FoldConstants().run(plain, ctx).model
    plain = FoldBatchNorm().run(plain, ctx).model
    assert_same_outputs(before, run_ort(plain, feeds), rtol=1e-3, atol=1e-4)
