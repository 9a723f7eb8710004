"""``qnn-unroll-lstm``: an LSTM as its time steps, exact on ONNX Runtime, and what HTP then runs."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compressor.targets.onnx import ort_session
from compressor.targets.qnn_htp import (
    HTP_QDQ_RULES,
    QNN_HTP_CAPABILITIES,
    float_compute_nodes,
    lint,
)
from compressor.targets.qnn_htp.rules import UNFINALIZED_OPS
from compressor.targets.qnn_htp.unroll_lstm import unroll_problem
from onnx import TensorProto, helper, numpy_helper

from compressor.data import load_npz
from compressor.inputs import model_input_specs
from compressor.pipeline import PassContext, build_pass

HAVE_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None

T, B, I, H = 5, 2, 6, 4


class _Stub:
    name = "qnn-htp"
    capabilities = QNN_HTP_CAPABILITIES
    qdq_rules = HTP_QDQ_RULES


def lstm(direction: str = "forward", initial: str = "none", outputs: tuple[str, ...] = ("y", "yh", "yc"),
         seed: int = 0, **attrs) -> ir.Model:
    """x[T,B,I] -> LSTM(W, R, B[, initial_h, initial_c]) -> ``outputs``; ``initial``: none, zeros or random."""
    dirs = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((dirs, 4 * H, I)).astype(np.float32) * 0.5, "w"),
             numpy_helper.from_array(rng.standard_normal((dirs, 4 * H, H)).astype(np.float32) * 0.5, "r"),
             numpy_helper.from_array(rng.standard_normal((dirs, 8 * H)).astype(np.float32) * 0.5, "b")]
    inputs = ["x", "w", "r", "b"]
    if initial != "none":
        make = np.zeros if initial == "zeros" else (lambda s: rng.standard_normal(s))
        inits += [numpy_helper.from_array(np.asarray(make((dirs, B, H)), np.float32), n) for n in ("h0", "c0")]
        inputs += ["", "h0", "c0"]
    names = ["y", "yh", "yc"]
    shapes = {"y": [T, dirs, B, H], "yh": [dirs, B, H], "yc": [dirs, B, H]}
    node = helper.make_node("LSTM", inputs, [n if n in outputs else "" for n in names], name="the_lstm",
                            hidden_size=H, direction=direction, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, B, I])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in outputs], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    return ort_session(model, as_written=True).run(None, {"x": x})  # Q/DQ as written, as HTP computes it


def _x(seed: int = 1, n: int | None = None) -> np.ndarray:
    shape = (T, B, I) if n is None else (n, T, B, I)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("initial", ["none", "zeros", "random"])
def test_unrolled_lstm_equals_the_lstm(direction, initial):
    """Y, Y_h and Y_c equal ONNX Runtime's LSTM within float rounding (cases 1-3), no LSTM left."""
    model = lstm(direction, initial)
    x = _x()
    want = _run(model, x)
    result = build_pass("qnn-unroll-lstm", None).run(model, PassContext())
    assert result.modified and result.stats == {"lstm_unrolled": 1, "lstm_left": {}}
    ops = [n.op_type for n in result.model.graph]
    assert "LSTM" not in ops and set(ops) <= {"MatMul", "Add", "Slice", "Sigmoid", "Tanh", "Mul", "Reshape", "Concat"}
    # case 2: a zero initial state adds no recurrent MatMul at the first step of each direction
    dirs = 2 if direction == "bidirectional" else 1
    assert ops.count("MatMul") == dirs * (T if initial == "random" else T - 1) + dirs
    got = _run(result.model, x)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


