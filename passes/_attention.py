"""Find the layers of attention blocks (projections and attention MatMuls), by structure.

An attention block is ``Softmax(f(Q Kᵀ)) V`` written with plain ops: a MatMul of two
activations (the scores) feeds a Softmax through scaling and mask ops, and the Softmax
output is the left operand of a second activation MatMul. Walking back from each operand
through reshapes, transposes, bias adds and constant scales reaches the linear layer (a
MatMul or Gemm with a constant weight) that projects it:

- the scores' left operand comes from the **query** projection,
- the scores' right operand (``Kᵀ``) from the **key** projection,
- the second MatMul's right operand from the **value** projection;

the scores MatMul itself has the role **scores**, the second one (``probs · V``) the role
**context**.

Names are never used, so this finds the same layers in a torch.export capture, an
exporter's ONNX file or a hand-written graph. A fused QKV projection (one MatMul whose
output is Split) carries all three roles.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir
from compressor.passes._placement import is_constant

__all__ = ["ROLES", "attention_projections"]

#: Roles a projection can have, as the recipe spells them.
ROLES = ("attention-queries", "attention-keys", "attention-values", "attention-scores", "attention-context")

# Ops an operand may pass through between its projection and the attention MatMul.
_PASS_THROUGH = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast",
                           "Split", "Slice", "Add", "Sub", "Mul", "Div"})
# Ops between the scores MatMul and the Softmax (scaling, masking; a Flatten that ONNX's
# version converter writes before a Softmax of opset < 13 whose input rank it cannot see).
_SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Reshape", "Flatten", "Identity"})
# Ops between the Softmax and the context MatMul: casts, dropout, and the Reshape back to the
# scores' shape that the version converter writes after such a Softmax.
_PROBS_OPS = frozenset({"Cast", "Dropout", "Identity", "Reshape"})
# Of these, only the data input is followed (the others are shapes, indices, axes).
_DATA_ONLY = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Split", "Slice", "Flatten"})
_DEPTH = 8


def _inputs(node: ir.Node) -> Iterable[ir.Value]:
    values = node.inputs[:1] if node.op_type in _DATA_ONLY else node.inputs
    return (v for v in values if v is not None and not is_constant(v))


def _is_linear(node: ir.Node) -> bool:
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    return is_constant(node.inputs[1]) and not is_constant(node.inputs[0])


def _is_activation_matmul(node: ir.Node) -> bool:
    return (node.op_type == "MatMul" and len(node.inputs) == 2
            and all(v is not None and not is_constant(v) for v in node.inputs))


def _projection(value: ir.Value, depth: int = _DEPTH) -> ir.Node | None:
    """The linear layer ``value`` is reshaped, transposed, biased or scaled from."""
    node = value.producer()
    if node is None or depth == 0:
        return None
    if _is_linear(node):
        return node
    if node.op_type not in _PASS_THROUGH:
        return None
    sources = list(_inputs(node))
    if len(sources) != 1:  # e.g. Add of two activations: not a bias or a scale
        return None
    return _projection(sources[0], depth - 1)


def _scores(value: ir.Value, depth: int = _DEPTH) -> ir.Node | None:
    """The activation MatMul that ``value`` (a Softmax input) is computed from."""
    node = value.producer()
    if node is None or depth == 0:
        return None
    if _is_activation_matmul(node):
        return node
    if node.op_type not in _SCORE_OPS:
        return None
    for source in _inputs(node):
        found = _scores(source, depth - 1)
        if found is not None:
            return found
    return None


def _readers(value: ir.Value, depth: int = 3) -> Iterable[tuple[ir.Node, int]]:
    """``(node, input index)`` reading ``value``, looking through casts, dropout and reshapes."""
    for node, index in value.uses():
        if node.op_type in _PROBS_OPS and index == 0 and depth > 0:
            yield from _readers(node.outputs[0], depth - 1)
        else:
            yield node, index


def attention_projections(graph: ir.Graph) -> dict[str, set[str]]:
    """Attention MatMuls and the linear layers projecting their operands.

    Returns:
        Node name -> the roles (:data:`ROLES`) of that layer.
    """
    roles: dict[str, set[str]] = {}

    def mark(node: ir.Node | None, role: str) -> None:
        if node is not None:
            roles.setdefault(node.name, set()).add(role)

    for node in graph:
        if node.op_type != "Softmax" or not node.inputs or node.inputs[0] is None:
            continue
        scores = _scores(node.inputs[0])
        if scores is None:
            continue
        mark(scores, "attention-scores")
        mark(_projection(scores.inputs[0]), "attention-queries")
        mark(_projection(scores.inputs[1]), "attention-keys")
        for reader, index in _readers(node.outputs[0]):
            if _is_activation_matmul(reader) and index == 0:
                mark(reader, "attention-context")
                mark(_projection(reader.inputs[1]), "attention-values")
    return roles
