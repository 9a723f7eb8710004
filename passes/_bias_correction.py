"""Bias correction, one for every pass that changes a weight (quantize, the sparsity passes).

When a layer's weight ``W`` becomes ``W'`` (rounded, pruned), its output mean on the
calibration data moves by ``(W' - W) E[x]``; adding ``delta = (W - W') E[x]`` to the
layer's bias restores it: ``b' = b + (W - W') E[x]`` (:func:`bias_delta`):

1. Gemm / MatMul (``y = x W``): ``E[x]`` per input channel, measured at real tokens only
   when the data has an ``attention_mask`` (:mod:`compressor.quant.taps`); grouped
   convolutions read only their group's channels;
2. Conv: when the mean of its input per channel *and position* is known (``N x C x H x W``
   inputs), ``E[x]`` is taken at each kernel offset over the output positions, zero
   padding included (:func:`conv_window_means`), so the output mean is restored exactly
   on the calibration data, border outputs included; otherwise per channel.

Where the bias goes (:func:`add_output_bias`): the Conv's input 2 (added when there is
none), Gemm's ``C`` (``alpha * delta / beta``; added when there is none), or for MatMul
(and any other layer) the constant of a following ``Add`` of one value per channel, or a
new ``Add`` after the layer when there is none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import (
    NameAllocator,
    NotFoldable,
    add_initializer,
    append_add,
    attr_float,
)
from compressor.passes._layers import Layer, is_constant_float
from compressor.passes._sparsity import replace_constant

from compressor.quant.taps import ChannelMoments

__all__ = ["add_output_bias", "bias_delta", "conv_window_means", "correct_bias", "correct_biases"]

logger = logging.getLogger(__name__)


def _pads(node: ir.Node, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> list[int] | None:
    """Begin and end pads of a Conv (``auto_pad`` resolved), or ``None`` when unknown."""
    auto = node.attributes.get("auto_pad")
    mode = auto.as_string() if auto is not None else "NOTSET"
    d = len(spatial)
    if mode == "NOTSET":
        pads = node.attributes.get("pads")
        return list(pads.as_ints()) if pads is not None else [0] * (2 * d)
    if mode == "VALID":
        return [0] * (2 * d)
    begin, end = [], []
    for size, k, s, dl in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * dl + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


def conv_window_means(node: ir.Node, mean_map: np.ndarray, kernel: Sequence[int]) -> np.ndarray | None:
    """``E[x]`` of a Conv's input at each kernel offset, averaged over the output positions (case 2).

    ``mean_map`` is ``E[x]`` per channel and position (``C x H x W``); padding reads 0.
    Returns ``C x k1 x ... x kd``, or ``None`` when the Conv's attributes cannot be read.
    """
    d = mean_map.ndim - 1
    spatial = mean_map.shape[1:]
    strides = list(node.attributes["strides"].as_ints()) if "strides" in node.attributes else [1] * d
    dilations = list(node.attributes["dilations"].as_ints()) if "dilations" in node.attributes else [1] * d
    pads = _pads(node, spatial, kernel, strides, dilations)
    if pads is None or len(kernel) != d:
        return None
    padded = np.pad(mean_map, [(0, 0)] + [(pads[i], pads[i + d]) for i in range(d)])
    outs = [(padded.shape[i + 1] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(d)]
    if any(o < 1 for o in outs):
        return None
    result = np.zeros((mean_map.shape[0], *kernel))
    for offset in np.ndindex(*kernel):
        window = tuple(slice(offset[i] * dilations[i], offset[i] * dilations[i] + (outs[i] - 1) * strides[i] + 1,
                             strides[i]) for i in range(d))
        result[(slice(None), *offset)] = padded[(slice(None), *window)].reshape(mean_map.shape[0], -1).mean(axis=1)
    return result


def bias_delta(layer: Layer, delta_w: np.ndarray, moments: ChannelMoments) -> np.ndarray:
    """``(W - W') E[x]`` per output channel of ``layer`` (cases 1-2); ``delta_w = W - W'``."""
    delta_w = np.asarray(delta_w, np.float64)
    if layer.op == "Conv" and moments.spatial_mean is not None:
        windows = conv_window_means(layer.node, moments.spatial_mean, delta_w.shape[2:])
        if windows is not None:
            g, m, cg = layer.group, delta_w.shape[0], delta_w.shape[1]
            per_out = windows.reshape(g, cg, *windows.shape[1:])[np.arange(m) // (m // g)]
            return (delta_w * per_out).reshape(m, -1).sum(axis=1)
    rows = layer.to_rows(delta_w)
    if rows.shape[1] * layer.group != moments.mean.size:
        raise ValueError(f"the weight has {rows.shape[1] * layer.group} input channels, its input "
                         f"{moments.mean.size}")
    per_row = (rows * layer.row_channel_values(moments.mean, delta_w.shape)).sum(axis=1)
    if layer.op == "Conv":
        return per_row.reshape(delta_w.shape[0], -1).sum(axis=1)
    return per_row


def _constant(value: ir.Value, what: str) -> np.ndarray:
    if not is_constant_float(value):
        raise NotFoldable(f"{what} `{value.name}` is not a constant float initializer")
    return value.const_value.numpy()


def _new_bias(graph: ir.Graph, layer: Layer, values: np.ndarray, names: NameAllocator, suffix: str) -> ir.Value:
    """A new bias initializer named after the layer's weight, in the layer's output dtype."""
    out = layer.node.outputs[0]
    dtype = out.dtype.numpy() if out.dtype is not None else np.dtype(np.float32)
    base = layer.weight.name if layer.weight is not None and layer.weight.name else layer.name
    return add_initializer(graph, names(f"{base}_{suffix}"), np.asarray(values).astype(dtype))


def add_output_bias(graph: ir.Graph, layer: Layer, delta: np.ndarray, names: NameAllocator) -> str:
    """Add ``delta`` (one value per output channel) to ``layer``'s output through its bias.

    Returns:
        How it was done (``"bias"``, ``"gemm C"``, ``"add"``, ``"new add"``), for the stats.

    Raises:
        NotFoldable: the bias is not a constant, or its shape cannot take ``delta``.
    """
    delta = np.asarray(delta, np.float64)
    node, op = layer.node, layer.op
    if op == "Conv":
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = _constant(node.inputs[2], "Conv bias")
            if b.shape != delta.shape:
                raise NotFoldable(f"Conv bias `{node.inputs[2].name}` has shape {list(b.shape)}, not [{delta.size}]")
            replace_constant(graph, node, 2, b.astype(np.float64) + delta, names, like=b)
        else:
            node.resize_inputs(3)
            node.replace_input_with(2, _new_bias(graph, layer, delta, names, "bias"))
        return "bias"
    if op == "Gemm":
        alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None and beta != 0.0
        if has_c:
            c = _constant(node.inputs[2], "Gemm C")
            new = c.astype(np.float64) + alpha * delta / beta
            if new.shape != c.shape:
                raise NotFoldable(f"Gemm C `{node.inputs[2].name}` of shape {list(c.shape)} cannot take one value "
                                  "per output channel")
            replace_constant(graph, node, 2, new, names, like=c)
        else:
            node.resize_inputs(3)
            node.replace_input_with(2, _new_bias(graph, layer, alpha * delta, names, "bias"))
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        return "gemm C"
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        add, index = uses[0]
        other = add.inputs[1 - index] if add.op_type == "Add" and len(add.inputs) == 2 else None
        if other is not None and is_constant_float(other):
            b = other.const_value.numpy()
            if b.ndim >= 1 and b.shape[-1] == delta.size and all(d == 1 for d in b.shape[:-1]):
                replace_constant(graph, add, 1 - index, b.astype(np.float64) + delta, names, like=b)
                return "add"
    append_add(graph, out, _new_bias(graph, layer, delta, names, "bias_correction"), names)
    return "new add"


def correct_bias(graph: ir.Graph, layer: Layer, delta_w: np.ndarray, moments: ChannelMoments | None,
                 names: NameAllocator) -> str:
    """Restore ``layer``'s output mean after ``W`` became ``W - delta_w``.

    Returns:
        How its bias was corrected (:func:`add_output_bias`), or ``"skipped: why"``.
    """
    if moments is None:
        return "skipped: no statistics for its activation input"
    try:
        return add_output_bias(graph, layer, bias_delta(layer, delta_w, moments), names)
    except (NotFoldable, ValueError) as why:
        logger.info("`%s`: bias not corrected: %s", layer.name, why)
        return f"skipped: {why}"


def correct_biases(graph: ir.Graph, changed: Sequence[tuple[Layer, np.ndarray]],
                   moments: Mapping[str, ChannelMoments], names: NameAllocator) -> dict[str, str]:
    """:func:`correct_bias` of each ``(layer, dense weight)`` whose weight changed in place.

    Returns:
        Layer name -> how its bias was corrected, or why not.
    """
    done: dict[str, str] = {}
    for layer, dense in changed:
        act = layer.activation()
        delta_w = dense.astype(np.float64) - layer.array().astype(np.float64)
        if act is not None and act.name in moments and not delta_w.any():
            continue
        name = layer.name  # before a new Add renames the output a name may be made of
        done[name] = correct_bias(graph, layer, delta_w, moments.get(act.name) if act is not None else None, names)
    return done
