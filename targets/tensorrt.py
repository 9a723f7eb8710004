"""Target ``tensorrt``: explicit-quantization (QDQ) ONNX built into a TensorRT engine on the GPU.

TensorRT 10.x/11.x builds INT8 engines only from ONNX that already carries Q/DQ
(explicit quantization), so where the Q/DQ pairs sit decides which layers run int8. The
rules TensorRT's fusions need (what :data:`TENSORRT_CAPABILITIES` asks the ``quantize``
pass for, and what :func:`check_qdq_placement` verifies):

1. Q/DQ are signed and symmetric: int8 with zero point 0 (TensorRT rejects uint8 Q/DQ and
   non-zero zero points); FP8 E4M3 with zero point 0 is the option for Hopper/Ada GPUs;
2. every Conv/ConvTranspose/MatMul/Gemm whose weight is read through ``DequantizeLinear``
   also has its activation input(s) produced by ``DequantizeLinear``: TensorRT fuses
   ``DQ(x), DQ(W) -> Conv -> Q`` into one int8 kernel; a float activation leaves the layer
   in float with an extra dequantize of the weight;
3. weights per output channel: Conv axis 0 (``W: O x I/g x kH x kW``), ConvTranspose
   axis 1, Gemm axis 0 for ``transB=1`` / 1 for ``transB=0``, MatMul the last axis
   (``W: K x N``); the scale has one entry per output channel;
4. no Q/DQ on tensors computed only from integer inputs (attention masks, shape and index
   paths): TensorRT cannot quantize them usefully and a mask scaled to ``finfo.min``
   saturates;
5. a residual ``Add`` reading a quantized layer has *both* inputs quantized, so TensorRT
   fuses the Add into that layer's int8 epilogue (the ResNet/BERT pattern of NVIDIA's
   ``pytorch-quantization``); otherwise the report says which input is float and why;
6. each ``DequantizeLinear`` of an activation reads a ``QuantizeLinear`` with the same
   scale and zero point (a mismatched pair is not folded).

2:4 sparse weights (``sparsify-nm``) stay in place through quantization (zeros quantize to
0); when the lowered model's weights follow the 2:4 pattern along the input channels the
engine is built with ``BuilderFlag.SPARSE_WEIGHTS``.

Engine build (:func:`build_engine`, GPU and the ``tensorrt`` package only): ONNX parser
(its errors name the ONNX node), builder config with INT8 (+FP16 for the layers left
float) when the model holds Q/DQ, SPARSE_WEIGHTS when the weights are 2:4, a timing cache
persisted between builds (:func:`timing_cache_path`), one optimization profile from the
input shapes (``--input`` fixes them; :func:`profile_shapes`), and detailed profiling
verbosity so the engine inspector reports per layer whether it picked an int8 and a
sparse kernel (``build_log.json``). The artifact holds ``model.engine``, the QDQ
``model.onnx`` and ``build_log.json``.

Without a CUDA device or TensorRT the target still writes the TensorRT-ready QDQ ONNX and
its ``build_log.json`` (the placement check), measures accuracy of that model on ONNX
Runtime CPU with Q/DQ executed as written (graph optimizations at the basic level, so no
int8 kernel of the host CPU stands in for TensorRT's), warns, and the manifest says
``engine: not built`` with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor.errors import CompressorError, DataError, UnsupportedByTarget
from compressor.inputs import InputSpec, model_input_specs
from compressor.model_io import save_model
from compressor.passes._placement import integer_derived, output_channel_axis
from compressor.targets.base import Capabilities, OpQuant, QuantSpec, Runner, Target, check_capabilities

__all__ = [
    "TensorRtTarget",
    "TensorRtRunner",
    "QdqReferenceRunner",
    "BuildSettings",
    "EngineBuild",
    "TENSORRT_CAPABILITIES",
    "TENSORRT_FP8_CAPABILITIES",
    "tensorrt_status",
    "check_qdq_placement",
    "nm_sparse_layers",
    "profile_shapes",
    "parser_offenders",
    "builder_offenders",
    "summarize_engine_layers",
    "timing_cache_path",
    "build_engine",
]

logger = logging.getLogger(__name__)

_INT8 = QuantSpec("int8", symmetric=True)
_FP8 = QuantSpec("float8e4m3fn", symmetric=True)


def _caps(act: QuantSpec) -> Capabilities:
    weights = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0, "MatMul": 1}  # axis is re-derived per node (rule 3)
    quantizable = {op: OpQuant(activations=act, weights=dataclasses.replace(act, axis=axis))
                   for op, axis in weights.items()}
    # Rule 5: residual Adds, both float inputs, no weight (passes/_placement: weights=None).
    quantizable["Add"] = OpQuant(activations=act, weights=None)
    return Capabilities(quantizable=quantizable, nm_patterns=((2, 4),), static_shapes=False, min_opset=13)


#: INT8 explicit quantization as TensorRT fuses it (module docstring, rules 1-5).
TENSORRT_CAPABILITIES = _caps(_INT8)

#: FP8 (E4M3) Q/DQ (Hopper/Ada). Needs ``compressor.calibration.quant_params`` to accept
#: ``float8e4m3fn`` (scale ``amax / 448``, zero point 0 as float8); not selectable from the CLI yet.
TENSORRT_FP8_CAPABILITIES = _caps(_FP8)

_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_SIGNED_QDQ = frozenset({ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN})
_BIAS_LIKE = frozenset({"Add", "Sub", "Mul", "Div"})
_PASS_THROUGH = frozenset({"Relu", "Identity"})


# --------------------------------------------------------------------------------------
# Availability


@functools.lru_cache(maxsize=1)
def tensorrt_status() -> tuple[bool, str]:
    """``(True, device name)`` when an engine can be built here, else ``(False, why not)``."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "the tensorrt Python package is not installed (pip install tensorrt; needs an NVIDIA GPU)"
    except Exception as err:  # a broken install (missing libnvinfer) raises OSError and friends
        return False, f"the tensorrt package cannot be imported: {err}"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed; the TensorRT runner keeps its buffers in torch CUDA tensors"
    if not torch.cuda.is_available():
        return False, f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return True, f"{torch.cuda.get_device_name(0)}, TensorRT {trt.__version__}"


