"""Tests of ``prune-channels``: exact when removed channels are zero, consistent shapes, skips, digits CNN."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes.prune_channels import PruneChannels

from compressor import pipeline
from compressor.data import Dataset, load_npz
from compressor.errors import OptionsError
from compressor.inputs import model_input_specs
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
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _zero_out(w: np.ndarray, channels: list[int], axis: int = 0) -> np.ndarray:
    w = w.copy()
    index = [slice(None)] * w.ndim
    index[axis] = channels
    w[tuple(index)] = 0
    return w


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _prune(model: ir.Model, calibration: Dataset | None = None, **options):
    """Run the pass; check the graph is valid ONNX with consistent shapes and runs; return outputs."""
    feeds = random_feeds(model)
    before = run_ort(model, feeds)
    result = PruneChannels(options).run(model, PassContext(calibration=calibration, properties={"constants-folded"}))
    verify_model(result.model, strict_shapes=True)
    after = run_ort(result.model, feeds)
    assert [a.shape for a in after] == [b.shape for b in before]
    return result, before, after


def _conv_chain(middle: str = "r = Relu(c)", extra: dict | None = None, zero=(1, 4), cout: int = 8):
    rng = _rng(1)
    w1 = _zero_out(_f32(rng, cout, 3, 3, 3), list(zero))
    b1 = _zero_out(_f32(rng, cout), list(zero))
    return model_from_text(f"""{HEADER}
    g (float[2,3,8,8] x) => (float[2,5,8,8] y) {{
      c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
      {middle}
      y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2, b2)
    }}""", w1=w1, b1=b1, w2=_f32(rng, 5, cout, 3, 3), b2=_f32(rng, 5), **(extra or {}))


def test_registered_with_contract():
    assert pipeline._REGISTRY["prune-channels"] is PruneChannels
    assert PruneChannels.requires == frozenset({"constants-folded"})
    assert not PruneChannels().needs_calibration


def test_conv_relu_conv_is_exact_when_removed_channels_are_zero():
    model = _conv_chain()
    result, before, after = _prune(model, ratio=0.25)
    assert_same_outputs(before, after)
    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    assert convs[0].inputs[1].const_value.shape == (6, 3, 3, 3)
    assert convs[0].inputs[2].const_value.shape == (6,)
    assert convs[1].inputs[1].const_value.shape == (5, 6, 3, 3)
    assert result.stats["per_layer"] == {"Conv -> c": "8->6"}
    assert result.stats["channels_removed"] == 2
    assert result.stats["mflops"] < result.stats["mflops_before"]
    # the two Convs' MACs per sample: 64 positions x (8x27 + 5x72) before, 6 of 8 channels after
    assert result.stats["mflops_before"] == pytest.approx(2 * 64 * (8 * 27 + 5 * 8 * 9) / 1e6, abs=1e-4)
    assert result.stats["mflops"] == pytest.approx(2 * 64 * (6 * 27 + 5 * 6 * 9) / 1e6, abs=1e-4)
    assert "Conv -> y" in result.stats["skipped_layers"]  # its output is the graph's output


@pytest.mark.parametrize("middle, extra", [
    # per-channel affine ops whose parameters are sliced, pools, and x * sigmoid(x)
    ("m = Mul(c, s)\n      p = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (m)\n      r = LeakyRelu(p)",
     {"s": np.linspace(0.5, 2, 8, dtype=np.float32).reshape(1, 8, 1, 1)}),
    ("a = Add(c, s)\n      g = Sigmoid(a)\n      r = Mul(a, g)", {"s": np.zeros((8, 1, 1), np.float32)}),
    ("d = Div(c, s)\n      r = Clip(d, lo, hi)", {"s": np.float32(2.0), "lo": np.float32(0), "hi": np.float32(6)}),
    ("r = PRelu(c, s)", {"s": np.linspace(0.1, 0.8, 8, dtype=np.float32).reshape(8, 1, 1)}),
])
def test_per_channel_ops_between_are_rewritten(middle, extra):
    result, before, after = _prune(_conv_chain(middle, extra), ratio=0.25)
    assert result.stats["per_layer"] == {"Conv -> c": "8->6"}
    assert_same_outputs(before, after)


def test_batchnorm_between_is_sliced():
    rng = _rng(2)
    bn = {"gamma": _f32(rng, 8), "beta": _f32(rng, 8), "mean": _f32(rng, 8), "var": np.ones(8, np.float32)}
    result, _, _ = _prune(_conv_chain("b = BatchNormalization(c, gamma, beta, mean, var)\n      r = Relu(b)", bn),
                          ratio=0.5)
    node = next(n for n in result.model.graph if n.op_type == "BatchNormalization")
    assert [v.const_value.shape for v in node.inputs[1:]] == [(4,)] * 4


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_relu_gemm_is_exact(trans_b):
    rng = _rng(3)
    w1 = _zero_out(_f32(rng, 12, 6), [0, 7, 11])  # transB=1: output channels are rows
    w2 = _f32(rng, 4, 12) if trans_b else _f32(rng, 12, 4)
    model = model_from_text(f"""{HEADER}
    g (float[3,6] x) => (float[3,4] y) {{
      h = Gemm <transB = 1> (x, w1, b1)
      r = Relu(h)
      y = Gemm <transB = {trans_b}> (r, w2, b2)
    }}""", w1=w1, b1=_zero_out(_f32(rng, 12), [0, 7, 11]), w2=w2, b2=_f32(rng, 4))
    result, before, after = _prune(model, ratio=0.25)
    assert_same_outputs(before, after)
    gemms = [n for n in result.model.graph if n.op_type == "Gemm"]
    assert gemms[1].inputs[1].const_value.shape == ((4, 9) if trans_b else (9, 4))


def test_matmul_chain_on_the_last_axis_is_exact():
    rng = _rng(4)
    model = model_from_text(f"""{HEADER}
    g (float[2,5,6] x) => (float[2,5,4] y) {{
      h = MatMul(x, w1)
      a = Add(h, b1)
      r = Tanh(a)
      y = MatMul(r, w2)
    }}""", w1=_zero_out(_f32(rng, 6, 8), [2, 3], axis=1), b1=_zero_out(_f32(rng, 8), [2, 3]), w2=_f32(rng, 8, 4))
    result, before, after = _prune(model, ratio=0.25)
    assert_same_outputs(before, after)
    assert result.stats["per_layer"] == {"MatMul -> h": "8->6"}
    add = next(n for n in result.model.graph if n.op_type == "Add")
    assert add.inputs[1].const_value.shape == (6,)


@pytest.mark.parametrize("flatten", ["Reshape(r, shape)", "Flatten(r)"])
def test_flatten_into_gemm_maps_channels_to_features(flatten):
    rng = _rng(5)
    model = model_from_text(f"""{HEADER}
    g (float[2,3,4,4] x) => (float[2,10] y) {{
      c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
      r = Relu(c)
      f = {flatten}
      y = Gemm <transB = 1> (f, w2, b2)
    }}""", w1=_zero_out(_f32(rng, 8, 3, 3, 3), [5]), b1=_zero_out(_f32(rng, 8), [5]),
        shape=np.array([-1, 128], np.int64), w2=_f32(rng, 10, 128), b2=_f32(rng, 10))
    result, before, after = _prune(model, ratio=0.125)
    assert_same_outputs(before, after)
    gemm = next(n for n in result.model.graph if n.op_type == "Gemm")
    assert gemm.inputs[1].const_value.shape == (10, 112)
    if flatten.startswith("Reshape"):
        reshape = next(n for n in result.model.graph if n.op_type == "Reshape")
        assert reshape.inputs[1].const_value.numpy().tolist() == [-1, 112]


@pytest.mark.parametrize("tail, reason", [
    ("a = Add(c, x)\n      y = Relu(a)", "residual connection"),
    ("y = Concat <axis = 1> (c, x)", "Concat"),
    ("t = Transpose <perm = [0, 2, 3, 1]> (c)\n      y = Transpose <perm = [0, 3, 1, 2]> (t)", "Transpose"),
])
def test_unhandled_readers_skip_with_a_reason(tail, reason):
    rng = _rng(6)
    out = "float[2,16,8,8] y" if "Concat" in tail else "float[2,8,8,8] y"
    model = model_from_text(f"""{HEADER}
    g (float[2,8,8,8] x) => ({out}) {{
      c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w)
      {tail}
    }}""", w=_f32(rng, 8, 8, 3, 3))
    result, before, after = _prune(model, ratio=0.5)
    assert not result.modified
    assert reason in result.stats["skipped_layers"]["Conv -> c"]
    assert_same_outputs(before, after)


def test_scope_multiple_of_and_criterion():
    model = _conv_chain(cout=16, zero=())
    result, _, _ = _prune(model, ratio=0.3, multiple_of=4, criterion="l1", scope={"include": ["w1"]})
    assert result.stats["per_layer"] == {"Conv -> c": "16->12"}  # 16 - floor(4.8) = 12, a multiple of 4
    result, _, _ = _prune(_conv_chain(), ratio=0.5, scope={"exclude": ["re:w.*"]})
    assert not result.modified


def test_graph_without_layers_is_unchanged():
    model = model_from_text(f"""{HEADER}
    g (float[2,4] x) => (float[2,4] y) {{
      y = Relu(x)
    }}""")
    result, _, _ = _prune(model)
    assert not result.modified


def _data(model: ir.Model, samples: int = 16) -> Dataset:
    x = _rng(9).standard_normal([samples * 3, 6]).astype(np.float32)
    return Dataset({"x": x}, model_input_specs(model), {"x": False}, None, "test", hashlib.sha256(x.tobytes()).hexdigest())


def test_bias_correction_gives_readers_the_mean_they_lost():
    """Channels with zero weights but a positive bias output a constant; the reader gets it back."""
    rng = _rng(7)
    b1 = np.abs(_f32(rng, 12)) + 0.5
    model = model_from_text(f"""{HEADER}
    g (float[3,6] x) => (float[3,4] y) {{
      h = Gemm <transB = 1> (x, w1, b1)
      r = Relu(h)
      y = Gemm <transB = 1, alpha = 0.5> (r, w2)
    }}""", w1=_zero_out(_f32(rng, 12, 6), [1, 2, 3]), b1=b1, w2=_f32(rng, 4, 12))
    plain, before, after = _prune(_clone(model), ratio=0.25)
    assert np.abs(after[0] - before[0]).max() > 0.1
    corrected, before, after = _prune(model, calibration=_data(model), ratio=0.25, bias_correction=True)
    assert corrected.stats["bias_correction"] == {"Gemm -> y": "gemm C"}
    assert_same_outputs(before, after)


def test_activation_criterion_removes_the_channels_readers_miss_least():
    """Channels 2, 5 are silent (zero weights and bias) though their readers' weights are large."""
    rng = _rng(8)
    w2 = _f32(rng, 4, 8)
    w2[:, [2, 5]] *= 100.0
    model = model_from_text(f"""{HEADER}
    g (float[3,6] x) => (float[3,4] y) {{
      h = Gemm <transB = 1> (x, w1, b1)
      r = Relu(h)
      y = Gemm <transB = 1> (r, w2)
    }}""", w1=_zero_out(_f32(rng, 8, 6), [2, 5]), b1=_zero_out(_f32(rng, 8), [2, 5]), w2=w2)
    assert PruneChannels({"criterion": "activation"}).needs_calibration
    result, before, after = _prune(model, calibration=_data(model), ratio=0.25, criterion="activation")
    assert_same_outputs(before, after)


