"""``qnn-quantize-tensors`` case 2d/2e (:mod:`compressor.targets.qnn_htp.widen`): square roots and carried states at 16 bits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compressor.targets.onnx import ort_session
from compressor.targets.qnn_htp import HTP_QDQ_RULES, QNN_HTP_CAPABILITIES
from compressor.targets.qnn_htp.widen import carried_states
from onnx import TensorProto, helper, numpy_helper

from compressor.data import load_npz
from compressor.inputs import model_input_specs
from compressor.pipeline import PassContext, build_pass

N = 64  # STFT bins


class _Stub:
    name = "qnn-htp"
    capabilities = QNN_HTP_CAPABILITIES
    qdq_rules = HTP_QDQ_RULES


class _NoRoots(_Stub):
    qdq_rules = dataclasses.replace(HTP_QDQ_RULES, root_inputs={})


def _model(nodes, inputs, outputs, inits=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _magnitude() -> ir.Model:
    """silero-vad's STFT magnitude: ``sqrt(re^2 + im^2)`` (``Pow`` by 2, ``Add``, ``Sqrt``), then a Relu."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("Pow", ["re", "two"], ["re2"], name="re_sq"),
             helper.make_node("Pow", ["im", "two"], ["im2"], name="im_sq"),
             helper.make_node("Add", ["re2", "im2"], ["power"], name="power"),
             helper.make_node("Sqrt", ["power"], ["mag"], name="mag"),
             helper.make_node("Relu", ["mag"], ["y"], name="relu")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, N]) for n in ("re", "im", "y")]
    return _model(nodes, io[:2], io[2:], [two])


def _spectra(n: int, seed: int) -> dict[str, np.ndarray]:
    """Bins whose magnitudes span 40 dB (log-uniform from 0.01 to 1), random phase."""
    rng = np.random.default_rng(seed)
    mag = 10 ** rng.uniform(-2, 0, (n, 1, N))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, N))
    return {"re": (mag * np.cos(phase)).astype(np.float32), "im": (mag * np.sin(phase)).astype(np.float32)}


def _legalize(model: ir.Model, data: dict[str, np.ndarray], tmp_path: Path, target=None, **options) -> ir.Model:
    path = tmp_path / "calib.npz"
    np.savez(path, **data)
    ctx = PassContext(target=target or _Stub(), calibration=load_npz(path, model_input_specs(model), what="calib"),
                      properties={"constants-folded"})
    model = build_pass("quantize", {"calibrator": "minmax"}).run(model, ctx).model
    return build_pass("qnn-legalize", options).run(model, ctx).model


def _encoding(value: ir.Value) -> str:
    q = next(use.node for use in value.uses() if use.node.op_type == "QuantizeLinear")
    return q.inputs[2].const_value.numpy().dtype.name


def test_a_square_root_and_the_power_it_reads_run_at_16_bits(tmp_path):
    """A root halves the dynamic range in dB: an 8-bit power keeps 24 dB, so every bin more than
    ~27 dB below the peak magnitude (power below half a step, peak^2/510) comes out of the
    Sqrt as exactly 0, about a third of these 40-dB spectra. With the power at 16 bits the
    floor is ~51 dB down, below every bin. ``Pow(x, 2)`` is written ``Mul(x, x)``."""
    floats = _magnitude()
    legal = _legalize(_magnitude(), _spectra(32, 0), tmp_path)
    ops = {n.name: n.op_type for n in legal.graph}
    assert ops["re_sq"] == ops["im_sq"] == "Mul"
    by_name = {n.name: n for n in legal.graph}
    assert {_encoding(by_name[k].outputs[0]) for k in ("re_sq", "im_sq", "power", "mag")} == {"uint16"}
    test = _spectra(8, 1)
    feeds = [{k: v[i] for k, v in test.items()} for i in range(8)]
    ref = np.stack([ort_session(floats).run(None, feed)[0] for feed in feeds])
    zeros = {}
    for key, model in (("16", legal), ("8", _legalize(_magnitude(), _spectra(32, 0), tmp_path, _NoRoots()))):
        session = ort_session(model, as_written=True)
        out = np.stack([session.run(None, feed)[0] for feed in feeds])
        zeros[key] = float(np.mean(out == 0))
    assert (ref > 0).all() and zeros["16"] == 0.0 and zeros["8"] > 0.2, zeros


