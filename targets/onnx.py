"""Target ``onnx``: portable (QDQ) ONNX run by ONNX Runtime on the CPU; the reference.

Lowering writes ``model.onnx`` with an IR version ONNX Runtime reads. The check asks
ONNX Runtime itself whether it has a kernel for every node, so an op it cannot run is
reported (exit 4) with the node's name before anything is written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from compressor.model_io import model_bytes, save_model
from compressor.targets.base import (
    Capabilities,
    OpQuant,
    QuantSpec,
    Runner,
    Target,
    check_capabilities,
    cpu_has_vnni,
    narrow_weights,
)

__all__ = ["OnnxTarget", "OrtRunner", "ort_session"]

logger = logging.getLogger(__name__)

_INT8_ACT = QuantSpec("uint8", symmetric=False)
_INT8_W = QuantSpec("int8", symmetric=True, axis=0)

#: Ops whose inputs ONNX Runtime's CPU kernels run in int8 when wrapped in Q/DQ.
ONNX_CAPABILITIES = Capabilities(
    quantizable={
        "Conv": OpQuant(activations=_INT8_ACT, weights=_INT8_W),
        "ConvTranspose": OpQuant(activations=_INT8_ACT, weights=QuantSpec("int8", True, axis=1)),
        "Gemm": OpQuant(activations=_INT8_ACT, weights=QuantSpec("int8", True, axis=0)),
        "MatMul": OpQuant(activations=_INT8_ACT, weights=QuantSpec("int8", True, axis=1)),
    },
    nm_patterns=(),
    static_shapes=False,
)

_NOT_IMPLEMENTED = re.compile(r"Could not find an implementation for (\S+) node with name '([^']*)'")


def ort_session(model_or_path: ir.Model | str | Path, *, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session, quiet and deterministic in its graph optimizations."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    source = model_bytes(model_or_path) if isinstance(model_or_path, ir.Model) else str(model_or_path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


class OrtRunner(Runner):
    """Runs an ``.onnx`` file on ONNX Runtime CPU."""

    def __init__(self, path: Path, threads: int | None = None):
        self.session = ort_session(path, threads=threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})


class OnnxTarget(Target):
    """ONNX Runtime CPU: the portable reference target."""

    name = "onnx"
    capabilities = ONNX_CAPABILITIES

    def __init__(self) -> None:
        if cpu_has_vnni() is False:  # MLAS's AVX2 u8s8 kernels saturate: 7-bit weights (reduce_range)
            self.capabilities = narrow_weights(ONNX_CAPABILITIES, set(ONNX_CAPABILITIES.quantizable))

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "onnxruntime_version": ort.__version__, "int8_vnni": cpu_has_vnni()}

    def check(self, model: ir.Model) -> list[tuple[str, str]]:
        offenders = check_capabilities(model, self.capabilities)
        if offenders:
            return offenders
        try:
            ort_session(model)
        except Exception as err:  # ORT raises its own exception types; read the message
            text = str(err)
            match = _NOT_IMPLEMENTED.search(text)
            if match:
                return [(match.group(2) or match.group(1), f"ONNX Runtime has no CPU kernel for {match.group(1)}")]
            first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            return [("model", f"ONNX Runtime cannot load it: {first[:300]}")]
        return []

    def lower(self, model: ir.Model, outdir: Path) -> list[Path]:
        outdir.mkdir(parents=True, exist_ok=True)
        return [save_model(model, outdir / "model.onnx")]

    def runner(self, files: list[Path]) -> Runner:
        onnx_files = [f for f in files if f.suffix == ".onnx"]
        return OrtRunner(onnx_files[0])
