"""``recover: {qat: true}``: fake quantization in training, and the learned ranges in the int8 artifact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from compressor.flow.compress import compress
from compressor.quant.math import dequantize_array, quant_params, quantize_array, weight_quant_params
from compressor.quant.spec import QuantSpec
from compressor.recover.qat import ActivationFakeQuant, QatLayer, QatModule, WeightFakeQuant
from compressor.recover.schedule import MaskedParam, MaskedParams, nm_mask, nm_ok
from tests.cliutil import error_line, run

UINT8 = QuantSpec("uint8", symmetric=False)
ROOT = Path(__file__).resolve().parents[1]


# -- the fake quantizers against the int8 step's arithmetic ----------------------------------------

@pytest.mark.parametrize("spec, lo, hi", [(UINT8, -0.7, 2.3), (UINT8, 0.0, 1.0), (QuantSpec("int8", True), -1.5, 0.4),
                                          (QuantSpec("uint16", False), -0.2, 3.0)])
def test_activation_fake_quant_is_onnx_quantize_dequantize(spec, lo, hi):
    fq = ActivationFakeQuant(spec, "x")
    fq.start(lo, hi)
    # values across the range, past both ends, and exactly on rounding ties
    scale, zp = quant_params(lo, hi, spec)
    ties = (np.arange(-40, 40) + 0.5).astype(np.float32) * scale
    x = np.concatenate([np.random.default_rng(0).uniform(lo - 1, hi + 1, 4000).astype(np.float32), ties])
    expected = dequantize_array(quantize_array(x, scale, zp, spec), scale, zp, spec)
    np.testing.assert_array_equal(fq(torch.from_numpy(x)).detach().numpy(), expected)
    # the range handed to quantize gives back the same scale and zero point
    s2, z2 = quant_params(*fq.learned(), spec)
    assert s2 == scale and z2 == zp


@pytest.mark.parametrize("bits", [None, 7])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_fake_quant_is_quantize_weight_rounding(bits, per_channel):
    w = np.random.default_rng(1).standard_normal((6, 8, 3, 3)).astype(np.float32)
    w[2] = 0.0  # an all-zero channel keeps its zeros
    spec = QuantSpec("int8", True, 0 if per_channel else None, bits)
    scale, zp = weight_quant_params(w, spec)
    expected = dequantize_array(quantize_array(w, scale, zp, spec), scale, zp, spec)
    fq = WeightFakeQuant(2 ** ((bits or 8) - 1) - 1, per_channel)
    np.testing.assert_array_equal(fq(torch.from_numpy(w)).numpy(), expected)


def test_learned_scale_gets_the_lsq_gradient_and_moves():
    fq = ActivationFakeQuant(UINT8, "x")
    fq.start(0.0, 2.0)
    s = float(fq.scale.detach())
    x = (torch.arange(200) % 250 + 0.25) * s  # inside the range: d x'/ds = round(x/s) - x/s = -0.25 each
    fq(x).sum().backward()
    g = 1.0 / math.sqrt(x.numel() * 255)
    # float32 carries x/s (up to 255) to about 255 * 2**-23 per element
    assert fq.scale.grad is not None
    assert float(fq.scale.grad) == pytest.approx(g * 200 * -0.25, rel=255 * 2.0 ** -20)
    # clipped values pull the scale up: their gradient is qmax - z
    fq.scale.grad = None
    big = torch.full((10,), 5.0)
    fq(big).sum().backward()
    assert float(fq.scale.grad) == pytest.approx(10 * 255 / math.sqrt(10 * 255), rel=1e-6)
    # and a loss that wants them (the squared error to x) grows the scale in one optimizer step
    fq.scale.grad = None
    ((fq(big) - big) ** 2).sum().backward()
    assert float(fq.scale.grad) < 0
    before = float(fq.scale.detach())
    torch.optim.AdamW([fq.scale], lr=1e-3, weight_decay=0.0).step()
    assert float(fq.scale.detach()) > before


# -- masks held under fake quantization ------------------------------------------------------------

class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_nm_zeros_stay_exactly_zero_and_training_is_deterministic():
    from compressor.data import Dataset
    from compressor.inputs import InputSpec
    from compressor.recover.config import RecoverConfig
    from compressor.recover.module import Trainable
    from compressor.recover.train import fine_tune

    def train(seed: int):
        torch.manual_seed(3)
        teacher = _Net().eval()
        student = _Net().eval()
        student.load_state_dict(teacher.state_dict())
        weight = student.fc1.weight
        masks = MaskedParams([MaskedParam("fc1.weight", weight, nm_mask(weight, 2, 4), weight.detach().clone(),
                                          ("nm", 2, 4))], 20, "fixed")
        layers = [QatLayer("fc1.weight", "fc1.weight", "x", UINT8, 127, True),
                  QatLayer("fc2.weight", "fc2.weight", "relu", UINT8, 127, True)]
        qat = QatModule(Trainable(student, "pickle", keyword=True), layers)
        x = np.random.default_rng(4).standard_normal((96, 16)).astype(np.float32)
        data = Dataset({"x": x}, [InputSpec("x", ("N", 16), "float32")], {"x": False}, None, "mem", "")
        qat.initialise(lambda f: student(f["x"]), data, 16, _quantize_options())
        seen = []

        def check(step: int, ms: MaskedParams) -> None:
            w = student.fc1.weight  # the fake-quantized weight the forward pass uses
            seen.append(bool((w[ms.params[0].mask == 0] == 0).all()) and nm_ok(w, 2, 4))

        params = list(student.parameters()) + qat.parameters()
        cfg = RecoverConfig(steps=20, lr=1e-2, batch=16, seed=seed, eval_every=10)
        result = fine_tune(lambda f: student(f["x"]), lambda f: teacher(f["x"]), params, masks, data.subset(0, 80),
                           data.subset(80, 96), cfg, "cosine", on_step=check)
        ranges = qat.learned_ranges()
        qat.remove()
        return result, seen, ranges, student

    first, seen, ranges, student = train(0)
    assert len(seen) == 20 and all(seen)
    assert sorted(n for n, _ in student.named_parameters()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert nm_ok(student.fc1.weight, 2, 4)
    assert {e.tensor for e in ranges.entries} == {"x", "relu"}
    again, _, ranges_again, _ = train(0)
    assert first.losses == again.losses and ranges == ranges_again
    other, _, _, _ = train(1)
    assert other.losses != first.losses


def _quantize_options():
    from compressor.passes.quantize import QuantizeOptions

    return QuantizeOptions(calibrator="minmax")


# -- the learned ranges reach quantize ---------------------------------------------------------------

def _gemm_model(x_name: str = "x") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32), "fc.weight")
    graph = helper.make_graph([helper.make_node("Gemm", [x_name, "fc.weight"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("x_name, used", [("x", True), ("x_renamed", False)])
def test_quantize_writes_the_learned_range_where_it_still_applies(x_name, used, caplog):
    import onnx_ir as ir

    from compressor.data import Dataset
    from compressor.inputs import InputSpec
    from compressor.pipeline import PassContext, build_pass
    from compressor.quant.learned import LearnedRange, LearnedRanges
    from compressor.targets import get_target

    model = ir.serde.deserialize_model(_gemm_model(x_name))
    x = np.random.default_rng(6).uniform(-1, 1, (32, 8)).astype(np.float32)
    data = Dataset({x_name: x}, [InputSpec(x_name, ("N", 8), "float32")], {x_name: False}, None, "mem", "")
    s = float(np.float32(0.01))  # a float32 scale and zero point 100, as a trained quantizer holds them
    learned = LearnedRanges((LearnedRange("fc.weight", "x", s * (0 - 100), s * (255 - 100), UINT8),))
    ctx = PassContext(target=get_target("onnx"), calibration=data, properties={"constants-folded"},
                      learned_ranges=learned)
    result = build_pass("quantize", {"calibrator": "minmax"}).run(model, ctx)
    q = next(n for n in result.model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == x_name)
    scale, zp = float(q.inputs[1].const_value.numpy()), int(q.inputs[2].const_value.numpy())
    if used:
        assert (scale, zp) == (s, 100)
        assert result.stats["ranges_from_training"] == 1 and result.stats["ranges_not_from_training"] == {}
    else:
        calibrated = quant_params(float(x.min()), float(x.max()), UINT8)
        assert (scale, zp) == (float(calibrated[0]), int(calibrated[1]))
        assert result.stats["ranges_from_training"] == 0
        assert result.stats["ranges_not_from_training"] == {
            "fc.weight": "its input is now 'x_renamed', not 'x' (a pass rewrote it)"}
        assert ("quantize: 1 range(s) learned in training not used, calibrated instead (e.g. the input of "
                "'fc.weight': its input is now 'x_renamed', not 'x' (a pass rewrote it)") in caplog.text


# -- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("qat")
    torch.manual_seed(0)
    model = _Net().eval()
    x = np.random.default_rng(7).standard_normal((224, 16)).astype(np.float32)
    program = torch.export.export(model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(folder / "net.pt2"))
    np.savez(folder / "train.npz", x=x[:160])
    np.savez(folder / "eval.npz", x=x[160:])
    return {"dir": folder, "model": folder / "net.pt2", "train": folder / "train.npz", "eval": folder / "eval.npz"}


def _recipe(folder: Path, name: str, recover: str, quantize: bool = True) -> Path:
    text = (f"name: {name}\npasses:\n  - fold-constants\n  - sparsify-nm: {{n: 2, m: 4, mask: magnitude, scope: "
            f"{{exclude: [fc2.weight]}}}}\n" + ("  - quantize: {calibrator: minmax}\n" if quantize else "")
            + f"recover: {recover}\n")
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


QAT = "{steps: 12, lr: 1.0e-2, batch: 16, seed: 0, holdout: 0, loss: mse, qat: true}"  # no early stop: the last step


@pytest.fixture(scope="module")
def qat_runs(tiny: dict[str, Path]) -> list[dict]:
    recipe = _recipe(tiny["dir"], "qat", QAT)
    return [compress(tiny["model"], recipe=recipe, outdir=tiny["dir"] / f"out-{i}", train=tiny["train"],
                     calib=tiny["train"], eval_data=tiny["eval"], latency_runs=1).manifest for i in range(2)]


def test_exported_activation_scales_are_the_learned_ones(qat_runs, tiny):
    manifest = qat_runs[0]
    record = manifest["recovery"]["qat"]
    assert record["layers"] == 2 and record["activation_quantizers"] == 2
    assert any(s["learned"] != s["initial"] for s in record["scales"].values())  # training moved them
    quantize = next(p for p in manifest["passes"] if p["name"] == "quantize")
    assert quantize["stats"]["ranges_from_training"] == 2 and quantize["stats"]["ranges_not_from_training"] == {}
    model = onnx.load(str(tiny["dir"] / "out-0" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    written = {n.input[0]: (inits[n.input[1]], inits[n.input[2]]) for n in model.graph.node
               if n.op_type == "QuantizeLinear"}
    for tensor, s in record["scales"].items():
        scale, zp = written[tensor]
        # float32 both sides: at most one float32 rounding apart (they are equal by construction)
        np.testing.assert_allclose(scale, np.float32(s["learned"]), rtol=2.0 ** -23)
        assert int(zp) == s["zero_point"]


def test_qat_artifact_keeps_nm_zeros_and_is_deterministic(qat_runs, tiny):
    assert [f["sha256"] for f in qat_runs[0]["files"]] == [f["sha256"] for f in qat_runs[1]["files"]]
    assert qat_runs[0]["recovery"]["qat"] == qat_runs[1]["recovery"]["qat"]
    model = onnx.load(str(tiny["dir"] / "out-0" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    first = next(v for k, v in inits.items() if v.dtype == np.int8 and v.shape == (8, 16))  # fc1, out x in
    assert ((first.reshape(8, -1, 4) != 0).sum(-1) <= 2).all()


# -- refusals -----------------------------------------------------------------------------------------

def test_qat_without_a_quantize_step_is_refused(tiny, capsys):
    recipe = _recipe(tiny["dir"], "noquant", QAT, quantize=False)
    code, _, err = run([tiny["model"], "--recipe", recipe, "--train", tiny["train"], "-o", tiny["dir"] / "o"], capsys)
    assert code == 2
    assert error_line(err) == (f"error: {recipe}: recover: qat: true fake-quantizes the module for the int8 step that "
                               "follows it, and the recipe has no 'quantize' pass after its sparsity pass; add one, "
                               "or drop 'qat'")
    assert not (tiny["dir"] / "o").exists()


def test_qat_without_global_steps_is_refused(tiny, capsys):
    recipe = _recipe(tiny["dir"], "noglobal", "{steps: 0, block_steps: 5, qat: true}")
    code, _, err = run([tiny["model"], "--recipe", recipe, "--train", tiny["train"], "-o", tiny["dir"] / "o"], capsys)
    assert code == 2
    assert error_line(err) == (f"error: {recipe}: recover: qat: true learns the activation scales in the global loop, "
                               "and steps: 0 has none (the block phase trains the weights only), so the int8 step "
                               "would get the untrained initial scales; set steps above 0, or drop 'qat'")
    assert not (tiny["dir"] / "o").exists()


class _LnNet(torch.nn.Module):
    """LayerNorm -> two Linears reading it (a transformer block's Q/K/V shape), with outlier channels."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(16)
        self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 4)
        with torch.no_grad():
            self.ln.weight.copy_(torch.linspace(0.5, 1.5, 16))
            self.ln.weight[[2, 11]] = 20.0  # activation outliers: what SmoothQuant moves into the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return self.out(torch.relu(self.q(h)) * torch.sigmoid(self.k(h)))


