"""``qnn-cpu-front-end`` (:mod:`compressor.targets.qnn_htp.front_end`): a log-power front end in float on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compressor.targets.base import on_cpu
from compressor.targets.onnx import ort_session
from compressor.targets.qnn_htp import (
    HTP_QDQ_RULES,
    QNN_HTP_CAPABILITIES,
    float_compute_nodes,
    lint,
)
from onnx import TensorProto, helper, numpy_helper

from compressor.data import load_npz
from compressor.errors import UsageError
from compressor.inputs import model_input_specs
from compressor.pipeline import PassContext, build_pass
from tests.cliutil import error_line, run

HAVE_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
needs_htp = pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn cannot be imported: no QNN HTP backend here")

RECIPE = """name: w8a8-npu-cpu-front-end
description: W8A8 on HTP, the log-power front end on the CPU
passes:
  - fold-constants
{front}  - quantize: {{activations: int8, calibrator: minmax}}
  - qnn-legalize: {{activations: int8}}
calibration: {{samples: 32}}
accuracy: {{metric: auto, max_drop: 0.01}}
"""


class _Stub:
    name = "qnn-htp"
    capabilities = QNN_HTP_CAPABILITIES
    qdq_rules = HTP_QDQ_RULES


def _proto(bypass: bool = False) -> onnx.ModelProto:
    """``Conv -> x^2 + 1e-10 -> Log`` (a log-power spectrogram) then ``Conv -> Relu`` (the network).

    With ``bypass`` the network also reads the front Conv's output (``Add`` of both Convs),
    so that tensor is read both inside the front end and by HTP.
    """
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.normal(size=(4, 4, 3, 3)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(1e-10, np.float32), "eps")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="front_conv"),
             helper.make_node("Mul", ["c1", "c1"], ["p"], name="power"),
             helper.make_node("Add", ["p", "eps"], ["pe"], name="floor"),
             helper.make_node("Log", ["pe"], ["l"], name="log"),
             helper.make_node("Conv", ["l", "w2"], ["c2"], pads=[1, 1, 1, 1], name="net_conv")]
    if bypass:
        nodes += [helper.make_node("Add", ["c2", "c1"], ["s"], name="join"),
                  helper.make_node("Relu", ["s"], ["y"], name="relu")]
    else:
        nodes.append(helper.make_node("Relu", ["c2"], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(proto)
    return onnx.shape_inference.infer_shapes(proto)


def _variant(proto: onnx.ModelProto, *, front_op: str | None = None, sqrt_after: bool = False,
             eps: float | None = None) -> onnx.ModelProto:
    """``proto`` with the power ``Mul(c1, c1)`` replaced by the one-input ``front_op`` (an op
    HTP lacks), a ``Sqrt`` after the network's Relu (a 16-bit pair on HTP's side, so the Q/DQ
    writer converts the opset to 21), or another guard constant."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    if front_op is not None:
        next(n for n in graph.node if n.name == "power").CopyFrom(
            helper.make_node(front_op, ["c1"], ["p"], name="power"))
    if eps is not None:
        next(i for i in graph.initializer if i.name == "eps").CopyFrom(
            numpy_helper.from_array(np.array(eps, np.float32), "eps"))
    if sqrt_after:
        relu = next(n for n in graph.node if n.name == "relu")
        relu.output[0] = "r"
        graph.node.append(helper.make_node("Sqrt", ["r"], ["y"], name="root"))
    return onnx.shape_inference.infer_shapes(proto)


