"""``qnn-quantize-tensors`` cases 1e and 1f: a SiLU's input grid, and Concat inputs on the output's encoding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compressor.targets.onnx import ort_session
from compressor.targets.qnn_htp import HTP_QDQ_RULES, QNN_HTP_CAPABILITIES
from onnx import TensorProto, helper, numpy_helper

from compressor.data import load_npz
from compressor.inputs import model_input_specs
from compressor.model_io import save_model
import compressor.targets.qnn_htp.quantize_tensors as legalizer
from compressor.passes._output_ranges import silu_floor
from compressor.pipeline import PassContext, build_pass
from compressor.quant.revert import give_back

needs_htp = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_qnn") is None,
                               reason="onnxruntime-qnn cannot be imported: no QNN HTP backend here")


class _Stub:
    name = "qnn-htp"
    capabilities = QNN_HTP_CAPABILITIES
    qdq_rules = HTP_QDQ_RULES


def _model(nodes, inputs, outputs, inits=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _legalize(model: ir.Model, data: dict[str, np.ndarray], tmp_path: Path) -> ir.Model:
    path = tmp_path / "calib.npz"
    np.savez(path, **data)
    ctx = PassContext(target=_Stub(), calibration=load_npz(path, model_input_specs(model), what="calib"),
                      properties={"constants-folded"})
    model = build_pass("quantize", {"calibrator": "minmax"}).run(model, ctx).model
    return build_pass("qnn-legalize", None).run(model, ctx).model


def _pair(value: ir.Value) -> tuple[float, int, str]:
    """(scale, zero point, dtype) of the Q that quantizes ``value``."""
    q = next(use.node for use in value.uses() if use.node.op_type == "QuantizeLinear")
    zp = q.inputs[2].const_value.numpy()
    return float(q.inputs[1].const_value.numpy()), int(zp), zp.dtype.name


def _read(value: ir.Value) -> tuple[float, int, str]:
    """(scale, zero point, dtype) of the DQ ``value`` is read through."""
    dq = value.producer()
    zp = dq.inputs[2].const_value.numpy()
    return float(dq.inputs[1].const_value.numpy()), int(zp), zp.dtype.name


def _silu_net(spy: bool = False) -> ir.Model:
    """x -> Conv (outputs far below 0) -> SiLU (``Mul(c, Sigmoid(c))``) -> Conv; with ``spy`` c is also an output."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 4, 1, 1)) * 0.8).astype(np.float32), "w1"),
             numpy_helper.from_array(np.linspace(-6, 1, 8).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="silu"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])]
    if spy:
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8, 6, 6]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])], outputs, inits)


def _silu_error(model: ir.Model, data: dict[str, np.ndarray]) -> tuple[float, float]:
    """Largest error of the SiLU output as written against SiLU of the convolution's float output
    in the same run (the quantization of the SiLU alone), and that output's largest magnitude."""
    proto = ir.serde.serialize_model(model)
    proto.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "m"))
    run = ort_session(ir.serde.deserialize_model(proto), as_written=True)
    error = peak = 0.0
    for x in data["x"]:
        c, m = run.run(["c", "m"], {"x": x})
        error = max(error, float(np.abs(m - c / (1 + np.exp(-c))).max()))
        peak = max(peak, float(np.abs(c).max()))
    return error, peak