H = 8


def _cell() -> ir.Model:
    """A recurrent cell a streaming caller runs frame by frame: ``state`` [2, 1, H] stacks ``h``
    and ``c``; ``c' = σ(x_f) c + tanh(x_g)``, ``h' = tanh(c')``, ``stateN`` stacks them again;
    ``y = h' W`` (a layer: it keeps its own 8-bit input encoding)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((H, 2)).astype(np.float32), "w")
    idx = [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in (0, 1)]
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [helper.make_node("Gather", ["state", "i1"], ["c"], name="take_c", axis=0),
             helper.make_node("Sigmoid", ["xf"], ["f"], name="forget"),
             helper.make_node("Tanh", ["xg"], ["g"], name="candidate"),
             helper.make_node("Mul", ["f", "c"], ["fc"], name="fc"),
             helper.make_node("Add", ["fc", "g"], ["c_new"], name="c_new"),
             helper.make_node("Tanh", ["c_new"], ["h_new"], name="h_new"),
             helper.make_node("Unsqueeze", ["h_new", "axes"], ["h_u"], name="h_u"),
             helper.make_node("Unsqueeze", ["c_new", "axes"], ["c_u"], name="c_u"),
             helper.make_node("Concat", ["h_u", "c_u"], ["stateN"], name="stack", axis=0),
             helper.make_node("MatMul", ["h_new", "w"], ["y"], name="head")]
    inputs = [helper.make_tensor_value_info("xf", TensorProto.FLOAT, [1, H]),
              helper.make_tensor_value_info("xg", TensorProto.FLOAT, [1, H]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, H])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, H])]
    return _model(nodes, inputs, outputs, [w, *idx, axes])


def test_a_state_carried_between_calls_is_found_by_structure():
    model = _cell()
    found = carried_states(model.graph, HTP_QDQ_RULES)
    assert [(x.name, y.name) for x, y in found] == [("state", "stateN")]
    names = {n.name for n in model.graph if id(n) in next(iter(found.values()))}
    assert names == {"take_c", "fc", "c_new", "h_new", "h_u", "c_u", "stack"}


def _one_input(op: str) -> ir.Model:
    """A one-input model whose output is its input through ``op`` and a Conv: a residual
    (``Add``) or a mask (``Mul``); same shape in and out, nothing carried between calls."""
    w = numpy_helper.from_array(np.full((4, 4, 1, 1), 0.1, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["f"], name="conv"),
             helper.make_node(op, ["x", "f"], ["y"], name="join")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("x", "y")]
    return _model(nodes, io[:1], io[1:], [w])


def test_a_one_input_model_whose_output_reaches_its_input_carries_nothing(tmp_path):
    """A residual denoiser (``y = x + f(x)``) or a mask enhancer (``y = x * m(x)``) has an input and
    an output of one shape joined by an elementwise op, but no other input: no stream state.
    Nothing is widened (before: the input and the Add ran at 16 bits, with Converts)."""
    for op in ("Add", "Mul"):
        assert carried_states(_one_input(op).graph, HTP_QDQ_RULES) == {}
    x = np.random.default_rng(0).standard_normal((8, 1, 4, 8, 8)).astype(np.float32)
    legal = _legalize(_one_input("Add"), {"x": x}, tmp_path)
    assert _encoding(legal.graph.inputs[0]) == "uint8"
    assert {_encoding(n.outputs[0]) for n in legal.graph if n.name == "join"} == {"uint8"}


def test_a_power_that_is_a_graph_output_is_written_as_mul(tmp_path):
    """``Pow(x, 2)`` whose output is the model's output (an energy head): rewritten, the output
    keeps its name (qnn-legalize exited 1: onnx_ir refuses to rewire a graph output unasked)."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    model = _model([helper.make_node("Pow", ["x", "two"], ["energy"], name="energy")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N])],
                   [helper.make_tensor_value_info("energy", TensorProto.FLOAT, [1, N])], [two])
    legal = _legalize(model, {"x": np.random.default_rng(0).standard_normal((8, 1, N)).astype(np.float32)}, tmp_path)
    assert [v.name for v in legal.graph.outputs] == ["energy"]
    assert {n.op_type for n in legal.graph} - {"QuantizeLinear", "DequantizeLinear"} == {"Mul"}


