"""Helpers shared by the sparsity passes (``prune-magnitude``, ``sparsify-nm``, ``prune-channels``).

Layout of a weight (:class:`WeightLayer`). Every prunable layer computes
``y[o] = sum_i W[o, i] x[i]`` for an output channel ``o`` and a *reduction* index ``i``.
The *reduction-rows view* of its weight is a 2-D matrix ``R`` with one row per
(output channel, kernel position) and one column per input channel, so that a row holds
consecutive input channels, the order TensorRT's sparse kernels read N:M groups in:

1. ``Conv``, ``W: M x C/g x k1 x ... x kd``: ``R = W.transpose(0, 2, ..., d+1, 1)``
   reshaped to ``(M * k1 ... kd) x C/g``;
2. ``Gemm``, ``B: N x K`` (``transB=1``): ``R = B``; ``B: K x N`` (``transB=0``): ``R = B^T``;
3. ``MatMul``, ``W: K x N``: ``R = W^T``.

Input channel ``j`` of row ``r`` is activation channel ``j`` (plus ``g(r) * C/g`` in a
grouped convolution), read along the activation's channel axis: 1 for Conv and Gemm
(0 with ``transA=1``), the last axis for MatMul.

Activation moments (:func:`activation_moments`) run the model in ONNX Runtime and keep,
per channel ``c`` of each wanted tensor, ``sum x_c`` and ``sum x_c^2`` over every sample
and position, so ``E[x_c] = sum x_c / n`` and ``||x_c||_2 = sqrt(sum x_c^2)`` with memory
independent of the number of samples. When the data has an ``attention_mask`` input
(``N x S``), token activations (``N x S x ...``) are summed over real tokens only: what a
model computes at padding positions is never used.

Bias correction (:func:`add_output_bias`): when ``W`` becomes ``W_p``, the layer's output
mean moves by ``(W_p - W) E[x]``; adding ``delta = (W - W_p) E[x]`` to its bias restores it:
``b' = b + (W - W_p) E[x]`` (for a Conv, ``E[x]`` is per input channel and the kernel
positions are summed: border effects of zero padding are ignored). The bias is the Conv's
input 2, Gemm's ``C`` (divided by ``beta``, times ``alpha``), or for MatMul the constant of a
following ``Add`` (a new ``Add`` when there is none).

Size figures (:func:`size_report`): dense bytes, and the zlib-compressed bytes of the
same weights, the on-disk size a sparse (zero-rich) weight reaches in a zip/gzip archive.
FLOPs (:func:`count_macs`): multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul per
sample, from the value shapes (symbolic dimensions count as 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from compressor.data import MASK_INPUT
from compressor.errors import CompressorError
from compressor.model_io import ir_version_for, model_bytes
from compressor.passes._graph import NameAllocator, NotFoldable, add_initializer, append_add, attr_float, attr_int, label
from compressor.scope import Scope

if TYPE_CHECKING:
    from compressor.data import Dataset

__all__ = [
    "PRUNABLE_OPS",
    "WeightLayer",
    "ChannelMoments",
    "find_weight_layers",
    "activation_moments",
    "cached_moments",
    "add_output_bias",
    "bias_delta",
    "conv_window_means",
    "replace_constant",
    "sparsity",
    "size_report",
    "count_macs",
    "require_calibration",
    "write_weight",
    "write_groups",
    "pruning_stats",
    "group_by_weight",
    "correct_biases",
    "input_moments",
]

logger = logging.getLogger(__name__)

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")
_ONNX = ("", "ai.onnx")
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclasses.dataclass
class WeightLayer:
    """A compute node with a constant weight; see the module docstring for the layouts.

    Attributes:
        node: The Conv, Gemm or MatMul node.
        weight: Its constant weight value (input 1).
    """

    node: ir.Node
    weight: ir.Value

    @property
    def name(self) -> str:
        return label(self.node)

    @property
    def op(self) -> str:
        return self.node.op_type

    def array(self) -> np.ndarray:
        """The weight's current value."""
        return self.weight.const_value.numpy()

    @property
    def group(self) -> int:
        return attr_int(self.node, "group", 1) if self.op == "Conv" else 1

    def to_rows(self, w: np.ndarray) -> np.ndarray:
        """The reduction-rows view ``R`` of ``w`` (cases 1-3): rows x input channels."""
        if self.op == "Conv":
            return np.moveaxis(w, 1, -1).reshape(-1, w.shape[1])
        if self.op == "Gemm" and attr_int(self.node, "transB", 0):
            return w
        return w.T

    def from_rows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`to_rows` for a weight of ``shape``."""
        if self.op == "Conv":
            moved = (shape[0], *shape[2:], shape[1])
            return np.moveaxis(rows.reshape(moved), -1, 1)
        if self.op == "Gemm" and attr_int(self.node, "transB", 0):
            return rows.reshape(shape)
        return rows.T.reshape(shape)

    def activation(self) -> ir.Value | None:
        """The activation input the weight multiplies."""
        return self.node.inputs[0]

    def activation_axis(self) -> int:
        """The channel axis of :meth:`activation` that the reduction runs over."""
        if self.op == "Conv":
            return 1
        if self.op == "Gemm":
            return 0 if attr_int(self.node, "transA", 0) else 1
        return -1

    def row_channel_values(self, per_channel: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        """``per_channel`` (one value per activation channel) laid out like ``to_rows(W)``.

        Broadcastable to the rows view: a grouped Conv's row reads only its group's channels.
        """
        per_channel = np.asarray(per_channel, np.float64)
        if self.op != "Conv":
            return per_channel[None, :]
        g, m, cg = self.group, w_shape[0], w_shape[1]
        by_out = per_channel.reshape(g, cg)[np.arange(m) // (m // g)]  # M x C/g
        return np.repeat(by_out, int(np.prod(w_shape[2:], dtype=np.int64)), axis=0)

    def output_axis(self) -> int:
        """The weight axis indexing output channels."""
        if self.op == "Conv":
            return 0
        if self.op == "Gemm":
            return 0 if attr_int(self.node, "transB", 0) else 1
        return 1


def _is_constant_float(value: ir.Value | None) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and not value.is_graph_input() and value.const_value.dtype in _FLOATS)


def find_weight_layers(graph: ir.Graph, ops: Iterable[str] = PRUNABLE_OPS,
                       scope: Scope = Scope()) -> tuple[list[WeightLayer], dict[str, str]]:
    """The layers of ``ops`` with a constant float weight in ``scope``; and skipped ones with why.

    A Conv's weight needs rank >= 3, a Gemm's or MatMul's rank 2 (batched MatMul weights
    are skipped).
    """
    wanted = set(ops)
    layers: list[WeightLayer] = []
    skipped: dict[str, str] = {}
    for node in graph:
        if node.op_type not in wanted or node.domain not in _ONNX or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        weight_names = [w.name] if w is not None and w.name else []
        if not scope.contains(node.name, *weight_names):
            skipped[label(node)] = "outside the recipe's scope"
            continue
        if not _is_constant_float(w):
            what = "" if w is None else f"`{w.name}` "
            skipped[label(node)] = f"weight {what}is not a constant float initializer".replace("  ", " ")
            continue
        rank = len(w.const_value.shape)
        if node.op_type == "Conv" and rank < 3 or node.op_type != "Conv" and rank != 2:
            skipped[label(node)] = f"{node.op_type} weight has rank {rank}"
            continue
        layers.append(WeightLayer(node, w))
    return layers, skipped


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
    """

    total: np.ndarray
    squares: np.ndarray
    count: int
    spatial: np.ndarray | None = None
    samples: int = 0

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
                       limit: int | None = None) -> dict[str, ChannelMoments]:
    """Run ``model`` on ``data`` (ONNX Runtime, CPU) and gather :class:`ChannelMoments`.

    Args:
        model: The model (not changed: a copy gets the tensors as extra outputs).
        axes: Tensor name -> its channel axis.
        data: Calibration samples.
        limit: Use at most this many samples.
    """
    work = ir.serde.deserialize_model(ir.serde.serialize_model(model))
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
            x = np.asarray(results[name], np.float64)
            axis %= x.ndim
            others = tuple(a for a in range(x.ndim) if a != axis)
            if mask is not None and mask.ndim == 2 and x.ndim >= 3 and axis >= 2 and x.shape[:2] == mask.shape:
                # token activations: padding positions are not data (see compressor.evaluation)
                keep = mask.astype(np.float64).reshape(mask.shape + (1,) * (x.ndim - 2))
                total, squares = (x * keep).sum(axis=others), (np.square(x) * keep).sum(axis=others)
                count = int(round(keep.sum())) * (x[0, 0].size // x.shape[axis])
            else:
                total, squares = x.sum(axis=others), np.square(x).sum(axis=others)
                count = x.size // x.shape[axis]
            spatial = x.sum(axis=0) if axis == 1 and x.ndim >= 3 else None
            if name not in acc:
                acc[name] = ChannelMoments(total, squares, count, spatial, x.shape[0])
            else:
                m = acc[name]
                m.total = m.total + total
                m.squares = m.squares + squares
                m.count += count
                if m.spatial is not None and spatial is not None and m.spatial.shape == spatial.shape:
                    m.spatial = m.spatial + spatial
                    m.samples += x.shape[0]
                else:
                    m.spatial = None
    missing = [n for n in axes if n not in acc]
    if missing:
        raise CompressorError("sparsity: the calibration data gave no batch to run (too few samples for the "
                              "model's fixed batch size?)")
    return acc


def cached_moments(model: ir.Model, axes: Mapping[str, int], data: Dataset, cache: dict) -> dict[str, ChannelMoments]:
    """:func:`activation_moments`, remembered in ``cache`` per model and data (re-runs are free)."""
    key = "sparsity.moments:" + hashlib.sha256(model_bytes(model)).hexdigest() + ":" + data.sha256
    store = cache.setdefault(key, {})
    todo = {n: a for n, a in axes.items() if (n, a) not in store}
    if todo:
        for name, moments in activation_moments(model, todo, data).items():
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
        if other is not None and _is_constant_float(other):
            b = other.const_value.numpy()
            if b.ndim >= 1 and b.shape[-1] == delta.size and all(d == 1 for d in b.shape[:-1]):
                replace_constant(graph, add, 1 - index, b.astype(np.float64) + delta, names, like=b)
                return "add"
    w = node.inputs[1].const_value.numpy()
    bias = add_initializer(graph, names(f"{node.inputs[1].name}_bias_correction"), delta.astype(w.dtype))
    append_add(graph, out, bias, names)
    return "new add"


def _constant(value: ir.Value, what: str) -> np.ndarray:
    if not _is_constant_float(value):
        raise NotFoldable(f"{what} `{value.name}` is not a constant float initializer")
    return value.const_value.numpy()


def replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, names: NameAllocator, *,
                     like: np.ndarray | None = None) -> ir.Value:
    """Give ``node``'s input ``index`` the constant ``array`` (cast to ``like``'s dtype).

    The initializer is changed in place when ``node`` is its only reader (its name is
    kept); otherwise ``node`` gets a new initializer with a fresh name and the shared one
    is left as it was.
    """
    value = node.inputs[index]
    dtype = (like if like is not None else value.const_value.numpy()).dtype
    array = np.ascontiguousarray(np.asarray(array).astype(dtype))
    uses = list(value.uses())
    if len(uses) == 1 and not value.is_graph_output() and not value.is_graph_input():
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return value
    new = add_initializer(graph, names(value.name), array)
    node.replace_input_with(index, new)
    return new


