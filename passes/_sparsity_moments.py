"""Activation statistics and bias correction for the sparsity passes.

Activation moments (:func:`activation_moments`) run the model in ONNX Runtime and keep,
per channel ``c`` of each wanted tensor, ``sum x_c`` and ``sum x_c^2`` over every sample
and position, so ``E[x_c] = sum x_c / n`` and ``||x_c||_2 = sqrt(sum x_c^2)`` with memory
independent of the number of samples. When the data has an ``attention_mask`` input
(``N x S``), token activations (``N x S x ...``) are summed over real tokens only: what a
model computes at padding positions is never used. On request the engine also keeps each
tensor's channel Gram matrix ``G = sum x x^T`` (``C x C``, summed over the same samples and
positions, padding excluded), accumulated batch by batch: the statistics SparseGPT's
layer-wise Hessian ``H = 2 G`` is built from (:mod:`._sparsegpt`).

Bias correction (:func:`add_output_bias`): when ``W`` becomes ``W_p``, the layer's output
mean moves by ``(W_p - W) E[x]``; adding ``delta = (W - W_p) E[x]`` to its bias restores it:
``b' = b + (W - W_p) E[x]`` (for a Conv, ``E[x]`` is per input channel and the kernel
positions are summed: border effects of zero padding are ignored). The bias is the Conv's
input 2, Gemm's ``C`` (divided by ``beta``, times ``alpha``), or for MatMul the constant of a
following ``Add`` (a new ``Add`` when there is none).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from compressor.passes._graph import (
    NameAllocator,
    NotFoldable,
    add_initializer,
    append_add,
    attr_float,
)
from compressor.passes._sparsity import WeightLayer, is_constant_float, replace_constant

from compressor.data import MASK_INPUT
from compressor.errors import CompressorError
from compressor.model_io import clone_model, ir_version_for, model_bytes

if TYPE_CHECKING:
    from compressor.data import Dataset

__all__ = [
    "ChannelMoments",
    "activation_moments",
    "cached_moments",
    "add_output_bias",
    "bias_delta",
    "conv_window_means",
    "require_calibration",
    "correct_biases",
    "input_moments",
]

logger = logging.getLogger(__name__)


def require_calibration(ctx_calibration: Dataset | None, what: str) -> Dataset:
    """The calibration data, or an error that says how to give it."""
    if ctx_calibration is None:
        raise CompressorError(f"{what} needs calibration data: pass --calib samples.npz")
    return ctx_calibration


@dataclasses.dataclass
class ChannelMoments:
    """Per-channel first and second moments of one tensor.

    Attributes:
        total: ``sum x_c`` over every sample and position.
        squares: ``sum x_c^2``.
        count: Values summed per channel.
        spatial: For an ``N x C x ...`` tensor with channels on axis 1, the sum over samples
            of ``x`` per channel and position (``C x H x W``), or ``None`` (other layouts,
            or sizes that changed between batches).
        samples: Samples summed into ``spatial``.
        gram: ``sum x x^T`` over the channels (``C x C``) when it was asked for, else ``None``.
    """

    total: np.ndarray
    squares: np.ndarray
    count: int
    spatial: np.ndarray | None = None
    samples: int = 0
    gram: np.ndarray | None = None

    @property
    def spatial_mean(self) -> np.ndarray | None:
        """``E[x]`` per channel and position, or ``None``."""
        return None if self.spatial is None else self.spatial / max(self.samples, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def norm(self) -> np.ndarray:
        """``||x_c||_2`` over everything seen."""
        return np.sqrt(self.squares)


def activation_moments(model: ir.Model, axes: Mapping[str, int], data: Dataset,
                       limit: int | None = None, gram: Collection[str] = ()) -> dict[str, ChannelMoments]:
    """Run ``model`` on ``data`` (ONNX Runtime, CPU) and gather :class:`ChannelMoments`.

    Args:
        model: The model (not changed: a copy gets the tensors as extra outputs).
        axes: Tensor name -> its channel axis.
        data: Calibration samples.
        limit: Use at most this many samples.
        gram: Names (of ``axes``) whose channel Gram matrix ``sum x x^T`` is kept too.
    """
    work = clone_model(model)
    graph = work.graph
    values = {v.name: v for v in graph.inputs}
    values.update((v.name, v) for node in graph for v in node.outputs)
    missing = [n for n in axes if n not in values]
    if missing:
        raise CompressorError(f"sparsity: no tensor {', '.join(map(repr, missing))} in the model's main graph")
    outputs = {v.name for v in graph.outputs}
    inputs = {v.name for v in graph.inputs}
    fetch = [n for n in axes if n not in inputs]
    for name in fetch:
        if name not in outputs:
            graph.outputs.append(values[name])
            outputs.add(name)
    proto = ir.serde.serialize_model(work)
    proto.ir_version = ir_version_for(work)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del proto, work
    acc: dict[str, ChannelMoments] = {}
    for feed in data.batches(limit=limit):
        results = dict(zip(fetch, session.run(fetch, feed)))
        results.update((n, feed[n]) for n in axes if n in feed)
        mask = feed.get(MASK_INPUT)
        for name, axis in axes.items():
            raw = np.asarray(results[name])
            axis %= raw.ndim
            tokens = (mask is not None and mask.ndim == 2 and raw.ndim >= 3 and axis >= 2
                      and raw.shape[:2] == mask.shape)
            # token activations: padding positions are not data (see compressor.flow.evaluation), so
            # only real tokens are kept, before any arithmetic
            real = raw[mask.astype(bool)] if tokens else raw
            flat = np.moveaxis(real, axis - 1 if tokens else axis, -1).reshape(-1, raw.shape[axis])
            x = flat.astype(np.float64)
            total, squares, count = x.sum(axis=0), np.einsum("ij,ij->j", x, x), x.shape[0]
            g = _gram(flat) if name in gram else None
            spatial = raw.astype(np.float64).sum(axis=0) if axis == 1 and raw.ndim >= 3 else None
            if name not in acc:
                acc[name] = ChannelMoments(total, squares, count, spatial, raw.shape[0], g)
            else:
                m = acc[name]
                m.total = m.total + total
                m.squares = m.squares + squares
                if g is not None:
                    m.gram = m.gram + g
                m.count += count
                if m.spatial is not None and spatial is not None and m.spatial.shape == spatial.shape:
                    m.spatial = m.spatial + spatial
                    m.samples += raw.shape[0]
                else:
                    m.spatial = None
    missing = [n for n in axes if n not in acc]
    if missing:
        raise CompressorError("sparsity: the calibration data gave no batch to run (too few samples for the "
                              "model's fixed batch size?)")
    return acc


def _gram(flat: np.ndarray) -> np.ndarray:
    """``sum x x^T`` of one batch's ``positions x channels`` matrix.

    The product runs in the activation's float precision (float32: one batch's sum), the
    result is float64 so that batches accumulate without loss.
    """
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float32)
    flat = np.ascontiguousarray(flat)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow stays inf: the caller names the layer
        return (flat.T @ flat).astype(np.float64)


def cached_moments(model: ir.Model, axes: Mapping[str, int], data: Dataset, cache: dict,
                   gram: Collection[str] = ()) -> dict[str, ChannelMoments]:
    """:func:`activation_moments`, remembered in ``cache`` per model and data (re-runs are free).

    Moments gathered without a Gram matrix are gathered again when ``gram`` names them.
    """
    key = "sparsity.moments:" + hashlib.sha256(model_bytes(model)).hexdigest() + ":" + data.sha256
    store = cache.setdefault(key, {})
    todo = {n: a for n, a in axes.items()
            if (n, a) not in store or n in gram and store[(n, a)].gram is None}
    if todo:
        for name, moments in activation_moments(model, todo, data, gram=[n for n in todo if n in gram]).items():
            store[(name, todo[name])] = moments
    return {n: store[(n, a)] for n, a in axes.items()}


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
    """``E[x]`` of a Conv's input at each kernel offset, averaged over the output positions.

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


