"""The executor seam: in process by default, Ray with ``--ray``; the same results on both.

The Ray checks run against a real local Ray instance (2 CPUs), started by
``tests/ray_session.py`` inside a network namespace that holds loopback alone
(``unshare -n``): Ray listens on every interface and advertises the machine's address, so
it never runs outside one here. Where no namespace can be made the Ray tests skip and say
why; they never fall back to running Ray on the host's network.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor.cli import main
from compressor.executor import InProcessExecutor, make_executor
from compressor.flow.compress import compress
from compressor.flow.search import search
from compressor.flow.sweep import sweep

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "digits_cnn.pt2"
CALIB = EXAMPLES / "digits_calib.npz"
EVAL = EXAMPLES / "digits_eval.npz"
SESSION = Path(__file__).with_name("ray_session.py")
LEVELS = "0.2,0.5,0.8"  # as in ray_session.py
SHARED_KEYS = 10  # what a sweep shares with its level tasks (model, target, data, baseline outputs, ...)


def _square(item: int, shared: dict) -> int:
    return item * item + shared["offset"]


def test_in_process_maps_in_order_with_the_shared_inputs(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ticks = []
    with InProcessExecutor() as executor:
        assert executor.map(_square, [3, 1, 2], shared={"offset": 10}, progress=ticks.append) == [19, 11, 14]
    assert ticks == [1, 1, 1] and executor.retried == []
    assert isinstance(make_executor(None), InProcessExecutor)  # no --ray: in process, even with RAY_ADDRESS


def test_in_process_asks_stop_before_each_item_and_returns_those_started():
    asked = []

    def stop() -> bool:  # a budget spent after two items
        asked.append(1)
        return len(asked) > 2

    assert InProcessExecutor().map(_square, [1, 2, 3, 4], shared={"offset": 0}, stop=stop) == [1, 4]
    assert len(asked) == 3, "asked once per item started, and once more to stop"


@pytest.mark.parametrize("command", ["sweep", "compress", "search"])
def test_ray_without_the_extra_exits_2(command, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    argv = {"sweep": ["sweep", str(MODEL), "--pass", "prune-magnitude", "--levels", "0.5", "--eval", str(EVAL),
                      "--ray"],
            "compress": [str(MODEL), "--recipe", "fold", "--ray", "local"],
            "search": ["search", str(MODEL), "--calib", str(CALIB), "--eval", str(EVAL), "--max-drop", "0.01",
                       "--ray", "auto"]}[command]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == \
        "error: --ray needs Ray, which is not installed: pip install 'compressor[ray]'"


def test_which_address_ray_gets(monkeypatch):
    """``--ray`` alone: $RAY_ADDRESS, else a local instance; an address given wins. Ray starts only at a map."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'compressor[ray]')")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert make_executor("").address == "local"
    assert make_executor("10.1.2.3:6379").address == "10.1.2.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert make_executor("").address == "10.1.2.3:6379"
    assert make_executor("local").address == "local"
    executor = make_executor("")
    executor.close()  # nothing was started: nothing to end
    assert executor.map(_square, []) == [] and not executor.ray.is_initialized()


# ------------------------------------------------------------------ a real Ray instance