def _data(folder: Path) -> tuple[Path, Path]:
    """Signals whose level spans 100 dB (amplitudes 1e-4..10): most of the power is far below an
    8-bit step of the loudest sample's."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(64, 1, 16, 16)) * 10 ** rng.uniform(-4, 1, size=(64, 1, 1, 1))).astype(np.float32)
    np.savez(folder / "calib.npz", x=x[:32])
    np.savez(folder / "eval.npz", x=x[32:])
    return folder / "calib.npz", folder / "eval.npz"


def _legalized(tmp_path: Path, bypass: bool = False) -> tuple[ir.Model, dict]:
    model = ir.serde.deserialize_model(_proto(bypass))
    calib, _ = _data(tmp_path)
    ctx = PassContext(target=_Stub(), calibration=load_npz(calib, model_input_specs(model), what="calib"),
                      properties={"constants-folded"})
    marked = build_pass("qnn-cpu-front-end", None).run(model, ctx)
    quantized = build_pass("quantize", {"calibrator": "minmax"}).run(marked.model, ctx)
    legal = build_pass("qnn-legalize", None).run(quantized.model, ctx)
    return legal.model, {"front": marked.stats, "quantize": quantized.stats, "legalize": legal.stats}


def test_the_front_end_is_what_the_log_is_computed_from(tmp_path):
    """The Log and its ancestors are marked; quantize skips the front Conv; legalize leaves the
    front float (float weights, no Q/DQ read) and encodes only the tensor handed to HTP."""
    model, stats = _legalized(tmp_path)
    assert stats["front"] == {"cpu_nodes": 4, "cut": ["l"], "roots": ["log"]}
    assert stats["quantize"]["skipped_layers"] == {
        "front_conv": "runs on the CPU front end in float (qnn-cpu-front-end)"}
    assert stats["quantize"]["layers"] == ["net_conv"]
    assert stats["legalize"]["cpu_nodes"] == 4
    nodes = {n.name: n for n in model.graph}
    front = [n for n in model.graph if on_cpu(n)]
    assert sorted(n.name for n in front) == ["floor", "front_conv", "log", "power"]
    for node in front:  # every input float: the graph input, a front tensor or a float constant
        for value in node.inputs:
            assert value.producer() is None or on_cpu(value.producer()), (node.name, value.name)
    assert nodes["front_conv"].inputs[1].const_value.dtype == ir.DataType.FLOAT
    # the cut: Log's output goes through one uint8 pair to the network's Conv
    q = [user for user, _ in nodes["log"].outputs[0].uses()]
    assert [u.op_type for u in q] == ["QuantizeLinear"]
    assert float_compute_nodes(model) == []  # nothing left float on HTP's side


def test_a_tensor_read_on_both_sides_stays_float_in_the_front_end(tmp_path):
    """The front Conv's output feeds the power (CPU) and the network's Add (HTP): HTP reads it
    through a pair, the power still reads the float tensor."""
    model, stats = _legalized(tmp_path, bypass=True)
    assert stats["front"]["cut"] == ["c1", "l"]
    power = next(n for n in model.graph if n.name == "power")
    assert [v.name for v in power.inputs] == ["c1", "c1"] and power.inputs[0].producer().name == "front_conv"
    join = next(n for n in model.graph if n.name == "join")
    assert all(v.producer().op_type == "DequantizeLinear" for v in join.inputs)


def test_marks_survive_a_16_bit_pair_and_its_opset_conversion(tmp_path):
    """A 16-bit pair on HTP's side makes the Q/DQ writer convert the model to opset 21 with
    ONNX's version converter, which drops node metadata: the marks are carried over."""
    model = ir.serde.deserialize_model(_variant(_proto(), sqrt_after=True))
    calib, _ = _data(tmp_path)
    ctx = PassContext(target=_Stub(), calibration=load_npz(calib, model_input_specs(model), what="calib"),
                      properties={"constants-folded"})
    model = build_pass("qnn-cpu-front-end", None).run(model, ctx).model
    model = build_pass("quantize", {"calibrator": "minmax"}).run(model, ctx).model
    legal = build_pass("qnn-legalize", None).run(model, ctx)
    assert legal.model.opset_imports[""] == 21 and legal.stats["roots_16bit"]
    assert sorted(n.name for n in legal.model.graph if on_cpu(n)) == ["floor", "front_conv", "log", "power"]


