"""OpenVINO's activations on AMX: signed and without zero points, with uint8 as the fallback.

With AMX int8 tiles the CPU plugin's u8 kernels with an activation zero point ran 10-40%
slower than its i8 ones (a 3x3 convolution up to 2x; docs/design.md), so for a CPU with AMX
the target quantizes an activation int8 symmetric where its range holds negative values
and uint8 from 0 where it does not (``QuantSpec.signed_by_range``). Where that breaks the
accuracy budget the flow quantizes again with uint8 and its zero points
(``OpenVinoTarget.scheme_fallback``) and keeps the better. The AMX branch is asked for by
name (``target_cpu="amx"``): the suite runs it on any CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("openvino", reason="the openvino package is not installed")

import onnx
import onnx_ir as ir
from compressor.targets import base as target_base
from compressor.targets.onnx import OnnxTarget
from compressor.targets.openvino import OpenVinoTarget

from compressor.cli_report import summary
from compressor.flow.compress import compress
from compressor.quant.math import quant_params
from compressor.quant.revert import widened
from compressor.quant.spec import QuantSpec

SIGNED = QuantSpec("int8", symmetric=True, signed_by_range=True)


def test_a_signed_by_range_spec_follows_the_range():
    assert SIGNED.for_range(-0.3, 6.0) == QuantSpec("int8", True)
    assert SIGNED.for_range(0.0, 6.0) == QuantSpec("uint8", False)
    scale, zp = quant_params(0.0, 6.0, SIGNED.for_range(0.0, 6.0))
    assert zp.dtype == np.uint8 and int(zp) == 0 and float(scale) == pytest.approx(6.0 / 255, rel=1e-6)
    scale, zp = quant_params(-0.3, 6.0, SIGNED.for_range(-0.3, 6.0))
    assert zp.dtype == np.int8 and int(zp) == 0 and float(scale) == pytest.approx(6.0 / 127, rel=1e-6)
    plain = QuantSpec("uint8", symmetric=False)
    assert plain.for_range(-1.0, 1.0) is plain
    assert widened(SIGNED) == QuantSpec("int16", True), "16 bits: no dtype left to follow the range"


def test_the_amx_branch_signs_every_activation_but_the_lstms():
    amx, vnni = OpenVinoTarget(target_cpu="amx"), OpenVinoTarget(target_cpu="vnni")
    assert amx.signed_activations and not vnni.signed_activations
    for op, q in amx.capabilities.quantizable.items():
        want = vnni.capabilities.quantizable[op].activations
        if op == "LSTM" or want != QuantSpec("uint8", False):
            assert q.activations == want, op
        else:
            assert q.activations == SIGNED, op
    assert amx.describe()["activations"] == "int8 symmetric, uint8 from 0"
    fallback = amx.scheme_fallback()
    assert not fallback.signed_activations and fallback.target_cpu == "amx"
    assert fallback.capabilities == vnni.capabilities and fallback.scheme_fallback() is None
    assert vnni.scheme_fallback() is None
    assert OpenVinoTarget(target_cpu="avx2").scheme_fallback() is None


def test_host_means_signed_on_a_cpu_with_amx_and_amx_is_a_vnni_cpu(monkeypatch):
    import compressor.targets.openvino as openvino

    monkeypatch.setattr(openvino, "cpu_has_amx", lambda: True)
    assert OpenVinoTarget().signed_activations and not OpenVinoTarget(target_cpu="vnni").signed_activations
    monkeypatch.setattr(openvino, "cpu_has_amx", lambda: False)
    assert not OpenVinoTarget().signed_activations
    assert OpenVinoTarget(target_cpu="amx").signed_activations, "a named CPU does not depend on this one"
    assert target_base.deployment_vnni("amx", False) is True and target_base.deployment_amx("vnni", True) is False
    assert OnnxTarget(target_cpu="amx").capabilities == OnnxTarget(target_cpu="vnni").capabilities

def _conv_relu_conv(path: Path, low: float) -> Path:
    """x -> Conv(3x3) -> Relu -> Conv(1x1) -> y; ``x`` is uniform in [low, 0.1] but for one value of 1
    per sample: a skewed range, whose rounding outweighs the weights'."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3, "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path / "m.onnx")
    for name, seed in (("calib", 1), ("eval", 2)):
        x = np.random.default_rng(seed).uniform(low, 0.1, (16, 4, 12, 12)).astype(np.float32)
        x[:, 0, 0, 0] = 1.0
        np.savez(path / f"{name}.npz", x=x)
    return path / "m.onnx"


