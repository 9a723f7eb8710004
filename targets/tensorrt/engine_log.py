"""What TensorRT says, read: its logger, its parser and builder errors, its engine inspector.

TensorRT reports through an ``ILogger`` (:func:`capturing_logger` keeps the lines), through
``parser.get_error(i)`` objects and through the engine inspector's JSON. The functions here
turn those into what the target reports: ``(ONNX node, reason)`` offenders for exit 4
(:func:`parser_offenders`, :func:`builder_offenders`) and the per-layer kernel summary of
``build_log.json`` (:func:`summarize_engine_layers`). Apart from :func:`capturing_logger`,
which derives from ``trt.ILogger``, they are pure Python and unit-tested without TensorRT.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["capturing_logger", "parser_offenders", "builder_offenders", "summarize_engine_layers"]

logger = logging.getLogger(__name__)


def capturing_logger(trt: Any, lines: list[str], errors: list[str]) -> Any:
    """A ``trt.ILogger`` keeping INFO-and-worse messages in ``lines``, errors also in ``errors``."""
    class _Recorder(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR=0 < ERROR < WARNING < INFO < VERBOSE
            if level <= int(trt.ILogger.Severity.INFO):
                lines.append(f"[{getattr(severity, 'name', level)}] {msg}")
            if level <= int(trt.ILogger.Severity.ERROR):
                errors.append(msg)
                logger.debug("tensorrt: %s", msg)

    return _Recorder()


def parser_offenders(errors: Sequence[Any], node_names: Sequence[str], node_ops: Sequence[str] = ()
                     ) -> list[tuple[str, str]]:
    """``(ONNX node, reason)`` from TensorRT ONNX parser errors (``parser.get_error(i)``).

    Uses the error's ``node_name()``/``node_operator()`` where the TensorRT version has them,
    else its ``node()`` index into the graph's node list.
    """
    out = []
    for err in errors:
        name = _call(err, "node_name") or ""
        op = _call(err, "node_operator") or ""
        index = _call(err, "node")
        if not name and isinstance(index, int) and 0 <= index < len(node_names):
            name = node_names[index]
            op = op or (node_ops[index] if index < len(node_ops) else "")
        desc = str(_call(err, "desc") or err).strip()
        label = name or (f"node #{index}" if isinstance(index, int) and index >= 0 else "model")
        out.append((label, f"TensorRT's ONNX parser: {op + ': ' if op else ''}{desc}"))
    return out


def _call(obj: Any, attr: str) -> Any:
    fn = getattr(obj, attr, None)
    try:
        return fn() if callable(fn) else fn
    except Exception:  # an accessor this TensorRT version does not implement
        return None


def builder_offenders(messages: Sequence[str], node_names: Sequence[str]) -> list[tuple[str, str]]:
    """``(ONNX node, reason)`` from the builder's error log: each message naming a node is given to it.

    TensorRT names layers after the ONNX nodes they come from (``/layer1/conv/Conv``,
    often with a suffix); the longest node name found in a message wins.
    """
    names = sorted((n for n in node_names if n), key=len, reverse=True)
    out = []
    for message in messages:
        text = message.strip()
        hit = next((n for n in names if n in text), None)
        out.append((hit or "model", f"TensorRT builder: {text[:400]}"))
    return out or [("model", "TensorRT builder returned no engine and logged no error")]


_SPARSE_PICKED = re.compile(r"picks sparse implementation for layers?:?\s*(.*)", re.I)
_COMPUTE_LAYER = re.compile(r"conv|gemm|matmul|matrixmultiply|fullyconnected|deconv", re.I)


def summarize_engine_layers(info: str | Mapping[str, Any], log: Sequence[str] = ()) -> dict[str, Any]:
    """Per engine layer: type, tactic, whether it picked an int8 and a sparse kernel.

    Args:
        info: ``inspector.get_engine_information(LayerInformationFormat.JSON)`` (built
            with ``ProfilingVerbosity.DETAILED``).
        log: The builder's log lines; ``(Sparsity) TRT inference plan picks sparse
            implementation for layers: a, b`` names the layers given sparse kernels.
    """
    data = json.loads(info) if isinstance(info, str) else dict(info)
    sparse_named: set[str] = set()
    for line in log:
        match = _SPARSE_PICKED.search(line)
        if match:
            sparse_named.update(n.strip() for n in match.group(1).split(",") if n.strip())
    layers = []
    for layer in data.get("Layers", []):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity
            layer = {"Name": layer}
        name = str(layer.get("Name", ""))
        kind = str(layer.get("LayerType", layer.get("ParameterType", "")))
        tactic = str(layer.get("TacticName", layer.get("Tactic", "")))
        formats = " ".join(str(t.get("Format/Datatype", "")) for t in (*layer.get("Inputs", []),
                                                                        *layer.get("Outputs", []))
                           if isinstance(t, Mapping))
        int8 = "int8" in formats.lower() or bool(re.search(r"i8i8|int8", tactic, re.I))
        fp8 = "fp8" in formats.lower() or "e4m3" in tactic.lower()
        sparse = "sparse" in tactic.lower() or name in sparse_named
        layers.append({"name": name, "type": kind, "tactic": tactic, "int8": int8, "fp8": fp8, "sparse": sparse,
                       "compute": bool(_COMPUTE_LAYER.search(kind + " " + str(layer.get("ParameterType", ""))))})
    compute = [layer for layer in layers if layer["compute"]]
    return {
        "layers": len(layers),
        "compute_layers": len(compute),
        "int8": sum(layer["int8"] for layer in compute),
        "fp8": sum(layer["fp8"] for layer in compute),
        "sparse": sum(layer["sparse"] for layer in layers),
        "float_compute_layers": [layer["name"] for layer in compute if not (layer["int8"] or layer["fp8"])],
        "sparse_layers": sorted({layer["name"] for layer in layers if layer["sparse"]} | sparse_named),
        "per_layer": layers,
    }
