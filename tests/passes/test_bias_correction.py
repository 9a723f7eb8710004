"""The one bias correction (passes/_bias_correction.py), as ``quantize`` and the sparsity passes use it.

References are the exact output mean shift, computed in float64 with numpy/torch on the
calibration data (real tokens only, zero padding included); the tolerance is float32's
rounding of the stored bias.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes.sparsify_nm import SparsifyNM

from compressor.data import Dataset
from compressor.inputs import model_input_specs
from compressor.pipeline import PassContext, build_pass
from tests.ortutil import model_from_text, onnx_specs_target

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
EPS32 = float(np.finfo(np.float32).eps)


def _dataset(model: ir.Model, arrays: dict[str, np.ndarray]) -> Dataset:
    return Dataset(arrays, model_input_specs(model), {n: False for n in arrays}, None, "test", "bias-correction")


def _token_model(k: int = 8, n: int = 4) -> ir.Model:
    """``y = x @ W`` on ``[batch, tokens, k]`` with an attention mask, no bias ``Add``."""
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    return model_from_text(f"""{HEADER}
    g (float[2,5,{k}] x, int64[2,5] attention_mask) => (float[2,5,{n}] y) {{
      y = MatMul(x, w)
    }}""", w=w)


def _token_data(model: ir.Model, k: int = 8) -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 5, k)) + 0.5).astype(np.float32)
    mask = np.ones((6, 5), np.int64)
    mask[:, 3:] = 0
    mask[0, 1:] = 0
    x[mask == 0] = 1000.0  # what a model computes at padding: never data
    return _dataset(model, {"x": x, "attention_mask": mask}), x[mask == 1].astype(np.float64)


def _weight_dq(model: ir.Model) -> np.ndarray:
    """``DQ(Wq)`` of the (only) quantized weight, computed in float32 as DequantizeLinear does."""
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None)
    wq = dq.inputs[0].const_value.numpy().astype(np.float32)
    scale = dq.inputs[1].const_value.numpy().astype(np.float32)
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    shape = [1] * wq.ndim
    shape[axis] = -1
    return (wq * (scale.reshape(shape) if scale.ndim else scale)).astype(np.float64)


def _quantize(model: ir.Model, data: Dataset):
    # The onnx specs without its speed rules: the 4-channel Conv below would stay float on ONNX Runtime.
    ctx = PassContext(target=onnx_specs_target(), calibration=data, properties={"constants-folded"})
    return build_pass("quantize", {"bias_correction": True, "calibrator": "minmax"}).run(model, ctx)


def test_quantize_corrects_a_matmul_without_add_over_real_tokens_only():
    model = _token_model()
    w = model.graph.initializers["w"].const_value.numpy().astype(np.float64)
    data, real = _token_data(model)
    result = _quantize(model, data)
    assert result.stats["bias_corrected"] == 1
    adds = [n for n in result.model.graph if n.op_type == "Add"]
    assert len(adds) == 1, "a MatMul without a bias Add gets one"
    bias = next(v for v in adds[0].inputs if v.const_value is not None).const_value.numpy()
    mean = real.mean(axis=0)
    expected = -(mean @ (_weight_dq(result.model) - w))  # b' = b - E[x] (DQ(Wq) - W)
    assert np.abs(expected).max() > 0
    # float32 rounding of DQ(Wq) (relative to |W|) summed over the reduction
    np.testing.assert_allclose(bias, expected, rtol=4 * EPS32, atol=4 * EPS32 * (np.abs(mean) @ np.abs(w)).max())


def test_quantize_corrects_a_padded_conv_exactly():
    """Zero padding: border outputs see fewer inputs; the correction restores the mean of every output."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) / 3.0
    b = rng.standard_normal(4).astype(np.float32)
    model = model_from_text(f"""{HEADER}
    g (float[2,3,6,6] x) => (float[2,4,6,6] y) {{
      y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
    }}""", w=w, b=b)
    x = (rng.standard_normal((8, 3, 6, 6)) + 1.0).astype(np.float32)  # a large mean: borders matter
    result = _quantize(model, _dataset(model, {"x": x}))
    assert result.stats["bias_corrected"] == 1
    conv = next(n for n in result.model.graph if n.op_type == "Conv")
    bias = conv.inputs[2].const_value.numpy()
    error = _weight_dq(result.model) - w.astype(np.float64)
    shift = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(error), padding=1)
    expected = b.astype(np.float64) - shift.mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(bias, expected, rtol=4 * EPS32, atol=4 * EPS32 * np.abs(expected).max())


def test_sparsity_and_quantize_share_the_correction_on_a_matmul_without_add():
    """``sparsify-nm`` adds the same kind of ``Add``, with ``b = (W - W_p) E[x]`` over real tokens."""
    model = _token_model()
    w = model.graph.initializers["w"].const_value.numpy().astype(np.float64)
    data, real = _token_data(model)
    result = SparsifyNM({"bias_correction": True}).run(
        model, PassContext(calibration=data, properties={"constants-folded"}))
    assert result.stats["bias_correction"] == {"MatMul -> y": "new add"}
    add = next(n for n in result.model.graph if n.op_type == "Add")
    bias = next(v for v in add.inputs if v.const_value is not None).const_value.numpy()
    pruned = result.model.graph.initializers["w"].const_value.numpy().astype(np.float64)
    expected = real.mean(axis=0) @ (w - pruned)
    np.testing.assert_allclose(bias, expected, rtol=4 * EPS32, atol=4 * EPS32 * np.abs(expected).max())
