"""Tests of ``sparsify-nm``: the N:M property on random shapes, masks, and the int8-nm artifact."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compressor.passes.sparsify_nm import SparsifyNM, nm_keep_mask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor import pipeline
from compressor.data import Dataset
from compressor.errors import CompressorError, OptionsError
from compressor.inputs import model_input_specs
from compressor.model_io import verify_model
from compressor.pipeline import PassContext
from compressor.quant.math import dequantize_array
from compressor.quant.spec import QuantSpec
from tests.ortutil import model_from_text, random_feeds, run_ort

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _reduction_last(op: str, w: np.ndarray, trans_b: int = 0) -> np.ndarray:
    """``w`` with its reduction (input-channel) axis last, every other axis before it.

    Written independently of the pass: Conv ``M x C x k..`` reduces over axis 1, Gemm
    ``transB=1`` (``N x K``) over axis 1, Gemm ``transB=0`` and MatMul (``K x N``) over axis 0.
    """
    if op == "Conv" or (op == "Gemm" and trans_b):
        return np.moveaxis(w, 1, -1)
    return np.moveaxis(w, 0, -1)


def _group_nonzeros(op: str, w: np.ndarray, m: int, trans_b: int = 0) -> np.ndarray:
    r = _reduction_last(op, w, trans_b)
    return (r.reshape(*r.shape[:-1], r.shape[-1] // m, m) != 0).sum(-1)


def _layer_model(op: str, cin: int, cout: int, *, trans_b: int = 0, kernel: tuple[int, int] = (1, 1),
                 group: int = 1, seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    if op == "Conv":
        kh, kw = kernel
        w = rng.standard_normal((cout, cin // group, kh, kw)).astype(np.float32)
        text = f"""{HEADER}
        g (float[2,{cin},5,5] x) => (float[2,{cout},{6 - kh},{6 - kw}] y) {{
          y = Conv <kernel_shape = [{kh}, {kw}], group = {group}> (x, w)
        }}"""
    elif op == "Gemm":
        w = rng.standard_normal((cout, cin) if trans_b else (cin, cout)).astype(np.float32)
        text = f"""{HEADER}
        g (float[2,{cin}] x) => (float[2,{cout}] y) {{
          y = Gemm <transB = {trans_b}> (x, w)
        }}"""
    else:
        w = rng.standard_normal((cin, cout)).astype(np.float32)
        text = f"""{HEADER}
        g (float[2,3,{cin}] x) => (float[2,3,{cout}] y) {{
          y = MatMul(x, w)
        }}"""
    return model_from_text(text, w=w)


def _run(model: ir.Model, calibration: Dataset | None = None, **options):
    return SparsifyNM(options).run(model, PassContext(calibration=calibration, properties={"constants-folded"}))


def _weight(model: ir.Model) -> np.ndarray:
    return next(n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")).inputs[1].const_value.numpy()


def test_registered_with_contract():
    assert pipeline._REGISTRY["sparsify-nm"] is SparsifyNM
    assert SparsifyNM.requires == frozenset({"constants-folded"})
    assert not SparsifyNM().needs_calibration
    assert SparsifyNM({"mask": "wanda"}).needs_calibration
    assert SparsifyNM({"bias_correction": True}).needs_calibration


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from([("Conv", 0), ("Gemm", 0), ("Gemm", 1), ("MatMul", 0)]),
    nm=st.integers(2, 8).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m))),
    groups=st.integers(1, 4),
    cout=st.integers(1, 6),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
)
def test_every_group_of_m_has_at_most_n_nonzeros(layout, nm, groups, cout, kernel, seed):
    op, trans_b = layout
    n, m = nm
    model = _layer_model(op, groups * m, cout, trans_b=trans_b, kernel=kernel, seed=seed)
    dense = _weight(model)
    result = _run(model, n=n, m=m)
    w = _weight(result.model)
    assert w.shape == dense.shape
    counts = _group_nonzeros(op, w, m, trans_b)
    assert counts.max() <= n
    assert (counts == n).all()  # random weights have no zeros: exactly n kept per group
    # the kept weights are the n largest of their group, unchanged
    kept = w != 0
    np.testing.assert_array_equal(w[kept], dense[kept])
    r_dense, r_kept = _reduction_last(op, np.abs(dense), trans_b), _reduction_last(op, kept, trans_b)
    g_dense = r_dense.reshape(*r_dense.shape[:-1], -1, m)
    g_kept = r_kept.reshape(*r_kept.shape[:-1], -1, m)
    smallest_kept = np.where(g_kept, g_dense, np.inf).min(-1)
    largest_gone = np.where(g_kept, -np.inf, g_dense).max(-1)
    assert (smallest_kept >= largest_gone).all()
    assert result.stats["sparsity"] == pytest.approx(1 - n / m, abs=1e-4)
    assert result.stats["pattern"] == f"{n}:{m}"


def test_grouped_conv_and_output_runs():
    model = _layer_model("Conv", 8, 6, kernel=(3, 3), group=2)
    result = _run(model)
    counts = _group_nonzeros("Conv", _weight(result.model), 4)
    assert counts.max() == 2
    verify_model(result.model, strict_shapes=True)
    run_ort(result.model, random_feeds(result.model))


def test_keep_mask_ties_go_to_the_earlier_position():
    mask = nm_keep_mask(np.array([[1.0, 1.0, 1.0, 1.0, 0.0, 3.0, 0.0, 2.0]]), 2, 4)
    assert mask.tolist() == [[True, True, False, False, False, True, False, True]]


def test_channels_not_a_multiple_of_m_are_skipped():
    model = _layer_model("Conv", 6, 4, kernel=(3, 3))
    result = _run(model)
    assert not result.modified
    assert result.stats["skipped_layers"] == {"Conv -> y": "6 input channels per group, not a multiple of m=4"}


def test_graph_without_layers_is_unchanged():
    model = model_from_text(f"""{HEADER}
    g (float[2,4] x) => (float[2,4] y) {{
      y = Relu(x)
    }}""")
    assert not _run(model).modified


def test_scope_excludes_by_pattern():
    model = model_from_text(f"""{HEADER}
    g (float[2,8] x) => (float[2,4] y) {{
      h = MatMul(x, w1)
      y = MatMul(h, classifier_w)
    }}""", w1=np.ones((8, 8), np.float32), classifier_w=np.ones((8, 4), np.float32))
    result = _run(model, scope={"exclude": ["re:.*classifier.*"]})
    nodes = list(result.model.graph)
    assert (nodes[0].inputs[1].const_value.numpy() == 0).mean() == 0.5
    assert (nodes[1].inputs[1].const_value.numpy() != 0).all()


@pytest.mark.parametrize("options, message", [
    ({"n": 4, "m": 4}, "1 <= n < m"),
    ({"n": 0, "m": 4}, "1 <= n < m"),
    ({"mask": "random"}, "is not one of"),
])
def test_invalid_options(options, message):
    with pytest.raises(OptionsError, match=message):
        SparsifyNM(options)


def _outlier_data(model: ir.Model, cin: int, samples: int = 64) -> Dataset:
    """Activations whose input channels differ in scale by up to 30x (as transformers' do)."""
    rng = np.random.default_rng(7)
    scale = np.exp(rng.uniform(0, np.log(30), cin)).astype(np.float32)
    x = (rng.standard_normal((samples * 2, 3, cin)) * scale).astype(np.float32)
    specs = model_input_specs(model)
    return Dataset({"x": x}, specs, {"x": False}, None, "test", hashlib.sha256(x.tobytes()).hexdigest())


def test_wanda_mask_beats_magnitude_on_outlier_channels():
    cin, cout = 64, 32
    model = _layer_model("MatMul", cin, cout, seed=3)
    data = _outlier_data(model, cin)
    held_out = _outlier_data(model, cin)
    ref = np.concatenate([run_ort(model, f)[0] for f in held_out.batches()])

    def error(mask: str) -> float:
        clone = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        result = _run(clone, calibration=data, mask=mask)
        assert result.stats["mask"] == mask
        assert _group_nonzeros("MatMul", _weight(result.model), 4).max() <= 2
        out = np.concatenate([run_ort(result.model, f)[0] for f in held_out.batches()])
        return float(np.square(out - ref).sum() / np.square(ref).sum())

    magnitude, wanda = error("magnitude"), error("wanda")
    assert wanda < 0.7 * magnitude, (wanda, magnitude)


def test_activation_norms_ignore_padding_tokens():
    from compressor.quant.taps import activation_moments

    model = model_from_text(f"""{HEADER}
    g (float[2,3,4] x, int64[2,3] attention_mask) => (float[2,3,4] y) {{
      y = MatMul(x, w)
    }}""", w=np.eye(4, dtype=np.float32))
    x = np.ones((4, 3, 4), np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], np.int64)
    x[mask == 0] = 1000.0  # what the model computes at padding: never used
    data = Dataset({"x": x, "attention_mask": mask}, model_input_specs(model), {"x": False, "attention_mask": False},
                   None, "test", "padding")
    moments = activation_moments(model, {"x": -1, "y": -1}, data)
    for m in moments.values():
        assert m.count == int(mask.sum())
        np.testing.assert_allclose(m.mean, 1.0)
        np.testing.assert_allclose(m.norm, np.sqrt(mask.sum()))