def bias_delta(layer: WeightLayer, delta_w: np.ndarray, moments: ChannelMoments) -> np.ndarray:
    """``(W - W_p) E[x]`` per output channel of ``layer`` (module docstring, bias correction).

    For a Conv whose input's mean per position is known, ``E[x]`` is taken at each kernel
    offset over the output positions (zero padding included), so the output mean is
    restored exactly on the calibration data; otherwise per channel.
    """
    delta_w = np.asarray(delta_w, np.float64)
    if layer.op == "Conv" and moments.spatial_mean is not None:
        windows = conv_window_means(layer.node, moments.spatial_mean, delta_w.shape[2:])
        if windows is not None:
            g, m, cg = layer.group, delta_w.shape[0], delta_w.shape[1]
            per_out = windows.reshape(g, cg, *windows.shape[1:])[np.arange(m) // (m // g)]
            return (delta_w * per_out).reshape(m, -1).sum(axis=1)
    rows = layer.to_rows(delta_w)
    per_row = (rows * layer.row_channel_values(moments.mean, delta_w.shape)).sum(axis=1)
    if layer.op == "Conv":
        return per_row.reshape(delta_w.shape[0], -1).sum(axis=1)
    return per_row


def add_output_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray, names: NameAllocator) -> str:
    """Add ``delta`` (one value per output channel) to ``node``'s output through its bias.

    Returns:
        How it was done (``"bias"``, ``"gemm C"``, ``"add"``, ``"new add"``), for the stats.

    Raises:
        NotFoldable: the bias is not a constant, or its shape cannot take ``delta``.
    """
    delta = np.asarray(delta, np.float64)
    op = node.op_type
    if op == "Conv":
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = _constant(node.inputs[2], "Conv bias")
            replace_constant(graph, node, 2, b.astype(np.float64) + delta, names, like=b)
        else:
            node.resize_inputs(3)
            w = node.inputs[1].const_value.numpy()
            node.replace_input_with(2, add_initializer(graph, names(f"{node.inputs[1].name}_bias"),
                                                       delta.astype(w.dtype)))
        return "bias"
    if op == "Gemm":
        alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None and beta != 0.0
        if has_c:
            c = _constant(node.inputs[2], "Gemm C")
            new = c.astype(np.float64) + alpha * delta / beta
            replace_constant(graph, node, 2, new, names, like=c)
        else:
            w = node.inputs[1].const_value.numpy()
            node.resize_inputs(3)
            node.replace_input_with(2, add_initializer(graph, names(f"{node.inputs[1].name}_bias"),
                                                       (alpha * delta).astype(w.dtype)))
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
    w = node.inputs[1].const_value.numpy()
    bias = add_initializer(graph, names(f"{node.inputs[1].name}_bias_correction"), delta.astype(w.dtype))
    append_add(graph, out, bias, names)
    return "new add"