@pytest.fixture(scope="module")
def ln_net(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("qat_ln")
    torch.manual_seed(0)
    x = np.random.default_rng(3).standard_normal((192, 16)).astype(np.float32)
    program = torch.export.export(_LnNet().eval(), (torch.from_numpy(x[:2]),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(folder / "net.pt2"))
    np.savez(folder / "train.npz", x=x[:160])
    np.savez(folder / "eval.npz", x=x[160:])
    recipe = folder / "smooth.yaml"
    recipe.write_text("name: smooth\npasses:\n  - fold-constants\n  - sparsify-nm: {n: 2, m: 4, mask: magnitude, "
                      "scope: {exclude: [out.weight]}}\n  - quantize: {calibrator: minmax, smoothquant: {alpha: 0.5}}\n"
                      f"recover: {QAT}\n")
    return {"dir": folder, "model": folder / "net.pt2", "train": folder / "train.npz", "eval": folder / "eval.npz",
            "recipe": recipe}


def test_smoothing_the_module_is_exact_and_as_quantize_plans_it(ln_net):
    """gamma/s, beta/s and W[:, k]*s_k leave the module's output unchanged; s is quantize's own."""
    from compressor.capture import capture
    from compressor.data import load_npz
    from compressor.inputs import model_input_specs
    from compressor.passes._quantize_selection import select_layers
    from compressor.passes._smoothquant import plan_smoothing
    from compressor.pipeline import available_passes
    from compressor.recover.smooth import smooth_module, smoothing_for
    from compressor.targets import get_target

    dense = capture(ln_net["model"]).model
    calib = load_npz(ln_net["train"], model_input_specs(dense))
    caps = get_target("onnx").capabilities
    opts, preset = smoothing_for(available_passes()["quantize"]({"calibrator": "minmax", "smoothquant": {"alpha": 0.5}}).options,
                                 dense.graph, caps)
    layers, _ = select_layers(dense.graph, caps, opts, preset)
    plan = {g.tensor: g.scale for g in plan_smoothing(dense, layers, calib, opts.smoothquant, skip=set())}
    program = torch.export.load(str(ln_net["model"]))
    module = program.module()
    x = torch.from_numpy(np.load(ln_net["eval"])["x"])
    before = module(x).detach()
    gamma = module.get_parameter("ln.weight").detach().clone()
    record = smooth_module(module, dense, opts, preset, caps, calib)
    assert len(record["smoothed"]) == 1  # the LayerNorm's output, read by q and k
    # the gate product read by `out` is no LayerNorm's: case 2, left to train unsmoothed
    assert list(record["not_smoothed"].values()) == [
        "not produced by a LayerNorm whose only readers are the smoothed layers"]
    s = torch.from_numpy(plan[record["smoothed"][0]].astype(np.float32))
    assert s.max() > 2.0  # the outlier channels moved
    torch.testing.assert_close(module.get_parameter("ln.weight").detach(), gamma / s, rtol=1e-6, atol=0)
    # float32 rounding of gamma/s and W*s only: a few ulps of the output's scale
    torch.testing.assert_close(module(x).detach(), before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))


def test_qat_with_smoothquant_smooths_before_training_and_writes_the_learned_ranges(ln_net):
    manifest = compress(ln_net["model"], recipe=ln_net["recipe"], outdir=ln_net["dir"] / "out", train=ln_net["train"],
                        calib=ln_net["train"], eval_data=ln_net["eval"], latency_runs=1).manifest
    record = manifest["recovery"]["qat"]
    assert len(record["smoothquant"]["smoothed"]) == 1
    quantize = next(p for p in manifest["passes"] if p["name"] == "quantize")
    # every learned range is written: quantize did not smooth (and so rename) those inputs again
    assert quantize["stats"]["ranges_from_training"] == record["activation_quantizers"]
    assert quantize["stats"]["ranges_not_from_training"] == {}
    model = onnx.load(str(ln_net["dir"] / "out" / "model.onnx"))
    assert not [n.name for n in model.graph.node if n.op_type == "Mul" and "SmoothQuant" in n.name]


def test_qat_on_torchscript_is_refused(tiny, capsys):
    torch.jit.save(torch.jit.script(_Net().eval()), str(tiny["dir"] / "net.pt"))
    recipe = _recipe(tiny["dir"], "ts", QAT)
    code, _, err = run([tiny["dir"] / "net.pt", "--recipe", recipe, "--train", tiny["train"], "--calib", tiny["train"],
                        "-o", tiny["dir"] / "o"], capsys)
    assert code == 2
    assert error_line(err) == ("error: recover: qat: net.pt is TorchScript, whose compiled code cannot be "
                               "fake-quantized; pass the trainable model instead: the .pt2 (torch.export.save), the "
                               "Hugging Face folder, or the torch.save file (with --trust-pickle, or a state_dict with "
                               "--model-class) it was exported from, or drop 'qat'")
    assert not (tiny["dir"] / "o").exists()


def test_qat_must_be_a_boolean(tiny, capsys):
    recipe = _recipe(tiny["dir"], "badqat", "{qat: 3}")
    code, _, err = run([tiny["model"], "--recipe", recipe, "--train", tiny["train"], "-o", tiny["dir"] / "o"], capsys)
    assert code == 2
    assert error_line(err) == f"error: {recipe}: recover: option 'qat': expected true or false, got 3"


def test_sweep_recover_refuses_qat(tiny, capsys):
    code, _, err = run(["sweep", tiny["model"], "--pass", "sparsify-nm", "--levels", "2:4", "--eval", tiny["eval"],
                        "--train", tiny["train"], "--recover", "{qat: true}", "-o", tiny["dir"] / "sw"], capsys)
    assert code == 2
    assert error_line(err) == ("error: sweep --recover: qat: true fake-quantizes for an int8 step, and sweep levels are "
                               "not quantized; drop 'qat', or compress with a recipe that has 'quantize' after its "
                               "sparsity pass")


@pytest.mark.slow
def test_digits_cnn_int8_nm_recover_with_qat_passes_its_gate(tmp_path):
    """The bundled CNN, ``int8-nm-recover`` with ``qat: true``: the 0.01 top-1 gate holds (minutes under load)."""
    text = (ROOT / "recipes" / "int8-nm-recover.yaml").read_text()
    text = text.replace("schedule: fixed,", "schedule: fixed, qat: true,")
    assert "qat: true" in text
    recipe = tmp_path / "int8-nm-recover-qat.yaml"
    recipe.write_text(text)
    result = compress(ROOT / "examples" / "digits_cnn.pt2", recipe=recipe, outdir=tmp_path / "out",
                      calib=ROOT / "examples" / "digits_calib.npz", eval_data=ROOT / "examples" / "digits_eval.npz",
                      latency_runs=1)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert result.gate_passed is True and manifest["accuracy_drop"] <= 0.01
    quantize = next(p for p in manifest["passes"] if p["name"] == "quantize")
    assert quantize["stats"]["ranges_from_training"] == manifest["recovery"]["qat"]["activation_quantizers"] == 5
