"""Concats of Concats share one encoding (``qnn-quantize-tensors`` case 1f).

A detector's head concatenates, per level, its box regression and its scores
(``Concat(reg, Sigmoid(obj), Sigmoid(cls))``), flattens each level and concatenates the
levels. HTP writes a Concat's inputs in place into its output's buffer; where the inner
Concats had encodings of their own, the QNN HTP backend (onnxruntime-qnn 2.x, the emulator
here) left part of an inner Concat on the inner grid inside the outer buffer, which it read
on the outer grid: ddddocr's detector came out with the objectness of two of its three
levels wrong (q 69 where 103 was meant; AP50 vs fp32 0.764 on HTP against 0.980 for the
same graph run as written on the CPU). One encoding for the whole tree leaves nothing to
requantize between the Concats: only each leaf input is requantized into the tree's grid,
as for a single Concat, which HTP gets right.

The tree's range is the union of its Concats' calibrated ranges (the root's holds the
others' values anyway); its width is 16 bits where a leaf input spans under
:data:`~.widen.CONCAT_RANGE_RATIO` of that range (case 2h, :func:`~.widen.mixed_concats`,
judged on the tree, not on each Concat's own range), and so is the data movement between its Concats (a Reshape at 8
bits between two 16-bit Concats would round the tree to 8 bits on the way).
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

__all__ = ["ConcatTree", "concat_trees"]


class ConcatTree:
    """The Concats (by output name) whose outputs flow into one root Concat, and the tree's range."""

    def __init__(self, root: ir.Node):
        self.root = root
        self.members: list[ir.Node] = [root]
        self.between: list[ir.Node] = []  # the data movement from a member to the Concat it feeds

    @property
    def names(self) -> list[str]:
        return [n.outputs[0].name for n in self.members]

    def range(self, ranges: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
        """The union of the members' ranges (``None`` when one was not calibrated)."""
        found = [ranges.get(name) for name in self.names]
        if any(r is None for r in found):
            return None
        return min(r[0] for r in found), max(r[1] for r in found)

    def leaves(self, moves: frozenset[str]) -> list[ir.Value]:
        """The members' inputs that are not other members' outputs (through ``moves``)."""
        inner = {id(n.outputs[0]) for n in self.members}
        found = []
        for node in self.members:
            for value in node.inputs:
                source = value
                while source is not None and id(source) not in inner and (p := source.producer()) is not None \
                        and p.op_type in moves and p.inputs and p.inputs[0] is not None:
                    source = p.inputs[0]
                if value is not None and (source is None or id(source) not in inner):
                    found.append(value)
        return found


def _parent(node: ir.Node, moves: frozenset[str]) -> tuple[ir.Node, list[ir.Node]] | None:
    """The Concat ``node``'s output flows into alone, through single-reader ``moves`` ops, and those ops."""
    value, path = node.outputs[0], []
    for _ in range(16):
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return None
        user = uses[0].node
        if user.op_type == "Concat":
            return user, path
        if user.op_type not in moves or user.inputs[0] is not value or len(user.outputs) != 1:
            return None
        path.append(user)
        value = user.outputs[0]
    return None


def _concat(node: ir.Node) -> bool:
    return node.op_type == "Concat" and node.domain in ("", "ai.onnx")


def concat_trees(graph: ir.Graph, moves: frozenset[str], singletons: bool = False) -> list[ConcatTree]:
    """Every tree of two Concats or more (a Concat feeding another, through data movement only);
    with ``singletons``, each other Concat as a tree of one too."""
    parent = {id(n): p for n in graph if _concat(n) and (p := _parent(n, moves)) is not None}
    trees: dict[int, ConcatTree] = {}
    for node in graph:
        if not _concat(node) or id(node) not in parent:
            continue
        root = node
        while id(root) in parent:
            root = parent[id(root)][0]
        tree = trees.setdefault(id(root), ConcatTree(root))
        tree.members.append(node)
        tree.between += parent[id(node)][1]
    if singletons:
        for node in graph:
            if _concat(node) and id(node) not in parent and id(node) not in trees:
                trees[id(node)] = ConcatTree(node)
    return list(trees.values())