def test_only_y_is_kept_when_the_states_are_not_read():
    model = lstm("bidirectional", outputs=("y",))
    result = build_pass("qnn-unroll-lstm", None).run(model, PassContext())
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    np.testing.assert_allclose(_run(result.model, _x())[0], _run(lstm("bidirectional", outputs=("y",)), _x())[0],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize(("attrs", "why"), [
    ({"clip": 3.0}, "attribute clip=3.0 is not rewritten"),
    ({"input_forget": 1}, "attribute input_forget=1 is not rewritten"),
    ({"activations": ["Sigmoid", "Relu", "Tanh"]}, "activations ['Sigmoid', 'Relu', 'Tanh'] are not the default"),
])
def test_an_lstm_it_cannot_unroll_is_left_and_refused_by_lint(attrs, why):
    model = lstm(**attrs)
    node = next(iter(model.graph))
    assert why in unroll_problem(node)
    result = build_pass("qnn-unroll-lstm", None).run(model, PassContext())
    assert not result.modified and why in result.stats["lstm_left"]["the_lstm"]
    assert [n.op_type for n in result.model.graph] == ["LSTM"]
    [(where, reason)] = lint(model)
    assert where == "the_lstm" and reason.startswith(f"op LSTM: {UNFINALIZED_OPS['LSTM']}; qnn-legalize does not unroll it")
    assert why in reason


def test_lint_accepts_an_lstm_qnn_legalize_unrolls():
    assert lint(lstm("bidirectional", "zeros")) == []


def test_lint_accepts_an_lstm_whose_input_shape_is_known_only_after_folding():
    """ddddocr_common: the LSTM reads a Reshape whose target shape is Shape/Gather/Concat
    arithmetic, so its input has no static shape until fold-constants runs (after lint); lint
    refused it (exit 4, "its input's shape is not static") though qnn-legalize unrolls it."""
    model = lstm("bidirectional", "zeros")
    node = next(iter(model.graph))
    hop = ir.node("Identity", [node.inputs[0]], name="reshaped_later")
    model.graph.insert_before(node, hop)
    hop.outputs[0].name, hop.outputs[0].dtype = "x_later", ir.DataType.FLOAT  # shape unknown, as before folding
    node.replace_input_with(0, hop.outputs[0])
    assert "not static" in unroll_problem(node)
    assert lint(model) == []


def _legalized(tmp_path, activations: str = "int8") -> tuple[ir.Model, ir.Model]:
    """(float LSTM, quantize + qnn-legalize of it) on the HTP data, with 64 calibration samples."""
    model = lstm("bidirectional", "zeros", outputs=("y",))
    path = tmp_path / "calib.npz"
    np.savez(path, x=_x(2, 64))
    ctx = PassContext(target=_Stub(), calibration=load_npz(path, model_input_specs(model), what="calib"),
                      properties={"constants-folded"})
    quantized = build_pass("quantize", {"activations": activations, "calibrator": "minmax"}).run(model, ctx).model
    legal = build_pass("qnn-legalize", {"activations": activations}).run(quantized, ctx).model
    return lstm("bidirectional", "zeros", outputs=("y",)), legal  # the passes may edit their input in place


def test_legalized_lstm_is_wholly_quantized_and_close_to_float(tmp_path):
    """After qnn-legalize no float compute is left (so HTP runs every op quantized), and the
    W8A8 steps stay near the float LSTM: each H_t is ``σ(o) ⊙ tanh(C_t)`` in [-1, 1], and 8-bit
    encodings of ``[-1, 1]`` tensors step by 1/128, so a floor of 25 dB SQNR (about 4 steps of
    RMS error on outputs of RMS ~0.3) holds; the same graph at W8A16 does better (its
    ranges still clip the eval samples calibration did not see, so not by the 48 dB of 8 more bits)."""
    floats, model = _legalized(tmp_path)
    assert float_compute_nodes(model) == []
    assert "LSTM" not in [n.op_type for n in model.graph]
    x = _x(3, 16)
    sqnr = {}
    for bits, m in (("int8", model), ("int16", _legalized(tmp_path, "int16")[1])):
        ref = np.stack([_run(floats, s)[0] for s in x])
        out = np.stack([_run(m, s)[0] for s in x])
        sqnr[bits] = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))
    assert sqnr["int8"] >= 25.0, sqnr
    assert sqnr["int16"] > sqnr["int8"], sqnr


@pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn cannot be imported: no QNN HTP backend here")
def test_unrolled_lstm_runs_wholly_on_htp(tmp_path):
    """The LSTM HTP fails to finalize (``rules.UNFINALIZED_OPS``) compiles once unrolled and runs
    on HTP (CPU fallback disabled) within a few output steps of the same QDQ model on the CPU."""
    from compressor.targets import get_target

    target = get_target("qnn-htp")
    _, model = _legalized(tmp_path)
    run = target.runner(target.lower(model, tmp_path / "out"))
    dq = next(v for v in model.graph.outputs if v.name == "y").producer()
    step = float(dq.inputs[1].const_value.numpy())
    for s in _x(4, 3):
        htp, cpu = run({"x": s})[0], _run(model, s)[0]
        # 4 steps: one rounding step per op that can differ (MatMul sums, Add, Mul) carried
        # through a Tanh/Mul whose slope is at most 1, across the 5 recurrent steps
        assert np.abs(htp - cpu).max() <= 4 * step + 1e-6
    assert target.report(run)["qnn_htp"]["float_nodes"] == []


def _wide_gates_lstm(gain: float) -> ir.Model:
    """The bidirectional LSTM of :func:`lstm` with its input weights ``W`` times ``gain``."""
    model = lstm("bidirectional", "zeros", outputs=("y",))
    w = model.graph.initializers["w"]
    w.const_value = ir.tensor(w.const_value.numpy() * gain, name="w")
    return model


def _legalized_gates(tmp_path, gates: str, gain: float, cell: str = "int16") -> ir.Model:
    model = _wide_gates_lstm(gain)
    np.savez(tmp_path / "calib.npz", x=_x(2, 64))
    ctx = PassContext(target=_Stub(), calibration=load_npz(tmp_path / "calib.npz", model_input_specs(model),
                                                           what="calib"), properties={"constants-folded"})
    quantized = build_pass("quantize", {"activations": "int8", "calibrator": "minmax"}).run(model, ctx).model
    return build_pass("qnn-legalize", {"lstm_gates": gates, "lstm_cell": cell}).run(quantized, ctx).model


def _encoding_dtype(value: ir.Value) -> str:
    """The type of the Q/DQ pair ``value`` is read through (its readers' DQ), by its zero point."""
    q = next(use.node for use in value.uses() if use.node.op_type == "QuantizeLinear")
    return q.inputs[2].const_value.numpy().dtype.name


def test_gate_pre_activations_and_the_cell_run_at_16_bits_h_at_the_recipes_width(tmp_path):
    """Issue 12 (ddddocr_common): an LSTM's gate pre-activations span the range of every gate of
    every step (±160 on ddddocr), so at 8 bits their step is wider than where a sigmoid moves;
    qnn-unroll-lstm marks them (and the Sigmoid/Tanh reading them, whose outputs are encoded
    at 16 bits too) for 16 bits (case 4); the cell state too (its products, C_t, tanh(C_t):
    case 5, silero-vad). H_t stays 8-bit; the MatMul weights are int8 symmetric as a layer's.
    ``lstm_gates``/``lstm_cell: int8`` leave each at the recipe's width."""
    model = _legalized_gates(tmp_path, "int16", gain=1.0)
    assert float_compute_nodes(model) == []
    by_kind: dict[str, set[str]] = {}
    for node in model.graph:
        if node.name.startswith("the_lstm_d") and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            kind = re.match(r"the_lstm_d\d_(?:t\d+_)?(.+)$", node.name).group(1)
            by_kind.setdefault(kind, set()).add(_encoding_dtype(node.outputs[0]))
    gates = {"xw", "xw_b", "hr", "gates", "i", "o", "f", "c", "i_sig", "o_sig", "f_sig", "c_tanh"}
    cell = {"ic", "fc", "C", "C_tanh"}
    assert {k: v for k, v in by_kind.items() if k in gates | cell} == {k: {"uint16"} for k in gates | cell}
    assert {k: v for k, v in by_kind.items() if k not in gates | cell} == {k: {"uint8"} for k in ("H", "y")}
    for node in model.graph:
        if node.op_type == "MatMul":
            dq = node.inputs[1].producer()
            assert dq.inputs[0].const_value.dtype == ir.DataType.INT8 and not dq.inputs[2].const_value.numpy().any()
    eight = _legalized_gates(tmp_path, "int8", gain=1.0)
    assert {_encoding_dtype(n.outputs[0]) for n in eight.graph if n.name.endswith("_gates")} == {"uint8"}
    assert {_encoding_dtype(n.outputs[0]) for n in eight.graph if n.name.endswith("_C")} == {"uint16"}
    narrow_cell = _legalized_gates(tmp_path, "int16", gain=1.0, cell="int8")
    assert {_encoding_dtype(n.outputs[0]) for n in narrow_cell.graph if n.name.endswith(("_C", "_fc"))} == {"uint8"}


