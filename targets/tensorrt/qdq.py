"""Where TensorRT needs Q/DQ, checked on the CPU (the ``tensorrt`` target's placement lint).

TensorRT 10.x/11.x builds INT8 engines only from ONNX that already carries Q/DQ
(explicit quantization), so where the Q/DQ pairs sit decides which layers run int8. The
rules TensorRT's fusions need (what ``TENSORRT_CAPABILITIES`` asks the ``quantize`` pass
for, and what :func:`check_qdq_placement` verifies):

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
engine is built with ``BuilderFlag.SPARSE_WEIGHTS``; :func:`nm_sparse_layers` finds
those layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import label
from compressor.passes._layers import output_channel_axis
from compressor.passes._placement import integer_derived, mask_uses

__all__ = ["check_qdq_placement", "nm_sparse_layers"]

_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_SIGNED_QDQ = frozenset({ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN})
_BIAS_LIKE = frozenset({"Add", "Sub", "Mul", "Div"})
_PASS_THROUGH = frozenset({"Relu", "Identity"})


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
    used_as_mask = mask_uses(graph)  # integer data that feeds compute ops is quantized like any data
    masks = {name: src for name, src in integer_derived(graph).items() if name in used_as_mask}
    out: list[tuple[str, str]] = []
    for node in graph:
        where = label(node)
        if node.op_type in _QDQ:  # rule 1: signed, symmetric
            zp = node.inputs[2] if len(node.inputs) > 2 else None
            if zp is None:
                out.append((where, f"{node.op_type} has no zero point, so ONNX makes it uint8; TensorRT takes "
                                   "only signed int8 (or FP8) Q/DQ with zero point 0"))
            else:
                zp_value = _const(zp)
                if zp.dtype not in _SIGNED_QDQ:
                    kind = str(getattr(zp.dtype, "name", zp.dtype)).lower()
                    out.append((where, f"{node.op_type} is {kind}; TensorRT takes only int8 or FP8 E4M3 "
                                       "Q/DQ (symmetric, zero point 0)"))
                elif zp_value is not None and np.any(zp_value.astype(np.float32) != 0):
                    out.append((where, f"{node.op_type} has a non-zero zero point "
                                       f"({np.unique(zp_value.astype(np.float32))[:4].tolist()}); TensorRT needs "
                                       "symmetric quantization (zero point 0)"))
            if node.op_type == "QuantizeLinear" and node.inputs[0] is not None and node.inputs[0].name in masks:
                out.append((where, f"Q/DQ on {node.inputs[0].name!r}, which derives only from integer input "
                                   f"{masks[node.inputs[0].name]!r} (mask/shape path): keep it float"))
            if node.op_type == "DequantizeLinear" and not _is_const(node.inputs[0]):  # rule 6
                q = _producer(node.inputs[0], "QuantizeLinear")
                if q is None:
                    out.append((where, "DequantizeLinear of an activation that no QuantizeLinear produced"))
                elif not _same_params(q, node):
                    out.append((where, f"scale/zero point differ from its QuantizeLinear {label(q)!r}: "
                                       "TensorRT cannot fold the pair"))
            continue
        w_dq = _quantized_layer(node)
        if node.op_type in _COMPUTE:
            acts = [(i, v) for i, v in enumerate(node.inputs[:2]) if v is not None and not _is_const(v)
                    and (i == 0 or node.op_type == "MatMul") and _producer(v, "DequantizeLinear") is not w_dq]
            float_acts = [v for _, v in acts if _producer(v, "DequantizeLinear") is None]
            if w_dq is not None and float_acts:  # rule 2
                out.append((where, f"weight is quantized but activation {float_acts[0].name!r} is not "
                                   f"(no DequantizeLinear before {node.op_type}): TensorRT runs it in float"))
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if w_dq is None and acts and not float_acts and weight is not None and _is_const(weight):
                out.append((where, f"activation is quantized but the weight {node.inputs[1].name!r} is float: "
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
                out.append((where, f"residual Add after quantized layer {label(layer)!r}: input {missing.name!r} "
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
    where = label(node)
    want = output_channel_axis(node, weight.ndim)
    if node.op_type == "ConvTranspose":
        group = node.attributes.get("group")
        channels = weight.shape[1] * (group.as_int() if group is not None else 1)
    else:
        channels = weight.shape[want]
    if scale.size == 1:
        return [(where, f"weight {dq.inputs[0].name!r} has one scale (per tensor); TensorRT keeps more accuracy "
                        f"per output channel (axis {want}, {channels} scales)")]
    axis_attr = dq.attributes.get("axis")
    axis = (axis_attr.as_int() if axis_attr is not None else 1) % max(weight.ndim, 1)
    if axis != want or scale.size != weight.shape[want]:
        return [(where, f"weight {dq.inputs[0].name!r} is quantized per channel along axis {axis} "
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
            found.append(label(node))
    return found
