"""The systems the zoo benchmark compares, and how each one's artifact is run.

``compress`` in a subprocess (ours), ONNX Runtime's ``quantize_static`` / QNN flow and
NNCF (the rivals, in-process, a crash recorded as the row's result), the original model in
the target's backend (the fp32 reference), and a runner for every artifact. Used by
``tools/bench_zoo.py``, which scores and times them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from data import ZooModel

logger = logging.getLogger("bench_zoo")
ZOO = Path(__file__).resolve().parent

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


def err_text(err: BaseException) -> str:
    """An exception in one line: its type and first informative lines (OpenVINO's come after a 'Check' line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith("Check '")]
    return f"{type(err).__name__}: {' / '.join(lines[:3])}"[:240]


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def feeds(model_file: Path, folder: Path, split: str) -> list[dict[str, np.ndarray]]:
    """Per-sample feeds of a data file, one model call each (batch 1).

    Read from the ONNX file itself, not through compressor's loader: the rivals and the
    fp32 reference must run even where compressor cannot import the model.
    """
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in proto.graph.input if i.name not in init}
    data = load_npz(folder / f"{split}.npz")
    n = len(next(iter(data.values())))
    return [{k: (np.asarray(v[i]) if v.ndim == ranks[k] + 1 else v[i:i + 1]) for k, v in data.items() if k in ranks}
            for i in range(n)]


# --- the systems ---------------------------------------------------------------------------


def run_compressor(zm: ZooModel, target: str, folder: Path, dest: Path, state_dict: bool = False,
                   max_drop: float | None = None) -> dict[str, Any]:
    """``compress`` in a subprocess; returns rc, reason, seconds and the artifact folder.

    ``max_drop`` replaces the recipe's budget (``--max-drop``; a large one measures the
    recipe's artifact as it comes, without accuracy control).
    """
    cmd = [sys.executable, "-c", "import sys; from compressor.cli import main; sys.exit(main())"]
    env = dict(os.environ)
    calib, evald = folder / "calib.npz", folder / "eval.npz"
    if state_dict:
        from fetch import model_path

        # the module's forward(x): the data keyed by that name, its shape given with --input
        dest.parent.mkdir(parents=True, exist_ok=True)
        calib, evald = dest.parent / "calib_x.npz", dest.parent / "eval_x.npz"
        for src, dst in ((folder / "calib.npz", calib), (folder / "eval.npz", evald)):
            np.savez(dst, x=next(iter(load_npz(src).values())))
        cmd += [str(model_path(zm.state_dict)), "--model-class", "crepe:Crepe", "--model-kwargs", zm.model_kwargs,
                "--input", "x=?x1024" if target != "qnn-htp" else "x=1x1024"]
        env["PYTHONPATH"] = os.pathsep.join([str(ZOO), env.get("PYTHONPATH", "")])
    else:
        cmd += [str(zm.path())]
        if target in STATIC_TARGETS:
            for spec in zm.static_inputs:
                cmd += ["--input", spec]
            for spec in zm.frozen:
                cmd += ["--freeze", spec]
    recipe = zm.htp_recipe if target == "qnn-htp" and zm.htp_recipe else RECIPES[target]
    cmd += ["--recipe", recipe, "--target", target, "--calib", str(calib), "--eval", str(evald),
            "-o", str(dest), "-q"]
    if max_drop is not None:
        cmd += ["--max-drop", str(max_drop)]
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


