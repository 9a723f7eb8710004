"""Helpers shared by the sparsity passes (``prune-magnitude``, ``sparsify-nm``, ``prune-channels``).

The layer model (:class:`~._layers.Layer`, its reduction-rows view and axis rules) is
:mod:`._layers`; bias correction is :mod:`._bias_correction`; activation statistics come
from the one tapped-model runner, :mod:`compressor.quant.taps` (:func:`input_moments`).

Size figures (:func:`size_report`): dense bytes, and the zlib-compressed bytes of the
same weights, the on-disk size a sparse (zero-rich) weight reaches in a zip/gzip archive.
FLOPs (:func:`count_macs`): multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul per
sample, from the value shapes (symbolic dimensions count as 1).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import NameAllocator, add_initializer, attr_int
from compressor.passes._layers import Layer

from compressor.errors import CompressorError
from compressor.quant.taps import ChannelMoments, StatPoint, gather

if TYPE_CHECKING:
    from compressor.data import Dataset

__all__ = [
    "count_macs",
    "group_by_weight",
    "input_moments",
    "nm_keep_mask",
    "pruning_stats",
    "replace_constant",
    "require_calibration",
    "size_report",
    "sparsity",
    "write_groups",
    "write_weight",
]

_ONNX = ("", "ai.onnx")


def require_calibration(ctx_calibration: Dataset | None, what: str) -> Dataset:
    """The calibration data, or an error that says how to give it."""
    if ctx_calibration is None:
        raise CompressorError(f"{what} needs calibration data: pass --calib samples.npz")
    return ctx_calibration


def input_moments(model: ir.Model, layers: Sequence[Layer], data: Dataset, cache: dict,
                  gram: bool = False) -> dict[str, ChannelMoments]:
    """:class:`ChannelMoments` of each layer's activation input along its reduction axis.

    Call it before changing any weight: bias correction wants ``E[x]`` of the model as
    the pass found it. Gathered through the one runner and its cache (one run per model
    and data).

    Args:
        gram: Also keep each input's channel Gram matrix ``sum x x^T`` (SparseGPT).
    """
    points = moment_points(layers, gram)
    found = gather(model, data, points.values(), cache)
    return {name: found[p] for name, p in points.items()}


def moment_points(layers: Sequence[Layer], gram: bool = False) -> dict[str, StatPoint]:
    """Activation name -> the :class:`StatPoint` of each layer's input moments along its reduction axis."""
    points = {}
    for layer in layers:
        act, axis = layer.activation(), layer.activation_axis()
        if act is not None and act.name and axis is not None:
            points[act.name] = StatPoint(act.name, "moments", axis, gram)
    return points


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


def write_groups(graph: ir.Graph, groups: Sequence[Sequence[Layer]], dense: Sequence[np.ndarray],
                 new: Sequence[np.ndarray], names: NameAllocator,
                 ) -> tuple[dict[str, float], list[tuple[Layer, np.ndarray]]]:
    """Give each group of layers sharing a weight its new array (where it changed).

    Returns:
        Layer name -> sparsity of its new weight, and ``(layer, dense weight)`` of every
        layer whose weight changed (what :func:`correct_biases` takes).
    """
    per_layer: dict[str, float] = {}
    changed: list[tuple[Layer, np.ndarray]] = []
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


def group_by_weight(layers: Sequence[Layer]) -> list[list[Layer]]:
    """``layers`` grouped by the weight value they read, in graph order."""
    groups: dict[int, list[Layer]] = {}
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