def sparsity(array: np.ndarray) -> float:
    """Fraction of exact zeros."""
    return float((array == 0).sum() / array.size) if array.size else 0.0


def _zlib_bytes(arrays: Iterable[np.ndarray]) -> int:
    return sum(len(zlib.compress(np.ascontiguousarray(a).tobytes(), 6)) for a in arrays)


def size_report(before: Sequence[np.ndarray], after: Sequence[np.ndarray]) -> dict[str, float]:
    """Dense and zlib-compressed megabytes of the weights, before and after."""
    return {
        "weight_mb_dense": round(sum(a.nbytes for a in after) / 1e6, 4),
        "weight_mb_dense_before": round(sum(a.nbytes for a in before) / 1e6, 4),
        "weight_mb_zlib_before": round(_zlib_bytes(before) / 1e6, 4),
        "weight_mb_zlib": round(_zlib_bytes(after) / 1e6, 4),
    }


def _dims(value: ir.Value | None) -> list[int] | None:
    """Static dims of ``value``'s shape, symbolic ones as 1 (``None``: unknown shape)."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in value.shape]


def count_macs(graph: ir.Graph) -> int:
    """Multiply-accumulates of the Conv/ConvTranspose/Gemm/MatMul nodes, per sample.

    Layers whose shapes are unknown are not counted.
    """
    total = 0
    for node in graph:
        if node.domain not in _ONNX or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out = _dims(node.outputs[0])
        w = _dims(node.inputs[1]) if len(node.inputs) > 1 else None
        a = _dims(node.inputs[0])
        if out is None or w is None:
            continue
        if node.op_type == "Conv":
            total += int(np.prod(out[1:], dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":
            total += int(np.prod(a[1:], dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64)) if a else 0
        elif node.op_type == "Gemm":
            k = w[0] if attr_int(node, "transB", 0) == 0 else w[1]
            total += int(np.prod(out[1:], dtype=np.int64)) * k
        else:
            k = w[-2] if len(w) >= 2 else w[0]
            total += int(np.prod(out[1:], dtype=np.int64) if len(out) > 1 else 1) * k
    return total


def write_weight(graph: ir.Graph, weight: ir.Value, nodes: Sequence[ir.Node], array: np.ndarray,
                 names: NameAllocator) -> ir.Value:
    """Give the ``nodes`` reading ``weight`` (as input 1) the new value ``array``.

    In place (the name is kept) when those nodes are its only readers; otherwise they
    get a new initializer with a fresh name and the other readers keep the old one.
    """
    array = np.ascontiguousarray(np.asarray(array).astype(weight.const_value.numpy().dtype))
    readers = {id(user) for user, _ in weight.uses()}
    if readers <= {id(n) for n in nodes} and not weight.is_graph_output():
        weight.const_value = ir.tensor(array, name=weight.name)
        weight.shape = ir.Shape(array.shape)
        return weight
    new = add_initializer(graph, names(f"{weight.name}_sparse"), array)
    for node in nodes:
        node.replace_input_with(1, new)
    return new


def write_groups(graph: ir.Graph, groups: Sequence[Sequence[WeightLayer]], dense: Sequence[np.ndarray],
                 new: Sequence[np.ndarray], names: NameAllocator,
                 ) -> tuple[dict[str, float], list[tuple[WeightLayer, np.ndarray]]]:
    """Give each group of layers sharing a weight its new array (where it changed).

    Returns:
        Layer name -> sparsity of its new weight, and ``(layer, dense weight)`` of every
        layer whose weight changed (what :func:`correct_biases` takes).
    """
    per_layer: dict[str, float] = {}
    changed: list[tuple[WeightLayer, np.ndarray]] = []
    for group, w, array in zip(groups, dense, new):
        if not np.array_equal(array, w):
            write_weight(graph, group[0].weight, [layer.node for layer in group], array, names)
            for layer in group:
                layer.weight = layer.node.inputs[1]
                changed.append((layer, w))
        for layer in group:
            per_layer[layer.name] = round(sparsity(array), 4)
    return per_layer, changed


def pruning_stats(dense: Sequence[np.ndarray], new: Sequence[np.ndarray], per_layer: dict[str, float],
                  skipped: Mapping[str, str], corrected: dict[str, str]) -> dict[str, Any]:
    """The stats a weight-zeroing pass reports: overall sparsity, sizes, bias correction, layers."""
    total = sum(w.size for w in dense)
    stats = {
        "layers_skipped": len(skipped),
        "sparsity": round(sum(int((w == 0).sum()) for w in new) / total, 4) if total else 0.0,
        **size_report(dense, new),
        "bias_corrected": sum(1 for how in corrected.values() if not how.startswith("skipped")),
        "per_layer": per_layer,
        "skipped_layers": dict(sorted(skipped.items())),
    }
    if corrected:
        stats["bias_correction"] = corrected
    return stats


def group_by_weight(layers: Sequence[WeightLayer]) -> list[list[WeightLayer]]:
    """``layers`` grouped by the weight value they read, in graph order."""
    groups: dict[int, list[WeightLayer]] = {}
    for layer in layers:
        groups.setdefault(id(layer.weight), []).append(layer)
    return list(groups.values())


def input_moments(model: ir.Model, layers: Sequence[WeightLayer], data: Dataset,
                  cache: dict) -> dict[str, ChannelMoments]:
    """:class:`ChannelMoments` of each layer's activation input along its reduction axis.

    Call it before changing any weight: bias correction wants ``E[x]`` of the model as
    the pass found it.
    """
    axes = {}
    for layer in layers:
        act = layer.activation()
        if act is not None and act.name:
            axes[act.name] = layer.activation_axis()
    return cached_moments(model, axes, data, cache) if axes else {}


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
