"""The ``int8`` recipe end to end through ``compress`` (in process), on the bundled digits CNN.

Covers both targets (OpenVINO tests skip when ``openvino`` is not importable), the
artifact (int8 weights, hashes, size), the accuracy gate and its JUnit file, accuracy
control's success and failure paths, and where the evaluation data comes from.

Runs are module fixtures shared by the tests that read them. Every run goes through
``cli.main`` with the ``.pt2`` path; the torch export behind capture (~90% of a run's time,
and tested in ``test_capture.py``/``test_cli.py``) happens once per module, each later run
getting a fresh copy of that ONNX graph (:func:`capture_once`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import xml.etree.ElementTree as ET
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import compressor.flow.calib_eval
from compressor.cli import main
from compressor.flow.artifact import deployable_bytes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "digits_cnn.pt2"
CALIB = EXAMPLES / "digits_calib.npz"
EVAL = EXAMPLES / "digits_eval.npz"
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
#: The digits CNN: 3 Conv + 2 Linear.
LAYERS = 5

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino is not importable (pip install 'compressor[openvino]')")


class Run(NamedTuple):
    code: int
    stdout: str
    stderr: str
    outdir: Path
    manifest: dict[str, Any]
    junit: Path | None


def compress(outdir: Path, *args: Any, junit: Path | None = None) -> Run:
    """``compress MODEL --recipe int8 ... -o outdir`` in process; stdout/stderr captured."""
    argv = [MODEL, "--recipe", "int8", *args, "-o", outdir, "--latency-runs", "2"]
    if junit is not None:
        argv += ["--junit", junit]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):  # the CLI's log handler writes to sys.stderr
        code = main([str(a) for a in argv])
    manifest_path = outdir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return Run(code, out.getvalue(), err.getvalue(), outdir, manifest, junit)


def quantize_report(manifest: dict[str, Any]) -> dict[str, Any]:
    (report,) = [p for p in manifest["passes"] if p["name"] == "quantize"]
    return report["stats"]


def junit_failures(path: Path) -> list[ET.Element]:
    suite = ET.parse(path).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "1" and suite.get("errors") == "0"
    failures = suite.findall("./testcase/failure")
    assert suite.get("failures") == str(len(failures))
    return failures


def assert_files_hashed(run: Run, names: set[str]) -> None:
    files = run.manifest["files"]
    assert {f["path"] for f in files} == names
    for entry in files:
        data = (run.outdir / entry["path"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def assert_smaller_than_fp32(run: Run) -> None:
    size = deployable_bytes(run.manifest["files"])  # the artifact's size, as the summary counts it
    assert size < 0.5 * run.manifest["model"]["baseline_bytes"], (size, run.manifest["model"]["baseline_bytes"])


@pytest.fixture(scope="module", autouse=True)
def capture_once():
    """Export each model once per module; every call gets its own copy (the passes edit it)."""
    real = compressor.flow.calib_eval.capture
    done: dict[tuple[str, str], Any] = {}

    def capture(path, **kwargs):
        key = (str(path), repr(sorted(kwargs.items())))
        if key not in done:
            done[key] = real(path, **kwargs)
        first = done[key]
        model = ir.serde.deserialize_model(ir.serde.serialize_model(first.model))
        return dataclasses.replace(first, model=model, notes=list(first.notes))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compressor.flow.calib_eval, "capture", capture)
        yield


@pytest.fixture(scope="module")
def cosine_eval(tmp_path_factory) -> Path:
    """The eval images without labels: the metric becomes cosine fidelity to the fp32 model."""
    path = tmp_path_factory.mktemp("data") / "eval_no_labels.npz"
    with np.load(EVAL) as npz:
        np.savez(path, images=npz["images"])
    return path


# ---------------------------------------------------------------------------- target onnx


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("onnx")
    return compress(tmp / "out", "--target", "onnx", "--calib", CALIB, "--eval", EVAL, junit=tmp / "junit.xml")


def test_onnx_passes_with_int8_weights(onnx_run):
    m = onnx_run.manifest
    assert onnx_run.code == 0, onnx_run.stderr
    assert m["evaluation"]["metric"] == "top1" and m["evaluation"]["source"] == "eval file"
    assert m["metrics"]["baseline"]["top1"] > 0.97
    assert m["accuracy_drop"] <= 0.01
    assert m["gate"] == {"max_drop": 0.01, "passed": True}  # the recipe's budget
    assert m["accuracy_control"] is None  # within budget at once: nothing given back
    stats = quantize_report(m)
    assert stats["layers_quantized"] == LAYERS and stats["skipped_layers"] == {}

    model = onnx.load(onnx_run.outdir / "model.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    assert len(compute) == LAYERS
    for node in compute:  # every weight is DequantizeLinear(int8 initializer), zero point 0
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear", node.name
        assert inits[dq.input[0]].dtype == np.int8 and not inits[dq.input[2]].any()
        assert producers[node.input[0]].op_type == "DequantizeLinear"  # activation through Q/DQ
    float_weights = [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim >= 2]
    assert not float_weights, f"fp32 weights left in the artifact: {float_weights}"

    assert_files_hashed(onnx_run, {"model.onnx"})
    assert_smaller_than_fp32(onnx_run)
    assert "gate" in onnx_run.stdout and "PASS" in onnx_run.stdout


def test_junit_has_no_failure_on_success(onnx_run):
    assert junit_failures(onnx_run.junit) == []


# ---------------------------------------------------------------------------- target openvino


@pytest.fixture(scope="module")
def openvino_run(tmp_path_factory) -> Run:
    return compress(tmp_path_factory.mktemp("openvino") / "out", "--target", "openvino",
                    "--calib", CALIB, "--eval", EVAL)


@needs_openvino
def test_openvino_runs_every_compute_layer_int8(openvino_run):
    m = openvino_run.manifest
    assert openvino_run.code == 0, openvino_run.stderr
    assert m["target"]["name"] == "openvino"
    assert m["evaluation"]["metric"] == "top1" and m["accuracy_drop"] <= 0.01
    assert m["gate"]["passed"] is True
    runtime = m["runtime_layers"]
    assert runtime["int8"] == len(runtime["layers"]) == LAYERS  # what the compiled model really ran
    assert runtime["float"] == 0 and runtime["float_layers"] == []
    assert all(layer["precision"] in ("u8", "i8") for layer in runtime["layers"])
    # The IR stores the weights as i8 constants (one per layer), not f32.
    xml = ET.parse(openvino_run.outdir / "model.xml").getroot()
    i8 = [d for d in xml.iter("data") if d.get("element_type") == "i8"]
    assert len(i8) == LAYERS
    assert_files_hashed(openvino_run, {"model.xml", "model.bin"})
    assert_smaller_than_fp32(openvino_run)


# ---------------------------------------------------------------------------- the accuracy gate


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory, cosine_eval) -> Run:
    """A zero budget on cosine fidelity: no budget a quantized model can meet."""
    tmp = tmp_path_factory.mktemp("gate")
    return compress(tmp / "out", "--calib", CALIB, "--eval", cosine_eval, "--max-drop", "0", junit=tmp / "junit.xml")


def test_gate_fails_with_exit_3_and_writes_the_artifact(gate_run):
    m = gate_run.manifest
    assert gate_run.code == 3, gate_run.stderr
    assert (gate_run.outdir / "model.onnx").is_file() and m, "the artifact is written even when the gate fails"
    assert m["evaluation"]["metric"] == "cosine"
    assert m["gate"] == {"max_drop": 0.0, "passed": False}
    assert m["accuracy_drop"] > 0
    errors = [line for line in gate_run.stderr.splitlines() if "accuracy gate failed" in line]
    assert len(errors) == 1 and "gate.passed: false" in errors[0]

    control = m["accuracy_control"]
    assert control["action"] == "float" and control["budget_met"] is False
    assert control["ranking_backend"] == "onnxruntime"
    # max_fallback 0.5: at most int(0.5 * 5) = 2 layers may be tried, then it stops.
    steps = control["steps"]
    assert len(steps) - 1 == int(0.5 * LAYERS) == 2
    ranked = [r["layer"] for r in control["ranking"]]
    stats = quantize_report(m)
    assert sorted(ranked) == sorted([*stats["skipped_layers"], *stats["layers"]]), "every quantized layer is ranked"
    assert [s["layer"] for s in steps[1:]] == ranked[:2], "the most sensitive layers are tried first"
    sensitivities = [r["sensitivity"] for r in control["ranking"]]
    assert sensitivities == sorted(sensitivities, reverse=True)
    kept = [s for s in steps if s["kept"]]
    assert [s["layer"] for s in kept] == [None, *control["layers"]]
    assert [s["drop"] for s in kept] == sorted((s["drop"] for s in kept), reverse=True), "a kept step lowers the drop"
    assert all(s["drop"] >= kept[-1]["drop"] for s in steps), "a step that made it worse was undone"
    assert all(s["drop"] > 0 for s in steps)
    assert kept[-1]["drop"] == m["accuracy_drop"]
    # The artifact is the last kept step's model: the given-back layers are float in it.
    assert stats["layers_quantized"] == LAYERS - len(control["layers"])
    assert stats["skipped_layers"] == {name: "reverted by accuracy control" for name in control["layers"]}


def test_junit_has_a_failure_when_the_gate_fails(gate_run):
    (failure,) = junit_failures(gate_run.junit)
    assert "max_drop 0.0" in failure.get("message") and "accuracy drop" in failure.get("message")


def test_accuracy_control_meets_a_reachable_budget(gate_run, cosine_eval, tmp_path):
    """A budget between the fully quantized drop and the drop after one layer is given back.

    The zero-budget run recorded both (its steps); the same inputs give the same models
    and drops, so this budget is exceeded at first and met after one step.
    """
    steps = gate_run.manifest["accuracy_control"]["steps"]
    first, after_one = steps[0]["drop"], steps[1]["drop"]
    assert after_one < first, "giving back the most sensitive layer must reduce the drop"
    budget = (first + after_one) / 2
    run = compress(tmp_path / "out", "--calib", CALIB, "--eval", cosine_eval, "--max-drop", repr(budget),
                   junit=tmp_path / "junit.xml")
    m = run.manifest
    assert run.code == 0, run.stderr
    control = m["accuracy_control"]
    assert control["budget_met"] is True and m["gate"] == {"max_drop": budget, "passed": True}
    assert len(control["layers"]) >= 1
    kept = [s for s in control["steps"] if s["kept"]]
    assert [s["layer"] for s in kept] == [None, *control["layers"]]  # one more layer per kept step
    assert control["steps"][0]["drop"] == pytest.approx(first) and first > budget
    assert m["accuracy_drop"] == control["steps"][-1]["drop"] <= budget
    assert all(s["drop"] > budget for s in control["steps"][:-1]), "it stops as soon as the budget holds"
    tried = [s["layer"] for s in control["steps"][1:]]
    assert tried == [r["layer"] for r in control["ranking"]][: len(tried)]
    assert quantize_report(m)["layers_quantized"] == LAYERS - len(control["layers"])
    assert junit_failures(run.junit) == []


# ---------------------------------------------------------------------------- where eval data comes from


def test_without_eval_a_calibration_holdout_is_used(tmp_path):
    run = compress(tmp_path / "out", "--calib", CALIB)
    m = run.manifest
    assert run.code == 0, run.stderr
    ev = m["evaluation"]
    assert ev["source"] == "calibration holdout" and ev["verified"] is True
    # recipe holdout 0.2 of the 256 samples: the last 51 evaluate, the first 205 calibrate.
    assert ev["samples"] == 51 and m["calibration"]["samples"] == 205
    assert ev["data"].endswith("[205:256]")
    assert ev["metric"] == "cosine" and m["accuracy_drop"] <= 0.01
    assert "calibration holdout" in run.stdout


def test_without_any_data_the_accuracy_is_marked_unverified(tmp_path):
    run = compress(tmp_path / "out")
    m = run.manifest
    assert run.code == 0, run.stderr
    assert m["evaluation"]["verified"] is False
    assert m["evaluation"]["source"] == "random (unverified)" and m["calibration"]["source"] == "random"
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING") and "NO DATA" in line]
    assert len(warnings) == 1 and "NOT verified" in warnings[0]
    assert quantize_report(m)["layers_quantized"] == LAYERS
    # The recipe's budget is not judged on random inputs: neither passed nor failed.
    assert m["gate"]["passed"] is None and m["gate"]["reason"].startswith("accuracy unverified")
    assert m["accuracy_control"] is None
    assert "n/a (accuracy unverified" in run.stdout


def test_an_explicit_gate_without_data_fails_instead_of_passing_on_noise(tmp_path):
    run = compress(tmp_path / "out", "--max-drop", "0.5", junit=tmp_path / "gate.xml")
    assert run.code == 3, run.stderr
    m = run.manifest
    assert m["gate"] == {"max_drop": 0.5, "passed": False,
                         "reason": "accuracy unverified: no --calib or --eval data "
                                   "(random inputs say nothing about accuracy)"}
    assert m["accuracy_control"] is None and m["files"]  # the artifact is still written
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == ["ERROR: accuracy gate failed: accuracy unverified: no --calib or --eval data (random inputs "
                      "say nothing about accuracy); pass --calib or --eval with real samples (artifact written, "
                      "gate.passed: false)"]
    (failure,) = junit_failures(tmp_path / "gate.xml")
    assert failure.get("message").startswith("accuracy unverified")


@needs_openvino
def test_openvino_accuracy_control_ranks_in_onnxruntime_and_gates_on_openvino(cosine_eval, tmp_path,
                                                                           force_precision):
    """Ranking runs the Q/DQ models in ONNX Runtime (no OpenVINO compile per layer); every
    give-back step and the gate are measured on OpenVINO (on a device whose default is f32:
    a bf16 one pins f32 after control, ``test_openvino_precision.py``)."""
    force_precision("f32")
    run = compress(tmp_path / "out", "--target", "openvino", "--calib", CALIB, "--eval", cosine_eval,
                   "--max-drop", "0")
    m = run.manifest
    assert run.code == 3, run.stderr
    control = m["accuracy_control"]
    assert control["ranking_backend"] == "onnxruntime" and control["budget_met"] is False
    assert len(control["ranking"]) == LAYERS
    assert [s["layer"] for s in control["steps"][1:]] == [r["layer"] for r in control["ranking"]][:2]
    assert [s for s in control["steps"] if s["kept"]][-1]["drop"] == m["accuracy_drop"] > 0
    assert m["precision_fallback"] is None
    assert m["target"]["name"] == "openvino" and (run.outdir / "model.xml").is_file()


def test_a_drop_caused_by_pruning_is_named_and_not_blamed_on_quantization(tmp_path):
    """Pruning 90% then quantizing: the drop measured right after pruning already breaks the
    budget, so no quantized layer is given back and the report names the pruning pass."""
    recipe = tmp_path / "prune-then-int8.yaml"
    recipe.write_text("name: prune-then-int8\npasses:\n  - fold-constants\n  - fold-batchnorm\n"
                      "  - prune-magnitude: {sparsity: 0.9}\n  - quantize\n")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in [MODEL, "--recipe", recipe, "--calib", CALIB, "--eval", EVAL, "--max-drop",
                                      "0.01", "-o", tmp_path / "out", "--latency-runs", "1"]])
    assert code == 3, err.getvalue()
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    drops = {p["name"]: p["accuracy_drop"] for p in m["passes"]}
    assert drops["fold-constants"] is None and drops["fold-batchnorm"] is None, "exact passes are not measured"
    assert drops["prune-magnitude"] > 0.01 and drops["quantize"] == m["accuracy_drop"]
    assert m["accuracy_control"] is None, "giving quantized layers back cannot undo pruning"
    assert m["gate"]["passed"] is False and m["gate"]["reason"].startswith("the drop comes from prune-magnitude")
    assert "drop by pass" in out.getvalue() and "prune-magnitude" in out.getvalue()
    assert "the drop comes from prune-magnitude" in err.getvalue()
