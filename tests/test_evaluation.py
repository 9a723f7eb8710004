"""Fidelity metrics on outputs whose first axes are not all the batch (one row per call)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.data import Dataset
from compressor.errors import DataError
from compressor.flow.evaluation import collect_outputs, compare, cosine_error, drop_order, fidelity, small_channels
from compressor.inputs import InputSpec
from tests.cliutil import error_line, run


def _state_run(flip_short_call: bool):
    """``x [n, 2] -> (logits [n, 10] all 2, state [2, n, 3] all 1)``, negated on a call of 4 samples if asked."""

    def run(feed):
        n = len(feed["x"])
        outs = [np.full((n, 10), 2.0, np.float32), np.ones((2, n, 3), np.float32)]
        return [-o for o in outs] if flip_short_call and n == 4 else outs

    return run


def _data(samples: int, labels: np.ndarray | None = None) -> Dataset:
    spec = InputSpec("x", ("N", 2), "float32")
    return Dataset({"x": np.ones((samples, 2), np.float32)}, [spec], {"x": False}, labels, "eval.npz", "0" * 64)


def test_fidelity_of_outputs_with_different_first_axes_is_one_row():
    # logits [2, 1] beside a state [1, 2, 1]: one call's results, one row [3, 0 | 0, 4].
    ref = [np.array([[3.0], [0.0]]), np.array([[[0.0], [4.0]]])]
    out = [np.array([[3.0], [0.0]]), np.array([[[0.0], [0.0]]])]
    fid = fidelity(ref, out)
    assert fid["cosine_mean"] == pytest.approx(9 / (5 * 3)) and fid["cosine_min"] == pytest.approx(0.6)
    assert fid["sqnr_db"] == pytest.approx(10 * math.log10(25 / 16))
    assert fid["max_abs_diff"] == 4.0 and fid["top1_agreement"] == 1.0


def test_collect_outputs_gives_one_row_per_call_when_a_state_is_not_batch_first():
    """20 samples in calls of 16 and 4 (the default batch on a dynamic axis): ``state [2, n, 3]``
    is not batch-first, so every output gives one row per call, the short call zero-padded."""
    data = _data(20)
    ref = collect_outputs(_state_run(False), data)
    out = collect_outputs(_state_run(True), data)
    assert [a.shape for a in ref] == [(2, 160), (2, 96)]
    assert not ref[0][1, 40:].any() and not ref[1][1, 24:].any()  # the call of 4: 40 and 24 values
    fid = fidelity(ref, out)
    # Call 1 equal (cosine 1), call 2 negated (cosine -1). |call 1|^2 = 160*4 + 96 = 736,
    # |call 2|^2 = 40*4 + 24 = 184; noise = |2 * call 2|^2 = 736.
    assert fid["cosine_mean"] == pytest.approx(0.0) and fid["cosine_min"] == pytest.approx(-1.0)
    assert fid["sqnr_db"] == pytest.approx(10 * math.log10((736 + 184) / 736))
    assert fid["max_abs_diff"] == 4.0
    ev = compare(ref, out, data, "cosine")
    assert ev.drop == pytest.approx(1.0) and ev.samples == 20


def test_top1_refused_when_rows_are_calls_of_several_samples():
    data = _data(20, labels=np.zeros(20, np.int64))
    ref = collect_outputs(_state_run(False), data)
    with pytest.raises(DataError) as err:
        compare(ref, ref, data, "auto")
    assert str(err.value) == (
        "eval eval.npz: metric 'top1' needs one row of the first output per sample, but the model's outputs do not "
        "all have the samples first, so each of the 2 rows is one call of 16 samples (20 in all); drop 'labels' "
        "from the eval file to measure fidelity, or give each sample as one whole input tensor (an array with one "
        "axis more than the input, fed one call per sample)")


def test_batch_first_outputs_keep_one_row_per_sample():
    data = _data(20)
    ref = collect_outputs(lambda feed: [np.ones((len(feed["x"]), 10)), np.ones((len(feed["x"]), 2, 3))], data)
    assert [a.shape for a in ref] == [(20, 10), (20, 2, 3)]


def _recurrent_state_model(path) -> None:
    """``logits = x @ w1`` ``[N, 10]`` and ``state = transpose(reshape(x @ w2, [N, 2, 128]))`` ``[2, N, 128]``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 256)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1, 2, 128], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["logits"], name="fc1"),
             helper.make_node("MatMul", ["x", "w2"], ["h"], name="fc2"),
             helper.make_node("Reshape", ["h", "shape"], ["h3"]),
             helper.make_node("Transpose", ["h3"], ["state"], perm=[1, 0, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
                               helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 128])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.parametrize("samples", [20, 32])  # 20: a short last call (was exit 2), 32: two full calls (was exit 1)