def test_the_step_after_quantize_is_refused(tmp_path):
    model = ir.serde.deserialize_model(_proto())
    calib, _ = _data(tmp_path)
    ctx = PassContext(target=_Stub(), calibration=load_npz(calib, model_input_specs(model), what="calib"),
                      properties={"constants-folded"})
    model = build_pass("quantize", {"calibrator": "minmax"}).run(model, ctx).model
    with pytest.raises(UsageError, match=r"^qnn-cpu-front-end: the model is quantized already, so the front end "
                                         r"would not be float; put this step before 'quantize' in the recipe$"):
        build_pass("qnn-cpu-front-end", None).run(model, ctx)


def test_the_target_check_leaves_the_front_end_to_the_cpu():
    """An op HTP lacks (``Erf`` here, ``STFT`` in a real spectrogram) in the front end: the
    step marks the front end before the check (``check_input``), which then names nothing."""
    model = ir.serde.deserialize_model(_variant(_proto(), front_op="Erf"))
    assert [where for where, _ in lint(model)] == ["power"]
    build_pass("qnn-cpu-front-end", None).check_input(model)
    assert lint(model) == []


def test_sentinels_in_the_front_end_stay(tmp_path):
    """``qnn-clamp-sentinels`` (finfo.max masks become +-100 for an HTP grid) leaves a constant
    only the CPU front end reads as it is."""
    model = ir.serde.deserialize_model(_variant(_proto(), eps=float(np.finfo(np.float32).max)))
    build_pass("qnn-cpu-front-end", None).check_input(model)
    assert build_pass("qnn-clamp-sentinels", None).run(model, PassContext()).stats["sentinels_clamped"] == 0
    assert float(model.graph.initializers["eps"].const_value.numpy()) == np.finfo(np.float32).max


def test_a_model_without_a_log_is_refused():
    model = ir.serde.deserialize_model(_proto())
    model.graph.remove(next(n for n in model.graph if n.name == "relu"), safe=False)
    for node in model.graph:
        if node.op_type == "Log":
            node.op_type = "Sqrt"
    with pytest.raises(UsageError, match=r"^qnn-cpu-front-end: the model has no Log node, so there is no front end "
                                         r"to run on the CPU \(its ops: Add, Conv, Mul, Sqrt\); drop the pass"):
        build_pass("qnn-cpu-front-end", None).run(model, PassContext())


def test_a_front_end_that_computes_the_model_output_is_refused(tmp_path):
    model = ir.serde.deserialize_model(_proto())
    for name in ("net_conv", "relu"):
        model.graph.remove(next(n for n in model.graph if n.name == name), safe=False)
    model.graph.outputs[0] = next(n for n in model.graph if n.name == "log").outputs[0]
    with pytest.raises(UsageError, match=r"^qnn-cpu-front-end: the front end computes the model output\(s\) l, "):
        build_pass("qnn-cpu-front-end", None).run(model, PassContext())