def _constant(value: ir.Value, what: str) -> np.ndarray:
    if not is_constant_float(value):
        raise NotFoldable(f"{what} `{value.name}` is not a constant float initializer")
    return value.const_value.numpy()


def input_moments(model: ir.Model, layers: Sequence[WeightLayer], data: Dataset,
                  cache: dict, gram: bool = False) -> dict[str, ChannelMoments]:
    """:class:`ChannelMoments` of each layer's activation input along its reduction axis.

    Call it before changing any weight: bias correction wants ``E[x]`` of the model as
    the pass found it.

    Args:
        gram: Also keep each input's channel Gram matrix ``sum x x^T`` (SparseGPT).
    """
    axes = {}
    for layer in layers:
        act = layer.activation()
        if act is not None and act.name:
            axes[act.name] = layer.activation_axis()
    return cached_moments(model, axes, data, cache, gram=list(axes) if gram else ()) if axes else {}


def correct_biases(graph: ir.Graph, pruned: Sequence[tuple[WeightLayer, np.ndarray]],
                   moments: Mapping[str, ChannelMoments], names: NameAllocator) -> dict[str, str]:
    """Bias correction (module docstring) of each ``(layer, dense weight)`` after its weight changed.

    Returns:
        Layer name -> how its bias was corrected, or why not.
    """
    done: dict[str, str] = {}
    for layer, dense in pruned:
        act, name = layer.activation(), layer.name
        if act is None or act.name not in moments:
            done[name] = "skipped: no statistics for its activation input"
            continue
        delta_w = dense.astype(np.float64) - layer.array().astype(np.float64)
        if not delta_w.any():
            continue
        try:
            delta = bias_delta(layer, delta_w, moments[act.name])
            done[name] = add_output_bias(graph, layer.node, delta, names)
        except (NotFoldable, ValueError) as why:
            done[name] = f"skipped: {why}"
            logger.info("`%s`: bias not corrected: %s", name, why)
    return done
