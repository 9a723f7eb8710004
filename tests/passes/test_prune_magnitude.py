"""Tests of ``prune-magnitude``: exact sparsity, per-layer vs global, scope, bias correction."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes.prune_magnitude import PruneMagnitude

from compressor import pipeline
from compressor.data import Dataset
from compressor.errors import CompressorError, OptionsError
from compressor.inputs import model_input_specs
from compressor.model_io import verify_model
from compressor.pipeline import PassContext
from tests.ortutil import model_from_text, op_counts, random_feeds, run_ort

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)


def _f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _mlp(**extra) -> ir.Model:
    """Conv -> Relu -> flatten -> Gemm(transB) -> Relu -> MatMul + bias."""
    return model_from_text(f"""{HEADER}
    g (float[4,3,6,6] x) => (float[4,5] y) {{
      c = Conv <kernel_shape = [3, 3]> (x, wc, bc)
      r = Relu(c)
      f = Flatten(r)
      h = Gemm <transB = 1> (f, wg, bg)
      a = Relu(h)
      m = MatMul(a, wm)
      y = Add(m, bm)
    }}""", wc=_f32(8, 3, 3, 3), bc=_f32(8), wg=_f32(16, 128, scale=0.1), bg=_f32(16), wm=_f32(16, 5, scale=0.01),
        bm=_f32(5), **extra)


def _dataset(model: ir.Model, samples: int = 64, seed: int = 1, shift: float = 0.0) -> Dataset:
    rng = np.random.default_rng(seed)
    specs = model_input_specs(model)
    arrays = {}
    for spec in specs:
        shape = [samples * spec.shape[0], *spec.shape[1:]]
        arrays[spec.name] = (rng.standard_normal(shape) + shift).astype(np.float32)
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays.values())).hexdigest()
    return Dataset(arrays, specs, {s.name: False for s in specs}, None, "test", digest)


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _outputs(model: ir.Model, data: Dataset) -> np.ndarray:
    return np.concatenate([run_ort(model, feed)[0] for feed in data.batches()])


def _run(model: ir.Model, calibration: Dataset | None = None, **options):
    result = PruneMagnitude(options).run(model, PassContext(calibration=calibration, properties={"constants-folded"}))
    verify_model(result.model, strict_shapes=False)
    return result


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {n.op_type: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")}


def test_registered_with_contract():
    assert pipeline._REGISTRY["prune-magnitude"] is PruneMagnitude
    assert PruneMagnitude.requires == frozenset({"constants-folded"})
    assert not PruneMagnitude().needs_calibration
    assert PruneMagnitude({"bias_correction": True}).needs_calibration


@pytest.mark.parametrize("level", [0.1, 0.5, 0.9])
def test_per_layer_sparsity_is_exact(level):
    model = _mlp()
    dense = _weights(model)
    result = _run(model, sparsity=level)
    assert result.modified
    for op, w in _weights(result.model).items():
        k = int(np.floor(level * w.size))
        assert int((w == 0).sum()) == k, op
        # the k smallest went: every kept weight is at least as large as every pruned one
        kept, gone = np.abs(dense[op][w != 0]), np.abs(dense[op][w == 0])
        assert kept.min() >= gone.max()
        np.testing.assert_array_equal(w[w != 0], dense[op][w != 0])
    assert result.stats["layers_pruned"] == 3
    assert result.stats["per_layer"] == {
        name: pytest.approx(v, abs=1e-4) for name, v in result.stats["per_layer"].items()}
    assert abs(result.stats["sparsity"] - level) < 0.01
    assert result.stats["weight_mb_zlib"] < result.stats["weight_mb_zlib_before"]
    run_ort(result.model, random_feeds(result.model))


def test_global_threshold_prunes_small_layers_more():
    model = _mlp()
    result = _run(model, sparsity=0.5, threshold="global")
    per = {n.op_type: float((n.inputs[1].const_value.numpy() == 0).mean()) for n in result.model.graph
           if n.op_type in ("Conv", "Gemm", "MatMul")}
    total = sum(w.size for w in _weights(result.model).values())
    zeros = sum(int((w == 0).sum()) for w in _weights(result.model).values())
    assert zeros == int(np.floor(0.5 * total))
    # MatMul's weights are 100x smaller than Conv's: one global threshold takes nearly all of them
    assert per["MatMul"] > 0.9 and per["Conv"] < 0.2
    assert result.stats["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_zero_sparsity_changes_nothing():
    result = _run(_mlp(), sparsity=0.0)
    assert not result.modified


def test_graph_without_layers_is_unchanged():
    model = model_from_text(f"""{HEADER}
    g (float[2,3] x) => (float[2,3] y) {{
      y = Relu(x)
    }}""")
    result = _run(model, sparsity=0.5)
    assert not result.modified
    assert result.stats["layers_pruned"] == 0


@pytest.mark.parametrize("scope, pruned", [
    ({"exclude": ["re:.*Gemm.*"]}, {"Conv", "MatMul"}),
    ({"include": ["wc"]}, {"Conv"}),  # by weight name
    ({"include": ["re:w[gm]"], "exclude": ["wm"]}, {"Gemm"}),
])
def test_scope(scope, pruned):
    model = _mlp()
    for node in model.graph:
        node.name = f"{node.op_type}_0"
    result = _run(model, sparsity=0.5, scope=scope)
    changed = {op for op, w in _weights(result.model).items() if (w == 0).any()}
    assert changed == pruned
    assert all(why == "outside the recipe's scope" for why in result.stats["skipped_layers"].values())


def test_activation_matmul_and_graph_input_weight_are_skipped():
    model = model_from_text(f"""{HEADER}
    g (float[2,4] x, float[4,4] w) => (float[2,4] y) {{
      y = MatMul(x, w)
    }}""")
    result = _run(model, sparsity=0.5)
    assert not result.modified
    assert "not a constant float initializer" in next(iter(result.stats["skipped_layers"].values()))


def test_shared_weight_outside_scope_is_not_mutated():
    w = _f32(4, 4)
    model = model_from_text(f"""{HEADER}
    g (float[2,4] x) => (float[2,4] y, float[2,4] z) {{
      y = MatMul(x, w)
      z = Gemm(x, w)
    }}""", w=w)
    result = _run(model, sparsity=0.5, ops=["MatMul"])
    mm = next(n for n in result.model.graph if n.op_type == "MatMul")
    gemm = next(n for n in result.model.graph if n.op_type == "Gemm")
    assert (mm.inputs[1].const_value.numpy() == 0).sum() == 8
    assert gemm.inputs[1].name == "w"
    np.testing.assert_array_equal(gemm.inputs[1].const_value.numpy(), w)


@pytest.mark.parametrize("layer, weights", [
    ("y = Conv <kernel_shape = [3, 3]> (x, w, b)", {"w": (5, 4, 3, 3), "b": (5,)}),
    ("y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (x, w, b)", {"w": (5, 4, 3, 3), "b": (5,)}),
    ("y = Conv <kernel_shape = [3, 3], auto_pad = \"SAME_LOWER\", strides = [2, 2]> (x, w)", {"w": (5, 4, 3, 3)}),
    ("y = Conv <kernel_shape = [1, 3], group = 2> (x, w)", {"w": (6, 2, 1, 3)}),
    ("y = Conv <kernel_shape = [3, 3], dilations = [2, 2], pads = [2, 1, 0, 2]> (x, w)", {"w": (5, 4, 3, 3)}),
    ("y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (f, w, b)", {"w": (5, 144), "b": (5,)}),
    ("y = Gemm <transB = 0> (f, w)", {"w": (144, 5)}),
    ("m = MatMul(f, w)\n      y = Add(b, m)", {"w": (144, 5), "b": (5,)}),
])
def test_bias_correction_restores_the_output_mean_exactly(layer, weights):
    """One linear layer: ``b' = b + (W - W_p) E[x]`` makes the mean output on the data exact."""
    out = "float[4,5] y" if "Conv" not in layer else f"float[4,{weights['w'][0]},?,?] y"
    rng = np.random.default_rng(3)
    model = model_from_text(f"""{HEADER}
    g (float[4,4,6,6] x) => ({out}) {{
      f = Flatten(x)
      {layer}
    }}""", **{k: rng.standard_normal(v).astype(np.float32) for k, v in weights.items()})
    data = _dataset(model, samples=8, shift=1.0)
    dense = _outputs(model, data)
    plain = _outputs(_run(_clone(model), sparsity=0.7).model, data)
    result = _run(model, calibration=data, sparsity=0.7, bias_correction=True)
    corrected = _outputs(result.model, data)
    assert result.stats["bias_corrected"] == 1
    axes = (0, 2, 3) if dense.ndim == 4 else (0,)
    np.testing.assert_allclose(corrected.mean(axes), dense.mean(axes), atol=1e-4)
    assert np.abs(plain.mean(axes) - dense.mean(axes)).max() > 0.05