def _namespace_problem() -> str | None:
    """Why no loopback-only network namespace can be made here (``None``: it can)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2) to run Ray in a loopback-only network namespace"
    try:
        probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up && ip -o addr show"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"cannot make a network namespace ({err}); Ray runs only inside one"
    if probe.returncode != 0:
        return f"cannot make a network namespace ({probe.stderr.strip() or probe.returncode}); Ray runs only inside one"
    others = [line for line in probe.stdout.splitlines() if line.split()[1] != "lo"]
    if others:
        return f"the new network namespace holds more than loopback ({others[0]})"
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The digits CNN captured once to ONNX, and its eval images without labels (cosine metric)."""
    from compressor.capture import capture
    from compressor.model_io import save_model

    tmp = tmp_path_factory.mktemp("data")
    cosine = tmp / "eval_no_labels.npz"
    with np.load(EVAL) as npz:
        np.savez(cosine, images=npz["images"])
    return {"model": save_model(capture(MODEL).model, tmp / "digits.onnx"), "cosine_eval": cosine}


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory, data) -> tuple[Path, dict]:
    """``tests/ray_session.py`` run once in its own network namespace; its folder and results."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'compressor[ray]')")
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    out = tmp_path_factory.mktemp("ray")
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, str(SESSION),
           str(out), str(data["model"]), str(EVAL), str(CALIB), str(data["cosine_eval"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "result.json").read_text())


def _sweep_in_process(model: Path, outdir: Path) -> Path:
    sweep(model, pass_name="prune-magnitude", levels=LEVELS, eval_data=EVAL, outdir=outdir, latency_runs=0)
    return outdir / "sweep.csv"


@pytest.mark.slow
def test_sweep_rows_are_the_same_in_process_and_on_ray(ray_session, data, tmp_path):
    out, result = ray_session
    assert result["node_ip"] == "127.0.0.1"
    serial = _sweep_in_process(data["model"], tmp_path / "serial").read_bytes()
    assert (out / "ray" / "sweep.csv").read_bytes() == serial, "byte for byte"
    rows = list(csv.DictReader(io.StringIO(serial.decode())))
    assert [r["level"] for r in rows] == ["dense", *LEVELS.split(",")]
    ray_json = json.loads((out / "ray" / "sweep.json").read_text())
    serial_json = json.loads((tmp_path / "serial" / "sweep.json").read_text())
    assert ray_json["levels"] == serial_json["levels"]
    # every shared input went to the object store once, whatever the number of levels
    assert len(result["puts"]) == SHARED_KEYS


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_its_row_is_there(ray_session):
    out, result = ray_session
    assert result["killed_pid"] > 0
    assert result["retried"] == [[1, f"level {LEVELS.split(',')[1]}", 2]]
    assert (out / "crash" / "sweep.csv").read_bytes() == (out / "ray" / "sweep.csv").read_bytes()


@pytest.mark.slow
def test_a_task_error_comes_back_as_itself(ray_session):
    assert ray_session[1]["task_error"] == ["UsageError", "bad item 7"]
    assert ray_session[1]["task_error_seconds"] < 60, "not after the other task's two minutes"


@pytest.mark.slow
def test_a_target_keeps_its_deployment_cpu_in_a_ray_worker(ray_session):
    """``--target-cpu`` travels with the pickled target (its capabilities are fixed when it is built),
    so a worker on any CPU quantizes for the CPU named, not for its own."""
    onnx, openvino = ray_session[1]["target_in_worker"]
    assert onnx == {"deployment_cpu": "avx2", "bits": dict.fromkeys(("Conv", "ConvTranspose", "Gemm", "MatMul"), 7)}
    assert openvino == {"deployment_cpu": "avx2", "bits": {"Conv": 7, "ConvTranspose": 7, "Gemm": None,
                                                          "MatMul": None, "LSTM": None}}


@pytest.mark.slow
def test_accuracy_control_ranks_the_same_on_ray(ray_session, data, tmp_path):
    _, result = ray_session
    serial = compress(data["model"], recipe="int8", outdir=tmp_path / "int8", calib=CALIB,
                      eval_data=data["cosine_eval"], max_drop=0.0, latency_runs=1)
    control = serial.manifest["accuracy_control"]
    assert len(control["ranking"]) >= 2
    assert result["ranking"] == control["ranking"] and result["ranking_cached"] is False
    assert result["given_back"] == control["layers"]


@pytest.mark.slow
def test_search_measures_the_same_on_ray(ray_session, data, tmp_path):
    out, _ = ray_session
    search(data["model"], calib=CALIB, eval_data=EVAL, max_drop=0.01, outdir=tmp_path,
           grid={"calibrator": ["minmax", "percentile"], "sparsity": [0, 0.5]}, latency_runs=1)
    fields = ("index", "options", "metric", "drop", "weight_bytes", "rejected", "cache_hits")
    measured = [[c[k] for k in fields] for c in json.loads((tmp_path / "search.json").read_text())["candidates"]]
    on_ray = json.loads((out / "search" / "search.json").read_text())["candidates"]
    assert [[c[k] for k in fields] for c in on_ray] == measured
    assert sum(c["rejected"] is not None for c in on_ray) == 2
    # the prefixes ran as tasks first; the candidate tasks took them from the cache they were sent
    assert [c["cache_hits"] for c in on_ray] == [2, 0, 2, 0]


@pytest.mark.slow
def test_a_search_budget_stops_the_same_candidates_on_ray(ray_session, data, tmp_path):
    """With the budget spent, no more tasks are submitted: the same candidates ran on Ray as in process."""
    from ray_session import BUDGET_MINUTES, GRID, ticking_clock

    out, _ = ray_session
    search(data["model"], calib=CALIB, eval_data=EVAL, max_drop=0.01, outdir=tmp_path, grid=GRID, latency_runs=1,
           budget_minutes=BUDGET_MINUTES, clock=ticking_clock())
    fields = ("index", "options", "metric", "drop", "weight_bytes", "rejected", "cache_hits", "given_back")
    serial = json.loads((tmp_path / "search.json").read_text())
    on_ray = json.loads((out / "search-budget" / "search.json").read_text())
    assert [[c[k] for k in fields] for c in on_ray["candidates"]] == [[c[k] for k in fields]
                                                                      for c in serial["candidates"]]
    not_run = f"not run: budget of {BUDGET_MINUTES:g} min spent"
    assert [c["rejected"] == not_run for c in on_ray["candidates"]] == [False, False, True, False]
    assert (on_ray["ran"], on_ray["not_run"]) == (3, 1)


@pytest.mark.slow
def test_a_search_candidate_gives_layers_back_the_same_on_ray(ray_session, data, tmp_path, monkeypatch):
    """Accuracy control inside a candidate's Ray task: the same layers, steps and drop as in process."""
    from ray_session import CONTROL_GRID

    out, _ = ray_session
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))  # ranked here too, not read from a cache
    search(data["model"], calib=CALIB, eval_data=data["cosine_eval"], max_drop=0.0, outdir=tmp_path,
           grid=CONTROL_GRID, latency_runs=1)
    fields = ("index", "options", "metric", "drop", "weight_bytes", "rejected", "given_back", "control")
    serial = json.loads((tmp_path / "search.json").read_text())["candidates"]
    on_ray = json.loads((out / "search-control" / "search.json").read_text())["candidates"]
    assert [[c[k] for k in fields] for c in on_ray] == [[c[k] for k in fields] for c in serial]
    assert on_ray[0]["given_back"] and on_ray[0]["control"]["ranking_cached"] is False


