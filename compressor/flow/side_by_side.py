"""Several edited copies of one model as one model: every ranking candidate of a stage in one session.

Accuracy control ranks layers by running the quantized model once per candidate, each a
copy with one layer given back (:mod:`compressor.flow.ranking`). Built one session each,
a candidate pays its own serialization, session build and graph optimization; on a model
whose candidates run few samples (the screen: 8) that fixed part is most of the cost
(ddddocr's recogniser: ~1.6 s per candidate, its 8 samples a fraction of it).

:func:`side_by_side` puts the candidates into one graph, next to each other: the graph
inputs and the initializers the copies share (the same tensor objects:
:func:`~compressor.model_io.clone_model` shares tensors) are held once; every node and
every value a copy computes is that copy's own (renamed ``<name>__<i>``), and the graph's
outputs are each copy's outputs in turn. One session then runs every candidate on each
batch.

The copies compute what they compute in their own sessions, bit for bit, as long as no
optimization merges nodes across copies: ONNX Runtime's common-subexpression elimination
would merge the identical part before the layer given back, which changes how many
readers a value has and so which Q/DQ pairs fuse into int8 kernels, and so the
rounding. :data:`UNMERGED` names that optimizer, to disable in the session.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx_ir as ir

__all__ = ["UNMERGED", "side_by_side"]

logger = logging.getLogger(__name__)

#: ONNX Runtime optimizers to disable so the copies stay apart (module docstring).
UNMERGED = ("CommonSubexpressionElimination",)


def _refusal(model: ir.Model) -> str | None:
    """Why ``model`` cannot be put side by side with others (``None``: it can)."""
    if model.functions:
        return "it has model-local functions"
    for node in model.graph:
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            return f"node {node.name or node.op_type} has a subgraph"
    produced = {v.name for node in model.graph for v in node.outputs}
    if any(v.name not in produced for v in model.graph.outputs):
        return "a graph output is not computed by a node"
    return None


def side_by_side(models: Sequence[ir.Model]) -> tuple[ir.Model, list[int]] | None:
    """One model computing every model of ``models`` on the same inputs (module docstring).

    Args:
        models: Copies of one model (the same inputs and opsets), edited differently.

    Returns:
        The model, whose outputs are those of ``models[0]``, then ``models[1]``'s..., and
        how many outputs each copy has; ``None`` (logged) where the copies cannot be
        combined: graph inputs or opsets that differ, subgraphs, local functions, or an
        output that is an input or initializer.
    """
    first = models[0]
    for model in models:
        reason = _refusal(model)
        if reason is None and ([(v.name, v.dtype) for v in model.graph.inputs] !=
                               [(v.name, v.dtype) for v in first.graph.inputs]
                               or dict(model.opset_imports) != dict(first.opset_imports)):
            reason = "the copies' inputs or opsets differ"
        if reason is not None:
            logger.debug("candidates not put side by side: %s", reason)
            return None
    inputs = [ir.Value(name=v.name, type=v.type, shape=v.shape) for v in first.graph.inputs]
    by_name = {v.name: v for v in inputs}
    initializers: dict[str, ir.Value] = {}
    nodes: list[ir.Node] = []
    outputs: list[ir.Value] = []
    counts: list[int] = []
    for i, model in enumerate(models):
        mapped: dict[int, ir.Value] = {id(v): by_name[v.name] for v in model.graph.inputs}
        for name, value in model.graph.initializers.items():
            held = initializers.get(name)
            if held is not None and held.const_value is value.const_value:
                mapped[id(value)] = held  # the same tensor: one initializer for every copy
                continue
            own = name if held is None else f"{name}__{i}"
            copy = ir.Value(name=own, type=value.type, shape=value.shape, const_value=value.const_value)
            initializers[own] = mapped[id(value)] = copy
        for node in model.graph:
            copied = ir.Node(node.domain, node.op_type, [None if v is None else mapped[id(v)] for v in node.inputs],
                             [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                             overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                             name=f"{node.name}__{i}" if node.name else None)
            for old, new in zip(node.outputs, copied.outputs):
                new.name, new.type, new.shape = f"{old.name}__{i}", old.type, old.shape
                mapped[id(old)] = new
            nodes.append(copied)
        outputs.extend(mapped[id(v)] for v in model.graph.outputs)
        counts.append(len(model.graph.outputs))
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=list(initializers.values()),
                     opset_imports=dict(first.opset_imports), name=first.graph.name)
    return ir.Model(graph, ir_version=first.ir_version, producer_name=first.producer_name), counts
