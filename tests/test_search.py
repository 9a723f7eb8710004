"""``compress search``: a grid of recipe options on the digits CNN, the front, the best artifact."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from compressor.cli import main
from compressor.flow.search import Candidate, _check_destination, pareto_front

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "digits_cnn.pt2"
CALIB = EXAMPLES / "digits_calib.npz"
EVAL = EXAMPLES / "digits_eval.npz"
GRID = "{calibrator: [minmax, percentile], sparsity: [0, 0.5]}"  # as in ray_session.py


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("search")
    code = main(["search", str(MODEL), "--calib", str(CALIB), "--eval", str(EVAL), "--max-drop", "0.01",
                 "--grid", GRID, "-o", str(out), "--latency-runs", "2"])
    return code, out


def test_search_rejects_early_reuses_passes_and_writes_the_best(searched, capsys):
    code, out = searched
    assert code == 0
    with (out / "search.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["calibrator"], float(r["sparsity"])) for r in rows] == [
        ("minmax", 0.0), ("minmax", 0.5), ("percentile", 0.0), ("percentile", 0.5)]
    pruned = [r for r in rows if float(r["sparsity"]) == 0.5]
    assert all(r["rejected"].startswith("drop ") and r["rejected"].endswith("after prune-magnitude")
               and r["top1"] == "" for r in pruned), "50% pruning breaks a 0.01 budget before quantization"
    # each prefix ran once as its own task; every candidate within budget takes it from the cache
    assert [int(r["cache_hits"]) for r in rows] == [2, 0, 2, 0]
    data = json.loads((out / "search.json").read_text())
    best = data["candidates"][data["best"]]
    assert best["on_front"] and best["drop"] <= 0.01 and best["options"]["sparsity"] == 0
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["gate"]["passed"] is True
    assert manifest["accuracy_drop"] == pytest.approx(best["drop"])
    assert manifest["recipe"]["passes"][-1]["quantize"]["calibrator"] == best["options"]["calibrator"]
    _check_destination(out)  # a later search may replace these files: they are ours
    assert sorted(p.name for p in out.iterdir()) == ["best", "search.csv", "search.json"]  # nothing staged left


def test_no_candidate_within_budget_exits_3(tmp_path, capsys):
    code = main(["search", str(MODEL), "--calib", str(CALIB), "--eval", str(EVAL), "--max-drop", "0.01",
                 "--grid", "{sparsity: [0.5], calibrator: [minmax]}", "-o", str(tmp_path)])
    assert code == 3
    assert "best: none; no candidate is within max drop 0.01" in capsys.readouterr().out
    assert not (tmp_path / "best").exists() and (tmp_path / "search.csv").is_file()


@pytest.mark.parametrize("grid, message", [
    ("{bits: [4]}", "error: search: unknown grid key 'bits'; valid keys: calibrator, alpha, sparsity"),
    ("{sparsity: 0.5}", "error: search: every grid key takes a non-empty list, e.g. '{sparsity: [0, 0.5]}'"),
    ("[1, 2]", "error: --grid must be a mapping such as '{sparsity: [0, 0.5]}', got '[1, 2]'"),
])
def test_bad_grid_exits_2(grid, message, tmp_path, capsys):
    code = main(["search", str(MODEL), "--calib", str(CALIB), "--eval", str(EVAL), "--max-drop", "0.01",
                 "--grid", grid, "-o", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == message


def test_search_files_of_someone_else_are_refused(tmp_path, capsys):
    (tmp_path / "search.csv").write_text("mine\n")
    code = main(["search", str(MODEL), "--calib", str(CALIB), "--eval", str(EVAL), "--max-drop", "0.01",
                 "-o", str(tmp_path)])
    assert code == 2
    assert "holds search.csv not written by a compressor search" in capsys.readouterr().err
    assert (tmp_path / "search.csv").read_text() == "mine\n"


def test_pareto_front():
    def cand(i: int, latency: float, metric: float) -> Candidate:
        return Candidate(i, {}, metric=metric, drop=0.0, latency_ms=latency)

    points = [cand(0, 1.0, 0.90), cand(1, 2.0, 0.95), cand(2, 2.5, 0.94), cand(3, 0.5, 0.80),
              Candidate(4, {}, rejected="drop 0.2 after prune-magnitude")]
    assert [c.index for c in pareto_front(points)] == [0, 1, 3]
    untimed = [Candidate(0, {}, metric=0.90, drop=0.0), Candidate(1, {}, metric=0.95, drop=0.0)]
    assert [c.index for c in pareto_front(untimed)] == [1]  # latency_runs=0: the metric decides


def test_search_asks_for_a_bar_per_phase(tmp_path):
    from compressor.flow.search import search
    from compressor.progress import no_progress

    bars = []

    def progress(desc, total, unit="batch"):
        bars.append((desc, total, unit))
        return no_progress(desc, total, unit)

    result = search(MODEL, calib=CALIB, eval_data=EVAL, max_drop=0.01, outdir=tmp_path, latency_runs=1,
                    grid={"sparsity": [0.5], "calibrator": ["minmax"]}, progress=progress)
    assert bars == [("search prefixes", 1, "prefix"), ("search candidates", 0, "candidate")]
    assert result.best is None and result.candidates[0].rejected.endswith("after prune-magnitude")
