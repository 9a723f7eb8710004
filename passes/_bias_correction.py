"""Bias correction for the ``quantize`` pass.

Rounding a weight ``W`` to ``DQ(Wq) = W + E`` shifts each output channel's mean by
``E[x] · E`` (for a linear layer ``y = x W + b``). Subtracting it restores the mean:

1. MatMul ``x[..., K] @ W[K, N]``: ``delta = E[x] @ E`` (``N``), folded into a following
   ``Add`` of a constant ``[N]`` bias (skipped when there is none);
2. Gemm ``alpha * A B + beta * C``: ``delta = alpha * E[x] @ E`` (``E.T`` when ``transB``),
   ``C' = C - delta / beta`` (a ``C`` input is added when there is none);
3. Conv ``W[O, C, kh, kw]`` (group 1): ``delta_o = sum_c E[x_c] sum_kh,kw E[o, c]``, the
   bias input ``B' = B - delta`` (added when there is none). Padding is ignored: border
   outputs see fewer inputs, so the correction is exact only inside the image.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import NameAllocator, add_initializer
from compressor.passes._placement import Layer

__all__ = ["input_channel_axis", "correct_bias"]

logger = logging.getLogger(__name__)


def input_channel_axis(layer: Layer) -> int | None:
    """Axis of the activation that indexes the layer's input channels, or ``None``."""
    node = layer.node
    if node.op_type == "Conv":
        group = node.attributes.get("group")
        return 1 if group is None or group.as_int() == 1 else None
    if node.op_type == "MatMul" and layer.weight is not None and layer.weight.shape is not None \
            and len(layer.weight.shape) == 2:
        return -1
    if node.op_type == "Gemm":
        trans_a = node.attributes.get("transA")
        return -1 if trans_a is None or not trans_a.as_int() else None
    return None


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def correct_bias(graph: ir.Graph, layer: Layer, error: np.ndarray, mean: np.ndarray, names: NameAllocator) -> int:
    """Subtract the mean shift of ``layer``'s output; returns 1 if corrected, else 0."""
    node = layer.node
    mean = np.asarray(mean, np.float64)
    if node.op_type == "Conv":  # case 3
        if error.ndim < 3 or error.shape[1] != mean.size:
            return 0
        delta = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2) @ mean
        bias_index = 2
        scale = 1.0
    elif node.op_type == "Gemm":  # case 2
        trans_b = node.attributes.get("transB")
        e = error.T if trans_b is not None and trans_b.as_int() else error
        if e.shape[0] != mean.size:
            return 0
        delta = _attr(node, "alpha", 1.0) * (mean @ e)
        bias_index = 2
        scale = 1.0 / _attr(node, "beta", 1.0)
    else:  # case 1: MatMul
        if error.ndim != 2 or error.shape[0] != mean.size:
            return 0
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add":
            return 0
        add, index = uses[0].node, uses[0].idx
        bias_value = add.inputs[1 - index]
        bias = _constant(bias_value)
        delta = mean @ error
        if bias is None or bias.shape != (delta.size,):
            return 0
        new = add_initializer(graph, names(f"{bias_value.name}_corrected"), (bias - delta).astype(bias.dtype))
        add.replace_input_with(1 - index, new)
        return 1
    bias = _constant(node.inputs[bias_index]) if len(node.inputs) > bias_index else None
    if len(node.inputs) > bias_index and node.inputs[bias_index] is not None and bias is None:
        return 0  # a bias computed at run time: leave it
    if bias is not None and bias.shape != (delta.size,):
        return 0
    base = bias if bias is not None else np.zeros(delta.size, np.float32)
    name = (node.inputs[bias_index].name if bias is not None else f"{node.name or node.op_type}_bias")
    new = add_initializer(graph, names(f"{name}_corrected"), (base - delta * scale).astype(np.float32))
    if len(node.inputs) <= bias_index:
        node.resize_inputs(bias_index + 1)
    node.replace_input_with(bias_index, new)
    return 1
