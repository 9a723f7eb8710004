"""The ``compress`` command end to end: the bundled model, and every failure path.

Each failure asserts the exit code, a one-line message, and that no output folder is left.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compressor.cli import main
from compressor.errors import AccuracyGateFailed, CompressorError, UnsupportedByTarget
from tests.cliutil import error_line, raise_on_constant, run
from tests.ortutil import int8_weight_extremes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "digits_cnn.pt2"
CALIB = EXAMPLES / "digits_calib.npz"
EVAL = EXAMPLES / "digits_eval.npz"





@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    program = torch.onnx.export(torch.export.load(str(MODEL)), dynamo=True, verbose=False)
    program.save(str(path))
    return path


@pytest.fixture(scope="module")
def digits_bn_onnx(tmp_path_factory) -> Path:
    """The bundled CNN exported without the exporter's optimizer: its BatchNorms stay BatchNormalization."""
    path = tmp_path_factory.mktemp("onnx") / "digits_bn.onnx"
    program = torch.onnx.export(torch.export.load(str(MODEL)), dynamo=True, verbose=False, optimize=False)
    program.save(str(path))
    return path


def test_fold_on_bundled_model(digits_bn_onnx, tmp_path, capsys):
    # The .pt2 capture has no BatchNorm left (the exporter fuses it into the Conv), so the
    # fold is tested on an export that keeps them.
    bns = sum(1 for n in onnx.load(digits_bn_onnx).graph.node if n.op_type == "BatchNormalization")
    assert bns > 0
    out = tmp_path / "out"
    code, stdout, _ = run([digits_bn_onnx, "--recipe", "fold", "--calib", CALIB, "--eval", EVAL, "--max-drop", "0",
                           "-o", out, "--latency-runs", "2"], capsys)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text(), parse_constant=raise_on_constant)  # strict JSON
    fold = next(p for p in manifest["passes"] if p["name"] == "fold-batchnorm")
    assert fold["modified"] and fold["stats"]["bn_folded"] == bns, fold
    model = onnx.load(out / "model.onnx")
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert manifest["evaluation"]["metric"] == "top1"
    assert manifest["metrics"]["baseline"]["top1"] == manifest["metrics"]["compressed"]["top1"] > 0.97
    assert manifest["gate"] == {"max_drop": 0.0, "passed": True}
    assert manifest["files"][0]["path"] == "model.onnx"
    assert "top1" in stdout and "gate" in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_same_inputs_byte_identical(tmp_path, capsys):
    hashes = []
    for name in ("a", "b"):
        code, _, _ = run([MODEL, "--recipe", "fold", "--calib", CALIB, "-o", tmp_path / name, "--latency-runs", "1"], capsys)
        assert code == 0
        hashes.append(json.loads((tmp_path / name / "manifest.json").read_text())["files"])
        assert (tmp_path / name / "model.onnx").read_bytes() == (tmp_path / "a" / "model.onnx").read_bytes()
    assert hashes[0] == hashes[1]


def test_recipes_lists_builtins(capsys):
    code, out, _ = run(["recipes"], capsys)
    assert code == 0
    assert "fold" in out and "Exact rewrites" in out


def test_inspect(digits_onnx, capsys):
    code, out, _ = run(["inspect", digits_onnx, "--json"], capsys)
    assert code == 0
    report = json.loads(out, parse_constant=raise_on_constant)  # strict JSON
    assert report["inputs"][0]["name"] == "images"
    assert report["parameters"] > 40_000
    assert set(report["passes"]) >= {"fold-constants", "fold-batchnorm"}
    assert report["passes"]["qnn-legalize"] == {
        "would_change": "?", "detail": "runs after quantize (which needs calibration data)"}
    assert report["passes"]["device-bias-correction"] == {
        "would_change": "?", "detail": "measures the model on a target's device (compress with --target and --calib)"}
    assert not [p for p, v in report["passes"].items() if "Error" in v["detail"]], report["passes"]