@needs_htp
def test_split_artifact_runs_the_front_end_on_the_cpu_and_the_rest_wholly_on_htp(tmp_path, capsys):
    """End to end on the HTP backend: with the front end on the CPU the recipe's own gate holds;
    without it, the 8-bit power loses the quiet signals to the Log's floor and the gate fails."""
    onnx.save(_proto(), tmp_path / "m.onnx")
    calib, evals = _data(tmp_path)
    (tmp_path / "front.yaml").write_text(RECIPE.format(front="  - qnn-cpu-front-end: {ops: [Log]}\n"))
    (tmp_path / "plain.yaml").write_text(RECIPE.format(front=""))
    common = ["--target", "qnn-htp", "--calib", calib, "--eval", evals, "--latency-runs", "1"]
    code, out, err = run([tmp_path / "m.onnx", "--recipe", tmp_path / "front.yaml", *common, "-o", tmp_path / "a"],
                         capsys)
    assert code == 0, err
    assert "cpu front end" in out and "4 node(s) in float on the CPU (front_end.onnx), the rest on the device" in out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"front_end.onnx", "model_htp.onnx", "model_ctx.onnx",
                                                      "model.onnx", "model.encodings"}
    deployed = [f["path"] for f in manifest["files"] if f["deploy"]]
    assert deployed == ["front_end.onnx", "model_ctx.onnx", "model_ctx_qnn.bin"]
    assert f"deployable files: {', '.join(deployed)}; 3 companion files not counted)" in out
    report = manifest["qnn_htp"]
    assert report["cpu_front_end"] == {"file": "front_end.onnx", "runs_on": "ONNX Runtime CPU, float32",
                                       "nodes": 4, "hands_to_htp": ["l"]}
    assert report["ran_wholly_on_htp"] is False and report["cpu_fallback"] == "disabled"
    assert report["float_nodes"] == []
    front = onnx.load(str(tmp_path / "a" / "front_end.onnx"))
    assert [n.op_type for n in front.graph.node] == ["Conv", "Mul", "Add", "Log"]
    assert [o.name for o in front.graph.output] == ["l"]
    htp = onnx.load(str(tmp_path / "a" / "model_htp.onnx"))
    assert [i.name for i in htp.graph.input] == ["l"] and "Log" not in {n.op_type for n in htp.graph.node}
    # the two parts chained on the CPU compute what the whole model does, bit for bit
    x = np.load(evals)["x"][:4]
    parts = [ort_session(tmp_path / "a" / f, as_written=True) for f in ("front_end.onnx", "model_htp.onnx", "model.onnx")]
    for sample in x:
        handed = parts[0].run(None, {"x": sample[None]})[0]
        assert np.array_equal(parts[1].run(None, {"l": handed})[0], parts[2].run(None, {"x": sample[None]})[0])
    code, out, err = run([tmp_path / "m.onnx", "--recipe", tmp_path / "plain.yaml", *common, "-o", tmp_path / "b"],
                         capsys)
    assert code == 3, err
    plain = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert plain["accuracy_drop"] > 10 * manifest["accuracy_drop"]


@needs_htp
def test_recipe_asking_for_a_front_end_the_model_lacks_exits_2(tmp_path, capsys):
    proto = _proto()
    for node in proto.graph.node:
        if node.op_type == "Log":
            node.op_type = "Sqrt"
    onnx.save(proto, tmp_path / "m.onnx")
    calib, evals = _data(tmp_path)
    (tmp_path / "front.yaml").write_text(RECIPE.format(front="  - qnn-cpu-front-end: {}\n"))
    code, _, err = run([tmp_path / "m.onnx", "--recipe", tmp_path / "front.yaml", "--target", "qnn-htp",
                        "--calib", calib, "--eval", evals, "-o", tmp_path / "out"], capsys)
    assert code == 2
    assert error_line(err).startswith("error: qnn-cpu-front-end: the model has no Log node, so there is no front "
                                      "end to run on the CPU (its ops: Add, Conv, Mul, Relu, Sqrt)")
    assert not (tmp_path / "out").exists()


@needs_htp
def test_accuracy_control_keeps_the_front_end_on_the_cpu(tmp_path, capsys):
    """A promotion to 16 bits writes 16-bit pairs (the opset conversion that drops node
    metadata): every try, and the artifact, keep the split; the front Conv is never a candidate."""
    onnx.save(_proto(), tmp_path / "m.onnx")
    calib, evals = _data(tmp_path)
    (tmp_path / "front.yaml").write_text(RECIPE.format(front="  - qnn-cpu-front-end: {}\n").replace(
        "max_drop: 0.01}", "max_drop: 0.01, max_fallback: 1.0}"))
    code, _, err = run([tmp_path / "m.onnx", "--recipe", tmp_path / "front.yaml", "--target", "qnn-htp",
                        "--calib", calib, "--eval", evals, "--max-drop", "0", "--latency-runs", "1",
                        "-o", tmp_path / "out"], capsys)
    assert code in (0, 3), err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    control = manifest["accuracy_control"]
    assert control["action"] == "int16" and [s["layer"] for s in control["steps"][1:]] == ["net_conv"]
    assert manifest["qnn_htp"]["cpu_front_end"]["nodes"] == 4 and manifest["qnn_htp"]["float_nodes"] == []
    front = onnx.load(str(tmp_path / "out" / "front_end.onnx"))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in front.graph.node)