def _calib_reader(samples: list[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

        def rewind(self) -> None:
            self.it = iter(samples)

    return Reader()


def _static_shapes(zm: ZooModel) -> dict[str, list[int]]:
    """``{input: shape}`` from the model's ``--input`` specs (``name=1x576``)."""
    return {spec.split("=")[0]: [int(d) for d in spec.split("=")[1].split(":")[0].split("x")]
            for spec in zm.static_inputs}


def source(zm: ZooModel, target: str, work: Path) -> Path:
    """The ONNX file the rival (and on ``openvino`` the fp32 reference) start from on ``target``.

    The model itself, or, where compressor gets ``--freeze`` (``ZooModel.frozen``), that
    model with the same static shapes and frozen inputs, folded by compressor's own
    ``apply_freeze``, so that every system starts from the same graph (silero-vad's ``If``
    on ``sr`` and those on the state's shape are gone). Written anew on every call.
    (On ``qnn-htp`` the fp32 reference is the model itself on ONNX Runtime CPU, fed ``sr``.)
    """
    if target not in STATIC_TARGETS or not zm.frozen:
        return zm.path()
    from compressor.flow.calib_eval import apply_freeze
    from compressor.inputs import apply_input_overrides, parse_freeze, parse_input_overrides
    from compressor.model_io import load_onnx, save_model

    model = load_onnx(zm.path())
    apply_input_overrides(model, parse_input_overrides(zm.static_inputs))
    apply_freeze(model, parse_freeze(zm.frozen))
    work.mkdir(parents=True, exist_ok=True)
    return save_model(model, work / "frozen.onnx")


def _ov_model(zm: ZooModel, path: Path):
    """``path`` converted by OpenVINO, its inputs fixed to the same static shapes compressor gets."""
    import openvino as ov

    return ov.convert_model(str(path), input=_static_shapes(zm) or None)


def _fix_shapes(src: Path, dest: Path, static: dict[str, list[int]]) -> Path:
    """A copy of the model with the given inputs' shapes fixed (ONNX Runtime's own tool), for ORT's QNN flow."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import (
        fix_output_shapes,
        make_input_shape_fixed,
    )

    proto = onnx.load(str(src))
    for name, shape in static.items():
        # a dim named "?" (paddle2onnx's H and W) is no symbol: ORT's tool would give every "?" in
        # the graph the first such axis's size ("Can't replace existing fixed size of 48 with 192")
        for value in proto.graph.input:
            if value.name == name:
                for dim, size in zip(value.type.tensor_type.shape.dim, shape):
                    if dim.dim_param in ("?", "-1"):
                        dim.Clear()
                        dim.dim_value = size
        make_input_shape_fixed(proto.graph, name, shape)
    fix_output_shapes(proto)
    # ORT 1.32's qnn_preprocess_model crashes on any metadata_props ("cannot convert dictionary
    # update sequence element #0": it dict-updates from the repeated proto field); PP-OCR's
    # recogniser carries its charset there, nudenet ultralytics' class names. Not computation.
    del proto.metadata_props[:]
    onnx.save(proto, str(dest))
    return dest


def run_rival(zm: ZooModel, target: str, folder: Path, dest: Path) -> dict[str, Any]:
    """The target's usual alternative, in-process; a crash is recorded, not raised."""
    dest.mkdir(parents=True, exist_ok=True)
    src_model = source(zm, target, dest.parent)
    calib = feeds(src_model, folder, "calib")
    start = time.perf_counter()
    try:
        if target == "onnx":
            from onnxruntime.quantization import QuantFormat, quantize_static
            from onnxruntime.quantization.shape_inference import quant_pre_process

            src, out = dest / "pre.onnx", dest / "model.onnx"
            try:  # the pre-processing ONNX Runtime's docs ask for (shape inference, graph optimisation);
                # in dest: where its symbolic shape inference fails it leaves a temporary model in the cwd
                absolute, model = src.resolve(), zm.path().resolve()  # before the chdir: a relative cache
                with contextlib.chdir(dest):
                    quant_pre_process(str(model), str(absolute))
            except Exception as err:  # noqa: BLE001
                logger.warning("ORT quant_pre_process failed (%s); quantizing the model as it is", err)
                src = zm.path()
            quantize_static(str(src), str(out), _calib_reader(calib), quant_format=QuantFormat.QDQ, per_channel=True)
        elif target == "openvino":
            import nncf
            import openvino as ov

            q = nncf.quantize(_ov_model(zm, src_model), nncf.Dataset(calib), subset_size=len(calib))
            out = dest / "model.xml"
            ov.save_model(q, str(out), compress_to_fp16=False)
        elif target == "qnn-htp":
            from onnxruntime.quantization import QuantType, quantize
            from onnxruntime.quantization.execution_providers.qnn import (
                get_qnn_qdq_config,
                qnn_preprocess_model,
            )

            fixed = _fix_shapes(src_model, dest / "fixed.onnx", _static_shapes(zm))
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
        return {"rc": 1, "reason": err_text(err),
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
        ov.save_model(_ov_model(zm, source(zm, target, work)), str(xml), compress_to_fp16=False)
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


class Renamed:
    """A runner whose inputs the zoo's data names differently (the state_dict route's ``x``)."""

    def __init__(self, runner, names: dict[str, str]):
        self.runner, self.names = runner, names
        self.input_names = [next((k for k, v in names.items() if v == n), n) for n in runner.input_names]
        self.output_names = list(getattr(runner, "output_names", []))

    def __call__(self, feeds):
        return self.runner({self.names.get(k, k): v for k, v in feeds.items()})