def test_the_carried_state_runs_at_16_bits_the_layer_reads_its_own_8_bit_encoding(tmp_path):
    """Unit 0's cell saturates (``c`` up to 40, a stream of 40 frames with the forget gate
    open), the others stay within ±1: one 8-bit encoding of ``state`` steps by ~0.3 and erases
    them; the state path (the ``state`` input, the Gather, the cell update, the Concat) runs at
    16 bits. The head's MatMul reads ``h'`` through its own 8-bit encoding (quantize's)."""
    rng = np.random.default_rng(1)
    n = 48
    xf = rng.normal(0, 1, (n, 1, H)).astype(np.float32)
    xf[:, :, 0] = 12.0  # σ ≈ 1: unit 0 accumulates
    xg = rng.normal(0, 0.5, (n, 1, H)).astype(np.float32)
    xg[:, :, 0] = 3.0  # tanh near 1, and a range that keeps the 8-bit step of xg small
    state = np.zeros((n, 2, 1, H), np.float32)
    state[:, 1, 0, 0] = np.arange(n) % 40  # the saturated cell as a stream leaves it
    state[:, 1, :, 1:] = rng.uniform(-1, 1, (n, 1, H - 1))
    state[:, 0] = np.tanh(state[:, 1])
    legal = _legalize(_cell(), {"xf": xf, "xg": xg, "state": state}, tmp_path)
    by_name = {n.name: n for n in legal.graph}
    state_in = next(v for v in legal.graph.inputs if v.name == "state")
    assert _encoding(state_in) == "uint16"
    assert {_encoding(by_name[k].outputs[0]) for k in ("take_c", "fc", "c_new", "h_new", "stack")} == {"uint16"}
    head_dq = by_name["head"].inputs[0].producer()
    assert head_dq.op_type == "DequantizeLinear" and head_dq.inputs[2].const_value.numpy().dtype == np.uint8
    # The small cells' c' over the samples: an 8-bit state (step s8 = range/255) alone moves
    # them by up to f * s8/2 (f near 1 for most); what is left at 16 bits comes from the 8-bit
    # gate inputs, under s8/4. The same graph without the rule (the control) exceeds s8/4.
    control = _legalize(_cell(), {"xf": xf, "xg": xg, "state": state}, tmp_path, carried_states="int8")
    assert _encoding(next(v for v in control.graph.inputs if v.name == "state")) == "uint8"
    s8 = float(np.ptp(state)) / 255
    worst = {}
    for key, model in (("16", legal), ("8", control)):
        session = ort_session(model, as_written=True)
        errors = []
        for i in range(n):
            feed = {"xf": xf[i], "xg": xg[i], "state": state[i]}
            ref = ort_session(_cell()).run(None, feed)[1]
            errors.append(np.abs(session.run(None, feed)[1][1, :, 1:] - ref[1, :, 1:]).max())
        worst[key] = float(max(errors))
    assert worst["16"] < s8 / 4 < worst["8"], (worst, s8)


D = 16


def _residual_norm() -> ir.Model:
    """Two BERT-style block ends: ``x = LayerNorm_0(x0)`` (its gamma makes channel 0 an outlier,
    x40, as a residual stream's), then ``y = LayerNorm(x + h W)``."""
    rng = np.random.default_rng(3)
    gamma0 = np.ones(D, np.float32)
    gamma0[0] = 40.0
    inits = [numpy_helper.from_array((rng.standard_normal((D, D)) * 0.1).astype(np.float32), "w"),
             numpy_helper.from_array(gamma0, "gamma0"), numpy_helper.from_array(np.ones(D, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(D, np.float32), "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x0", "gamma0", "beta"], ["x"], name="norm0", axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["f"], name="dense"),
             helper.make_node("Add", ["x", "f"], ["res"], name="residual"),
             helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["y"], name="norm", axis=-1)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, D]) for n in ("x0", "h", "y")]
    return _model(nodes, io[:2], io[2:], inits)


