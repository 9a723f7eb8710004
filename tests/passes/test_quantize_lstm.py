"""``quantize`` on ``openvino``: an int8 LSTM (X u8, W and R i8 on one scale per gate row, X's grid holding h)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from compressor.passes._layers import Layer
from compressor.passes._placement import cover_state_ranges
from compressor.targets import get_target

from compressor.pipeline import PassContext, build_pass
from compressor.quant.revert import give_back
from compressor.quant.spec import OpQuant, QuantSpec
from tests.ortutil import model_from_text, run_ort
from tests.passes.test_quantize import HEADER, _clone, _dataset, _normal

pytest.importorskip("openvino", reason="the openvino package is not installed")

T, I, H = 12, 32, 32  # steps, input size, hidden size


def lstm_net(seed: int = 0, relu: bool = False):
    """x [T, 1, I] -> (Relu) -> bidirectional LSTM -> Y [T, 2, 1, H]; R's rows 4x W's magnitude,
    so separate scales for W and R differ by 4x."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((2, 4 * H, I)) / np.sqrt(I)).astype(np.float32)
    r = (4 * rng.standard_normal((2, 4 * H, H)) / np.sqrt(H)).astype(np.float32)
    b = (0.1 * rng.standard_normal((2, 8 * H))).astype(np.float32)
    first = "a = Relu(x)" if relu else "a = Identity(x)"
    return model_from_text(f"""{HEADER}
    g (float[{T},1,{I}] x) => (float[{T},2,1,{H}] y) {{
      [act] {first}
      [lstm] y, yh, yc = LSTM <direction = "bidirectional", hidden_size = {H}> (a, w, r, b)
    }}""", w=w, r=r, b=b)


def _quantize(model, calib, lstm: OpQuant | None = None):
    target = get_target("openvino")
    if lstm is not None:
        target.capabilities = dataclasses.replace(target.capabilities,
                                                  quantizable={**target.capabilities.quantizable, "LSTM": lstm})
    ctx = PassContext(target=target, calibration=calib)
    folded = build_pass("fold-constants", None).run(model, ctx)
    ctx.properties.add("constants-folded")
    return build_pass("quantize", None).run(folded.model, ctx)


def _lowered(model, tmp_path):
    target = get_target("openvino")
    return target.runner(target.lower(model, tmp_path))


def _first(outputs) -> np.ndarray:
    return outputs[0] if isinstance(outputs, list) else next(iter(outputs.values()))


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10((ref**2).sum() / ((ref - out) ** 2).sum()))


def _dq_scale(model, node_name: str, index: int) -> np.ndarray:
    node = next(n for n in model.graph if n.name == node_name)
    dq = node.inputs[index].producer()
    assert dq is not None and dq.op_type == "DequantizeLinear", f"input {index} of {node_name} is not dequantized"
    return dq.inputs[1].const_value.numpy()


def test_the_lstm_runs_int8_with_w_and_r_on_one_scale_per_gate_row(tmp_path):
    model = lstm_net()
    x = _normal(1, 64, T, 1, I)
    calib = _dataset(model, tmp_path, {"x": x})
    result = _quantize(_clone(model), calib)
    assert "lstm" in result.stats["layers"]
    q = result.model
    w_scale, r_scale = _dq_scale(q, "lstm", 1), _dq_scale(q, "lstm", 2)
    assert w_scale.shape == (4 * H,)  # axis 1: one per gate row, shared by the two directions
    np.testing.assert_array_equal(w_scale, r_scale)
    assert q.graph.node("lstm").inputs[0].producer().op_type == "DequantizeLinear"  # X's pair
    assert q.graph.node("lstm").inputs[3].producer() is None  # B stays float

    runner = _lowered(q, tmp_path / "q")
    rnn = [la for la in runner.layer_precisions() if la["type"] == "RNNSeq"]
    assert rnn and all(la["int8"] for la in rnn), rnn

    # Numerics: the kernel against the QDQ model run by ONNX Runtime (float compute on the
    # same rounded X, W, R). The kernel also rounds h to X's grid (step s) at each of the T
    # steps, at most s / 2 each: allowed sqrt(T) s RMS, 3.5x what T independent roundings
    # (sqrt(T / 12) s) give, for what the recurrence makes of them.
    x = _normal(7, T, 1, I)
    out = _first(runner({"x": x}))
    step = float(q.graph.node("lstm").inputs[0].producer().inputs[1].const_value.numpy())
    rms = float(np.sqrt(((out - run_ort(q, {"x": x})[0]) ** 2).mean()))
    assert rms <= np.sqrt(T) * step, (rms, step)


def _own_scales(q, index: int) -> None:
    """Requantize input ``index`` of the LSTM of ``q`` on scales of its own (per gate row, as NNCF does)."""
    dq = q.graph.node("lstm").inputs[index].producer()
    w = dq.inputs[0].const_value.numpy().astype(np.float32) * dq.inputs[1].const_value.numpy()[None, :, None]
    scale = (np.abs(w).max(axis=(0, 2)) / 127).astype(np.float32)
    dq.inputs[0].const_value = ir.tensor(np.clip(np.round(w / scale[None, :, None]), -127, 127).astype(np.int8))
    dq.inputs[1].const_value = ir.tensor(scale)


