"""The openvino artifact judged in the device's default float precision, and f32 pinned where that breaks the budget.

Both branches are forced on any CPU (``force_precision`` in ``tests/conftest.py``): a
device whose default is bf16 (emulated by rounding the outputs to bf16 on CPUs without
it) and one whose default is f32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("openvino", reason="the openvino package is not installed")

import onnx
import openvino as ov
from compressor.targets.openvino import OpenVinoTarget, cpu_supports_bf16
from compressor.targets.openvino.precision import RT_PRECISION, plugin_reads_rt_option

from compressor.cli_report import summary as _summary
from compressor.flow.compress import compress

#: f32's unit roundoff: an artifact that runs the fp32 model's own f32 graph has drop 0,
#: while bf16's rounding of the outputs (unit roundoff 2**-8, relative error ~2**-9 per
#: value) costs a cosine drop of order (2**-9)**2 / 2, about 10x this.
F32_BUDGET = 2.0**-24


def _linear(path: Path) -> Path:
    """y = x @ W + b, 16 -> 32 -> 8 with a ReLU between: float layers only."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 8)), ("b2", (8,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
             helper.make_node("Add", ["m", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path / "linear.onnx")
    rng = np.random.default_rng(1)
    for name in ("calib", "eval"):
        np.savez(path / f"{name}.npz", x=rng.standard_normal((32, 16)).astype(np.float32))
    return path / "linear.onnx"


def _compress(tmp_path: Path, out: str, max_drop: float):
    model = _linear(tmp_path)
    return compress(model, recipe="fold", target="openvino", calib=tmp_path / "calib.npz",
                    eval_data=tmp_path / "eval.npz", outdir=tmp_path / out, max_drop=max_drop, latency_runs=2)


def _rt_precision(xml: Path) -> str | None:
    model = ov.Core().read_model(str(xml))
    return model.get_rt_info(list(RT_PRECISION)).astype(str) if model.has_rt_info(list(RT_PRECISION)) else None


def test_a_bf16_device_that_breaks_the_budget_gets_f32_pinned(tmp_path, force_precision):
    force_precision("bf16")
    result = _compress(tmp_path, "out", F32_BUDGET)
    m = result.manifest
    fallback = m["precision_fallback"]
    assert fallback["evaluated_in"] == "bf16" and fallback["drop"] > F32_BUDGET
    assert fallback["fallback"] == "f32" and fallback["fallback_drop"] <= F32_BUDGET
    assert fallback["pinned"] and fallback["budget_holds"]
    assert m["gate"]["passed"] is True and m["accuracy_drop"] == fallback["fallback_drop"]
    info = m["inference_precision"]
    assert info["device_default"] == "bf16" and info["used"] == "f32" and info["requested"] == "f32"
    pin = info["pinned"]
    assert pin["precision"] == "f32" and pin["rt_info"] == "runtime_options/INFERENCE_PRECISION_HINT"
    assert pin["read_by_plugin"] is plugin_reads_rt_option()
    if not pin["read_by_plugin"]:
        assert pin["compile_config"] == {"INFERENCE_PRECISION_HINT": "f32"} and "does not apply" in pin["note"]
    assert _rt_precision(tmp_path / "out" / "model.xml") == "f32"
    latency = m["latency"]
    assert (latency["baseline_precision"], latency["device_precision"], latency["compressed_precision"]) == \
        ("f32", "bf16", "f32")
    assert latency["baseline_device_ms"] > 0 and latency["compressed_ms"] > 0
    summary = _summary(m)
    assert "f32 pinned in the artifact" in summary and "fp32 in the device's default bf16" in summary


def test_a_bf16_device_within_budget_and_an_f32_device_change_nothing(tmp_path, force_precision):
    """No pin where the device's default holds the budget, nor on an f32 device: the
    artifact is byte-identical to the one lowered before precision was judged."""
    force_precision("bf16")
    loose = _compress(tmp_path, "bf16", 0.01).manifest
    assert loose["precision_fallback"] is None and loose["inference_precision"]["pinned"] is None
    assert loose["inference_precision"]["used"] == "bf16" and loose["gate"]["passed"] is True
    force_precision("f32")
    f32 = _compress(tmp_path, "f32", F32_BUDGET).manifest
    assert f32["precision_fallback"] is None and f32["inference_precision"]["pinned"] is None
    assert f32["inference_precision"]["device_default"] == "f32" and f32["gate"]["passed"] is True
    assert f32["latency"]["baseline_device_ms"] == f32["latency"]["baseline_ms"]
    assert f32["latency"]["device_precision"] == "f32"
    for name in ("model.xml", "model.bin"):
        assert (tmp_path / "f32" / name).read_bytes() == (tmp_path / "bf16" / name).read_bytes()
    assert _rt_precision(tmp_path / "f32" / "model.xml") is None


def test_the_pin_in_the_saved_xml_and_what_the_plugin_makes_of_it(tmp_path):
    """The pinned artifact carries f32 in its rt_info; compiled from the saved ``.xml`` with
    no config, it runs f32 wherever the plugin reads the key (on an f32 device it runs f32
    anyway). :func:`plugin_reads_rt_option` is what the manifest's ``read_by_plugin`` says,
    and it does detect a key the CPU plugin does read from there."""
    import onnx_ir as ir

    target = OpenVinoTarget()
    model = ir.serde.deserialize_model(onnx.load(_linear(tmp_path)))
    (xml, _) = target.lower_pinned(model, tmp_path / "pinned", "f32")
    assert _rt_precision(xml) == "f32"
    compiled = ov.Core().compile_model(str(xml), "CPU").get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if plugin_reads_rt_option() or not cpu_supports_bf16():
        assert compiled == "f32"
    else:  # a bf16 CPU whose plugin ignores the pin: the manifest's compile_config is what holds it
        assert compiled == "bf16"
    assert plugin_reads_rt_option("DYNAMIC_QUANTIZATION_GROUP_SIZE") is True
    (again, _) = target.lower(model, tmp_path / "unpinned")
    assert _rt_precision(again) is None


def test_the_pin_is_the_artifacts_not_the_targets(tmp_path, force_precision):
    """Issue 14: a target carries no state between calls. The pin is read back from the
    artifact, so a fresh target (the one a benchmark re-runs the artifact with) and a
    pickled copy (a Ray task's) run a pinned artifact in f32, and an artifact lowered after
    a pinned one is not pinned."""
    import pickle

    import onnx_ir as ir

    force_precision("bf16")
    model = ir.serde.deserialize_model(onnx.load(_linear(tmp_path)))
    target = OpenVinoTarget()
    pinned = target.lower_pinned(model, tmp_path / "pinned", "f32")
    plain = target.lower(model, tmp_path / "plain")
    assert _rt_precision(plain[0]) is None
    for runner_of in (OpenVinoTarget(), pickle.loads(pickle.dumps(target)), target):
        run = runner_of.runner(pinned)
        assert run.pinned == "f32" and run.precision == "f32" and run.inference_precision == "f32"
        assert runner_of.report(run)["inference_precision"]["pinned"]["precision"] == "f32"
        unpinned = runner_of.runner(plain)
        assert unpinned.pinned is None and unpinned.precision is None
        assert runner_of.report(unpinned)["inference_precision"]["pinned"] is None
    assert runner_of.precision_fallback() == "f32", "the device's bf16 still asks for the fallback"


def test_accuracy_control_lowers_its_candidates_with_the_pin(tmp_path, force_precision, monkeypatch):
    """Pinned and still over budget (int8 costs more than f32 wins back): accuracy control goes
    on from the pinned artifact, so each candidate (and so the final artifact, the final
    candidate's files) is lowered with the pin the flow passed on, not one left on the target."""
    force_precision("bf16")
    pins = []
    lower_pinned = OpenVinoTarget.lower_pinned

    def spy(self, model, outdir, precision):
        pins.append(precision)
        return lower_pinned(self, model, outdir, precision)

    monkeypatch.setattr(OpenVinoTarget, "lower_pinned", spy)
    model = _linear(tmp_path)
    result = compress(model, recipe="int8", target="openvino", calib=tmp_path / "calib.npz",
                      eval_data=tmp_path / "eval.npz", outdir=tmp_path / "out", max_drop=F32_BUDGET, latency_runs=1)
    m = result.manifest
    assert m["precision_fallback"]["pinned"] and not m["precision_fallback"]["budget_holds"]
    assert m["accuracy_control"] is not None and m["accuracy_control"]["steps"]
    # the fallback and each give-back try; the artifact is the final try's files (not lowered again)
    assert len(pins) == 1 + len(m["accuracy_control"]["steps"]) - 1 and set(pins) == {"f32"}
    assert _rt_precision(tmp_path / "out" / "model.xml") == "f32"
    assert m["inference_precision"]["pinned"]["precision"] == "f32" and m["latency"]["compressed_precision"] == "f32"


def test_a_pin_after_accuracy_control_when_the_pin_before_it_did_not_pay(tmp_path, force_precision, monkeypatch):
    """The flow's first judgement found f32 no better (stood in for here: on PP-OCRv4's
    recogniser f32 gave 0.0161 against bf16's 0.0157), so control gives layers back in bf16
    and ends over budget: the bf16 rounding of the float layers is what is left. f32 pinned
    after control holds the budget; every layer given back is tried quantized again, which
    breaks the f32 budget, so all stay float. The artifact is the pinned one."""
    import compressor.flow.compress as flow

    force_precision("bf16")
    monkeypatch.setattr(flow, "try_precision_fallback",
                        lambda tgt, model, outdir, files, run, score, first, budget: (files, run, first, None, None))
    model = _linear(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\npasses: [fold-constants, quantize]\naccuracy: {max_fallback: 1.0}\n")
    result = compress(model, recipe=recipe, target="openvino", calib=tmp_path / "calib.npz",
                      eval_data=tmp_path / "eval.npz", outdir=tmp_path / "out", max_drop=F32_BUDGET, latency_runs=1)
    m = result.manifest
    control, pf = m["accuracy_control"], m["precision_fallback"]
    assert sorted(control["layers"]) == ["fc1", "fc2"] and control["budget_met"] is True
    assert pf["after_accuracy_control"] and pf["pinned"] and pf["budget_holds"] and pf["before_accuracy_control"] is None
    assert pf["evaluated_in"] == "bf16" and pf["drop"] > F32_BUDGET >= pf["fallback_drop"]
    assert sorted(t["layer"] for t in pf["requantize_tries"]) == ["fc1", "fc2"] and pf["requantized"] == []
    assert all(t["drop"] > F32_BUDGET for t in pf["requantize_tries"])
    assert m["gate"]["passed"] is True and m["accuracy_drop"] == pf["fallback_drop"]
    assert _rt_precision(tmp_path / "out" / "model.xml") == "f32"
    assert m["inference_precision"]["pinned"]["precision"] == "f32"
    assert "f32 pinned in the artifact after accuracy control (0 given-back layer(s) quantized again)" in _summary(m)