def _saturating_cell_lstm() -> ir.Model:
    """A forward LSTM over 40 steps whose unit 0 has its input and forget gates and its candidate
    driven to 1 (bias +10): its cell state climbs to ~40 while the other units' stay within ±1."""
    steps, hidden = 40, 4
    rng = np.random.default_rng(5)
    w = rng.standard_normal((1, 4 * hidden, I)).astype(np.float32) * 0.5
    r = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.3
    b = np.zeros((1, 8 * hidden), np.float32)
    for gate in (0, 2, 3):  # i, f, c of unit 0 (gate order i, o, f, c)
        b[0, gate * hidden] = 10.0
        w[0, gate * hidden] = 0.0
    node = helper.make_node("LSTM", ["x", "w", "r", "b"], ["y"], name="the_lstm", hidden_size=hidden)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, I])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [steps, 1, 1, hidden])],
                              [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (r, "r"), (b, "b"))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def test_a_16_bit_cell_state_keeps_the_small_cells_beside_a_saturated_one(tmp_path):
    """silero-vad's cell state spans ±64 where most cells are small: at 8 bits its step (range /
    255, here ~0.3) erases the small cells, and H = σ(o) tanh(C) of those units follows. With
    the cell at 16 bits the other units' H must be at least 10 dB closer to float (about 15
    measured; the 8-bit H and gate encodings bound what is left)."""
    floats = _saturating_cell_lstm()
    xs = np.random.default_rng(6).standard_normal((16, 40, 1, I)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=xs)
    sqnr = {}
    for cell in ("int16", "int8"):
        model = _saturating_cell_lstm()
        ctx = PassContext(target=_Stub(), calibration=load_npz(tmp_path / "calib.npz", model_input_specs(model),
                                                               what="calib"), properties={"constants-folded"})
        quantized = build_pass("quantize", {"calibrator": "minmax"}).run(model, ctx).model
        legal = build_pass("qnn-legalize", {"lstm_cell": cell}).run(quantized, ctx).model
        ref = _run_all(floats, xs)[..., 1:]
        out = _run_all(legal, xs)[..., 1:]
        sqnr[cell] = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))
    assert sqnr["int16"] >= sqnr["int8"] + 10.0, sqnr