def test_a_normalization_and_the_residual_sum_it_reads_run_at_16_bits(tmp_path):
    """The residual stream's channel 0 is an outlier (x40): one 8-bit encoding of it and of the
    sum steps by a third of the other channels' spread, and the LayerNorm scales that error
    back up. With the normalizations and the Add at 16 bits the output must be at least 6 dB
    closer to float (one bit of the eight added; about 10 measured: the 8-bit ``h`` and ``f``
    bound what is left)."""
    rng = np.random.default_rng(4)
    data = {"x0": rng.standard_normal((40, 1, 8, D)).astype(np.float32),
            "h": rng.standard_normal((40, 1, 8, D)).astype(np.float32)}
    legal = _legalize(_residual_norm(), data, tmp_path)
    by_name = {n.name: n for n in legal.graph}
    assert {_encoding(by_name[k].outputs[0]) for k in ("norm0", "residual", "norm")} == {"uint16"}
    control = _legalize(_residual_norm(), data, tmp_path, norms="int8")
    assert {_encoding(n.outputs[0]) for n in control.graph if n.name in ("norm0", "residual", "norm")} == {"uint8"}
    feeds = [{k: v[i] for k, v in data.items()} for i in range(8)]
    ref = np.stack([ort_session(_residual_norm()).run(None, f)[0] for f in feeds])
    sqnr = {}
    for key, model in (("16", legal), ("8", control)):
        session = ort_session(model, as_written=True)
        out = np.stack([session.run(None, f)[0] for f in feeds])
        sqnr[key] = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))
    assert sqnr["16"] >= sqnr["8"] + 6.0, sqnr