def test_invalid_options():
    with pytest.raises(OptionsError, match="must be in"):
        PruneChannels({"ratio": 1.0})
    with pytest.raises(OptionsError, match="multiple_of"):
        PruneChannels({"multiple_of": 0})


@pytest.fixture(scope="module")
def digits() -> ir.Model:
    from compressor.capture import capture

    return capture(EXAMPLES / "digits_cnn.pt2").model


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_digits_cnn_gets_smaller_and_stays_consistent(digits, ratio):
    model = _clone(digits)
    data = load_npz(EXAMPLES / "digits_eval.npz", model_input_specs(model), what="eval")
    calib = load_npz(EXAMPLES / "digits_calib.npz", model_input_specs(model), what="calib")
    result = PruneChannels({"ratio": ratio, "bias_correction": True}).run(
        model, PassContext(calibration=calib, properties={"constants-folded"}))
    verify_model(result.model, strict_shapes=True)
    assert result.stats["layers_pruned"] == 4  # 3 Convs and the hidden Gemm (through the flatten)
    assert set(result.stats["skipped_layers"]) == {"node_linear_1"}  # the classifier: a graph output
    assert result.stats["params"] < (1 - ratio) * result.stats["params_before"] + 1000
    assert result.stats["mflops"] < (1 - ratio) ** 1.5 * result.stats["mflops_before"]
    assert op_counts(result.model) == op_counts(digits)
    logits = np.concatenate([run_ort(result.model, f)[0] for f in data.batches()])
    top1 = float((logits.argmax(1) == data.labels).mean())
    assert top1 > (0.9 if ratio == 0.25 else 0.1)