def test_a_silu_input_grid_starts_where_silu_is_zero(tmp_path, monkeypatch):
    """The convolution's output reaches about -9; below ``silu_floor`` (about -5.6 for this output's
    8-bit step) SiLU is within half an output step of 0, so the input grid starts there and its
    step shrinks by a third. The SiLU, as written, is then off from SiLU of the convolution's
    float output by at most the bound below, and by less than with the calibrated grid."""
    data = {"x": np.random.default_rng(1).standard_normal((16, 1, 4, 6, 6)).astype(np.float32) * 2}
    legal = _legalize(_silu_net(), data, tmp_path)
    c, m = (next(n for n in legal.graph if n.name == name).outputs[0] for name in ("conv1", "silu"))
    s_in, z_in, _ = _pair(c)
    s_out, z_out, _ = _pair(m)
    floor = silu_floor((-z_out * s_out, (255 - z_out) * s_out), 255)
    assert -z_in * s_in == pytest.approx(floor, abs=s_in)  # the grid starts at the floor...
    monkeypatch.setattr(legalizer, "silu_output", lambda x: None)  # the calibrated grid, for comparison
    calibrated = _legalize(_silu_net(), data, tmp_path)
    c0 = next(n for n in calibrated.graph if n.name == "conv1").outputs[0]
    s0, z0, _ = _pair(c0)
    assert -z0 * s0 < floor - 2 and s_in < 0.75 * s0  # ...where the calibrated one started far below
    (error, peak), (error0, _) = _silu_error(legal, data), _silu_error(calibrated, data)
    # the Mul's rounding and the clamp (half an output step each), the input's rounding through
    # SiLU's steepest slope, the Sigmoid's fixed 8-bit grid (1/512) times the input
    assert error <= s_out + 1.1 * s_in / 2 + peak / 512 + 1e-6 and error < error0, (error, error0)


def test_a_silu_input_given_back_at_16_bits_is_read_at_8_on_the_floored_grid(tmp_path):
    """Accuracy control gives the convolution back at 16 bits: its output is encoded at 16 bits
    (floored for 16), and the 8-bit Sigmoid and Mul read it through a conversion to 8 bits that
    starts at the 8-bit floor, not at the 16-bit one (-11.9 here), which would coarsen the step."""
    data = {"x": np.random.default_rng(1).standard_normal((16, 1, 4, 6, 6)).astype(np.float32) * 2}
    path = tmp_path / "calib.npz"
    np.savez(path, **data)
    model = _silu_net()
    ctx = PassContext(target=_Stub(), calibration=load_npz(path, model_input_specs(model), what="calib"),
                      properties={"constants-folded"})
    quantized = build_pass("quantize", {"calibrator": "minmax"}).run(model, ctx)
    edited = give_back(quantized.model, quantized.quantization, ["conv1"], "int16")
    legal = build_pass("qnn-legalize", None).run(edited, ctx).model
    plain = _legalize(_silu_net(), data, tmp_path)
    read, read_plain = (_read(next(n for n in m.graph if n.name == "sig").inputs[0]) for m in (legal, plain))
    assert read[2] == "uint8" and _pair(next(n for n in legal.graph if n.name == "conv1").outputs[0])[2] == "uint16"
    assert -read[1] * read[0] == pytest.approx(-read_plain[1] * read_plain[0], abs=2 * read_plain[0])
    assert read[0] < 1.05 * read_plain[0], (read, read_plain)


def test_a_silu_input_another_op_reads_keeps_its_calibrated_grid(tmp_path):
    data = {"x": np.random.default_rng(1).standard_normal((16, 1, 4, 6, 6)).astype(np.float32) * 2}
    legal = _legalize(_silu_net(spy=True), data, tmp_path)
    c = next(n for n in legal.graph if n.name == "conv1").outputs[0]
    s_in, z_in, _ = _pair(c)
    assert -z_in * s_in < -8  # the graph output needs the values below the floor


