"""``qnn-gathernd-to-gather``: ``GatherND`` with constant indices as ``Reshape`` (``-> Gather``).

Rule: HTP refuses ``GatherND`` on a boolean mask (BERT-style exporters write it for the
attention mask). With ``batch_dims = 0``, constant indices ``idx`` (last axis ``k``) and
a static data shape ``[d_0, ..., d_{k-1}, rest...]``, each index row picks the slice

    data[i_0, ..., i_{k-1}] = reshape(data, [D, rest...])[sum_j i_j * stride_j],
    stride_j = prod(d_{j+1} .. d_{k-1}),  D = prod(d_0 .. d_{k-1})

(negative indices taken modulo ``d_j``), so the node becomes

1. ``Reshape(data, idx.shape[:-1] + rest)`` when the flat indices enumerate ``0 .. D-1`` in
   order (the slices are the data, reshaped), else
2. ``Reshape(data, [D, rest...]) -> Gather(axis=0, flat indices of shape idx.shape[:-1])``:

the same elements in the same order. Other ``GatherND`` nodes are left as they are (the
target's check names them if HTP cannot run them).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common is not imported by onnx_ir itself)
from compressor.passes._graph import NameAllocator, add_initializer, take_over
from compressor.targets.base import on_cpu

from compressor.pipeline import Pass, PassContext, PassResult, register_pass

__all__ = ["GatherNdToGather", "gathernd_to_gather"]

logger = logging.getLogger(__name__)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def gathernd_to_gather(graph: ir.Graph) -> int:
    """Rewrite every eligible ``GatherND`` of ``graph`` (module docstring); returns how many."""
    names = NameAllocator(graph)
    count = 0
    for node in list(graph):
        if node.op_type != "GatherND" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 \
                or on_cpu(node):  # the CPU front end runs it as it is
            continue
        batch_dims = node.attributes.get("batch_dims")
        data, idx = node.inputs[0], _constant(node.inputs[1])
        if (batch_dims is not None and batch_dims.as_int() != 0) or idx is None or data is None \
                or data.shape is None or not all(isinstance(d, int) for d in data.shape):
            continue
        dims = [int(d) for d in data.shape]
        k = idx.shape[-1]
        lead, rest = dims[:k], dims[k:]
        coords = np.mod(idx.reshape(-1, k).astype(np.int64), np.asarray(lead, np.int64))
        flat = np.ravel_multi_index(tuple(coords.T), lead) if k else np.zeros(len(coords), np.int64)
        out_shape = [*idx.shape[:-1], *rest]
        out = node.outputs[0]
        total = int(np.prod(lead)) if lead else 1
        base = node.name or "gathernd"
        if flat.size == total and np.array_equal(flat, np.arange(total)):  # case 1
            shape = add_initializer(graph, names(f"{base}_shape"), np.asarray(out_shape, np.int64))
            new = [ir.node("Reshape", [data, shape], name=names(f"{base}_as_reshape"))]
        else:  # case 2
            shape = add_initializer(graph, names(f"{base}_flat_shape"), np.asarray([total, *rest], np.int64))
            where = add_initializer(graph, names(f"{base}_flat_indices"), flat.reshape(idx.shape[:-1]))
            reshape = ir.node("Reshape", [data, shape], name=names(f"{base}_flatten"))
            reshape.outputs[0].name = names(f"{base}_flat")
            new = [reshape, ir.node("Gather", [reshape.outputs[0], where], attributes={"axis": 0},
                                    name=names(f"{base}_as_gather"))]
        graph.insert_after(node, new)
        result = new[-1].outputs[0]
        take_over(graph, out, result)
        result.shape = ir.Shape(out_shape)  # the computed shape, not the one declared (take_over copies that)
        count += 1
    return count


@register_pass
class GatherNdToGather(Pass):
    """``GatherND`` with constant indices becomes ``Reshape`` or ``Reshape -> Gather`` (module docstring)."""

    name = "qnn-gathernd-to-gather"
    description = "rewrite GatherND with constant indices as Reshape/Gather (QNN HTP refuses it on masks)"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        count = gathernd_to_gather(model.graph)
        if count:
            ir.passes.common.RemoveUnusedNodesPass()(model)  # the index constants
        return PassResult(model, count > 0, {"gathernd_rewritten": count})