def _first_pair(value: ir.Value) -> str:
    """The zero point dtype of the first Q/DQ pair ``value`` is read through (its DQ's, or a Q reading it)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        return producer.inputs[2].const_value.numpy().dtype.name
    return _encoding(value)


def test_attention_glue_runs_at_16_bits_and_the_weight_matmuls_read_8(tmp_path):
    """Case 2g: in a model with attention blocks at W8A8, every node but the compute layers
    (the score scaling, Softmax, the residual Add, LayerNorm) runs at 16
    bits, the scores Q·Kᵀ too (quantize's preset on a target without a float path); the
    weight MatMuls Q, V, O and the head read 8-bit pairs. ``{attention: int8}`` turns the
    glue back to 8 bits (the norms rule keeps the residual and LayerNorm at 16, and the
    softmax is read by the 16-bit ``probs · V``)."""
    from tests.targets.test_qnn_htp_accuracy_control import D, S, block

    data = {"x": np.random.default_rng(3).standard_normal((16, 1, S, D)).astype(np.float32)}
    typed = build_pass("fold-constants", None).run(block(), PassContext()).model  # the value types quantize reads
    for options, glue in ((None, "uint16"), ({"attention": "int8"}, "uint8")):
        legal = _legalize(ir.from_proto(ir.to_proto(typed)), data, tmp_path, **(options or {}))
        nodes = {n.name: n for n in legal.graph if n.name}
        outputs = {n.outputs[0].name: n for n in legal.graph}
        assert _encoding(outputs["ss"].outputs[0]) == glue, options
        assert _encoding(outputs["p"].outputs[0]) == "uint16"  # read by probs·V, a 16-bit layer (case 2b)
        assert {_encoding(nodes[n].outputs[0]) for n in ("residual", "norm")} == {"uint16"}
        for layer in ("q_proj", "v_proj", "o_proj", "head"):
            assert _first_pair(nodes[layer].inputs[0]) == "uint8", (layer, options)
        assert {_first_pair(v) for v in nodes["scores"].inputs} == {"uint16"}, options


def test_a_model_without_attention_keeps_its_glue_at_8_bits(tmp_path):
    legal = _legalize(_one_input("Add"), {"x": np.random.default_rng(4).standard_normal((16, 1, 4, 8, 8))
                                          .astype(np.float32)}, tmp_path)
    assert _encoding(next(n for n in legal.graph if n.name == "join").outputs[0]) == "uint8"


def _boxes_and_scores() -> ir.Model:
    """A YOLOv8-style output: ``Concat(300 * sigmoid(a), sigmoid(b))``, boxes in pixels beside scores in (0, 1)."""
    px = numpy_helper.from_array(np.array(300.0, np.float32), "px")
    nodes = [helper.make_node("Sigmoid", ["a"], ["a01"], name="box_sigmoid"),
             helper.make_node("Mul", ["a01", "px"], ["boxes"], name="to_pixels"),
             helper.make_node("Sigmoid", ["b"], ["scores"], name="score_sigmoid"),
             helper.make_node("Concat", ["boxes", "scores"], ["y"], name="head", axis=1)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 50]) for n in ("a", "b")]
    return _model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 50])], [px])


def test_a_concat_of_scores_beside_pixels_runs_at_16_bits(tmp_path):
    """One 8-bit encoding for [0, 300] has a step of 1.18: every score in (0, 1) rounds to 0 or
    1.18. At 16 bits the step is 0.0046, so a score is off by less than that, plus half the
    Sigmoid's own 8-bit step (1/512), plus its 8-bit input's half step times its largest
    slope (1/4)."""
    rng = np.random.default_rng(0)
    data = {k: rng.normal(0, 2, (32, 1, 4, 50)).astype(np.float32) for k in ("a", "b")}
    legal = _legalize(_boxes_and_scores(), data, tmp_path)
    assert _encoding({n.name: n for n in legal.graph}["head"].outputs[0]) == "uint16"
    narrow = _legalize(_boxes_and_scores(), data, tmp_path, concats="int8")
    assert _encoding({n.name: n for n in narrow.graph}["head"].outputs[0]) == "uint8"
    feeds = [{k: v[i] for k, v in data.items()} for i in range(8)]
    ref = np.stack([ort_session(_boxes_and_scores()).run(None, feed)[0] for feed in feeds])[:, :, 4:]
    errors = {}
    for key, model in (("16", legal), ("8", narrow)):
        session = ort_session(model, as_written=True)
        errors[key] = float(np.abs(np.stack([session.run(None, feed)[0] for feed in feeds])[:, :, 4:] - ref).max())
    step_b = (data["b"].max() - min(data["b"].min(), 0)) / 255
    assert errors["16"] < 300 / 65535 + 1 / 512 + step_b / 2 / 4 and errors["8"] > 0.3, errors


def _concat_then(reader: str | None, name: str = "head") -> ir.Model:
    """:func:`_boxes_and_scores`, its Concat named ``name``, then a reader of the Concat: ``None`` (the Concat is
    the output), ``Transpose`` (data movement to the output) or ``Conv`` (a compute layer)."""
    model = _boxes_and_scores()
    proto = ir.serde.serialize_model(model)
    proto.graph.node[-1].name = name
    if reader is not None:
        proto.graph.node[-1].output[0] = "cat"
        if reader == "Transpose":
            proto.graph.node.append(helper.make_node("Transpose", ["cat"], ["y"], perm=[0, 2, 1], name="to_rows"))
            proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 50
            proto.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 8
        else:  # Conv1d 8 -> 8, kernel 1
            w = np.random.default_rng(1).standard_normal((8, 8, 1)).astype(np.float32)
            proto.graph.initializer.append(numpy_helper.from_array(w, "w"))
            proto.graph.node.append(helper.make_node("Conv", ["cat", "w"], ["y"], name="mix"))
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


@pytest.mark.parametrize("reader, wide", [(None, True), ("Transpose", True), ("Conv", False)])
def test_a_concat_is_widened_only_on_its_way_to_an_output(tmp_path, reader, wide):
    """The review's case: a Conv reading the Concat requantizes it to its own 8 bits over the whole range, so a
    16-bit Concat there would only add Converts. An unnamed Concat is found too (by its output)."""
    rng = np.random.default_rng(0)
    data = {k: rng.normal(0, 2, (32, 1, 4, 50)).astype(np.float32) for k in ("a", "b")}
    legal = _legalize(_concat_then(reader, name=""), data, tmp_path)
    (concat,) = [n for n in legal.graph if n.op_type == "Concat"]
    assert (_encoding(concat.outputs[0]) == "uint16") is wide