# --------------------------------------------------------------------------------------
# Structural checks (CPU)


def _label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}->{node.outputs[0].name if node.outputs else '?'}"


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op else None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _is_const(value: ir.Value | None) -> bool:
    return value is None or _const(value) is not None


def _quantized_layer(node: ir.Node) -> ir.Node | None:
    """The DQ reading a constant weight of compute ``node`` (its weight is quantized), else None."""
    if node.op_type not in _COMPUTE or len(node.inputs) < 2:
        return None
    dq = _producer(node.inputs[1], "DequantizeLinear")
    return dq if dq is not None and _is_const(dq.inputs[0]) else None


def _source_layer(value: ir.Value | None, limit: int = 8) -> ir.Node | None:
    """The quantized compute node ``value`` comes from, through Q/DQ, bias ops and Relu."""
    for _ in range(limit):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if _quantized_layer(node) is not None:
            return node
        if node.op_type in _QDQ or node.op_type in _PASS_THROUGH:
            value = node.inputs[0]
        elif node.op_type in _BIAS_LIKE and len(node.inputs) == 2 and _is_const(node.inputs[1]):
            value = node.inputs[0]
        elif node.op_type in _BIAS_LIKE and len(node.inputs) == 2 and _is_const(node.inputs[0]):
            value = node.inputs[1]
        else:
            return None
    return None


def _masked(value: ir.Value | None, masks: Mapping[str, str]) -> bool:
    """``value`` is an integer-derived tensor, or its Q/DQ'd copy."""
    for _ in range(3):
        if value is None:
            return False
        if value.name in masks:
            return True
        node = value.producer()
        if node is None or node.op_type not in _QDQ:
            return False
        value = node.inputs[0]
    return False


def _why_float(value: ir.Value, masks: Mapping[str, str]) -> str:
    if value.name in masks:
        return f"it derives only from integer input {masks[value.name]!r} (mask/shape path; float by design)"
    if value.dtype not in _FLOATS:
        return f"it is {value.dtype}, not floating point"
    return "it has no Q/DQ (give the Add to the quantize pass, or it was reverted by accuracy control)"