def test_bias_correction_on_a_network():
    model = _mlp()
    data = _dataset(model, shift=1.0)  # inputs with a non-zero mean: pruning moves the outputs' mean
    dense = _outputs(model, data)
    plain = _outputs(_run(_clone(model), sparsity=0.8).model, data)
    corrected_result = _run(model, calibration=data, sparsity=0.8, bias_correction=True)
    corrected = _outputs(corrected_result.model, data)
    assert corrected_result.stats["bias_corrected"] == 3
    assert corrected_result.stats["bias_correction"] == {"Conv -> c": "bias", "Gemm -> h": "gemm C", "MatMul -> m": "add"}
    err_plain = np.abs(plain.mean(0) - dense.mean(0)).mean()
    err_corrected = np.abs(corrected.mean(0) - dense.mean(0)).mean()
    assert err_corrected < err_plain
    assert np.square(corrected - dense).mean() < np.square(plain - dense).mean()
    assert op_counts(corrected_result.model) == {"Conv": 1, "Relu": 2, "Flatten": 1, "Gemm": 1, "MatMul": 1, "Add": 1}


def test_bias_correction_adds_missing_biases():
    model = model_from_text(f"""{HEADER}
    g (float[4,3,5,5] x) => (float[4,6] y) {{
      c = Conv <kernel_shape = [3, 3]> (x, wc)
      f = Flatten(c)
      h = Gemm <transB = 0, alpha = 0.5> (f, wg)
      y = MatMul(h, wm)
    }}""", wc=_f32(4, 3, 3, 3), wg=_f32(36, 8), wm=_f32(8, 6))
    data = _dataset(model, shift=1.0)
    result = _run(model, calibration=data, sparsity=0.6, bias_correction=True)
    assert result.stats["bias_correction"] == {"Conv -> c": "bias", "Gemm -> h": "gemm C", "MatMul -> y": "new add"}
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    run_ort(result.model, {"x": data.arrays["x"][:4]})


def test_bias_correction_needs_calibration():
    with pytest.raises(CompressorError, match="--calib"):
        _run(_mlp(), sparsity=0.5, bias_correction=True)


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "must be in"),
    ({"threshold": "layer"}, "is not one of"),
    ({"ops": ["Relu"]}, "cannot be pruned"),
    ({"sparsty": 0.5}, "did you mean 'sparsity'"),
])
def test_invalid_options(options, message):
    with pytest.raises(OptionsError, match=message):
        PruneMagnitude(options)
