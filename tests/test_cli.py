"""The ``compress`` command end to end: the bundled model, and every failure path.

Each failure asserts the exit code, a one-line message, and that no output folder is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compressor.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "digits_cnn.pt2"
CALIB = EXAMPLES / "digits_calib.npz"
EVAL = EXAMPLES / "digits_eval.npz"


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def raise_on_constant(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    program = torch.onnx.export(torch.export.load(str(MODEL)), dynamo=True, verbose=False)
    program.save(str(path))
    return path


def test_fold_on_bundled_model(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run([MODEL, "--recipe", "fold", "--calib", CALIB, "--eval", EVAL, "--max-drop", "0",
                           "-o", out, "--latency-runs", "2"], capsys)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text(), parse_constant=raise_on_constant)  # strict JSON
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