def check_qdq_placement(model: ir.Model) -> list[tuple[str, str]]:
    """``(node, reason)`` for each place where the Q/DQ layout blocks a TensorRT int8 fusion.

    The rules are the module docstring's 1-6. An empty list means TensorRT can run every
    quantized layer with int8 kernels (whether it does is read from the engine).
    """
    graph = model.graph
    masks = integer_derived(graph)
    out: list[tuple[str, str]] = []
    for node in graph:
        label = _label(node)
        if node.op_type in _QDQ:  # rule 1: signed, symmetric
            zp = node.inputs[2] if len(node.inputs) > 2 else None
            if zp is None:
                out.append((label, f"{node.op_type} has no zero point, so ONNX makes it uint8; TensorRT takes "
                                   "only signed int8 (or FP8) Q/DQ with zero point 0"))
            else:
                zp_value = _const(zp)
                if zp.dtype not in _SIGNED_QDQ:
                    kind = str(getattr(zp.dtype, "name", zp.dtype)).lower()
                    out.append((label, f"{node.op_type} is {kind}; TensorRT takes only int8 or FP8 E4M3 "
                                       "Q/DQ (symmetric, zero point 0)"))
                elif zp_value is not None and np.any(zp_value.astype(np.float32) != 0):
                    out.append((label, f"{node.op_type} has a non-zero zero point "
                                       f"({np.unique(zp_value.astype(np.float32))[:4].tolist()}); TensorRT needs "
                                       "symmetric quantization (zero point 0)"))
            if node.op_type == "QuantizeLinear" and node.inputs[0] is not None and node.inputs[0].name in masks:
                out.append((label, f"Q/DQ on {node.inputs[0].name!r}, which derives only from integer input "
                                   f"{masks[node.inputs[0].name]!r} (mask/shape path): keep it float"))
            if node.op_type == "DequantizeLinear" and not _is_const(node.inputs[0]):  # rule 6
                q = _producer(node.inputs[0], "QuantizeLinear")
                if q is None:
                    out.append((label, "DequantizeLinear of an activation that no QuantizeLinear produced"))
                elif not _same_params(q, node):
                    out.append((label, f"scale/zero point differ from its QuantizeLinear {_label(q)!r}: "
                                       "TensorRT cannot fold the pair"))
            continue
        w_dq = _quantized_layer(node)
        if node.op_type in _COMPUTE:
            acts = [(i, v) for i, v in enumerate(node.inputs[:2]) if v is not None and not _is_const(v)
                    and (i == 0 or node.op_type == "MatMul") and _producer(v, "DequantizeLinear") is not w_dq]
            float_acts = [v for _, v in acts if _producer(v, "DequantizeLinear") is None]
            if w_dq is not None and float_acts:  # rule 2
                out.append((label, f"weight is quantized but activation {float_acts[0].name!r} is not "
                                   f"(no DequantizeLinear before {node.op_type}): TensorRT runs it in float"))
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if w_dq is None and acts and not float_acts and weight is not None and _is_const(weight):
                out.append((label, f"activation is quantized but the weight {node.inputs[1].name!r} is float: "
                                   "TensorRT cannot run an int8 kernel with a float weight"))
            if w_dq is not None:  # rule 3
                out.extend(_weight_axis_findings(node, w_dq))
        elif (node.op_type == "Add" and len(node.inputs) == 2 and not any(_is_const(v) for v in node.inputs)
              and not any(_masked(v, masks) for v in node.inputs)):  # an attention-mask Add is no residual
            sources = [_source_layer(v) for v in node.inputs]
            quantized = [_producer(v, "DequantizeLinear") is not None for v in node.inputs]
            if any(sources) and not all(quantized):  # rule 5
                layer = next(s for s in sources if s is not None)
                missing = next(v for v, q in zip(node.inputs, quantized) if not q)
                out.append((label, f"residual Add after quantized layer {_label(layer)!r}: input {missing.name!r} "
                                   f"is not quantized ({_why_float(missing, masks)}); TensorRT cannot fuse the "
                                   "Add into the layer's int8 kernel"))
    return out


def _same_params(q: ir.Node, dq: ir.Node) -> bool:
    for i in (1, 2):
        a = q.inputs[i] if len(q.inputs) > i else None
        b = dq.inputs[i] if len(dq.inputs) > i else None
        if a is b:
            continue
        va, vb = _const(a), _const(b)
        if va is None or vb is None or va.shape != vb.shape or not np.array_equal(va, vb):
            return False
    return True