def _levels(silu: bool = False) -> ir.Model:
    """A YOLOX-style head: per level ``Concat(regression, Sigmoid(objectness))``, flattened, then
    one ``Concat`` of the levels; each level's regression has its own range. With ``silu`` the
    levels' Concat is a SiLU's input."""
    rng = np.random.default_rng(2)
    nodes, inits, inputs = [], [], []
    for k, (side, gain) in enumerate(((8, 3.0), (4, 1.5))):
        inputs.append(helper.make_tensor_value_info(f"f{k}", TensorProto.FLOAT, [1, 4, side, side]))
        inits += [numpy_helper.from_array((rng.standard_normal((2, 4, 1, 1)) * gain).astype(np.float32), f"wr{k}"),
                  numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32) * 2, f"wo{k}"),
                  numpy_helper.from_array(np.array([1, 3, side * side], np.int64), f"shape{k}")]
        nodes += [helper.make_node("Conv", [f"f{k}", f"wr{k}"], [f"reg{k}"], name=f"reg{k}"),
                  helper.make_node("Conv", [f"f{k}", f"wo{k}"], [f"obj{k}"], name=f"obj{k}"),
                  helper.make_node("Sigmoid", [f"obj{k}"], [f"p{k}"], name=f"p{k}"),
                  helper.make_node("Concat", [f"reg{k}", f"p{k}"], [f"cat{k}"], axis=1, name=f"cat{k}"),
                  helper.make_node("Reshape", [f"cat{k}", f"shape{k}"], [f"flat{k}"], name=f"flat{k}")]
    nodes.append(helper.make_node("Concat", ["flat0", "flat1"], ["cat" if silu else "y"], axis=2, name="levels"))
    if silu:
        nodes += [helper.make_node("Sigmoid", ["cat"], ["gate"], name="gate"),
                  helper.make_node("Mul", ["cat", "gate"], ["y"], name="silu")]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 80])], inits)


def _levels_data(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"f0": rng.standard_normal((n, 1, 4, 8, 8)).astype(np.float32),
            "f1": rng.standard_normal((n, 1, 4, 4, 4)).astype(np.float32)}


@pytest.mark.parametrize("silu", [False, True], ids=["output", "silu-input"])
def test_a_tree_of_concats_shares_one_encoding_at_16_bits(tmp_path, silu):
    """The levels' scores (0-1) span under 1/16 of the tree's range (the first level's regression,
    about +-20): the whole tree runs at 16 bits, on one encoding, the Reshapes between too, so
    nothing is requantized between the Concats. A root that is a SiLU's input keeps the tree's
    grid (no SiLU floor on it alone)."""
    if silu:
        legal = _legalize(_levels(silu=True), _levels_data(16), tmp_path)
        nodes = {n.name: n for n in legal.graph}
        assert len({_pair(nodes[name].outputs[0]) for name in ("cat0", "cat1", "levels")}) == 1
        return
    legal = _legalize(_levels(), _levels_data(16), tmp_path)
    nodes = {n.name: n for n in legal.graph}
    shared = _pair(nodes["levels"].outputs[0])
    assert shared[2] == "uint16"
    for name in ("cat0", "cat1", "flat0", "flat1"):
        assert _pair(nodes[name].outputs[0]) == shared, name
    for name in ("flat0", "flat1"):
        assert _read(nodes[name].inputs[0]) == shared and _read(nodes["levels"].inputs[int(name[-1])]) == shared


@needs_htp
def test_htp_computes_a_tree_of_concats_as_the_graph_says(tmp_path):
    """With inner Concats on grids of their own, HTP wrote the second level's objectness into the
    outer Concat on the inner grid and read it on the outer one: off by up to 1.79 on a
    probability (ddddocr's detector: AP50 vs fp32 0.764 on HTP, 0.980 run as written). Now each
    score HTP writes is within what one step of the objectness convolution's output moves a
    Sigmoid (slope 1/4) plus two steps of the Sigmoid's own grid (1/256) of the graph run as
    written."""
    from compressor.targets.qnn_htp.runtime import QnnHtpRunner

    data = _levels_data(16)
    legal = _legalize(_levels(), data, tmp_path)
    nodes = {n.name: n for n in legal.graph}
    htp = QnnHtpRunner(save_model(legal, tmp_path / "levels.onnx"))
    written = ort_session(legal, as_written=True)
    bound = max(_pair(nodes[f"obj{k}"].outputs[0])[0] for k in (0, 1)) / 4 + 2 / 256
    for i in range(4):
        feed = {k: v[i] for k, v in data.items()}
        got, want = htp(feed)[0][:, 2], written.run(None, feed)[0][:, 2]  # the objectness row
        assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)
