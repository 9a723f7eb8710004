"""``compress search``: a grid of recipe options on the digits CNN, the front, the best artifact."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor.cli import main
from compressor.flow.search import Candidate, pareto_front, search
from compressor.flow.search_output import check_search_destination
from tests.ortutil import int8_weight_extremes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "digits_cnn.pt2"
CALIB = EXAMPLES / "digits_calib.npz"
EVAL = EXAMPLES / "digits_eval.npz"
GRID = "{calibrator: [minmax, percentile], sparsity: [0, 0.5]}"  # as in ray_session.py


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[int, Path, str]:
    out = tmp_path_factory.mktemp("search")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["search", str(MODEL), "--calib", str(CALIB), "--eval", str(EVAL), "--max-drop", "0.01",
                     "--grid", GRID, "-o", str(out), "--latency-runs", "2"])
    return code, out, printed.getvalue()


def test_search_rejects_early_reuses_passes_and_writes_the_best(searched):
    code, out, stdout = searched
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
    assert all(r["given_back"] == "" for r in rows), "within budget or rejected early: no accuracy control"
    data = json.loads((out / "search.json").read_text())
    best = data["candidates"][data["best"]]
    assert best["on_front"] and best["drop"] <= 0.01 and best["options"]["sparsity"] == 0
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert manifest["gate"]["passed"] is True
    assert manifest["accuracy_drop"] == pytest.approx(best["drop"])
    assert manifest["recipe"]["passes"][-1]["quantize"]["calibrator"] == best["options"]["calibrator"]
    check_search_destination(out)  # a later search may replace these files: they are ours
    # nothing staged left; the plot is a PNG
    assert sorted(p.name for p in out.iterdir()) == ["best", "search.csv", "search.json", "search.png"]
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"written: {out / 'search.csv'}, {out / 'search.json'}, {out / 'search.png'}, {out / 'best'}" in stdout


def test_no_candidate_within_budget_exits_3(tmp_path, capsys):
    code = main(["search", str(MODEL), "--calib", str(CALIB), "--eval", str(EVAL), "--max-drop", "0.01",
                 "--grid", "{sparsity: [0.5], calibrator: [minmax]}", "-o", str(tmp_path)])
    assert code == 3
    assert "best: none; no candidate is within max drop 0.01" in capsys.readouterr().out
    assert not (tmp_path / "best").exists() and (tmp_path / "search.csv").is_file()


@pytest.mark.parametrize("grid, message", [
    ("{bits: [4]}", "error: search: unknown grid key 'bits'; valid keys: calibrator, alpha, sparsity, "
                    "accuracy_control"),
    ("{accuracy_control: [yes please]}", "error: search: accuracy_control takes true or false, got 'yes please'; "
                                         "e.g. '{accuracy_control: [false, true]}'"),
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
    # a NaN metric (the candidate computes NaN where fp32 does not) is never on the front; every
    # comparison with it being false, the fastest one sat there
    nan = [cand(0, 1.0, 0.90), cand(1, 0.5, float("nan"))]
    assert [c.index for c in pareto_front(nan)] == [0]


def test_search_asks_for_a_bar_per_phase(tmp_path):
    from compressor.progress import no_progress

    bars = []

    def progress(desc, total, unit="batch"):
        bars.append((desc, total, unit))
        return no_progress(desc, total, unit)

    result = search(MODEL, calib=CALIB, eval_data=EVAL, max_drop=0.01, outdir=tmp_path, latency_runs=1,
                    grid={"sparsity": [0.5], "calibrator": ["minmax"]}, progress=progress)
    assert bars == [("search prefixes", 1, "prefix"), ("search candidates", 0, "candidate")]
    assert result.best is None and result.candidates[0].rejected.endswith("after prune-magnitude")


def _ticking(seconds: float):
    """A clock that advances ``seconds`` each time it is read (search reads it once per task started)."""
    now = [-seconds]

    def clock() -> float:
        now[0] += seconds
        return now[0]
    return clock


@pytest.mark.parametrize("minutes, ran", [(2.5, 1), (0.5, 0)], ids=["one-candidate", "nothing"])
def test_budget_minutes_leaves_the_rest_not_run(minutes, ran, tmp_path):
    """Read at 0 (start), 60 s (the prefix), 120 s (candidate 0), 180 s (candidate 1): 2.5 min runs one."""
    result = search(MODEL, calib=CALIB, eval_data=EVAL, max_drop=0.01, outdir=tmp_path, latency_runs=1,
                    grid={"calibrator": ["minmax", "percentile"], "sparsity": [0]}, budget_minutes=minutes,
                    clock=_ticking(60))
    skipped = [c.index for c in result.candidates if c.rejected == f"not run: budget of {minutes:g} min spent"]
    assert skipped == [1] if ran else [0, 1], "grid order: the first candidates run"
    assert (result.ran, result.not_run) == (ran, 2 - ran)
    data = json.loads((tmp_path / "search.json").read_text())
    assert (data["budget_minutes"], data["ran"], data["not_run"]) == (minutes, ran, 2 - ran)
    if ran:  # the best of those that ran is still written
        assert result.best is result.candidates[0] and result.candidates[0].drop <= 0.01
        assert json.loads((tmp_path / "best" / "manifest.json").read_text())["gate"]["passed"] is True
    else:
        assert result.best is None and not (tmp_path / "best").exists()


@pytest.mark.parametrize("minutes", ["0", "-1", "nan", "inf"])
def test_a_budget_that_is_not_a_positive_number_exits_2(minutes, tmp_path, capsys):
    code = main(["search", str(MODEL), "--calib", str(CALIB), "--eval", str(EVAL), "--max-drop", "0.01",
                 "--budget-minutes", minutes, "-o", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --budget-minutes must be a finite number of minutes above 0 (e.g. 30), got {float(minutes):g}; "
        "leave it out to run every candidate")
    assert not (tmp_path / "out").exists()


def test_the_summary_says_how_many_ran(tmp_path, capsys):
    code = main(["search", str(MODEL), "--calib", str(CALIB), "--eval", str(EVAL), "--max-drop", "0.01",
                 "--grid", "{sparsity: [0.5], calibrator: [minmax]}", "--budget-minutes", "60", "-o", str(tmp_path)])
    assert code == 3
    assert "budget: 60 min; 1 of 1 candidates ran, 0 not run" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cosine_eval(tmp_path_factory) -> Path:
    """The digits eval images without labels: the metric is cosine fidelity, any drop above 0 is measurable."""
    path = tmp_path_factory.mktemp("cosine") / "eval_no_labels.npz"
    with np.load(EVAL) as npz:
        np.savez(path, images=npz["images"])
    return path


def test_accuracy_control_brings_a_candidate_within_budget(cosine_eval, tmp_path, monkeypatch):
    """A candidate just over the budget gives back its most sensitive layer and becomes the best."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    one = {"calibrator": ["minmax"], "sparsity": [0]}
    # At max_drop 0 accuracy control tries layer after layer: its steps say what giving back one costs.
    probe = search(MODEL, calib=CALIB, eval_data=cosine_eval, max_drop=0.0, outdir=tmp_path / "probe",
                   latency_runs=1, grid={**one, "accuracy_control": [True]}).candidates[0]
    first, *tries = probe.control["steps"]
    kept = next(step for step in tries if step["kept"])
    assert kept["drop"] < first["drop"] and probe.control["ranking_cached"] is False
    # With the budget that one layer meets, off misses it, on meets it with that one layer.
    result = search(MODEL, calib=CALIB, eval_data=cosine_eval, max_drop=kept["drop"], outdir=tmp_path / "out",
                    latency_runs=1, grid={**one, "accuracy_control": [False, True]})
    off, on = result.candidates
    assert off.given_back is None and off.control is None and off.drop == pytest.approx(first["drop"], abs=0)
    assert [off.cache_hits, on.cache_hits] == [2, 2], "each runs its own quantize, as on Ray"
    assert off.drop > kept["drop"]
    assert on.given_back == [kept["layer"]] and on.drop == kept["drop"] and on.control["budget_met"] is True
    assert on.control["ranking_cached"] is True, "ranked once, by the probe: the ranking cache holds it"
    assert result.best is on
    with (tmp_path / "out" / "search.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["accuracy_control"], r["given_back"]) for r in rows] == [("False", ""), ("True", kept["layer"])]
    manifest = json.loads((tmp_path / "out" / "best" / "manifest.json").read_text())
    assert manifest["accuracy_control"]["layers"] == [kept["layer"]] and manifest["gate"]["passed"] is True
    assert manifest["accuracy_control"]["ranking_cached"] is True, "the best artifact does not rank again"
    assert manifest["accuracy_drop"] == pytest.approx(on.drop)


def test_without_matplotlib_there_is_no_plot_and_an_earlier_one_goes(tmp_path, monkeypatch):
    from compressor.flow.search import SearchResult
    from compressor.flow.search_output import write_search_files

    (tmp_path / "notes.txt").write_text("mine")
    cands = [Candidate(0, {"calibrator": "minmax", "alpha": None, "sparsity": 0, "accuracy_control": True},
                       metric=0.9, drop=0.01, latency_ms=1.0, on_front=True)]
    result = SearchResult("top1", 0.91, 0.02, cands, cands[0], {})
    assert set(write_search_files(result, tmp_path)) == {"csv", "json", "png"}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert set(write_search_files(result, tmp_path)) == {"csv", "json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "search.csv", "search.json"]


def test_the_table_says_what_was_given_back_and_why_a_row_is_not_the_best():
    from compressor.flow.search import SearchResult
    from compressor.flow.search_output import format_search_table

    def opts(sparsity: float, control: bool) -> dict:
        return {"calibrator": "minmax", "alpha": None, "sparsity": sparsity, "accuracy_control": control}

    cands = [Candidate(0, opts(0, True), metric=0.99, drop=0.00004, latency_ms=0.2, given_back=["conv_1", "fc"]),
             Candidate(1, opts(0, False), metric=0.995, drop=0.00001, latency_ms=0.3),
             Candidate(2, opts(0.5, True), rejected="drop 0.1944 after prune-magnitude"),
             Candidate(3, opts(0.2, True), rejected="not run: budget of 1 min spent")]
    table = format_search_table(SearchResult("cosine", 1.0, 0.00003, cands, cands[1], {})).splitlines()
    assert table[0].split() == ["#", "calibrator", "alpha", "sparsity", "control", "cosine", "drop", "latency", "ms",
                                "KB", "front", "given", "back", "note"]
    assert table[2].split()[5:7] == ["0.9900", "4e-05"], "a drop below 0.0001 is not shown as 0"
    assert table[2].endswith("conv_1, fc  over max drop")
    assert table[3].endswith("best") and " off " in table[3]
    assert table[4].endswith("drop 0.1944 after prune-magnitude")
    assert table[5].endswith("not run: budget of 1 min spent")


@pytest.mark.slow
def test_candidates_on_qnn_htp_are_completed_by_the_target(tmp_path):
    """A candidate is the recipe the target completes (qnn-legalize after quantize), as
    ``compress`` writes the best: without it a plain int8 candidate falls off HTP (exit 4)."""
    pytest.importorskip("onnxruntime_qnn", reason="the QNN HTP execution provider is not installed")
    from compressor.capture import capture
    from compressor.inputs import apply_input_overrides, parse_input_overrides
    from compressor.model_io import save_model

    model = capture(MODEL).model  # HTP needs static shapes: the digits CNN at batch 1 (--input)
    apply_input_overrides(model, parse_input_overrides([f"{model.graph.inputs[0].name}=1x1x8x8"]))
    save_model(model, tmp_path / "digits_b1.onnx")
    result = search(tmp_path / "digits_b1.onnx", calib=CALIB, eval_data=EVAL, max_drop=0.01, outdir=tmp_path / "out",
                    target="qnn-htp",
                    grid={"calibrator": ["minmax"], "sparsity": [0], "accuracy_control": [False]}, latency_runs=1)
    (cand,) = result.candidates
    assert cand.rejected is None and cand.drop <= 0.01, cand
    assert result.best is cand
    manifest = json.loads((tmp_path / "out" / "best" / "manifest.json").read_text())
    assert manifest["recipe"]["target_passes"] == ["qnn-legalize"]


def test_a_search_on_the_htp_emulator_says_its_times_are_not_the_devices(tmp_path, capsys):
    """On x86 the HTP library emulates the NPU: the front is ordered by emulated times, and says so."""
    import platform

    from compressor.targets import get_target

    try:
        get_target("qnn-htp")
    except Exception as err:  # onnxruntime-qnn missing: the target says what to install
        pytest.skip(str(err))
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the HTP library runs on a device here: its times are the device's")
    out = tmp_path / "s"
    code = main(["search", str(MODEL), "--target", "qnn-htp", "--input", "images=1x1x8x8", "--calib", str(CALIB),
                 "--eval", str(EVAL), "--max-drop", "0.05", "--grid", "{calibrator: [minmax], sparsity: [0]}",
                 "-o", str(out), "--latency-runs", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    note = "HTP emulated on this x86 CPU: not the device's latency"
    assert json.loads((out / "search.json").read_text())["latency_note"] == note
    assert f"latency: {note}; the front and the best are ordered by these times" in printed


def test_the_candidates_and_the_best_are_built_for_the_target_cpu(tmp_path):
    """``target_cpu`` reaches the candidates' target and the best artifact's ``compress``."""
    result = search(MODEL, calib=CALIB, eval_data=EVAL, max_drop=0.05, outdir=tmp_path, latency_runs=1,
                    grid={"calibrator": ["minmax"], "sparsity": [0]}, target_cpu="avx2")
    assert result.best is not None
    manifest = json.loads((tmp_path / "best" / "manifest.json").read_text())
    assert manifest["target"]["deployment_cpu"] == "avx2"
    largest = int8_weight_extremes(tmp_path / "best" / "model.onnx")
    assert len(largest) == 5 and set(largest) == {63}
    target = json.loads((tmp_path / "search.json").read_text())["target"]  # the candidates' too
    assert (target["name"], target["deployment_cpu"]) == ("onnx", "avx2")