def test_wanda_needs_calibration():
    with pytest.raises(CompressorError, match="--calib"):
        _run(_layer_model("MatMul", 8, 4), mask="wanda")


@pytest.fixture(scope="module")
def int8_nm_artifact(tmp_path_factory) -> Path:
    """The digits CNN through the built-in ``int8-nm`` recipe on the onnx target."""
    from compressor.flow.compress import compress

    out = tmp_path_factory.mktemp("int8nm") / "out"
    result = compress(EXAMPLES / "digits_cnn.pt2", recipe="int8-nm", outdir=out, target="onnx",
                      calib=EXAMPLES / "digits_calib.npz", eval_data=EXAMPLES / "digits_eval.npz", latency_runs=1)
    assert [r["name"] for r in result.manifest["passes"]] == ["fold-constants", "fold-batchnorm", "sparsify-nm",
                                                              "quantize"]
    return out


def test_int8_nm_artifact_keeps_the_pattern(int8_nm_artifact):
    """Symmetric int8 weights map 0 to 0: the 2:4 pattern survives quantization."""
    manifest = __import__("json").loads((int8_nm_artifact / "manifest.json").read_text())
    sparse = manifest["passes"][2]["stats"]
    assert sparse["pattern"] == "2:4" and sparse["layers_sparsified"] >= 2
    assert sparse["mask"] == "sparsegpt"  # the best one-shot method (README, sparsity section)
    proto = onnx.load(int8_nm_artifact / "model.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    checked = quantized = 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq = producers.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear":
            q, scale, zp = (inits[name] for name in dq.input)
            assert q.dtype == np.int8 and not zp.any()  # symmetric: zero point 0
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            w = dequantize_array(q, scale, zp, QuantSpec("int8", True, axis))
            assert ((q == 0) == (w == 0)).all()
            quantized += 1
        else:  # given back to float by accuracy control: still sparse
            w = inits[node.input[1]]
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if node.op_type == "Conv" and w.shape[1] % 4 == 0 or node.op_type == "Gemm" and "classifier" not in node.input[1]:
            assert _group_nonzeros(node.op_type, w, 4, trans_b).max() <= 2, node.name
            checked += 1
    assert quantized >= 3
    assert checked == sparse["layers_sparsified"]
    assert manifest["metrics"]["compressed"]["top1"] > 0.8


@pytest.mark.parametrize("mask", ["sparsegpt", "wanda", "magnitude", "keep"])
def test_already_nm_weight_is_left_exactly_as_it_is(mask):
    """A recovered (fine-tuned, already 2:4) weight must not be re-pruned or OBS-updated."""
    cin, cout = 16, 8
    model = _layer_model("MatMul", cin, cout, seed=5)
    data = _outlier_data(model, cin)
    first = _run(model, calibration=data, mask="sparsegpt", bias_correction=True).model
    sparse = _weight(first).copy()
    again = _run(first, calibration=data, mask=mask, bias_correction=True)
    assert not again.modified
    assert again.stats["already_sparse"] == 1
    np.testing.assert_array_equal(_weight(again.model), sparse)


def test_keep_prunes_a_dense_weight_by_magnitude():
    model = _layer_model("MatMul", 16, 8, seed=6)
    dense = _weight(model).copy()
    result = _run(model, mask="keep")
    assert result.modified
    assert _group_nonzeros("MatMul", _weight(result.model), 4).max() <= 2
    keep = _weight(result.model) != 0
    assert np.abs(dense[keep]).sum() >= np.abs(dense[~keep]).sum()
