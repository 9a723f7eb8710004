"""``compress sweep``: the essential-sparsity curve and its knee on the bundled digits CNN."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor.errors import UsageError
from compressor.flow.evaluation import Evaluation
from compressor.flow.sweep import SweepLevel, SweepResult, _write, parse_levels, sweep
from tests.cliutil import run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "digits_cnn.pt2"
CALIB = EXAMPLES / "digits_calib.npz"
EVAL = EXAMPLES / "digits_eval.npz"
LEVELS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    """The digits CNN captured once to ONNX (later captures of an .onnx are fast)."""
    from compressor.capture import capture
    from compressor.model_io import save_model

    return save_model(capture(MODEL).model, tmp_path_factory.mktemp("onnx") / "digits.onnx")



def _fp32_top1(onnx_path: Path) -> float:
    """Top-1 of the fp32 model on the eval file, computed here with ONNX Runtime."""
    from compressor.model_io import load_onnx
    from tests.ortutil import run_ort

    with np.load(EVAL) as npz:
        images, labels = npz["images"], npz["labels"]
    logits = run_ort(load_onnx(onnx_path), {"images": images})[0]
    return float(np.mean(logits.argmax(axis=1) == labels))


def test_magnitude_sweep_on_digits_finds_the_knee(digits_onnx, tmp_path, capsys):
    out = tmp_path / "sweep"
    code, stdout, _ = run(["sweep", MODEL, "--pass", "prune-magnitude", "--levels", LEVELS, "--eval", EVAL,
                           "--max-drop", "0.01", "-o", out, "--latency-runs", "1"], capsys)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].split()[:4] == ["level", "sparsity", "top1", "drop"]
    table = {line.split()[0]: line.split() for line in lines[2:12]}
    assert list(table) == ["dense", *LEVELS.split(",")]
    assert table["dense"][2] == f"{_fp32_top1(digits_onnx):.4f}"  # the dense row is the fp32 model
    top1 = [float(table[lv][2]) for lv in LEVELS.split(",")]
    assert top1[0] > 0.98 and top1[-1] < 0.5  # the curve falls off: 90% of the weights is too many
    knee_line = next(line for line in lines if line.startswith("knee"))
    data = json.loads((out / "sweep.json").read_text())
    knee = data["knee"]
    assert knee in LEVELS.split(",") and f": {knee} " in knee_line
    by_level = {lv["level"]: lv for lv in data["levels"]}
    assert by_level[knee]["drop"] <= 0.01
    # the knee is the largest sparsity whose drop stays within the budget: every sparser level is over it
    sparser = [lv for lv in data["levels"] if lv["sparsity"] > by_level[knee]["sparsity"]]
    assert sparser and all(lv["drop"] > 0.01 for lv in sparser), sparser
    for lv in data["levels"]:
        assert lv["sparsity"] == pytest.approx(float(lv["level"]), abs=0.01)
    with (out / "sweep.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["level"] for r in rows] == ["dense", *LEVELS.split(",")]
    assert float(rows[-1]["weight_mb_zlib"]) < float(rows[0]["weight_mb_zlib"])
    png = out / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nm_and_channel_sweeps(digits_onnx, tmp_path):
    nm = sweep(digits_onnx, pass_name="sparsify-nm", levels="1:4,2:4,3:4", eval_data=EVAL, outdir=tmp_path / "nm",
               latency_runs=0)
    assert [lv.level for lv in nm.levels] == ["1:4", "2:4", "3:4"]
    assert [lv.sparsity for lv in nm.levels] == [0.75, 0.5, 0.25]
    assert nm.levels[2].metric >= nm.levels[0].metric
    assert nm.knee is None and nm.max_drop is None
    channels = sweep(digits_onnx, pass_name="prune-channels", levels=[0.25, 0.5], eval_data=EVAL, calib=CALIB,
                     options={"bias_correction": True}, outdir=tmp_path / "ch", max_drop=1.0, latency_runs=1)
    first, second = channels.levels
    assert first.stats["mflops"] < first.stats["mflops_before"]
    assert second.stats["mflops"] < first.stats["mflops"]
    assert channels.knee is second  # everything is within a budget of 1.0: the largest level wins
    assert first.options == {"bias_correction": True, "ratio": 0.25}


def test_no_level_within_budget_exits_3(digits_onnx, tmp_path, capsys):
    code, stdout, _ = run(["sweep", digits_onnx, "--pass", "prune-magnitude", "--levels", "0.9", "--eval", EVAL,
                           "--max-drop", "0", "-o", tmp_path, "--latency-runs", "0"], capsys)
    assert code == 3
    assert "knee: none" in stdout


def test_without_matplotlib_a_csv_is_written(digits_onnx, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, stdout, _ = run(["sweep", digits_onnx, "--pass", "sparsify-nm", "--levels", "2:4", "--eval", EVAL,
                           "-o", tmp_path, "--latency-runs", "0"], capsys)
    assert code == 0
    assert "no plot: matplotlib is not installed" in stdout
    assert (tmp_path / "sweep.csv").is_file() and not (tmp_path / "sweep.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--pass", "quantize", "--levels", "0.5"], "invalid choice: 'quantize'"),
    (["--pass", "sparsify-nm", "--levels", "2-4"], "level '2-4' of sparsify-nm is not a N:M pattern"),
    (["--pass", "sparsify-nm", "--levels", "4:4"], "1 <= n < m"),
    (["--pass", "prune-magnitude", "--levels", "0.5", "--options", "{sparsity: 0.2}"], "is what --levels sets"),
    (["--pass", "prune-magnitude", "--levels", "0.5", "--options", "{bias_correction: true}"], "--calib"),
])
def test_bad_usage_exits_2(argv, message, digits_onnx, capsys):
    code, _, err = run(["sweep", digits_onnx, "--eval", EVAL, *argv], capsys)
    assert code == 2
    assert message in err


def test_parse_levels():
    assert parse_levels("prune-channels", "0.25, 0.5") == [("0.25", {"ratio": 0.25}), ("0.5", {"ratio": 0.5})]
    with pytest.raises(UsageError, match="cannot be swept"):
        parse_levels("fold-batchnorm", "0.5")


def _raise_on_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def _result(tmp_path) -> SweepResult:
    """A sweep result holding what real ones hold: numpy scalars, an infinite SQNR, a NaN stat."""
    ev = Evaluation("cosine", {"cosine_mean": 1.0}, {"cosine_mean": np.float32(0.99), "sqnr_db": float("inf"),
                                                     "max_abs_diff": np.float64(0.0)}, 0.01, 4, "e.npz")
    level = SweepLevel("0.5", {"sparsity": 0.5}, np.float64(0.5), np.float32(0.99), 0.01, np.bool_(True),
                       {"sparsity": np.float32(0.5), "odd": float("nan"), "count": np.int64(3)}, None, ev)
    return SweepResult("m.onnx", "prune-magnitude", "onnx", "cosine", 1.0, None, 0.05, [level], level, {})


def test_sweep_json_is_strict_and_other_files_are_kept(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (tmp_path / "notes.txt").write_text("mine")
    files = _write(_result(tmp_path), tmp_path)
    data = json.loads((tmp_path / "sweep.json").read_text(), parse_constant=_raise_on_constant)
    level = data["levels"][0]
    assert data["tool"] == "compressor" and data["knee"] == "0.5"
    assert level["evaluation"]["compressed"]["sqnr_db"] is None and level["stats"]["odd"] is None
    assert level["sparsity"] == 0.5 and level["stats"]["count"] == 3 and level["within_budget"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "sweep.csv", "sweep.json"]
    assert set(files) == {"csv", "json"}


def test_an_earlier_sweep_is_replaced_and_its_stale_plot_removed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    earlier = {"model": "m.onnx", "pass": "prune-magnitude", "target": "onnx", "metric": "cosine", "baseline": 1.0,
               "knee": None, "levels": [], "sqnr": float("inf")}  # as written before the "tool" key
    (tmp_path / "sweep.json").write_text(json.dumps(earlier))
    (tmp_path / "sweep.csv").write_text("old")
    (tmp_path / "sweep.png").write_bytes(b"old plot")
    _write(_result(tmp_path), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.json"]
    assert (tmp_path / "sweep.csv").read_text().startswith("level,")


@pytest.mark.parametrize("files", [
    {"sweep.csv": "my own spreadsheet"},
    {"sweep.json": '{"my": "data"}', "sweep.png": "my plot"},
    {"sweep.json": "not json", "sweep.csv": "x"},
], ids=["csv-alone", "foreign-json", "invalid-json"])
def test_sweep_refuses_sweep_files_it_did_not_write(tmp_path, capsys, files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for name, text in files.items():
        (out / name).write_text(text)
    code, _, err = run(["sweep", MODEL, "--pass", "prune-magnitude", "--levels", "0.5", "--eval", EVAL, "-o", out,
                        "--latency-runs", "0"], capsys)
    assert code == 2, err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert "refusing to overwrite" in line and all(name in line for name in files)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"notes.txt": "mine", **files}


def test_sweep_json_names_the_target_cpu(digits_onnx, tmp_path):
    result = sweep(digits_onnx, pass_name="sparsify-nm", levels="2:4", eval_data=EVAL, outdir=tmp_path,
                   latency_runs=0, target_cpu="avx2")
    assert json.loads((tmp_path / "sweep.json").read_text())["deployment_cpu"] == "avx2"
    assert "deployment_cpu" not in sweep(digits_onnx, pass_name="sparsify-nm", levels="2:4", eval_data=EVAL,
                                         outdir=tmp_path, latency_runs=0).to_json()
    assert result.target == "onnx"