def _run(tmp_path: Path, out: str, target_cpu: str, max_drop: float, low: float = -0.05):
    model = _conv_relu_conv(tmp_path, low)
    return compress(model, recipe="int8", target="openvino", target_cpu=target_cpu, calib=tmp_path / "calib.npz",
                    eval_data=tmp_path / "eval.npz", outdir=tmp_path / out, max_drop=max_drop, latency_runs=1)


def _input_grid(xml: Path) -> tuple[float, float]:
    """``(input_low, input_high)`` of the FakeQuantize the artifact applies to its input ``x``."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() == "Parameter":
            low, high = (float(np.ravel(op.input_value(i).get_node().get_data())[0]) for i in (1, 2))
            return low, high
    raise AssertionError("no FakeQuantize on the input")


def _pairs(xml_dir: Path) -> dict[str, tuple[str, int]]:
    """What each conv of the artifact's Q/DQ model reads: the zero point's dtype and value of its input pair."""
    model = ir.serde.deserialize_model(onnx.load(xml_dir / "m.qdq.onnx"))
    found = {}
    for node in model.graph:
        if node.op_type == "Conv":
            dq = node.inputs[0].producer()
            zp = dq.inputs[2].const_value.numpy()
            found[node.name] = (str(zp.dtype), int(zp))
    return found


def test_on_amx_a_signed_input_is_int8_and_a_relu_output_uint8_both_without_zero_points(tmp_path, monkeypatch):
    """The pairs as quantize writes them (the model handed to lowering), and the artifact
    runs both convolutions in int8 within the drop of the scheme's own grid."""
    import compressor.targets.openvino as openvino

    lowered = []
    lower = openvino.OpenVinoTarget.lower

    def keep(self, model, outdir):
        lowered.append(ir.serde.serialize_model(model))
        return lower(self, model, outdir)

    monkeypatch.setattr(openvino.OpenVinoTarget, "lower", keep)
    result = _run(tmp_path, "amx", "amx", 1.0)
    onnx.save(lowered[0], tmp_path / "m.qdq.onnx")
    assert _pairs(tmp_path) == {"conv1": ("int8", 0), "conv2": ("uint8", 0)}
    m = result.manifest
    assert m["target"]["activations"] == "int8 symmetric, uint8 from 0" and "scheme_fallback" not in m
    assert m["runtime_layers"]["int8"] == 2 and m["runtime_layers"]["float"] == 0
    low, high = _input_grid(tmp_path / "amx" / "model.xml")
    assert low == pytest.approx(-high * 128 / 127, rel=1e-6), "the input grid is int8's, zero point 0"
    if target_base.cpu_has_amx():  # elsewhere the plugin shifts an i8 input into u8 (it has no i8 conv kernel)
        conv1 = next(la for la in m["runtime_layers"]["layers"] if "conv1" in la["name"] or "conv1" in
                     ",".join(la["original_layers"]))
        assert conv1["input_precisions"][0] == "i8", conv1
    assert "for a CPU with VNNI (--target-cpu amx)" in summary(m)
    # int8 symmetric on [-0.05, 1]: a step of 1/127 on the input, uniform rounding noise of
    # variance step²/12 per value against a signal of mean square ~0.003: a relative noise
    # power ~2e-3, so a cosine drop of that order at most (measured ~1e-3); a broken grid
    # (a wrong zero point, an unsigned grid cutting the negatives) is orders above.
    assert 0 < m["accuracy_drop"] < 1e-2