@pytest.mark.parametrize("module", ["compressor.passes.quantize", "compressor.passes.qnn_legalize"])
def test_a_pass_imports_what_it_uses_in_a_fresh_worker(module):
    """A task runs a pass in a fresh process: ``ir.passes.common`` must not rely on another pass importing it."""
    code = f"import onnx_ir as ir, {module}; ir.passes.common.RemoveUnusedNodesPass"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_ranking_on_the_target_runs_each_candidate_lowered(data, tmp_path):
    """``ranking_backend: target``: each candidate task lowers its model and runs it in the target."""
    recipe = tmp_path / "int8-target-ranking.yaml"
    recipe.write_text((ROOT / "recipes" / "int8.yaml").read_text().replace(
        "accuracy: {metric: auto, max_drop: 0.01}", "accuracy: {metric: auto, max_drop: 0.01, ranking_backend: target}"))
    result = compress(data["model"], recipe=recipe, outdir=tmp_path / "out", calib=CALIB,
                      eval_data=data["cosine_eval"], max_drop=0.0, latency_runs=1)
    control = result.manifest["accuracy_control"]
    assert control["ranking_backend"] == "target"
    layers = [r["layer"] for r in control["ranking"]]
    assert len(set(layers)) == len(layers) >= 2 and set(control["layers"]) <= set(layers)
    assert all(r["error_without"] >= 0 for r in control["ranking"])
