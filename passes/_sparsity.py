"""Helpers shared by the sparsity passes (``prune-magnitude``, ``sparsify-nm``, ``prune-channels``).

Activation statistics and bias correction live in :mod:`._sparsity_moments`.

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

Size figures (:func:`size_report`): dense bytes, and the zlib-compressed bytes of the
same weights, the on-disk size a sparse (zero-rich) weight reaches in a zip/gzip archive.
FLOPs (:func:`count_macs`): multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul per
sample, from the value shapes (symbolic dimensions count as 1).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import NameAllocator, add_initializer, attr_int, label

from compressor.scope import Scope

__all__ = [
    "PRUNABLE_OPS",
    "WeightLayer",
    "find_weight_layers",
    "is_constant_float",
    "replace_constant",
    "sparsity",
    "size_report",
    "count_macs",
    "write_weight",
    "write_groups",
    "pruning_stats",
    "group_by_weight",
    "nm_keep_mask",
]

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


def is_constant_float(value: ir.Value | None) -> bool:
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
        if not is_constant_float(w):
            what = "" if w is None else f"`{w.name}` "
            skipped[label(node)] = f"weight {what}is not a constant float initializer".replace("  ", " ")
            continue
        rank = len(w.const_value.shape)
        if node.op_type == "Conv" and rank < 3 or node.op_type != "Conv" and rank != 2:
            skipped[label(node)] = f"{node.op_type} weight has rank {rank}"
            continue
        layers.append(WeightLayer(node, w))
    return layers, skipped


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


def nm_keep_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask of a ``rows x K`` score matrix: the ``n`` largest of every ``m`` along K.

    ``K`` must be a multiple of ``m``. Ties go to the earlier position.
    """
    rows, k = scores.shape
    groups = scores.reshape(rows, k // m, m)
    # stable ascending sort of -score: largest first, earlier position first among equals
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(rows, k)