def _weight_axis_findings(node: ir.Node, dq: ir.Node) -> list[tuple[str, str]]:
    weight = _const(dq.inputs[0])
    scale = _const(dq.inputs[1]) if len(dq.inputs) > 1 else None
    if weight is None or scale is None:
        return []
    label = _label(node)
    want = output_channel_axis(node, weight.ndim)
    if node.op_type == "ConvTranspose":
        group = node.attributes.get("group")
        channels = weight.shape[1] * (group.as_int() if group is not None else 1)
    else:
        channels = weight.shape[want]
    if scale.size == 1:
        return [(label, f"weight {dq.inputs[0].name!r} has one scale (per tensor); TensorRT keeps more accuracy "
                        f"per output channel (axis {want}, {channels} scales)")]
    axis_attr = dq.attributes.get("axis")
    axis = (axis_attr.as_int() if axis_attr is not None else 1) % max(weight.ndim, 1)
    if axis != want or scale.size != weight.shape[want]:
        return [(label, f"weight {dq.inputs[0].name!r} is quantized per channel along axis {axis} "
                        f"({scale.size} scales); TensorRT needs the output-channel axis {want} "
                        f"({weight.shape[want]} scales)")]
    return []


def _reduction_rows(node: ir.Node, w: np.ndarray) -> np.ndarray | None:
    """Rows of consecutive input channels, the order TensorRT's sparse kernels read 2:4 groups in."""
    if node.op_type == "Conv" and w.ndim >= 3:
        return np.moveaxis(w, 1, -1).reshape(-1, w.shape[1])
    if node.op_type == "Gemm" and w.ndim == 2:
        return w if output_channel_axis(node, 2) == 0 else w.T
    if node.op_type == "MatMul" and w.ndim == 2:
        return w.T
    return None


def nm_sparse_layers(model: ir.Model, n: int = 2, m: int = 4) -> list[str]:
    """Compute nodes whose (quantized or float) weight has at most ``n`` non-zeros per ``m`` input channels."""
    found = []
    for node in model.graph:
        if node.op_type not in _COMPUTE or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        source = node.inputs[1]
        dq = _producer(source, "DequantizeLinear")
        w = _const(dq.inputs[0]) if dq is not None else _const(source)
        rows = _reduction_rows(node, w) if w is not None else None
        if rows is None or rows.shape[1] < m or rows.shape[1] % m:
            continue
        groups = (rows.reshape(rows.shape[0], -1, m) != 0).sum(axis=-1)
        if groups.max(initial=0) <= n:
            found.append(_label(node))
    return found


# --------------------------------------------------------------------------------------
# Engine build helpers (pure Python: unit-tested without TensorRT)


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """How engines are built.

    Attributes:
        batch: ``(min, opt, max)`` of a dynamic batch axis (axis 0) in the optimization profile.
        other: ``(min, opt, max)`` of any other dynamic axis (sequence length...).
        fp16: Allow FP16 kernels (for an int8 model: the layers left float; for an fp32
            model: an FP16 engine).
        workspace_mb: Builder workspace memory pool.
        timing_cache: Where the timing cache persists (``None``: :func:`timing_cache_path`).
    """

    batch: tuple[int, int, int] = (1, 16, 64)
    other: tuple[int, int, int] = (1, 128, 512)
    fp16: bool = True
    workspace_mb: int = 4096
    timing_cache: Path | None = None