def test_compress_a_model_with_a_state_that_is_not_batch_first(samples, tmp_path, capsys):
    _recurrent_state_model(tmp_path / "rnn.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((samples, 8)).astype(np.float32))
    code, _, err = run([tmp_path / "rnn.onnx", "--target", "onnx", "--recipe", "int8", "--calib",
                        tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["gate"]["passed"] and manifest["evaluation"]["samples"] == samples


def test_compress_refuses_top1_on_rows_of_calls_before_the_passes(tmp_path, capsys):
    _recurrent_state_model(tmp_path / "rnn.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((20, 8)).astype(np.float32), labels=np.zeros(20, np.int64))
    code, _, err = run([tmp_path / "rnn.onnx", "--target", "onnx", "--recipe", "int8", "--calib",
                        tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "-o", tmp_path / "out"], capsys)
    assert code == 2, err
    assert error_line(err) == (
        f"error: eval {tmp_path / 'eval.npz'}: metric 'top1' needs one row of the first output per sample, but the "
        "model's outputs do not all have the samples first, so each of the 2 rows is one call of 16 samples (20 in "
        "all); drop 'labels' from the eval file to measure fidelity, or give each sample as one whole input tensor "
        "(an array with one axis more than the input, fed one call per sample)")
    assert "running quantize" not in err and not (tmp_path / "out").exists()


def test_fidelity_of_float64_outputs_past_the_square_range_is_not_nan():
    """A sum of squares of values past ~1e154 overflows; cosine and SQNR are scale-free, so they are scaled first."""
    ref = np.array([[1e200, -3e200, 2e200], [1.0, 2.0, 3.0]])
    fid = fidelity([ref], [ref.copy()])
    assert fid["cosine_mean"] == fid["cosine_min"] == 1.0 and fid["sqnr_db"] == math.inf
    out = ref * np.array([1.0, 1.0, 1.1])  # 10% off in one value of each row
    fid = fidelity([ref], [out])
    small = fidelity([ref / np.array([[1e200], [1.0]])], [out / np.array([[1e200], [1.0]])])
    assert fid["cosine_min"] == pytest.approx(small["cosine_min"], rel=1e-12)
    assert math.isfinite(fid["sqnr_db"]) and fid["max_abs_diff"] == pytest.approx(0.2e200)


def test_the_same_nan_or_inf_on_both_sides_counts_as_equal_and_on_one_side_does_not():
    ref = np.array([[np.nan, 1.0, np.inf, 2.0], [3.0, -np.inf, 1.0, 1.0]])
    same = ref.copy()
    same[:, [1, 3]] *= 1.01  # finite positions a little off
    fid = fidelity([ref], [same])
    expect = fidelity([np.where(np.isfinite(ref), ref, 0.0)], [np.where(np.isfinite(ref), same, 0.0)])
    assert fid["cosine_min"] == pytest.approx(expect["cosine_min"], rel=1e-12) and fid["cosine_min"] > 0.99
    assert math.isfinite(fid["max_abs_diff"]) and math.isfinite(fid["sqnr_db"])
    for wrong in (np.nan, -np.inf, 5.0):  # NaN where the reference has inf, the other inf, a number
        out = same.copy()
        out[0, 2] = wrong
        assert math.isnan(fidelity([ref], [out])["cosine_min"]), wrong


def test_compress_a_model_that_computes_nan_on_its_own_data(tmp_path, capsys):
    """As ONNX's backend test `test_operator_sqrt`: Sqrt of negative inputs gives NaN on both sides; the gate passes."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sqrt", ["z"], ["r"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(1)

    def data(n: int) -> dict[str, np.ndarray]:
        return {"x": rng.standard_normal((n, 4)).astype(np.float32), "z": rng.standard_normal((n, 3)).astype(np.float32)}

    np.savez(tmp_path / "calib.npz", **data(32))
    np.savez(tmp_path / "eval.npz", **(eval_data := data(16)))
    code, _, err = run([tmp_path / "m.onnx", "--target", "onnx", "--recipe", "int8", "--calib",
                        tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "--max-drop", "0.05",
                        "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    negative = int((eval_data["z"] < 0).sum())
    assert (f"the original model computes NaN or inf at {negative} of its 96 output values on the evaluation data "
            f"(eval file: {tmp_path / 'eval.npz'})") in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["gate"]["passed"] and math.isfinite(manifest["accuracy_drop"])
    assert "RuntimeWarning" not in err


# -- channels the gate's cosine cannot see ---------------------------------------------------------

def _detector_rows(score_noise: float, box_noise: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``[N, 7, 50]``: 4 box channels in pixels (0-320), 2 score channels (0-1) and one class never seen
    (scores near 0), and a noisy copy."""
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(0, 320, (16, 4, 50)), rng.uniform(0, 1, (16, 2, 50)),
                          rng.uniform(0, 1e-4, (16, 1, 50))], axis=1)
    noise = np.concatenate([rng.normal(0, box_noise, (16, 4, 50)), rng.normal(0, score_noise, (16, 2, 50)),
                            rng.normal(0, 1e-4, (16, 1, 50))], axis=1)
    return [ref], [ref + noise]


def test_small_channels_the_cosine_hides_are_named():
    ref, out = _detector_rows(score_noise=0.3, box_noise=0.5)
    drop = 1 - fidelity(ref, out)["cosine_mean"]
    assert drop < 1e-4  # the per-sample cosine over the whole output sees nothing
    small = small_channels(ref, out, drop)
    assert (small["output"], small["axis"], small["channels"], small["count"], small["of"]) == (0, 1, "4-6", 3, 7)
    assert small["hidden"] and small["energy_share"] < 1e-4
    # together: the active scores' error (cosine ~0.89), not the unseen class's relative noise (~0.5)
    assert 0.85 < small["cosine"] < 0.93


def test_small_channels_of_a_channels_last_detector_are_found_on_its_last_axis():
    """YOLOv5's ``[N, anchors, 4 + 1 + classes]`` (ddddocr's detector: 3549 anchors): axis 1 has
    too many entries to be channels, the last axis holds them."""
    ref, out = _detector_rows(score_noise=0.3, box_noise=0.5)
    ref, out = [np.repeat(ref[0], 30, axis=2).transpose(0, 2, 1)], [np.repeat(out[0], 30, axis=2).transpose(0, 2, 1)]
    assert ref[0].shape == (16, 1500, 7)
    small = small_channels(ref, out, 1 - fidelity(ref, out)["cosine_mean"])
    assert (small["axis"], small["channels"], small["count"], small["of"]) == (2, "4-6", 3, 7) and small["hidden"]
    assert 0.85 < small["cosine"] < 0.93


def test_small_channels_are_not_hidden_when_the_error_is_even():
    ref, out = _detector_rows(score_noise=0.0005, box_noise=0.5)  # the same relative error on boxes and scores
    ref, out = [ref[0][:, :6]], [out[0][:, :6]]
    assert not small_channels(ref, out, 1 - fidelity(ref, out)["cosine_mean"])["hidden"]
    assert small_channels([ref[0][:, 0]], [out[0][:, 0]], 0.0) is None  # rank 2: no channel axis


def test_a_poor_channel_of_even_energy_is_no_small_channel():
    # a recogniser's [N, T, classes]: axis 1 is time; one step worse than the others is seen by the cosine
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 1, (16, 40, 30))
    out = ref.copy()
    out[:, 17] += rng.normal(0, 0.3, (16, 30))
    assert small_channels([ref], [out], 1 - fidelity([ref], [out])["cosine_mean"]) is None


def _detector_model(path) -> None:
    """``y = concat(300 * conv_box(x), sigmoid(conv_cls(x)))`` ``[N, 32, 50]``: boxes in pixels beside scores
    (16 channels each). Large class logits: their int8 grid is coarse, the scores' error shows."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 1)).astype(np.float32), "w_box"),
             numpy_helper.from_array(100 * rng.standard_normal((16, 8, 1)).astype(np.float32), "w_cls"),
             numpy_helper.from_array(np.array(300.0, np.float32), "px")]
    nodes = [helper.make_node("Conv", ["x", "w_box"], ["b0"], name="box"),
             helper.make_node("Mul", ["b0", "px"], ["boxes"], name="to_pixels"),
             helper.make_node("Conv", ["x", "w_cls"], ["c0"], name="cls"),
             helper.make_node("Sigmoid", ["c0"], ["scores"], name="sigmoid"),
             helper.make_node("Concat", ["boxes", "scores"], ["y"], name="head", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 50])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 50])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_compress_says_when_the_gate_hides_small_channels(tmp_path, capsys):
    _detector_model(tmp_path / "det.onnx")
    rng = np.random.default_rng(1)
    for split in ("calib", "eval"):
        np.savez(tmp_path / f"{split}.npz", x=rng.standard_normal((16, 8, 50)).astype(np.float32))
    # openvino: the onnx target keeps these convolutions float (their outputs feed float ops)
    code, out, err = run([tmp_path / "det.onnx", "--target", "openvino", "--recipe", "int8", "--calib",
                          tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    small = manifest["evaluation"]["small_channels"]
    assert (small["output"], small["channels"], small["hidden"]) == ("y", "16-31", True), small
    assert manifest["gate"]["passed"]
    assert "the cosine metric hardly sees channels 16-31 of output 'y' (16 of 32" in err
    assert "small channels" in out + err


def test_small_channels_of_outputs_with_nan_or_huge_values_stay_finite():
    """The review's cases: a NaN both sides compute made the energy share NaN ("nan%" in the summary), and
    float64 past 1e154 overflowed every channel's energy to inf (all 'small')."""
    ref, out = _detector_rows(score_noise=0.3, box_noise=0.5)
    want = small_channels(ref, out, 0.0)
    nan_ref, nan_out = ref[0].copy(), out[0].copy()
    nan_ref[0, 0, 0] = nan_out[0, 0, 0] = np.nan
    got = small_channels([nan_ref], [nan_out], 0.0)
    assert got["channels"] == want["channels"] and math.isfinite(got["energy_share"])
    with np.errstate(all="raise"):
        huge = small_channels([ref[0] * 1e200], [out[0] * 1e200], 0.0)
    assert huge["channels"] == want["channels"] and huge["cosine"] == pytest.approx(want["cosine"], rel=1e-9)
    assert huge["energy_share"] == pytest.approx(want["energy_share"], rel=1e-9)


def test_cosine_error_counts_a_nan_row_as_the_worst_cosine_and_drop_order_puts_nan_last():
    assert cosine_error(np.array([1.0, 0.5])) == pytest.approx(0.25)
    assert cosine_error(np.array([1.0, np.nan])) == pytest.approx(1.0)  # (1 + -1) / 2 -> 1 - 0
    assert cosine_error(np.array([np.nan, np.nan])) == pytest.approx(2.0)
    assert cosine_error(np.array([])) == 0.0
    assert drop_order(float("nan")) > 1e300 and drop_order(0.25) == 0.25
