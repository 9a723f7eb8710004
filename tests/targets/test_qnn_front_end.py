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
from compressor.targets.qnn_htp import (
    HTP_QDQ_RULES,
    QNN_HTP_CAPABILITIES,
    float_compute_nodes,
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


def test_a_model_without_a_log_is_refused(tmp_path):
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
    assert "cpu front end  4 node(s) in float on the CPU (front_end.onnx), the rest on the device" in out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"front_end.onnx", "model_htp.onnx", "model_ctx.onnx",
                                                      "model.onnx", "model.encodings"}
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
    assert error_line(err).startswith("error: pass 'qnn-cpu-front-end' failed (UsageError: qnn-cpu-front-end: the "
                                      "model has no Log node, so there is no front end to run on the CPU")
    assert not (tmp_path / "out").exists()
