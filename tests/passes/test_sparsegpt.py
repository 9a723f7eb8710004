"""Tests of SparseGPT (``passes/_sparsegpt.py``) through ``sparsify-nm {mask: sparsegpt}`` and
``prune-magnitude {method: sparsegpt}``, and of the Gram matrices the moments engine gathers for it."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes._sparsegpt import sparsegpt_rows
from compressor.passes._sparsity import nm_keep_mask
from compressor.passes.prune_magnitude import PruneMagnitude
from compressor.passes.sparsify_nm import SparsifyNM

from compressor.data import Dataset
from compressor.errors import CompressorError, DataError, OptionsError
from compressor.inputs import model_input_specs
from compressor.model_io import verify_model
from compressor.pipeline import PassContext
from compressor.quant.taps import activation_moments
from tests.ortutil import model_from_text, run_ort

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _dataset(model: ir.Model, arrays: dict[str, np.ndarray]) -> Dataset:
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays.values())).hexdigest()
    return Dataset(arrays, model_input_specs(model), {k: False for k in arrays}, None, "test", digest)


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _ctx(data: Dataset | None) -> PassContext:
    return PassContext(calibration=data, properties={"constants-folded"})


def _weights(model: ir.Model) -> list[np.ndarray]:
    return [n.inputs[1].const_value.numpy() for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")]


def _group_nonzeros(w: np.ndarray, m: int, axis: int) -> np.ndarray:
    """Non-zeros per group of ``m`` consecutive entries along the input-channel ``axis``."""
    r = np.moveaxis(w, axis, -1)
    return (r.reshape(*r.shape[:-1], r.shape[-1] // m, m) != 0).sum(-1)


def _correlated(samples: int, tokens: int, cin: int, seed: int) -> np.ndarray:
    """Token activations whose channels are strongly correlated and differ in scale (as a transformer's)."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((cin, cin)) * 0.5 + np.eye(cin)
    latent = rng.standard_normal((samples, tokens, 4))  # a few shared directions dominate
    shared = latent @ rng.standard_normal((4, cin)) * 3.0
    scale = np.exp(rng.uniform(0, np.log(10), cin))
    return ((rng.standard_normal((samples, tokens, cin)) @ mixing + shared) * scale).astype(np.float32)


def _matmul_model(cin: int, cout: int, seed: int = 3) -> ir.Model:
    w = np.random.default_rng(seed).standard_normal((cin, cout)).astype(np.float32)
    return model_from_text(f"""{HEADER}
    g (float[2,3,{cin}] x) => (float[2,3,{cout}] y) {{
      y = MatMul(x, w)
    }}""", w=w)


def _layer_error(model: ir.Model, pruned: ir.Model, data: Dataset) -> float:
    ref = np.concatenate([run_ort(model, f)[0] for f in data.batches()])
    out = np.concatenate([run_ort(pruned, f)[0] for f in data.batches()])
    return float(np.square(out - ref).sum() / np.square(ref).sum())


def test_nm_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs():
    cin, cout = 64, 32
    model = _matmul_model(cin, cout)
    data = _dataset(model, {"x": _correlated(128, 3, cin, seed=5)})
    errors = {}
    for mask in ("magnitude", "wanda", "sparsegpt"):
        result = SparsifyNM({"mask": mask}).run(_clone(model), _ctx(data))
        assert result.modified and result.stats["mask"] == mask
        (w,) = _weights(result.model)
        assert _group_nonzeros(w, 4, axis=0).max() <= 2
        errors[mask] = _layer_error(model, result.model, data)
    assert errors["sparsegpt"] < 0.7 * min(errors["magnitude"], errors["wanda"]), errors


def test_nm_sparsegpt_reconstructs_the_kept_weights():
    """Unlike masks alone, SparseGPT changes the surviving weights (OBS update), within the pattern."""
    model = _matmul_model(16, 8)
    dense = _weights(model)[0]
    data = _dataset(model, {"x": _correlated(32, 3, 16, seed=1)})
    (w,) = _weights(SparsifyNM({"mask": "sparsegpt"}).run(model, _ctx(data)).model)
    kept = w != 0
    assert kept.sum() == w.size // 2
    assert not np.allclose(w[kept], dense[kept])


@pytest.mark.parametrize("layout", ["conv", "grouped-conv", "gemm", "gemm-transB", "matmul"])
def test_nm_sparsegpt_keeps_the_layout_and_runs(layout):
    """Every group of M consecutive input-channel weights has at most N non-zeros, for every layout."""
    rng = np.random.default_rng(0)
    if layout in ("conv", "grouped-conv"):
        group = 2 if layout == "grouped-conv" else 1
        w = rng.standard_normal((6, 16 // group, 3, 3)).astype(np.float32)
        text = f"""{HEADER}
        g (float[2,16,5,5] x) => (float[2,6,3,3] y) {{
          y = Conv <kernel_shape = [3, 3], group = {group}> (x, w)
        }}"""
        axis, x = 1, rng.standard_normal((16, 16, 5, 5)).astype(np.float32)
    elif layout.startswith("gemm"):
        trans_b = int(layout.endswith("transB"))
        w = rng.standard_normal((6, 16) if trans_b else (16, 6)).astype(np.float32)
        text = f"""{HEADER}
        g (float[2,16] x) => (float[2,6] y) {{
          y = Gemm <transB = {trans_b}> (x, w)
        }}"""
        axis, x = trans_b, rng.standard_normal((16, 16)).astype(np.float32)
    else:
        w = rng.standard_normal((16, 6)).astype(np.float32)
        text = f"""{HEADER}
        g (float[2,3,16] x) => (float[2,3,6] y) {{
          y = MatMul(x, w)
        }}"""
        axis, x = 0, _correlated(16, 3, 16, seed=2)
    model = model_from_text(text, w=w)
    result = SparsifyNM({"n": 1, "m": 4, "mask": "sparsegpt"}).run(model, _ctx(_dataset(model, {"x": x})))
    (new,) = _weights(result.model)
    assert new.shape == w.shape and new.dtype == w.dtype
    counts = _group_nonzeros(new, 4, axis)
    assert counts.max() <= 1
    assert result.stats["sparsity"] == pytest.approx(0.75, abs=1e-4)
    verify_model(result.model, strict_shapes=True)
    assert np.isfinite(run_ort(result.model, {"x": x[:2]})[0]).all()


def test_white_inputs_give_the_magnitude_mask():
    """``X X^T = c I``: ``H^-1`` is diagonal, no weight moves, and the saliency ranks by ``|w|`` (case 4)."""
    w = np.random.default_rng(4).standard_normal((8, 16))
    new = sparsegpt_rows(w, 5.0 * np.eye(16), n=2, m=4)
    np.testing.assert_array_equal(new, np.where(nm_keep_mask(np.abs(w), 2, 4), w, 0.0))


def test_unused_channel_is_pruned_first():
    """A channel never active in the data (zero Gram row) costs nothing on it: its weights go first."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 8))
    x[:, 5] = 0.0
    w = rng.standard_normal((4, 8))
    w[:, 5] = 10.0
    new = sparsegpt_rows(w, x.T @ x, n=2, m=4)
    assert (new[:, 5] == 0).all()
    assert ((new.reshape(4, 2, 4) != 0).sum(-1) <= 2).all()


def test_graph_without_layers_is_unchanged():
    model = model_from_text(f"""{HEADER}
    g (float[2,4] x) => (float[2,4] y) {{
      y = Relu(x)
    }}""")
    assert not SparsifyNM({"mask": "sparsegpt"}).run(model, _ctx(None)).modified
    assert not PruneMagnitude({"method": "sparsegpt"}).run(model, _ctx(None)).modified


def test_sparsegpt_needs_calibration():
    assert SparsifyNM({"mask": "sparsegpt"}).needs_calibration
    assert PruneMagnitude({"method": "sparsegpt"}).needs_calibration
    with pytest.raises(CompressorError, match="--calib"):
        SparsifyNM({"mask": "sparsegpt"}).run(_matmul_model(8, 4), _ctx(None))
    with pytest.raises(CompressorError, match="method sparsegpt.*--calib"):
        PruneMagnitude({"method": "sparsegpt"}).run(_matmul_model(8, 4), _ctx(None))


def test_unstructured_sparsegpt_beats_magnitude_on_correlated_inputs():
    cin, cout = 64, 32
    model = _matmul_model(cin, cout)
    data = _dataset(model, {"x": _correlated(128, 3, cin, seed=8)})
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        result = PruneMagnitude({"sparsity": 0.6, "method": method}).run(_clone(model), _ctx(data))
        assert result.stats["method"] == method
        assert result.stats.get("damp") == (0.03 if method == "sparsegpt" else None)
        (w,) = _weights(result.model)
        assert (w == 0).mean() == pytest.approx(0.6, abs=1 / w.size)
        errors[method] = _layer_error(model, result.model, data)
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors


def test_sparsegpt_is_per_layer_only():
    with pytest.raises(OptionsError, match="threshold: per-layer"):
        PruneMagnitude({"method": "sparsegpt", "threshold": "global"})


def test_gram_skips_padding_and_accumulates_over_batches():
    model = model_from_text(f"""{HEADER}
    g (float[2,3,4] x, int64[2,3] attention_mask) => (float[2,3,4] y) {{
      y = MatMul(x, w)
    }}""", w=np.eye(4, dtype=np.float32))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], np.int64)
    x[mask == 0] = 1000.0  # what the model computes at padding: never used
    data = _dataset(model, {"x": x, "attention_mask": mask})
    moments = activation_moments(model, {"x": -1, "y": -1}, data, gram=["x"])
    real = x[mask == 1].astype(np.float64)
    np.testing.assert_allclose(moments["x"].gram, real.T @ real, rtol=1e-5)
    assert moments["y"].gram is None


def test_inverse_hessian_factor():
    """Case 2: ``U`` is upper triangular with ``U^T U = (2 G + lambda I)^-1``."""
    from compressor.passes._sparsegpt import _inverse_cholesky

    x = np.random.default_rng(10).standard_normal((50, 12))
    gram = x.T @ x
    u = _inverse_cholesky(gram, 0.01)
    h = 2 * gram + 0.01 * np.mean(np.diag(2 * gram)) * np.eye(12)
    np.testing.assert_allclose(u, np.triu(u))
    assert (np.diag(u) > 0).all()
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damp", [0.0, -0.1, float("inf")])
def test_damping_must_be_positive(damp):
    with pytest.raises(OptionsError, match="'damp' must be a positive number"):
        SparsifyNM({"mask": "sparsegpt", "damp": damp})
    with pytest.raises(OptionsError, match="'damp' must be a positive number"):
        PruneMagnitude({"method": "sparsegpt", "damp": damp})


def test_damping_reaches_the_algorithm():
    """Heavy damping pushes ``H`` towards ``lambda I``: the mask tends to magnitude's and the weights move less."""
    model = _matmul_model(32, 8)
    dense = _weights(model)[0]
    data = _dataset(model, {"x": _correlated(64, 3, 32, seed=3)})
    moved = {}
    for damp in (0.01, 1e4):
        result = SparsifyNM({"mask": "sparsegpt", "damp": damp}).run(_clone(model), _ctx(data))
        assert result.stats["damp"] == damp
        (w,) = _weights(result.model)
        kept = w != 0
        moved[damp] = float(np.abs(w[kept] - dense[kept]).max())
    assert moved[1e4] < 0.01 * moved[0.01], moved


def test_overflowing_calibration_inputs_are_named():
    model = _matmul_model(8, 4)
    x = np.full((4, 3, 8), 1e30, np.float32)  # x x^T overflows float32
    with pytest.raises(DataError, match="`MatMul -> y`: SparseGPT: .*non-finite"):
        SparsifyNM({"mask": "sparsegpt"}).run(model, _ctx(_dataset(model, {"x": x})))


# --- sequential SparseGPT (passes/_layerwise.py case 2, compressor/quant/staged.py) ---------------------------


def _two_layer_model(cin: int, hidden: int, cout: int, *, biases: bool, seed: int = 11) -> ir.Model:
    """``y = relu(x W1 [+ b1]) W2 [+ b2]``: the second layer reads the first one's output."""
    rng = np.random.default_rng(seed)
    arrays = {"w1": rng.standard_normal((cin, hidden)).astype(np.float32),
              "w2": rng.standard_normal((hidden, cout)).astype(np.float32)}
    if biases:
        arrays |= {"b1": rng.standard_normal(hidden).astype(np.float32),
                   "b2": rng.standard_normal(cout).astype(np.float32)}
        body = "m1 = MatMul(x, w1)\n a = Add(m1, b1)\n h = Relu(a)\n m2 = MatMul(h, w2)\n y = Add(m2, b2)"
    else:
        body = "a = MatMul(x, w1)\n h = Relu(a)\n y = MatMul(h, w2)"
    return model_from_text(f"""{HEADER}
    g (float[2,3,{cin}] x) => (float[2,3,{cout}] y) {{
      {body}
    }}""", **arrays)


def _matmul_weights(model: ir.Model) -> list[np.ndarray]:
    return [n.inputs[1].const_value.numpy().astype(np.float64) for n in model.graph
            if n.op_type == "MatMul" and n.inputs[1].const_value is not None]


@pytest.mark.parametrize("make", [
    lambda sequential: SparsifyNM({"mask": "sparsegpt", "sequential": sequential}),
    lambda sequential: PruneMagnitude({"method": "sparsegpt", "sparsity": 0.5, "sequential": sequential}),
], ids=["sparsify-nm", "prune-magnitude"])
def test_sequential_reconstructs_the_second_layer_on_the_pruned_first_layers_outputs(make):
    """Case 2: layer 2's Hessian is gathered on ``h~ = x W1_p``, the inputs it really gets after pruning.

    Layer 1 sees the dense model either way, so its weight is the same; layer 2's objective
    ``||h~ W2 - h~ W2_p||^2`` is the one its OBS solve minimises only when its ``X X^T`` is
    ``h~ᵀ h~``: with the dense ``hᵀ h`` it solves a neighbouring problem, so its error on
    ``h~`` is higher (``relu`` between them, so ``h~`` is not a linear image of ``h``).
    """
    model = _two_layer_model(32, 32, 16, biases=False)
    data = _dataset(model, {"x": _correlated(96, 3, 32, seed=12)})
    x = data.arrays["x"].reshape(-1, 32).astype(np.float64)
    results = {seq: make(seq).run(_clone(model), _ctx(data)) for seq in (False, True)}
    assert results[True].stats["sequential"] is True and results[True].stats["statistics_stages"] == 2
    assert results[False].stats["sequential"] is False and "statistics_stages" not in results[False].stats
    (w1_dense, w2_dense), (w1_seq, w2_seq) = (_matmul_weights(results[s].model) for s in (False, True))
    np.testing.assert_array_equal(w1_seq, w1_dense)
    h = np.maximum(x @ w1_seq, 0.0)  # what the pruned first layer feeds the second
    w2 = _matmul_weights(model)[1]
    error = {seq: float(np.square(h @ w2 - h @ w2p).sum()) for seq, w2p in ((False, w2_dense), (True, w2_seq))}
    assert error[True] < error[False], error
    if isinstance(make(None), SparsifyNM):  # N:M held in every layer
        for w in (w1_seq, w2_seq):
            assert _group_nonzeros(w, 4, axis=0).max() <= 2


def test_sequential_is_the_sparsegpt_default():
    model = _two_layer_model(8, 8, 4, biases=False)
    data = _dataset(model, {"x": _correlated(16, 3, 8, seed=13)})
    stats = SparsifyNM({"mask": "sparsegpt"}).run(_clone(model), _ctx(data)).stats
    assert stats["sequential"] is True and stats["statistics_stages"] == 2
    assert PruneMagnitude({"method": "sparsegpt"}).run(_clone(model), _ctx(data)).stats["sequential"] is True


@pytest.mark.parametrize("biases", [True, False], ids=["following-add", "new-add"])
def test_sequential_bias_correction_reads_the_sequential_inputs(biases):
    """``b2' = b2 + (W2 - W2_p) E[h~]`` with ``E[h~]`` of the pruned, bias-corrected first layer.

    So on the calibration data the final model's output mean is ``E[h~] W2 + b2`` exactly
    (what the dense second layer gives on the inputs it really gets), whether the bias is
    a following ``Add`` or a new one. The dense statistics' ``E[h]`` would not give it:
    layer 1's own correction restores the mean of ``x W1 + b1`` but not of its ``relu``.
    """
    model = _two_layer_model(16, 16, 8, biases=biases)
    data = _dataset(model, {"x": _correlated(64, 3, 16, seed=14)})
    result = SparsifyNM({"mask": "sparsegpt", "bias_correction": True}).run(_clone(model), _ctx(data))
    assert result.stats["bias_corrected"] == 2
    pruned = result.model
    feeds = list(data.batches())
    outputs = np.concatenate([run_ort(pruned, f)[0] for f in feeds]).reshape(-1, 8).astype(np.float64)
    # h~: what the pruned model's second layer reads (the first layer's bias correction included)
    probe = _clone(pruned)
    probe.graph.outputs.append(next(v for n in probe.graph for v in n.outputs if v.name == "h"))
    h = np.concatenate([run_ort(probe, f)[1] for f in feeds]).reshape(-1, 16).astype(np.float64)
    w2 = _matmul_weights(model)[1]
    b2 = model.graph.initializers["b2"].const_value.numpy() if biases else 0.0
    expected = h.mean(0) @ w2 + b2
    scale = np.abs(h).mean() * np.abs(w2).sum(0)  # float32 rounding of sums of 16 products
    np.testing.assert_allclose(outputs.mean(0), expected, atol=float(scale.max()) * 1e-5)


def _stage_weights(model: ir.Model) -> list[list[str]]:
    """The weight names of each stage :func:`plan_stages` gives, earliest first."""
    from compressor.passes._layers import find_weight_layers
    from compressor.passes._layerwise import plan_stages
    from compressor.passes._sparsity import group_by_weight

    groups = group_by_weight(find_weight_layers(model.graph)[0])
    return [[groups[i][0].weight.name for i in stage] for stage in plan_stages(model.graph, groups)]


def test_stages_group_layers_reading_the_same_input():
    """Q, K and V read one input: one stage; the out-projection, FFN1 and FFN2 follow one by one."""
    d = 8
    rng = np.random.default_rng(15)
    names = ("wq", "wk", "wv", "wo", "w1", "w2")
    arrays = {n: rng.standard_normal((d, d)).astype(np.float32) for n in names}
    model = model_from_text(f"""{HEADER}
    g (float[2,3,{d}] x) => (float[2,3,{d}] y) {{
      q = MatMul(x, wq)
      k = MatMul(x, wk)
      v = MatMul(x, wv)
      kt = Transpose <perm = [0, 2, 1]> (k)
      s = MatMul(q, kt)
      p = Softmax <axis = -1> (s)
      a = MatMul(p, v)
      o = MatMul(a, wo)
      r = Add(o, x)
      f = MatMul(r, w1)
      g1 = Relu(f)
      f2 = MatMul(g1, w2)
      y = Add(f2, r)
    }}""", **arrays)
    stages = _stage_weights(model)
    assert stages == [["wq", "wk", "wv"], ["wo"], ["w1"], ["w2"]]
    data = _dataset(model, {"x": _correlated(8, 3, d, seed=16)})
    result = SparsifyNM({"mask": "sparsegpt"}).run(model, _ctx(data))
    assert result.stats["statistics_stages"] == 4 and result.stats["layers_sparsified"] == 6
    for w in _matmul_weights(result.model):
        assert _group_nonzeros(w, 4, axis=0).max() <= 2


def test_stages_of_a_conv_net_with_branches():
    """Parallel convolutions on one input share a stage; one reading their sum comes after both."""
    rng = np.random.default_rng(17)
    arrays = {n: rng.standard_normal((8, 8, 1, 1)).astype(np.float32) for n in ("c1", "c2", "c3", "c4")}
    model = model_from_text(f"""{HEADER}
    g (float[1,8,4,4] x) => (float[1,8,4,4] y) {{
      a = Conv(x, c1)
      b = Conv(x, c2)
      s = Add(a, b)
      r = Relu(s)
      c = Conv(r, c3)
      y = Conv(c, c4)
    }}""", **arrays)
    stages = _stage_weights(model)
    assert stages == [["c1", "c2"], ["c3"], ["c4"]]


def test_sequential_option_validation():
    with pytest.raises(OptionsError, match="'sequential' applies to mask 'sparsegpt' only, not 'wanda'"):
        SparsifyNM({"mask": "wanda", "sequential": True})
    with pytest.raises(OptionsError, match="'sequential' applies to method 'sparsegpt' only, not 'magnitude'"):
        PruneMagnitude({"sequential": True})
    with pytest.raises(OptionsError, match="sequential"):
        SparsifyNM({"mask": "sparsegpt", "sequential": "yes"})
    assert SparsifyNM({"mask": "wanda", "sequential": False}).options.sequential is False


def test_sequential_with_a_weight_shared_across_depths_takes_dense_statistics(caplog):
    """``y = relu(relu(relu(x) W) W3) W``: W's second reader is two stages deeper than its
    first. Sequential statistics would run the first reader with W still dense under layers
    pruned on its output (it crashed: the first reader's input was no longer held); the
    pass takes the dense model's statistics instead, says so, and keeps the N:M pattern."""
    rng = np.random.default_rng(21)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    w3 = rng.standard_normal((8, 8)).astype(np.float32)
    model = model_from_text(HEADER + """
        g (float[N, 8] x) => (float[N, 8] y) {
            r0 = Relu(x)
            a = MatMul(r0, w)
            r1 = Relu(a)
            b = MatMul(r1, w3)
            r2 = Relu(b)
            y = MatMul(r2, w)
        }""", w=w, w3=w3)
    data = _dataset(model, {"x": _correlated(16, 1, 8, seed=22).reshape(-1, 8)})
    with caplog.at_level("WARNING", logger="compressor"):
        result = SparsifyNM({"mask": "sparsegpt"}).run(_clone(model), _ctx(data))
    assert "shared by layers at different depths" in caplog.text
    assert result.stats["sequential"] is False and "statistics_stages" not in result.stats
    for weight in _weights(result.model):
        assert _group_nonzeros(weight, 4, axis=0).max() <= 2
    dense = SparsifyNM({"mask": "sparsegpt", "sequential": False}).run(_clone(model), _ctx(data)).model
    for a, b in zip(_weights(result.model), _weights(dense)):
        np.testing.assert_array_equal(a, b)