FAILURES = [
    # (name, argv builder, exit code, message regex)
    ("missing model", lambda t, o: [t / "nope.onnx", "--recipe", "fold", "-o", o], 2, r"nope\.onnx: no such file"),
    ("unknown recipe", lambda t, o: [MODEL, "--recipe", "nope", "-o", o], 2, r"unknown recipe 'nope'; built-in recipes: .*fold"),
    ("missing --recipe", lambda t, o: [MODEL, "-o", o], 2, r"the following arguments are required: --recipe"),
]


@pytest.mark.parametrize("name,argv,code,message", FAILURES, ids=[f[0] for f in FAILURES])
def test_failures(name, argv, code, message, tmp_path, capsys):
    out = tmp_path / "out"
    got, _, err = run(argv(tmp_path, out), capsys)
    assert got == code
    assert pytest.importorskip("re").search(message, error_line(err)), err
    assert not out.exists()


def fail(argv, capsys, code, pattern, out):
    import re

    got, _, err = run(argv, capsys)
    assert got == code, err
    line = error_line(err)
    assert re.search(pattern, line), line
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return line


def test_truncated_onnx(tmp_path, digits_onnx, capsys):
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(digits_onnx.read_bytes()[: digits_onnx.stat().st_size // 2])
    fail([bad, "--recipe", "fold", "-o", tmp_path / "out"], capsys, 2, r"cut\.onnx: not a readable ONNX model", tmp_path / "out")


def test_random_bytes_pt(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    fail([bad, "--recipe", "fold", "-o", tmp_path / "out"], capsys, 2, r"model\.pt: not a PyTorch file", tmp_path / "out")


def test_pickle_needs_trust(tmp_path, capsys):
    path = tmp_path / "full.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), path)
    fail([path, "--recipe", "fold", "-o", tmp_path / "out"], capsys, 2, r"--trust-pickle", tmp_path / "out")


def test_state_dict_refused(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    fail([path, "--recipe", "fold", "-o", tmp_path / "out"], capsys, 2, r"state_dict.*torch\.export", tmp_path / "out")


def recipe_file(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_recipe_unknown_pass(tmp_path, capsys):
    r = recipe_file(tmp_path, "passes: [fold-constants, squash]\n")
    fail([MODEL, "--recipe", r, "-o", tmp_path / "out"], capsys, 2, r"r\.yaml: passes\[1\]: unknown pass 'squash'; valid passes: ", tmp_path / "out")


def test_recipe_misspelt_pass_gets_a_suggestion(tmp_path, capsys):
    r = recipe_file(tmp_path, "passes: [fold-constant]\n")
    fail([MODEL, "--recipe", r, "-o", tmp_path / "out"], capsys, 2,
         r"unknown pass 'fold-constant' \(did you mean 'fold-constants'\?\); valid passes: ", tmp_path / "out")


def test_recipe_unknown_option(tmp_path, capsys):
    r = recipe_file(tmp_path, "passes:\n  - fold-batchnorm: {epsilon: 1}\n")
    fail([MODEL, "--recipe", r, "-o", tmp_path / "out"], capsys, 2, r"r\.yaml: passes\[0\] fold-batchnorm: unknown option 'epsilon'; valid options: ", tmp_path / "out")


def test_recipe_invalid_yaml(tmp_path, capsys):
    r = recipe_file(tmp_path, "passes: [fold-constants\n  oops: {\n")
    fail([MODEL, "--recipe", r, "-o", tmp_path / "out"], capsys, 2, r"r\.yaml: invalid YAML at line \d+, column \d+", tmp_path / "out")


def test_input_shape_contradicts_model(tmp_path, digits_onnx, capsys):
    fail([digits_onnx, "--recipe", "fold", "--input", "images=1x3x8x8", "-o", tmp_path / "out"], capsys, 2,
         r"--input images: axis 1 is fixed to 1 in the model, not 3", tmp_path / "out")


def test_input_wrong_rank(tmp_path, capsys):
    fail([MODEL, "--recipe", "fold", "--input", "images=1x8x8", "-o", tmp_path / "out"], capsys, 2,
         r"--input images: shape 1x8x8 has rank 3, but the model's input 'images' has rank 4", tmp_path / "out")


def test_calib_keys_mismatch(tmp_path, capsys):
    calib = tmp_path / "c.npz"
    np.savez(calib, pixels=np.zeros((4, 1, 8, 8), np.float32))
    fail([MODEL, "--recipe", "fold", "--calib", calib, "-o", tmp_path / "out"], capsys, 2,
         r"c\.npz: keys do not match the model's inputs \(missing 'images'; unexpected 'pixels'\)", tmp_path / "out")


def test_eval_shape_mismatch(tmp_path, capsys):
    data = tmp_path / "e.npz"
    np.savez(data, images=np.zeros((4, 1, 9, 9), np.float32))
    fail([MODEL, "--recipe", "fold", "--eval", data, "-o", tmp_path / "out"], capsys, 2,
         r"axis 2 must be 8, got 9", tmp_path / "out")


def test_refuses_non_artifact_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run([MODEL, "--recipe", "fold", "-o", out], capsys)
    assert code == 2 and "refusing to overwrite" in error_line(err)
    assert (out / "precious.txt").read_text() == "keep me"


def test_console_script_exit_code(tmp_path):
    """The installed entry point maps errors to exit codes without a traceback."""
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", str(tmp_path / "missing.pt2"), "--recipe", "fold"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


# ------------------------------------------------------------- bad budgets and data: exit 2 before capture


@pytest.fixture
def no_capture(monkeypatch):
    """Fail the test if the model is captured: these errors must come before any long work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was captured before the bad input was reported")

    monkeypatch.setattr("compressor.flow.calib_eval.capture", refuse)
    monkeypatch.setattr("compressor.capture.capture", refuse)


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf"])
def test_max_drop_must_be_finite_and_non_negative(value, tmp_path, capsys, no_capture):
    fail([MODEL, "--recipe", "int8", "--calib", CALIB, f"--max-drop={value}", "-o", tmp_path / "out"], capsys, 2,
         rf"^error: --max-drop must be a finite number >= 0 .*got {value}$", tmp_path / "out")


def test_recipe_max_drop_nan_is_refused(tmp_path, capsys, no_capture):
    r = recipe_file(tmp_path, "passes: [fold-constants]\naccuracy: {max_drop: .nan}\n")
    fail([MODEL, "--recipe", r, "-o", tmp_path / "out"], capsys, 2,
         r"r\.yaml: accuracy: option 'max_drop' must be a finite number >= 0", tmp_path / "out")


def test_sweep_max_drop_nan_is_refused(tmp_path, capsys, no_capture):
    code, _, err = run(["sweep", MODEL, "--pass", "prune-magnitude", "--levels", "0.5", "--eval", EVAL,
                        "--max-drop", "nan", "-o", tmp_path / "sw"], capsys)
    assert code == 2 and "--max-drop must be a finite number >= 0" in error_line(err)
    assert not (tmp_path / "sw").exists()


def test_eval_without_calib_names_the_pass_that_needs_it(tmp_path, capsys, no_capture):
    fail([MODEL, "--recipe", "int8", "--eval", EVAL, "-o", tmp_path / "out"], capsys, 2,
         r"^error: pass 'quantize' of recipe 'int8' needs calibration data, and only --eval was given: "
         r"pass --calib X\.npz", tmp_path / "out")


@pytest.mark.parametrize("flag", ["--calib", "--eval"])
def test_data_file_with_zero_samples(flag, tmp_path, capsys, no_capture):
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 1, 8, 8), np.float32))
    what = flag.lstrip("-")
    fail([MODEL, "--recipe", "int8", "--calib", CALIB, flag, empty, "-o", tmp_path / "out"], capsys, 2,
         rf"^error: {what} .*empty\.npz: holds 0 samples", tmp_path / "out")


def test_data_file_that_is_not_an_npz(tmp_path, capsys, no_capture):
    npy = tmp_path / "calib.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros((4, 1, 8, 8), np.float32))
    fail([MODEL, "--recipe", "int8", "--calib", npy, "-o", tmp_path / "out"], capsys, 2,
         r"calib\.npz: not an \.npz file \(a single \.npy array\); save one array per model input with "
         r"numpy\.savez", tmp_path / "out")
    text = tmp_path / "calib.txt"
    text.write_text("1 2 3\n")
    line = fail([MODEL, "--recipe", "int8", "--calib", text, "-o", tmp_path / "out"], capsys, 2,
                r"calib\.txt: not an \.npz file", tmp_path / "out")
    assert "allow_pickle" not in line


def test_integer_data_for_a_float_input_is_cast_with_one_warning(tmp_path, capsys):
    ints = tmp_path / "ints.npz"
    with np.load(CALIB) as data:
        np.savez(ints, images=np.round(data["images"] * 16).astype(np.int64)[:64])
    code, _, err = run([MODEL, "--recipe", "fold", "--calib", ints, "-o", tmp_path / "out", "--latency-runs", "1"],
                       capsys)
    assert code == 0, err
    casts = [line for line in err.splitlines() if "int64, the model's input is float32: cast" in line]
    assert len(casts) == 1 and "'images'" in casts[0], err


def test_a_run_that_quantizes_nothing_says_so(tmp_path, capsys):
    """Exit 0 and a passing gate are not enough: the summary says the run was a no-op, and why."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])],
                              "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "relu.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    code, out, err = run([tmp_path / "relu.onnx", "--recipe", "int8", "--calib", tmp_path / "calib.npz",
                          "-o", tmp_path / "out", "--latency-runs", "1"], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if "nothing was quantized" in line)
    assert "no layer the target quantizes" in line
    assert "quantize: nothing was quantized" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    quant = next(p for p in manifest["passes"] if p["name"] == "quantize")
    assert quant["stats"]["nothing_quantized"].startswith("the model has no layer the target quantizes")


def test_one_hot_labels_are_accepted(tmp_path, capsys):
    with np.load(EVAL) as data:
        images, labels = data["images"], data["labels"]
    onehot = tmp_path / "onehot.npz"
    np.savez(onehot, images=images, labels=np.eye(10, dtype=np.float32)[labels])
    runs = {}
    for name, path in (("plain", EVAL), ("onehot", onehot)):
        code, _, err = run([MODEL, "--recipe", "fold", "--eval", path, "-o", tmp_path / name, "--latency-runs", "1"],
                           capsys)
        assert code == 0, err
        runs[name] = json.loads((tmp_path / name / "manifest.json").read_text())
    assert runs["onehot"]["evaluation"]["metric"] == "top1"
    assert runs["onehot"]["metrics"] == runs["plain"]["metrics"]


# ------------------------------------------------------------------------------------ progress bars


def _run_on_terminal(argv: list[str]) -> tuple[int, str]:
    """Run ``compress`` with stdout/stderr on a pseudo-terminal, as a person at a terminal would."""
    import os
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "compressor.cli", *argv], stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "120"})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=600), b"".join(chunks).decode("utf-8", "replace")


def test_progress_bars_on_a_terminal_and_none_in_logs(digits_onnx, tmp_path, capsys):
    argv = [str(digits_onnx), "--recipe", "int8", "--calib", str(CALIB), "--eval", str(EVAL), "--latency-runs", "1"]
    code, screen = _run_on_terminal([*argv, "-o", str(tmp_path / "tty")])
    assert code == 0, screen
    for bar in ("capture:", "baseline:", "calibrate:", "evaluate:"):
        assert re.search(rf"{bar} +\d+%\|", screen), f"no {bar} bar on the terminal:\n{screen}"
    code, out, err = run([*argv, "-o", tmp_path / "log"], capsys)  # stderr is not a terminal: a CI log
    assert code == 0, err
    assert "\r" not in err and not re.search(r"\d+%\|", err), err


def _static_batch_model(path: Path) -> Path:
    """y = x @ W with the batch axis fixed to 8, as exporters write for a fixed batch."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_too_few_samples_for_a_static_batch(tmp_path, capsys):
    model = _static_batch_model(tmp_path / "static8.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).random((16, 4), np.float32))
    np.savez(tmp_path / "e.npz", x=np.random.default_rng(2).random((5, 4), np.float32))
    fail([model, "--recipe", "int8", "--calib", tmp_path / "c.npz", "--eval", tmp_path / "e.npz",
          "-o", tmp_path / "out"], capsys, 2,
         r"^error: evaluation data \(.*e\.npz\): 5 samples, but the model's batch axis is fixed to 8: give at least "
         r"8 samples", tmp_path / "out")
    fail([model, "--recipe", "int8", "--calib", tmp_path / "c.npz", "-o", tmp_path / "out"], capsys, 2,
         r"^error: calibration data \(split from --calib for evaluation; pass --eval with its own samples\) .*"
         r"13 samples|^error: evaluation data \(split from --calib", tmp_path / "out")


def test_string_labels_are_refused(tmp_path, capsys):
    with np.load(EVAL) as data:
        np.savez(tmp_path / "e.npz", images=data["images"], labels=np.array(["seven"] * len(data["images"])))
    fail([MODEL, "--recipe", "fold", "--eval", tmp_path / "e.npz", "-o", tmp_path / "out"], capsys, 2,
         r"'labels' holds <U5 values; give integer class indices", tmp_path / "out")


@pytest.mark.parametrize("flag,value,message", [
    ("--latency-runs", "0", r"argument --latency-runs: must be >= 1, got 0"),
    ("--junit", "/proc/no/gate.xml", r"--junit /proc/no/gate\.xml: cannot create /proc/no"),
    ("--dump-passes", "/proc/no/dump", r"--dump-passes /proc/no/dump: cannot create /proc/no/dump"),
])
def test_bad_output_flags_are_exit_2_before_any_work(flag, value, message, tmp_path, capsys, no_capture):
    fail([MODEL, "--recipe", "fold", flag, value, "-o", tmp_path / "out"], capsys, 2, message, tmp_path / "out")


def test_a_reader_that_leaves_is_not_an_internal_error(monkeypatch, capsys):
    """``compress recipes | head -1``: the pipe closes under us; exit 141 as a shell's SIGPIPE, no 'internal error'."""

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["recipes"]) == 141
    assert "internal error" not in capsys.readouterr().err