def test_w_and_r_on_scales_of_their_own_are_read_wrongly_by_the_int8_kernel(tmp_path):
    """Why ``shared_scale_inputs``: with W and R on scales of their own (NNCF's placement; R's
    4x W's here) the kernel dequantizes one with the other's, an error far beyond the grid's."""
    model = lstm_net()
    calib = _dataset(model, tmp_path, {"x": _normal(1, 64, T, 1, I)})
    feeds = {"x": _normal(7, T, 1, I)}
    rms = {}
    for shared in (True, False):
        q = _quantize(_clone(model), calib).model
        if not shared:
            _own_scales(q, 1)
            assert not np.array_equal(_dq_scale(q, "lstm", 1), _dq_scale(q, "lstm", 2))
        qdq = run_ort(q, feeds)[0]
        out = _first(_lowered(q, tmp_path / f"q{shared}")(feeds))
        rms[shared] = float(np.sqrt(((out - qdq) ** 2).mean()))
    assert rms[False] > 3 * rms[True], rms


def test_the_input_range_of_an_lstm_holds_its_hidden_state(tmp_path):
    """X after a ReLU is calibrated on [0, hi]; the kernel quantizes h, in (-1, 1), on X's
    grid, so the range is widened to [-1, hi]: on [0, hi] every negative h is clipped to 0."""
    model = lstm_net(relu=True)
    calib = _dataset(model, tmp_path, {"x": _normal(1, 64, T, 1, I)})
    lstm = get_target("openvino").capabilities.quantizable["LSTM"]
    x = _normal(7, T, 1, I)
    rms, step = {}, {}
    for cover in (True, False):
        q = _quantize(_clone(model), calib, lstm if cover else dataclasses.replace(lstm, state_range=None)).model
        dq = q.graph.node("lstm").inputs[0].producer()
        step[cover] = float(dq.inputs[1].const_value.numpy())
        lowest = step[cover] * (0 - int(dq.inputs[2].const_value.numpy()))
        assert (lowest <= -1.0 + step[cover]) == cover, (lowest, step[cover])  # -1 on the grid within a step
        out = _first(_lowered(q, tmp_path / f"q{cover}")({"x": x}))
        rms[cover] = float(np.sqrt(((out - run_ort(model, {"x": x})[0]) ** 2).mean()))
    assert rms[False] > 3 * rms[True], rms  # against fp32: clipped at 0, the negative half of h is lost


def test_cover_state_ranges_widens_only_layers_with_a_state_range():
    act = QuantSpec("uint8", symmetric=False)

    class _Value:
        def __init__(self, name: str) -> None:
            self.name = name

    with_state = Layer(node=None, quant=OpQuant(activations=act, state_range=(-1.0, 1.0)),  # type: ignore[arg-type]
                       activations=[(0, _Value("x"))])
    without = Layer(node=None, quant=OpQuant(activations=act), activations=[(0, _Value("y"))])  # type: ignore[arg-type]
    ranges = {"x": (0.0, 5.0), "y": (0.0, 5.0)}
    assert cover_state_ranges([with_state, without], ranges) == 1
    assert ranges == {"x": (-1.0, 5.0), "y": (0.0, 5.0)}
    assert cover_state_ranges([with_state], ranges) == 0  # already holds it


def test_giving_the_lstm_back_restores_float_x_w_and_r(tmp_path):
    """Accuracy control's give-back (compressor.quant.revert) restores the LSTM whole: the float
    X, W and R (R recorded as a constant of the layer), so the model computes the fp32 one."""
    model = lstm_net()
    calib = _dataset(model, tmp_path, {"x": _normal(1, 64, T, 1, I)})
    result = _quantize(_clone(model), calib)
    back = give_back(_clone(result.model), result.quantization, ["lstm"])
    node = back.graph.node("lstm")
    assert all(node.inputs[i].producer() is None or node.inputs[i].producer().op_type != "DequantizeLinear"
               for i in (0, 1, 2))
    feeds = {"x": _normal(7, T, 1, I)}
    np.testing.assert_allclose(run_ort(back, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_an_lstm_with_initial_states_computed_at_run_time_stays_float(tmp_path):
    """silero-vad carries its state in: OpenVINO's int8 LSTM does not compile with initial
    states that are activations ("expects Constant for port 4"), so such an LSTM stays float,
    with the reason, and the model lowers and runs."""
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[{T},1,{I}] x, float[1,1,{H}] h0, float[1,1,{H}] c0) => (float[{T},1,1,{H}] y) {{
      [lstm] y, yh, yc = LSTM <hidden_size = {H}> (x, w, r, b, , h0, c0)
    }}""", w=(rng.standard_normal((1, 4 * H, I)) / np.sqrt(I)).astype(np.float32),
        r=(rng.standard_normal((1, 4 * H, H)) / np.sqrt(H)).astype(np.float32),
        b=(0.1 * rng.standard_normal((1, 8 * H))).astype(np.float32))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 64, T, 1, I), "h0": np.tanh(_normal(2, 64, 1, 1, H)),
                                       "c0": _normal(3, 64, 1, 1, H)})
    result = _quantize(_clone(model), calib)
    assert result.stats["layers"] == []
    assert result.stats["skipped_layers"] == {
        "lstm": "input(s) [5, 6] computed at run time: the target's int8 kernel needs them constant"}
    runner = _lowered(result.model, tmp_path / "q")
    # float: f32, or bf16 where that is the device's default (AVX512-BF16, AMX)
    rnn = [(la["precision"], la["int8"]) for la in runner.layer_precisions() if la["type"] == "RNNSeq"]
    assert rnn == [(runner.inference_precision, False)], rnn
