"""``--freeze NAME=VALUE``: an input made a constant of the model, and what folds away with it (silero-vad's ``sr``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from compressor.targets.qnn_htp import lint
from onnx import TensorProto, helper, numpy_helper

from compressor.cli import main
from compressor.errors import DataError, UsageError
from compressor.inputs import freeze_inputs, parse_freeze
from compressor.model_io import load_onnx
from compressor.pipeline import PassContext, build_pass

RNG = np.random.default_rng(0)


def _branch(name: str, weight: str, batch: int | str = 1) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("MatMul", ["x", weight], [f"{name}_y"], name=f"{name}_fc")], name, [],
                             [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [batch, 3])])


def _rate_model(tmp_path: Path, batch: int | str = 1) -> Path:
    """silero-vad's shape: ``y = x @ (w16 if sr == 16000 else w8)``, an ``If`` on the scalar int64 ``sr``;
    ``x`` is ``[batch, 4]``."""
    inits = [numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w16"),
             numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w8"),
             numpy_helper.from_array(np.array(16000, np.int64), "rate16k")]
    nodes = [helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="is16k"),
             helper.make_node("If", ["is16k"], ["y"], name="by_rate", then_branch=_branch("then", "w16", batch),
                              else_branch=_branch("else", "w8", batch))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4]),
                                           helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], inits)
    path = tmp_path / "rate.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    for split, n in (("calib", 16), ("eval", 8)):
        np.savez(tmp_path / f"{split}.npz", x=RNG.standard_normal((n, 1, 4)).astype(np.float32),
                 sr=np.full(n, 16000, np.int64))
    return path


def _run(argv, capsys) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err, [line for line in err.splitlines() if line.startswith("error: ")]


def test_frozen_input_folds_its_if_away_and_leaves_the_artifact(tmp_path, capsys):
    """The artifact has no ``sr`` input and no ``If``; the data's ``sr`` column (all 16000) is
    accepted and dropped; the manifest says what was frozen; the baseline is the 16 kHz branch."""
    path, out = _rate_model(tmp_path), tmp_path / "out"
    code, err, _ = _run([path, "--recipe", "int8", "--freeze", "sr=16000", "--calib", tmp_path / "calib.npz",
                         "--eval", tmp_path / "eval.npz", "-o", out, "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    artifact = onnx.load(out / "model.onnx")
    assert [i.name for i in artifact.graph.input] == ["x"]
    assert "If" not in {n.op_type for n in artifact.graph.node}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frozen_inputs"] == {"sr": 16000}
    assert [s["name"] for s in manifest["input_spec"]] == ["x"]


def test_freeze_makes_an_if_on_the_input_acceptable_to_htp(tmp_path):
    """HTP has no ``If``: lint names it on the model as exported, with the ``--freeze`` that
    folds it (and not the nodes of its branches), and accepts it once ``sr`` is frozen and
    folded (the branch taken is inlined)."""
    model = load_onnx(_rate_model(tmp_path))
    assert lint(model) == [("by_rate", "op If on input 'sr': HTP runs no If; --freeze sr=VALUE makes it a constant "
                                       "and folds the If away")]
    frozen = freeze_inputs(model, parse_freeze(["sr=16000"]))
    assert frozen["sr"].dtype == np.int64 and frozen["sr"].shape == ()
    folded = build_pass("fold-constants", {}).run(model, PassContext()).model
    assert lint(folded) == [] and [v.name for v in folded.graph.inputs] == ["x"]


def test_data_taken_at_another_value_is_exit_2(tmp_path, capsys):
    path, out = _rate_model(tmp_path), tmp_path / "out"
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((4, 1, 4)).astype(np.float32),
             sr=np.array([16000, 16000, 16000, 8000], np.int64))
    code, err, errors = _run([path, "--recipe", "int8", "--freeze", "sr=16000", "--calib", tmp_path / "calib.npz",
                              "-o", out, "-q"], capsys)
    assert code == 2, err
    assert errors == [f"error: calib {tmp_path / 'calib.npz'}: sample 3 has sr=8000, but --freeze sr makes the model "
                      "compute sr=16000 only (1 of 4 samples differ); give data taken at that value, or freeze the "
                      "value the data has"], err
    assert not out.exists()


@pytest.mark.parametrize(("flag", "message"), [
    ("sr", "--freeze 'sr': expected NAME=VALUE, a number (e.g. sr=16000), or NAME=V1,V2,... for a 1-D input"),
    ("sr=fast", "--freeze 'sr=fast': expected NAME=VALUE, a number (e.g. sr=16000), or NAME=V1,V2,... for a 1-D "
                "input"),
    ("rate=16000", "--freeze rate=16000: the model has no input 'rate'; its inputs are x, sr"),
    ("sr=16000.5", "--freeze sr=16000.5: the input 'sr' is int64; give whole numbers"),
    ("sr=8000,16000", "--freeze sr=8000,16000: the input 'sr' is a scalar: give one value"),
    ("x=1,2,3", "--freeze x=1,2,3: the input 'x' has rank 2; --freeze takes a scalar or 1-D input"),
    ("sr=1e20", "--freeze sr=1e+20: the input 'sr' is int64; give values in [-9223372036854775808, "
                "9223372036854775807]"),
])
def test_bad_freeze_is_exit_2_saying_what_to_give(tmp_path, capsys, flag, message):
    path, out = _rate_model(tmp_path), tmp_path / "out"
    code, err, errors = _run([path, "--recipe", "fold", "--freeze", flag, "-o", out, "-q"], capsys)
    assert code == 2, err
    assert errors == [f"error: {message}"], err
    assert not out.exists()


def test_freeze_with_a_recovery_recipe_is_refused_before_capture(tmp_path):
    with pytest.raises(UsageError, match="recover: stage trains the module"):
        from compressor.flow.compress import compress

        compress(_rate_model(tmp_path), recipe="int8-nm-recover", outdir=tmp_path / "out", freeze=["sr=16000"],
                 calib=tmp_path / "calib.npz")


def test_sweep_takes_freeze_too(tmp_path, capsys):
    """``compress sweep`` captures the model as ``compress`` does: the same ``--freeze``."""
    path = _rate_model(tmp_path)
    code = main(["sweep", str(path), "--pass", "prune-magnitude", "--levels", "0.25,0.5", "--eval",
                 str(tmp_path / "eval.npz"), "--freeze", "sr=16000", "-o", str(tmp_path / "sw"), "--latency-runs", "0",
                 "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    levels = json.loads((tmp_path / "sw" / "sweep.json").read_text())["levels"]
    assert [lv["level"] for lv in levels] == ["0.25", "0.5"]


#: One candidate, no accuracy control: a search as small as it gets.
ONE_CANDIDATE = "{calibrator: [minmax], sparsity: [0], accuracy_control: [false]}"


def test_search_takes_freeze_and_input_too(tmp_path, capsys):
    """``compress search`` captures and freezes the model as ``compress`` and ``sweep`` do, records
    what it froze in search.json, and writes the best artifact with the same ``--freeze``/``--input``
    (``x`` is ``[N, 4]``; ``--input x=1x4`` fixes N)."""
    path, out = _rate_model(tmp_path, batch="N"), tmp_path / "se"
    code = main(["search", str(path), "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "--max-drop", "0.05", "--freeze", "sr=16000", "--input", "x=1x4", "--grid", ONE_CANDIDATE, "-o",
                 str(out), "--latency-runs", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    searched = json.loads((out / "search.json").read_text())
    assert searched["frozen_inputs"] == {"sr": 16000} and searched["best"] == 0
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["frozen_inputs"] == {"sr": 16000}
    assert [(s["name"], s["shape"]) for s in manifest["input_spec"]] == [("x", [1, 4])]
    artifact = onnx.load(out / "best" / "model.onnx")
    assert [i.name for i in artifact.graph.input] == ["x"]
    assert "If" not in {n.op_type for n in artifact.graph.node}


def test_search_refuses_freezing_an_input_the_model_lacks(tmp_path, capsys):
    """The same message as ``compress`` gives (``test_bad_freeze_is_exit_2_saying_what_to_give``)."""
    path, out = _rate_model(tmp_path), tmp_path / "se"
    code, err, errors = _run(["search", path, "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz",
                              "--max-drop", "0.05", "--freeze", "rate=16000", "--grid", ONE_CANDIDATE, "-o", out, "-q"],
                             capsys)
    assert code == 2, err
    assert errors == ["error: --freeze rate=16000: the model has no input 'rate'; its inputs are x, sr"], err
    assert not (out / "search.json").exists()


def test_sweep_records_what_it_froze(tmp_path, capsys):
    path = _rate_model(tmp_path)
    code = main(["sweep", str(path), "--pass", "prune-magnitude", "--levels", "0.25", "--eval",
                 str(tmp_path / "eval.npz"), "--freeze", "sr=16000", "-o", str(tmp_path / "sw"), "--latency-runs", "0",
                 "-q"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["frozen_inputs"] == {"sr": 16000}


class _Gated(torch.nn.Module):
    """``fc(x)`` when ``flag`` is set, else ``-fc(x)``: a branch on a scalar argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        if bool(flag):
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("column", [False, True])
def test_torchscript_takes_the_frozen_value_as_its_example_input(column, tmp_path, capsys):
    """A TorchScript module records no input shapes: capture takes ``flag``'s example from
    ``--freeze flag=1``, so the data may leave its column out (exit 2 before: "no --input or
    data for forward argument(s) flag"); with the column, the example is still the frozen
    scalar, not the column's first two samples (the exporter then failed on ``bool(flag)``)."""
    torch.manual_seed(0)
    net = _Gated().eval()
    torch.jit.script(net).save(str(tmp_path / "gated.pt"))
    rng = np.random.default_rng(11)  # its own: the module's RNG depends on which tests ran before
    for split, n in (("calib", 16), ("eval", 8)):
        arrays = {"x": rng.standard_normal((n, 4)).astype(np.float32)}
        if column:
            arrays["flag"] = np.ones(n, np.int64)
        np.savez(tmp_path / f"{split}.npz", **arrays)
    out = tmp_path / "out"
    code, err, _ = _run([tmp_path / "gated.pt", "--recipe", "int8", "--freeze", "flag=1", "--calib",
                         tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "-o", out, "--latency-runs", "1", "-q"],
                        capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frozen_inputs"] == {"flag": 1}
    assert [s["name"] for s in manifest["input_spec"]] == ["x"]
    assert "example input of flag: its --freeze value 1 (int64), a constant of the model" in manifest["model"]["notes"]
    artifact = onnx.load(out / "model.onnx")
    assert [i.name for i in artifact.graph.input] == ["x"] and "If" not in {n.op_type for n in artifact.graph.node}
    # The flag=1 branch, at int8 fidelity (SQNR above 20 dB; the other branch is -fc(x), at -6 dB),
    # on eval samples (inside the calibrated range, as the gate measures).
    x = np.load(tmp_path / "eval.npz")["x"][:5]
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x), torch.tensor(1)).numpy()
    assert 10 * np.log10((want**2).sum() / ((got - want) ** 2).sum()) > 20