# ------------------------------------------------------------- -v adds detail, not tracebacks for user errors


def test_verbose_bad_recipe_is_one_line_without_traceback(tmp_path, capsys, no_capture):
    """``-v`` turns on debug logs; a user's mistake (exit 2) is still the one ``error:`` line."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\npasses: [no-such-pass]\n")
    code, _, err = run([MODEL, "--recipe", recipe, "-o", tmp_path / "out", "-v"], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert re.match(rf"^error: {re.escape(str(recipe))}: passes\[0\]: unknown pass 'no-such-pass'; valid passes: ",
                    error_line(err)), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error,code", [
    (AccuracyGateFailed("drop 0.5 > max_drop 0.01"), 3),
    (UnsupportedByTarget("onnx", [("conv_3", "op Foo is not supported")]), 4),
])
def test_verbose_user_errors_3_and_4_have_no_traceback(error, code, tmp_path, capsys, monkeypatch):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr("compressor.flow.compress.compress", failing)
    got, _, err = run([MODEL, "--recipe", "fold", "-o", tmp_path / "out", "-v"], capsys)
    assert got == code, err
    assert "Traceback" not in err
    assert error_line(err) == f"error: {error}"


@pytest.mark.parametrize("flag", ["-v", "--verbose", "-vv", "-qv"])
@pytest.mark.parametrize("error", [RuntimeError("boom"), CompressorError("an invariant broke")])
def test_verbose_internal_error_shows_the_traceback(error, flag, tmp_path, capsys, monkeypatch):
    """Exit 1 is a bug of the tool: there ``-v`` (alone or grouped, as argparse reads it) adds the traceback."""
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr("compressor.flow.compress.compress", failing)
    code, _, err = run([MODEL, "--recipe", "fold", "-o", tmp_path / "out", flag], capsys)
    assert code == 1, err
    assert "Traceback (most recent call last)" in err and "failing" in err
    code, _, err = run([MODEL, "--recipe", "fold", "-o", tmp_path / "out"], capsys)
    assert code == 1 and "Traceback" not in err


# ------------------------------------------------------------- --target-cpu: the CPU the artifact runs on


@pytest.mark.parametrize("command", ["compress", "search", "sweep"])
@pytest.mark.parametrize("target", ["tensorrt", "qnn-htp"])
def test_target_cpu_is_for_the_cpu_targets_only(command, target, tmp_path, capsys, no_capture, monkeypatch):
    """Refused before any work: before the model is captured and, with --ray, before Ray starts."""
    import compressor.executor

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started before the refusal")

    monkeypatch.setattr(compressor.executor, "make_executor", no_ray)
    out = tmp_path / "out"
    argv = {"compress": [MODEL, "--recipe", "int8", "--calib", CALIB],
            "search": ["search", MODEL, "--calib", CALIB, "--eval", EVAL, "--max-drop", "0.01"],
            "sweep": ["sweep", MODEL, "--pass", "prune-magnitude", "--levels", "0.5", "--eval", EVAL]}[command]
    line = fail([*argv, "--target", target, "--target-cpu", "avx2", "--ray", "local", "-o", out], capsys, 2, "", out)
    assert line == (f"error: --target-cpu avx2 names the x86 CPU an artifact runs on and applies to the targets onnx "
                    f"and openvino; {target} runs on its own device: leave --target-cpu out")


@pytest.mark.parametrize("target_cpu", ["avx2", "vnni"])
def test_target_cpu_end_to_end(target_cpu, force_vnni, tmp_path, capsys):
    """The README's model for the CPU named, built on a host of the other kind (forced): its int8
    weights have that CPU's grid, the manifest and the summary say which CPU, and a ``vnni``
    artifact measured on a host without VNNI says it is measured as written."""
    force_vnni(target_cpu == "avx2")
    out = tmp_path / "out"
    # --max-drop 1: on a real AVX2 host the vnni artifact's int8 sums saturate, and accuracy
    # control must not give a layer back (the grid is what this test reads)
    code, stdout, err = run([MODEL, "--recipe", "int8", "--target-cpu", target_cpu, "--calib", CALIB, "--eval", EVAL,
                             "--max-drop", "1", "-o", out, "--latency-runs", "1"], capsys)
    assert code == 0, err
    largest = int8_weight_extremes(out / "model.onnx")
    assert len(largest) == 5 and set(largest) == {127 if target_cpu == "vnni" else 63}
    target = json.loads((out / "manifest.json").read_text())["target"]
    assert (target["deployment_cpu"], target["int8_vnni"]) == (target_cpu, target_cpu == "avx2")
    row = next(line for line in stdout.splitlines() if line.startswith("target "))
    assert row.split(None, 1)[1] == (f"onnx, for a CPU {'with' if target_cpu == 'vnni' else 'without'} VNNI "
                                     f"(--target-cpu {target_cpu})")
    assert ("is measured as written" in err) is (target_cpu == "vnni")