@pytest.mark.parametrize("weights", ["int8-per-channel", "int8-per-tensor"])
def test_unrolled_weights_are_per_gate_unit_as_the_targets_layers(tmp_path, weights):
    """The unrolled MatMuls read ``W_dᵀ`` [I, 4H] and ``R_dᵀ`` [H, 4H], which ``quantize`` never
    saw: ``qnn-quantize-tensors`` (case 4) stores them as HTP's MatMul layers, int8 symmetric per
    output column (one scale per gate unit, ``s_c = max|W_c| / 127``), or per tensor with
    ``qnn-legalize {weights: int8-per-tensor}``, the fallback ``quantize`` takes too."""
    model = lstm("bidirectional", "zeros", outputs=("y",))
    w, r = (model.graph.initializers[n].const_value.numpy() for n in ("w", "r"))
    np.savez(tmp_path / "calib.npz", x=_x(2, 64))
    ctx = PassContext(target=_Stub(), calibration=load_npz(tmp_path / "calib.npz", model_input_specs(model),
                                                           what="calib"), properties={"constants-folded"})
    quantize = build_pass("quantize", {"activations": "int8", "calibrator": "minmax", "weights": weights})
    quantized = quantize.run(model, ctx)
    legal = build_pass("qnn-legalize", {"weights": weights}).run(quantized.model, ctx).model
    checked = 0
    for node in legal.graph:
        if node.op_type != "MatMul":
            continue
        d, kind = re.match(r"the_lstm_d(\d)_(?:t\d+_)?(xw|hr)$", node.name).groups()
        dq = node.inputs[1].producer()
        scale, zp = dq.inputs[1].const_value.numpy(), dq.inputs[2].const_value.numpy()
        assert dq.inputs[0].const_value.dtype == ir.DataType.INT8 and not zp.any()
        rows = (w if kind == "xw" else r)[int(d)]  # [4H, in]: the MatMul reads its transpose
        if weights == "int8-per-channel":
            assert dq.attributes["axis"].value == 1 and scale.shape == (4 * H,)
            np.testing.assert_allclose(scale, np.abs(rows).max(axis=1) / 127, rtol=1e-6)
        else:
            assert "axis" not in dq.attributes and scale.shape == ()
            np.testing.assert_allclose(scale, np.abs(rows).max() / 127, rtol=1e-6)
        checked += 1
    assert checked == 2 + 2 * (T - 1)  # per direction one X Wᵀ and a H Rᵀ per step after the first


GAIN = 16.0


def _run_all(model: ir.Model, xs: np.ndarray) -> np.ndarray:
    """``Y`` for each sample of ``xs``, from one session."""
    session = ort_session(model, as_written=True)
    return np.stack([session.run(None, {"x": x})[0] for x in xs])


def test_16_bit_gates_hold_an_lstm_whose_gates_span_a_wide_range(tmp_path):
    """With ``W`` x16 the gate pre-activations span tens of units, so an 8-bit step (their range
    / 255) is wider than the region where a sigmoid moves; at 16 bits (257 times finer) the error
    left is that of the 8-bit states, which the W8A8 test's 25 dB floor bounds. The 16-bit gates
    must pass that floor and beat the 8-bit gates by at least 6 dB (one bit of the 8 they add)."""
    floats = _wide_gates_lstm(GAIN)
    x = _x(3, 16)
    ref = _run_all(floats, x)
    sqnr = {}
    for gates in ("int16", "int8"):
        out = _run_all(_legalized_gates(tmp_path, gates, GAIN), x)
        sqnr[gates] = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))
    assert sqnr["int16"] >= 25.0 and sqnr["int16"] >= sqnr["int8"] + 6.0, sqnr