def test_where_signed_activations_break_the_budget_uint8_is_tried_and_kept(tmp_path):
    """A skewed input range ([-0.05, 1]): the signed grid's step is twice uint8's, four times
    the rounding noise where the input's rounding dominates. The two
    drops are measured first (no budget), then a budget between them: the flow falls back
    to uint8 with zero points, records both, and the artifact is the uint8 one."""
    signed = _run(tmp_path, "signed", "amx", 1.0).manifest
    plain = _run(tmp_path, "plain", "vnni", 1.0).manifest
    assert plain["accuracy_drop"] < signed["accuracy_drop"] / 1.5, "the finer grid is the fallback's point (~2.8x here)"
    budget = (plain["accuracy_drop"] + signed["accuracy_drop"]) / 2
    result = _run(tmp_path, "gated", "amx", budget)
    m = result.manifest
    fallback = m["scheme_fallback"]
    assert fallback["scheme"] == "int8 symmetric, uint8 from 0" and fallback["fallback"] == "uint8 asymmetric"
    assert fallback["kept"] and fallback["budget_holds"] and fallback["drop"] > budget >= fallback["fallback_drop"]
    assert m["accuracy_drop"] == fallback["fallback_drop"] and m["gate"]["passed"] is True
    assert m["target"]["activations"] == "uint8 asymmetric" and m["accuracy_control"] is None
    assert sorted(p.name for p in (tmp_path / "gated").iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    low, high = _input_grid(tmp_path / "gated" / "model.xml")
    assert low > -high / 2, "the artifact on disk is the uint8 one: its input grid is the skewed range's"
    assert _input_grid(tmp_path / "gated" / "model.xml") == _input_grid(tmp_path / "plain" / "model.xml")
    assert "activations" in dict(line.split(None, 1) for line in summary(m).splitlines()
                                 if line.startswith("activations"))


def test_a_fallback_that_misses_the_budget_too_is_kept_where_better_and_control_goes_on_from_it(tmp_path):
    plain = _run(tmp_path, "plain", "vnni", 1.0).manifest
    m = _run(tmp_path, "tight", "amx", plain["accuracy_drop"] / 100).manifest
    fallback = m["scheme_fallback"]
    assert not fallback["budget_holds"] and fallback["drop"] > fallback["fallback_drop"] and fallback["kept"]
    assert m["target"]["activations"] == "uint8 asymmetric" and m["accuracy_control"]["steps"]
    assert m["accuracy_control"]["steps"][0]["drop"] == fallback["fallback_drop"], "control started from uint8"


def test_a_fallback_no_better_is_not_kept_and_control_goes_on_from_the_signed_artifact(tmp_path, monkeypatch):
    """A fallback that cannot do better (stood in for by the signed scheme itself: the same
    drop, not lower) is recorded and dropped: the artifact, and accuracy control's start,
    stay the signed run's."""
    monkeypatch.setattr(OpenVinoTarget, "scheme_fallback", lambda self: OpenVinoTarget(
        target_cpu=self.target_cpu, signed_activations=True) if self.signed_activations else None)
    signed = _run(tmp_path, "signed", "amx", 1.0).manifest
    m = _run(tmp_path, "tight", "amx", signed["accuracy_drop"] / 100).manifest
    fallback = m["scheme_fallback"]
    assert fallback["drop"] == fallback["fallback_drop"] and not fallback["kept"]
    assert m["target"]["activations"] == "int8 symmetric, uint8 from 0"
    assert m["accuracy_control"]["steps"][0]["drop"] == fallback["drop"], "control started from the signed run"


def test_no_fallback_where_the_signed_artifact_holds_the_budget_or_on_a_cpu_without_amx(tmp_path):
    within = _run(tmp_path, "within", "amx", 0.5).manifest
    assert "scheme_fallback" not in within and within["target"]["activations"] == "int8 symmetric, uint8 from 0"
    plain = _run(tmp_path, "plain", "vnni", 1e-9).manifest
    assert "scheme_fallback" not in plain and plain["accuracy_control"] is not None
