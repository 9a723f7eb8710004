"""Target ``tensorrt``: explicit-quantization (QDQ) ONNX built into a TensorRT engine on the GPU.

Three parts: the capabilities here (signed symmetric Q/DQ, per-channel weights, residual
Adds; :mod:`.qdq` states the six placement rules TensorRT's int8 fusions need
and checks them on the CPU), the engine build (:mod:`.engine`, reading what TensorRT says with
:mod:`.engine_log`), the runners (:mod:`.runtime`), and :class:`TensorRtTarget`, which ties
them together.

2:4 sparse weights (``sparsify-nm``) stay in place through quantization (zeros quantize to
0); when the lowered model's weights follow the 2:4 pattern along the input channels the
engine is built with ``BuilderFlag.SPARSE_WEIGHTS``.

Without a CUDA device or TensorRT the target still writes the TensorRT-ready QDQ ONNX and
its ``build_log.json`` (the placement check), measures accuracy of that model on ONNX
Runtime CPU with Q/DQ executed as written (graph optimizations at the basic level, so no
int8 kernel of the host CPU stands in for TensorRT's), warns, and the manifest says
``engine: not built`` with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from compressor.targets.base import (
    Capabilities,
    Runner,
    Target,
    check_capabilities,
)
from compressor.targets.tensorrt.engine import BuildSettings, build_engine, qdq_precision, tensorrt_status
from compressor.targets.tensorrt.engine_log import capturing_logger, parser_offenders
from compressor.targets.tensorrt.qdq import check_qdq_placement, nm_sparse_layers
from compressor.targets.tensorrt.runtime import QdqReferenceRunner, TensorRtRunner

from compressor.errors import CompressorError
from compressor.model_io import save_model
from compressor.quant.spec import OpQuant, QuantSpec
from compressor.strict_json import write_json

__all__ = ["TensorRtTarget", "TENSORRT_CAPABILITIES", "TENSORRT_FP8_CAPABILITIES"]

logger = logging.getLogger(__name__)

_INT8 = QuantSpec("int8", symmetric=True)
_FP8 = QuantSpec("float8e4m3fn", symmetric=True)


def _caps(act: QuantSpec) -> Capabilities:
    weights = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0, "MatMul": 1}  # axis is re-derived per node (rule 3)
    quantizable = {op: OpQuant(activations=act, weights=dataclasses.replace(act, axis=axis))
                   for op, axis in weights.items()}
    # Rule 5: residual Adds, both float inputs, no weight (passes/_placement: weights=None).
    quantizable["Add"] = OpQuant(activations=act, weights=None)
    return Capabilities(quantizable=quantizable, nm_patterns=((2, 4),), static_shapes=False)


#: INT8 explicit quantization as TensorRT fuses it (module docstring, rules 1-5).
TENSORRT_CAPABILITIES = _caps(_INT8)

#: FP8 (E4M3) Q/DQ (Hopper/Ada). Needs ``compressor.quant.statistics.quant_params`` to accept
#: ``float8e4m3fn`` (scale ``amax / 448``, zero point 0 as float8); not selectable from the CLI yet.
TENSORRT_FP8_CAPABILITIES = _caps(_FP8)


# --------------------------------------------------------------------------------------
# The target


class TensorRtTarget(Target):
    """NVIDIA GPU through TensorRT: QDQ ONNX -> engine; QDQ ONNX only where no GPU/TensorRT is present.

    Args:
        settings: How engines are built (profile ranges, FP16, workspace, timing cache).
    """

    name = "tensorrt"
    capabilities = TENSORRT_CAPABILITIES

    def __init__(self, settings: BuildSettings = BuildSettings()) -> None:
        self.settings = settings
        self.available, self.status = tensorrt_status()
        if not self.available:  # said once per target, before any work
            logger.warning("tensorrt: engine not built: %s. The TensorRT-ready QDQ ONNX (model.onnx) is written and "
                           "accuracy is measured on that model with ONNX Runtime CPU", self.status)

    def check(self, model: ir.Model) -> list[tuple[str, str]]:
        """The generic lint; with TensorRT present, also what its ONNX parser refuses (by node)."""
        offenders = check_capabilities(model, self.capabilities)
        if offenders or not self.available:
            return offenders
        import tempfile

        import tensorrt as trt

        with tempfile.TemporaryDirectory(prefix="compressor-trt-") as tmp:
            path = save_model(model, Path(tmp) / "model.onnx")
            lines: list[str] = []
            trt_logger = capturing_logger(trt, lines, [])
            network = trt.Builder(trt_logger).create_network(0)
            parser = trt.OnnxParser(network, trt_logger)
            if parser.parse(path.read_bytes(), str(path)):
                return []
            nodes = list(model.graph)
            return parser_offenders([parser.get_error(i) for i in range(parser.num_errors)],
                                    [n.name or "" for n in nodes], [n.op_type for n in nodes])

    def lower(self, model: ir.Model, outdir: Path) -> list[Path]:
        """``model.onnx`` (QDQ), ``build_log.json``, and ``model.engine`` where TensorRT and a GPU are present."""
        outdir.mkdir(parents=True, exist_ok=True)
        onnx_path = save_model(model, outdir / "model.onnx")
        findings = check_qdq_placement(model)
        for node, why in findings[:10]:
            logger.warning("tensorrt: Q/DQ placement: %s: %s", node, why)
        if len(findings) > 10:
            logger.warning("tensorrt: Q/DQ placement: %d more findings in build_log.json", len(findings) - 10)
        sparse = nm_sparse_layers(model)
        log: dict[str, Any] = {
            "qdq_placement": [{"node": n, "reason": r} for n, r in findings],
            "quantization": qdq_precision(model) or "none",
            "sparse_2_4_layers": sparse,
        }
        files = [onnx_path]
        if self.available:
            build = build_engine(model, onnx_path, outdir / "model.engine", settings=self.settings)
            log.update({"engine": {"built": True, "status": "built", "file": build.engine.name},
                        "flags": build.flags, "profile": build.profile, "build_s": build.build_s,
                        "timing_cache": build.timing_cache, "layers": build.layers, "builder_log": build.log})
            files.append(build.engine)
            logger.info("tensorrt: engine built in %.1fs (%s): %d/%d compute layers int8, %d sparse", build.build_s,
                        "+".join(build.flags) or "fp32", build.layers["int8"], build.layers["compute_layers"],
                        build.layers["sparse"])
        else:
            log["engine"] = {"built": False, "status": "not built", "reason": self.status}
        build_log = outdir / "build_log.json"
        write_json(build_log, log, indent=1, sort_keys=False)
        return files + [build_log]

    def deployable(self, files: list[Path]) -> list[Path]:
        """The engine (``model.engine``) where one was built, else the TensorRT-ready QDQ ONNX
        (``model.onnx``, what a machine with a GPU builds its engine from).

        ``build_log.json``, and ``model.onnx`` next to an engine, are companions.
        """
        engines = [f for f in files if f.suffix == ".engine"]
        return engines or [f for f in files if f.suffix == ".onnx"]

    def runner(self, files: list[Path]) -> Runner:
        """The engine's runner, else the QDQ ONNX's; either carries the lowering's ``build_log.json``."""
        logs = [f for f in files if f.name == "build_log.json"]
        build_log = json.loads(logs[0].read_text(encoding="utf-8")) if logs else {}
        engines = [f for f in files if f.suffix == ".engine"]
        if engines:
            return TensorRtRunner(engines[0], build_log=build_log)
        onnx_files = [f for f in files if f.suffix == ".onnx"]
        if not onnx_files:
            raise CompressorError("tensorrt: no .engine or .onnx among the lowered files")
        return QdqReferenceRunner(onnx_files[0], build_log=build_log)

    def reference_runner(self, model: ir.Model, workdir: Path) -> Runner:
        """The fp32 baseline: an fp32 engine on the GPU, else ONNX Runtime CPU."""
        workdir.mkdir(parents=True, exist_ok=True)
        path = save_model(model, workdir / "model.onnx")
        if self.available:
            build = build_engine(model, path, workdir / "model.engine",
                                 settings=dataclasses.replace(self.settings, fp16=False), precision="fp32")
            return TensorRtRunner(build.engine)
        return QdqReferenceRunner(path)

    def report(self, runner: Runner, samples: Iterable[Mapping[str, np.ndarray]] = ()) -> dict[str, Any]:
        """``engine``: built or not (and why); ``tensorrt``: placement findings, per-layer kernels.

        Read from the ``build_log.json`` the runner was built with (``samples`` are not needed).
        """
        log = getattr(runner, "build_log", None) or {}
        out: dict[str, Any] = {"engine": log.get("engine", {"built": False, "status": "not built",
                                                             "reason": "nothing was lowered"})}
        info: dict[str, Any] = {
            "qdq_placement_findings": len(log.get("qdq_placement", [])),
            "qdq_placement": log.get("qdq_placement", [])[:50],
            "quantization": log.get("quantization"),
            "sparse_2_4_layers": log.get("sparse_2_4_layers", []),
        }
        if isinstance(runner, TensorRtRunner):
            layers = dict(log.get("layers", {}))
            layers.pop("per_layer", None)
            info.update({"flags": log.get("flags"), "profile": log.get("profile"), "build_s": log.get("build_s"),
                         "kernels": layers})
        else:
            info["accuracy_measured_on"] = "model.onnx on ONNX Runtime CPU (Q/DQ executed as written)"
        out["tensorrt"] = info
        return out

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "engine_build": self.available,
                                "settings": {k: (str(v) if isinstance(v, Path) else v)
                                             for k, v in dataclasses.asdict(self.settings).items()}}
        if self.available:
            info["device"] = self.status
        else:
            info["engine_not_built_because"] = self.status
        return info