def _lstm_in_body(kind: str) -> ir.Model:
    """An LSTM over the graph's input ``x`` inside a control-flow body: ``loop`` (a Loop of 2
    constant iterations scanning its ``Y`` out), ``if_input`` (the then-branch of an If on a
    boolean input) or ``if_const`` (the same If on a constant condition)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * H, I)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32), "r")]
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [T, 1, B, H])
    the_lstm = helper.make_node("LSTM", ["x", "w", "r"], ["out"], name="body_lstm", hidden_size=H)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, B, I])]
    if kind == "loop":
        body = helper.make_graph(
            [the_lstm, helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), y])
        nodes = [helper.make_node("Constant", [], ["m"], value=numpy_helper.from_array(np.array(2, np.int64))),
                 helper.make_node("Constant", [], ["go"], value=numpy_helper.from_array(np.array(True))),
                 helper.make_node("Loop", ["m", "go"], ["z"], name="the_loop", body=body)]
        shape = [2, T, 1, B, H]
    else:
        zeros = numpy_helper.from_array(np.zeros((T, 1, B, H), np.float32))
        other = helper.make_graph([helper.make_node("Constant", [], ["zeros"], value=zeros)], "else_branch", [],
                                  [helper.make_tensor_value_info("zeros", TensorProto.FLOAT, [T, 1, B, H])])
        then = helper.make_graph([the_lstm], "then_branch", [], [y])
        nodes = [helper.make_node("If", ["flag"], ["z"], name="the_if", then_branch=then, else_branch=other)]
        if kind == "if_input":
            inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
        else:
            nodes.insert(0, helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True))))
        shape = [T, 1, B, H]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


_IN_BODY = ("HTP fails to finalize an LSTM op and qnn-legalize unrolls an LSTM of the main graph only (export the "
            "model with the LSTM outside the control flow: a static condition, or the loop unrolled)")


def test_lint_refuses_an_lstm_in_a_control_flow_body_naming_the_body():
    """qnn-unroll-lstm rewrites the main graph only, and lint let an LSTM in a Loop body through
    (the Loop's own inputs are constants, so it counted as folded away, though its body reads
    ``x``): the HTP library would have failed on it after calibration. It is named now."""
    offenders = dict(lint(_lstm_in_body("loop")))
    assert offenders["body_lstm"] == f"op LSTM in the body Loop 'the_loop'.body: {_IN_BODY}"
    assert offenders["the_loop"] == "op Loop is not supported by QNN HTP"


def test_an_lstm_in_an_if_on_an_input_names_the_freeze_that_inlines_it():
    """The If decides on the boolean input ``flag``: freezing it folds the If, and the LSTM of
    the branch taken reaches the main graph, which qnn-legalize unrolls. lint says that, once,
    instead of refusing the body's LSTM."""
    assert lint(_lstm_in_body("if_input")) == [
        ("the_if", "op If on input 'flag': HTP runs no If; --freeze flag=VALUE makes it a constant and folds the If "
                   "away")]


def test_an_lstm_in_an_if_branch_folding_inlines_is_unrolled():
    """An If on a constant condition is inlined by fold-constants, so its LSTM reaches the main
    graph and qnn-unroll-lstm: lint accepts it."""
    model = _lstm_in_body("if_const")
    assert lint(model) == []
    folded = build_pass("fold-constants", None).run(model, PassContext()).model
    assert build_pass("qnn-unroll-lstm", None).run(folded, PassContext()).stats["lstm_unrolled"] == 1


def test_lint_checks_what_follows_an_if_on_a_constant_condition():
    """The If is folded away, but its branch reads ``x``: what is computed from its output is
    not constant, and lint must still check it (it skipped every node after such an If)."""
    model = _lstm_in_body("if_const")
    z = model.graph.outputs[0]
    det = ir.node("Det", [z], name="after_if")
    model.graph.append(det)
    model.graph.outputs[0] = det.outputs[0]
    assert dict(lint(model)) == {"after_if": "op Det is not supported by QNN HTP"}


@pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn cannot be imported: no QNN HTP backend here")
def test_cli_exit_4_names_an_lstm_in_a_loop_body_before_calibrating(tmp_path, capsys):
    from compressor.cli import main
    from compressor.model_io import save_model

    path = tmp_path / "loop.onnx"
    save_model(_lstm_in_body("loop"), path)
    np.savez(tmp_path / "c.npz", x=_x(2, 4))
    code = main([str(path), "--recipe", "w8a8-npu", "--target", "qnn-htp", "--calib", str(tmp_path / "c.npz"),
                 "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 4 and f"body_lstm: op LSTM in the body Loop 'the_loop'.body: {_IN_BODY}" in err
    assert "calibrat" not in err.lower() and not (tmp_path / "o").exists()
