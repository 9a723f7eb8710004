"""Accuracy control on ``qnn-htp`` tries no layer whose 16-bit promotion changes nothing.

The graph is one attention block with a residual sum and a LayerNormalization, as a
transformer layer has them: on a target without a float path the transformer preset gives
the key projection, the scores ``Q·Kᵀ`` and ``probs · V`` 16-bit activations (``quantize``), and ``qnn-legalize``
runs the residual ``Add`` and the LayerNormalization at 16 bits (its norms rule). Promoting
the preset's three layers writes the pairs they read: the model stays what it was, so they
are neither ranked nor tried. A layer next to a 16-bit tensor of the rule (``o_proj``
writes the residual sum's input, ``head`` reads the normalization's output) still reads its
own 8-bit pair, and promoting it does change the model.

Run on ONNX Runtime with qnn-htp's capabilities and rules (always) and on the HTP backend of
``onnxruntime-qnn`` (skipped where it cannot be imported).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import compressor.flow.accuracy as accuracy_module
import compressor.flow.compress as compress_module
from compressor.data import load_npz
from compressor.flow.compress import compress
from compressor.inputs import model_input_specs
from compressor.model_digest import model_digest
from compressor.model_io import clone_model, save_model
from compressor.pass_manager import PassManager
from compressor.pipeline import PassContext, build_pass
from compressor.quant.revert import already_wide, give_back
from tests.ortutil import SimulatedHtp, model_from_text

HAVE_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
S, D = 6, 16
LAYERS = ["q_proj", "k_proj", "v_proj", "scores", "context", "o_proj", "head"]
PRESET_16 = ["k_proj", "scores", "context"]


def block() -> ir.Model:
    """x[1,S,D] -> Q/K/V -> softmax(Q·Kᵀ/4)·V -> o_proj -> + x -> LayerNorm -> head."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    return model_from_text(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,{S},{D}] x) => (float[1,{S},{D}] y) {{
      [q_proj] q = MatMul(x, wq)
      [k_proj] k = MatMul(x, wk)
      [v_proj] v = MatMul(x, wv)
      kt = Transpose <perm = [0, 2, 1]> (k)
      [scores] s = MatMul(q, kt)
      ss = Mul(s, scale)
      p = Softmax <axis = -1> (ss)
      [context] c = MatMul(p, v)
      [o_proj] o = MatMul(c, wo)
      [residual] r = Add(o, x)
      [norm] n = LayerNormalization <axis = -1> (r, gamma, beta)
      [head] y = MatMul(n, wh)
    }}""", wq=w(D, D), wk=w(D, D), wv=w(D, D), wo=w(D, D), wh=w(D, D), scale=np.array(0.25, np.float32),
        gamma=(1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
        beta=(0.1 * rng.standard_normal(D)).astype(np.float32))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("htp-acskip")
    rng = np.random.default_rng(1)
    out = {"model": tmp / "block.onnx", "calib": tmp / "calib.npz", "eval": tmp / "eval.npz",
           "recipe": tmp / "w8a8-all-tries.yaml"}
    save_model(block(), out["model"])
    np.savez(out["calib"], x=rng.standard_normal((32, S, D)).astype(np.float32))
    np.savez(out["eval"], x=rng.standard_normal((12, S, D)).astype(np.float32))
    root = Path(__file__).resolve().parents[2] / "recipes"
    # Every layer may be tried (max_fallback 1) and each is ranked on every ranking sample
    # (no screen), so a run that tries the no-op layers and one that skips them try the
    # other layers in the same order.
    text = (root / "w8a8-npu.yaml").read_text().replace(
        "accuracy: {metric: auto, max_drop: 0.01}", "accuracy: {metric: auto, max_fallback: 1.0, screen_samples: 0}")
    assert "max_fallback" in text
    out["recipe"].write_text(text)
    return out


def test_the_layers_a_promotion_leaves_as_they_are_are_the_preset_s(files):
    """By the record (``already_wide``) and by effect (the model after ``qnn-legalize``,
    compared by :func:`model_digest`), layer by layer: the same three layers."""
    model = block()
    ctx = PassContext(target=SimulatedHtp(), calibration=load_npz(files["calib"], model_input_specs(model)))
    model = build_pass("fold-constants", None).run(model, ctx).model  # with the shapes quantize reads
    ctx.properties.add("constants-folded")
    quantized = build_pass("quantize", {"activations": "int8", "calibrator": "minmax"}).run(model, ctx)
    assert quantized.stats["layers"] == LAYERS
    assert sorted(quantized.stats["layers_widened_by_preset"]) == sorted(PRESET_16)
    record = quantized.quantization
    assert already_wide(record) == PRESET_16
    legalize = [build_pass("qnn-legalize", {"activations": "int8"})]
    ctx.properties.add("quantized")

    def legalized(given: list[str]) -> ir.Model:
        edited = give_back(clone_model(quantized.model), record, given, "int16")
        return PassManager(legalize, verify=False).run(edited, ctx).model

    base = legalized([])
    norms = PassManager(legalize, verify=False).run(clone_model(quantized.model), ctx).reports[-1].stats
    assert norms["norms_16bit"] == 1, "the residual Add and the LayerNorm run at 16 bits"
    same = [name for name in LAYERS if model_digest(legalized([name])) == model_digest(base)]
    assert same == PRESET_16


def _count_lowerings(monkeypatch, target_class) -> list[Path]:
    lowered: list[Path] = []
    real = target_class.lower_pinned
    monkeypatch.setattr(target_class, "lower_pinned",
                        lambda self, model, outdir, pin: lowered.append(outdir) or real(self, model, outdir, pin))
    return lowered


def _target(kind: str, monkeypatch) -> type:
    if kind == "simulated":
        monkeypatch.setattr(compress_module, "get_target", lambda name, target_cpu="host": SimulatedHtp())
        return SimulatedHtp
    if not HAVE_QNN:
        pytest.skip("onnxruntime-qnn cannot be imported: no QNN HTP backend here")
    from compressor.targets.qnn_htp import QnnHtpTarget

    return QnnHtpTarget


def _run(files, out: Path) -> dict:
    return compress(files["model"], recipe=files["recipe"], target="qnn-htp", outdir=out, inputs=["x=1x6x16"],
                    calib=files["calib"], eval_data=files["eval"], max_drop=0.0, latency_runs=1).manifest


@pytest.mark.parametrize("kind", ["simulated", "qnn-htp"])
def test_accuracy_control_never_tries_a_layer_already_at_16_bits(files, tmp_path, monkeypatch, kind):
    """A zero budget makes accuracy control try every layer it may: the preset's three are not
    ranked, not lowered, not evaluated, and the run ends as one that tries them (each such
    try measures the drop it started from and is undone) does."""
    target_class = _target(kind, monkeypatch)
    lowered = _count_lowerings(monkeypatch, target_class)
    manifest = _run(files, tmp_path / "skip")
    control = manifest["accuracy_control"]
    assert control["action"] == "int16"
    assert control["skipped_already_16bit"] == len(PRESET_16)
    assert sorted(control["skipped_already_16bit_layers"]) == sorted(PRESET_16)
    tried = [s["layer"] for s in control["steps"][1:]]
    assert sorted(tried) == sorted(set(LAYERS) - set(PRESET_16)), "every other layer is tried once"
    assert sorted(r["layer"] for r in control["ranking"]) == sorted(tried)
    assert len(lowered) == len(tried), "one lowering per try, none for a skipped layer"

    # Before: nothing skipped (no record check, no two candidates alike).
    monkeypatch.setattr(accuracy_module, "already_wide", lambda record: [])
    monkeypatch.setattr(accuracy_module, "model_digest", lambda model: str(id(model)))
    lowered.clear()
    old = _run(files, tmp_path / "all")
    before = old["accuracy_control"]
    assert before["skipped_already_16bit"] == 0
    assert sorted(s["layer"] for s in before["steps"][1:]) == sorted(LAYERS) and len(lowered) == len(LAYERS)
    for index, step in enumerate(before["steps"][1:], 1):
        if step["layer"] in PRESET_16:  # the model it started from, measured again, undone
            current = next(s["drop"] for s in reversed(before["steps"][:index]) if s["kept"])
            assert not step["kept"] and step["drop"] == current, step
    assert [s for s in before["steps"] if s["layer"] not in PRESET_16] == control["steps"]
    assert before["layers"] == control["layers"] and old["accuracy_drop"] == manifest["accuracy_drop"]


def test_with_every_layer_at_16_bits_nothing_is_ranked_or_tried(files, tmp_path, monkeypatch, caplog):
    """``w8a16-npu``: every layer reads 16-bit pairs, so accuracy control has nothing to promote."""
    lowered = _count_lowerings(monkeypatch, _target("simulated", monkeypatch))
    with caplog.at_level("WARNING", logger="compressor.flow.accuracy"):
        result = compress(files["model"], recipe="w8a16-npu", target="qnn-htp", outdir=tmp_path / "out",
                          inputs=["x=1x6x16"], calib=files["calib"], eval_data=files["eval"], max_drop=0.0,
                          latency_runs=1)
    control = result.manifest["accuracy_control"]
    assert control["skipped_already_16bit"] == len(LAYERS) and control["steps"] == [
        {"layer": None, "drop": result.manifest["accuracy_drop"], "kept": True}]
    assert control["ranking"] == [] and control["layers"] == [] and lowered == []
    assert result.gate_passed is False
    assert "every quantized layer already uses 16-bit activations" in caplog.text


def test_a_device_pass_runs_only_for_the_tries_accuracy_control_lowers(files, tmp_path, monkeypatch):
    """``device-bias-correction`` after ``qnn-legalize``: accuracy control's ranking (ONNX
    Runtime) and its "does this promotion change anything" check leave it out; each try it
    lowers gets its own run (and the final model, when no try is kept)."""
    from compressor.passes.device_bias_correction import DeviceBiasCorrection

    target_class = _target("simulated", monkeypatch)
    lowered = _count_lowerings(monkeypatch, target_class)
    runs: list[int] = []
    real = DeviceBiasCorrection.run
    monkeypatch.setattr(DeviceBiasCorrection, "run", lambda self, model, ctx: runs.append(1) or real(self, model, ctx))
    recipe = tmp_path / "with-device-pass.yaml"
    recipe.write_text(files["recipe"].read_text().replace(
        "  - qnn-legalize: {activations: int8}\n", "  - qnn-legalize: {activations: int8}\n  - device-bias-correction\n"))
    manifest = compress(files["model"], recipe=recipe, target="qnn-htp", outdir=tmp_path / "out", inputs=["x=1x6x16"],
                        calib=files["calib"], eval_data=files["eval"], max_drop=0.0, latency_runs=1).manifest
    control = manifest["accuracy_control"]
    tried = [s["layer"] for s in control["steps"][1:]]
    assert len(tried) == len(LAYERS) - len(PRESET_16) and len(lowered) == len(tried)
    # the pipeline's own run, one per lowered try, and at most one for the final model
    assert len(lowered) + 1 <= len(runs) <= len(lowered) + 2, (len(runs), len(lowered))
    assert [p["name"] for p in manifest["passes"]][-2:] == ["qnn-legalize", "device-bias-correction"]