def test_one_input_frozen_twice_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^--freeze sr is given twice; give each input one value$"):
        parse_freeze(["sr=16000", "sr=8000"])
    assert parse_freeze(["on=true", "off=false"]) == {"on": (1.0,), "off": (0.0,)}


def _vector_model(tmp_path: Path, dtype=TensorProto.FLOAT) -> Path:
    """``y = x + v``: ``v`` a 1-D input of 3 values."""
    graph = helper.make_graph([helper.make_node("Add", ["x", "v"], ["y"], name="add")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
                               helper.make_tensor_value_info("v", dtype, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "vector.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_a_data_column_of_another_width_is_exit_2(tmp_path, capsys):
    """The frozen input holds 3 values, the data's column 2 per sample (it crashed with exit 1)."""
    path = _vector_model(tmp_path)
    np.savez(tmp_path / "c.npz", x=RNG.standard_normal((8, 1, 3)).astype(np.float32),
             v=np.ones((8, 2), np.float32))
    code, err, errors = _run([path, "--recipe", "int8", "--freeze", "v=1,2,3", "--calib", tmp_path / "c.npz", "-o",
                              tmp_path / "out", "-q"], capsys)
    assert code == 2, err
    assert errors == [f"error: calib {tmp_path / 'c.npz'}: 'v' holds 2 values per sample, but --freeze v gives 3; "
                      "give the input's values, or leave 'v' out of the data"], err


def test_freezing_every_input_is_refused(tmp_path):
    graph = helper.make_graph([helper.make_node("Neg", ["v"], ["y"], name="neg")], "g",
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    path = tmp_path / "only.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(DataError, match=r"that is every input of the model, which would compute one constant"):
        freeze_inputs(load_onnx(path), {"v": (1.0, 2.0, 3.0)})


@pytest.mark.parametrize(("dtype", "values", "why"), [
    (TensorProto.BOOL, (2.0, 0.0, 1.0), "is bool; give 0 or 1 (false or true)"),
    (TensorProto.UINT8, (-1.0, 0.0, 1.0), "is uint8; give values in [0, 255]"),
    (TensorProto.FLOAT, (float("nan"), 0.0, 1.0), "is float32; give finite numbers"),
])
def test_a_value_the_input_cannot_hold_is_refused(tmp_path, dtype, values, why):
    """numpy would wrap -1 to 255 and 2 to True without a word."""
    with pytest.raises(DataError) as err:
        freeze_inputs(load_onnx(_vector_model(tmp_path, dtype)), {"v": values})
    assert str(err.value).endswith(f"the input 'v' {why}")


class _PerSample(torch.nn.Module):
    """``fc(x) * m[:, None]``: ``m`` is indexed per sample, so a scalar example cannot export it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * m[:, None]


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_falls_back_to_the_frozen_column_s_rows(tmp_path, capsys):
    """With the frozen scalar as example the exporter fails on ``m[:, None]``; the data's
    column is tried next, as capture did before the frozen value was an example at all."""
    torch.manual_seed(0)
    torch.jit.script(_PerSample().eval()).save(str(tmp_path / "per_sample.pt"))
    for split, n in (("calib", 16), ("eval", 8)):
        np.savez(tmp_path / f"{split}.npz", x=np.random.default_rng(12).standard_normal((n, 4)).astype(np.float32),
                 m=np.ones(n, np.float32))
    out = tmp_path / "out"
    code, err, _ = _run([tmp_path / "per_sample.pt", "--recipe", "int8", "--freeze", "m=1", "--calib",
                         tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "-o", out, "--latency-runs", "1",
                         "-q"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frozen_inputs"] == {"m": [1.0]} or manifest["frozen_inputs"] == {"m": 1.0}
    assert not any("its --freeze value" in note for note in manifest["model"]["notes"])