def profile_shapes(specs: Sequence[InputSpec], settings: BuildSettings = BuildSettings()
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``{input: (min, opt, max)}`` of one optimization profile; static axes keep their size.

    Raises:
        CompressorError: a ``(min, opt, max)`` setting that is not ordered.
    """
    for what, triple in (("batch", settings.batch), ("other", settings.other)):
        if not 1 <= triple[0] <= triple[1] <= triple[2]:
            raise CompressorError(f"tensorrt: profile range {what}={triple} must satisfy 1 <= min <= opt <= max")
    shapes = {}
    for spec in specs:
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(spec.shape):
            triple = (dim, dim, dim) if isinstance(dim, int) else settings.batch if axis == 0 else settings.other
            lo.append(triple[0])
            opt.append(triple[1])
            hi.append(triple[2])
        shapes[spec.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


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


def timing_cache_path(settings: BuildSettings = BuildSettings()) -> Path:
    """Where the timing cache persists: ``settings.timing_cache``, ``$COMPRESSOR_TRT_TIMING_CACHE``,
    else ``~/.cache/compressor/tensorrt.timing-cache``."""
    if settings.timing_cache is not None:
        return Path(settings.timing_cache)
    env = os.environ.get("COMPRESSOR_TRT_TIMING_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "compressor" / "tensorrt.timing-cache"


def _has_qdq(model: ir.Model) -> str | None:
    """``"int8"``/``"fp8"`` when the model holds Q/DQ, else ``None``."""
    for node in model.graph:
        if node.op_type in _QDQ and len(node.inputs) > 2 and node.inputs[2] is not None:
            return "fp8" if node.inputs[2].dtype == ir.DataType.FLOAT8E4M3FN else "int8"
        if node.op_type in _QDQ:
            return "int8"
    return None


# --------------------------------------------------------------------------------------
# Engine build and runner (GPU + tensorrt only)


@dataclasses.dataclass
class EngineBuild:
    """What :func:`build_engine` produced."""

    engine: Path
    flags: list[str]
    profile: dict[str, Any]
    layers: dict[str, Any]
    log: list[str]
    build_s: float
    timing_cache: str


def _trt_logger(trt: Any, lines: list[str], errors: list[str]) -> Any:
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


def build_engine(model: ir.Model, onnx_path: Path, engine_path: Path, *, settings: BuildSettings = BuildSettings(),
                 precision: str = "auto", sparse: bool | None = None) -> EngineBuild:
    """Build ``engine_path`` from the QDQ ONNX at ``onnx_path`` (the file of ``model``).

    Args:
        precision: ``auto`` (INT8/FP8 flags when the model holds Q/DQ, plus FP16 when
            ``settings.fp16``), ``fp32``, ``fp16``.
        sparse: Set SPARSE_WEIGHTS (``None``: when :func:`nm_sparse_layers` finds 2:4 weights).

    Raises:
        UnsupportedByTarget: the parser or the builder refused a node (named).
    """
    import tensorrt as trt

    lines: list[str] = []
    errors: list[str] = []
    trt_logger = _trt_logger(trt, lines, errors)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    nodes = list(model.graph)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        raise UnsupportedByTarget("tensorrt", parser_offenders(errs, [n.name or "" for n in nodes],
                                                               [n.op_type for n in nodes]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    flags = []
    quant = _has_qdq(model)
    if precision == "auto" and quant is not None:
        flags.append("FP8" if quant == "fp8" else "INT8")
    if precision == "fp16" or (precision == "auto" and settings.fp16):
        flags.append("FP16")
    sparse_layers = nm_sparse_layers(model)
    if sparse if sparse is not None else bool(sparse_layers):
        flags.append("SPARSE_WEIGHTS")
    for flag in flags:
        if hasattr(trt.BuilderFlag, flag):  # INT8/FP16 are deprecated (still honoured) in late 10.x
            config.set_flag(getattr(trt.BuilderFlag, flag))
    cache_path = timing_cache_path(settings)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    shapes = profile_shapes(model_input_specs(model), settings)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - start
    if serialized is None:
        raise UnsupportedByTarget("tensorrt", builder_offenders(errors, [n.name or "" for n in nodes]))
    engine_path.write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, cache_path)
    engine = trt.Runtime(trt_logger).deserialize_cuda_engine(bytes(serialized))
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    layers = summarize_engine_layers(info, lines)
    layers["eligible_sparse_onnx_layers"] = sparse_layers
    return EngineBuild(engine_path, flags, {k: [list(s) for s in v] for k, v in shapes.items()}, layers, lines,
                       round(build_s, 3), str(cache_path))


class TensorRtRunner(Runner):
    """Runs a serialized engine with torch CUDA tensors as buffers (one execution context)."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self.path = engine_path
        lines: list[str] = []
        self._logger = _trt_logger(trt, lines, [])
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise CompressorError(f"tensorrt: cannot deserialize {engine_path} ({'; '.join(lines[-3:])})")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.stream = torch.cuda.Stream()

    def _torch_dtype(self, name: str) -> Any:
        np_dtype = np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))
        return self._torch.from_numpy(np.zeros(0, np_dtype)).dtype

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        torch = self._torch
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DataError(f"no data for engine input(s) {', '.join(missing)}; inputs: {', '.join(self.input_names)}")
        keep = []
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name])
            tensor = torch.from_numpy(array).to("cuda", dtype=self._torch_dtype(name), non_blocking=False)
            if not self.context.set_input_shape(name, tuple(array.shape)):
                lo, opt, hi = self.engine.get_tensor_profile_shape(name, 0)
                raise DataError(f"tensorrt: input {name} of shape {array.shape} is outside the engine's profile "
                                f"(min {tuple(lo)}, max {tuple(hi)}); rebuild with other BuildSettings")
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outs = []
        for name in self.output_names:
            tensor = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._torch_dtype(name),
                                 device="cuda")
            self.context.set_tensor_address(name, tensor.data_ptr())
            outs.append(tensor)
        return keep + outs

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        buffers = self._bind(feeds)
        with self._torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise CompressorError(f"tensorrt: execution of {self.path.name} failed")
        self.stream.synchronize()
        return [t.cpu().numpy() for t in buffers[len(self.input_names):]]

    def device_latency_ms(self, feeds: Mapping[str, np.ndarray], repeats: int = 50, warmup: int = 10) -> float:
        """Median GPU time of one execution (CUDA events; inputs already on the device)."""
        torch = self._torch
        buffers = self._bind(feeds)  # kept alive: the context holds their addresses during the loop
        times = []
        for i in range(warmup + repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.context.execute_async_v3(self.stream.cuda_stream)
            stop.record(self.stream)
            stop.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(stop))
        del buffers
        return float(np.median(times))


class QdqReferenceRunner(Runner):
    """The QDQ ONNX on ONNX Runtime CPU with Q/DQ executed as written (no host int8 kernels).

    Graph optimizations stop at the basic level: ONNX Runtime's QDQ fusions (extended
    level) would swap in the host CPU's int8 kernels, whose arithmetic is not TensorRT's
    (and saturates on x86 without VNNI); executed as written, ``DQ(Q(x))`` then float
    Conv/MatMul is what TensorRT's int8 kernels compute, up to float rounding.
    """

    def __init__(self, path: Path):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})


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
        self._warned = False
        self._last: dict[str, Any] = {}

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
            trt_logger = _trt_logger(trt, lines, [])
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
            "quantization": _has_qdq(model) or "none",
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
            reason = self.status
            log["engine"] = {"built": False, "status": "not built", "reason": reason}
            if not self._warned:
                logger.warning("tensorrt: engine not built: %s. Wrote the TensorRT-ready QDQ ONNX (model.onnx); "
                               "accuracy is measured on that model with ONNX Runtime CPU", reason)
                self._warned = True
        build_log = outdir / "build_log.json"
        build_log.write_text(json.dumps(log, indent=1, default=str) + "\n", encoding="utf-8")
        self._last = log
        return files + [build_log]

    def runner(self, files: list[Path]) -> Runner:
        engines = [f for f in files if f.suffix == ".engine"]
        if engines:
            return TensorRtRunner(engines[0])
        onnx_files = [f for f in files if f.suffix == ".onnx"]
        if not onnx_files:
            raise CompressorError("tensorrt: no .engine or .onnx among the lowered files")
        return QdqReferenceRunner(onnx_files[0])

    def reference_runner(self, model: ir.Model, workdir: Path) -> Runner:
        """The fp32 baseline: an fp32 engine on the GPU, else ONNX Runtime CPU."""
        workdir.mkdir(parents=True, exist_ok=True)
        path = save_model(model, workdir / "model.onnx")
        if self.available:
            build = build_engine(model, path, workdir / "model.engine",
                                 settings=dataclasses.replace(self.settings, fp16=False), precision="fp32")
            return TensorRtRunner(build.engine)
        return QdqReferenceRunner(path)

    def report(self, runner: Runner) -> dict[str, Any]:
        """``engine``: built or not (and why); ``tensorrt``: placement findings, per-layer kernels, GPU latency."""
        log = self._last
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
