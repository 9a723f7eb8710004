"""Small graph helpers shared by the folding passes.

Everything here works on ``onnx_ir`` objects and keeps the graph's contract: graph input
and output names never change, initializers that other nodes share are never mutated
(new ones get fresh names), and values that take over another value's role also take
over its name.

A check that fails raises :class:`NotFoldable` with a reason a person can act on; a pass
catches it, logs it per node and counts it in its stats.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

__all__ = [
    "NotFoldable",
    "label",
    "constant_array",
    "attr_int",
    "attr_float",
    "sole_consumer",
    "only_first_output_used",
    "NameAllocator",
    "every_graph",
    "add_initializer",
    "drop_if_unused",
    "take_over",
    "append_add",
    "known_rank",
]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
)


class NotFoldable(Exception):
    """A pattern was found but cannot be rewritten; the message says why.

    The message names the values and nodes involved in backticks; :attr:`key` is the
    message without them, so that skips with the same cause count together in stats.
    """

    @property
    def key(self) -> str:
        """The reason without the names in it, e.g. ``weight is not a constant initializer``."""
        text = re.sub(r"\s+", " ", re.sub(r"`[^`]*`", "", str(self)))
        return text.replace("( ", "(").replace(" )", ")").replace(" :", ":").replace(" ,", ",").strip()


def label(node: ir.Node) -> str:
    """A name for ``node`` in messages, stats and manifests: its name, else ``Op -> output``.

    The one spelling of a node everywhere (passes' stats, accuracy control's layer names,
    targets' offender lists), so a name a report gives can be looked up in another.
    """
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type} -> {out}"


def constant_array(value: ir.Value | None, what: str) -> np.ndarray:
    """The value of a constant floating-point initializer.

    A graph input with a default (an initializer that is also an input) is *not*
    constant: a caller may override it.

    Args:
        value: The value to read.
        what: What the value is to the caller (``"weight"``, ``"BN scale"``), for messages.

    Raises:
        NotFoldable: the value is missing, not an initializer, overridable, or not float.
    """
    if value is None:
        raise NotFoldable(f"{what} is missing")
    if not value.is_initializer() or value.const_value is None:
        raise NotFoldable(f"{what} `{value.name}` is not a constant initializer (run fold-constants first)")
    if value.is_graph_input():
        raise NotFoldable(f"{what} `{value.name}` is a graph input that callers may override")
    if value.const_value.dtype not in _FLOAT_TYPES:
        raise NotFoldable(f"{what} `{value.name}` has dtype {value.const_value.dtype}, not a float type")
    return value.const_value.numpy()


def attr_int(node: ir.Node, name: str, default: int) -> int:
    """Integer attribute ``name`` of ``node`` (``default`` when absent)."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref():
        raise NotFoldable(f"attribute {name!r} is a reference to a function attribute")
    return attr.as_int()


def attr_float(node: ir.Node, name: str, default: float) -> float:
    """Float attribute ``name`` of ``node`` (``default`` when absent)."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref():
        raise NotFoldable(f"attribute {name!r} is a reference to a function attribute")
    return attr.as_float()


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The node that is the only reader of ``value``, or ``None``.

    ``None`` also when ``value`` is a graph output (someone outside reads it) or when the
    one consumer reads it through more than one input.
    """
    if value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    return uses[0].node


def only_first_output_used(node: ir.Node) -> bool:
    """Whether no output but the first is read or returned (inference-mode BN, plain LN)."""
    return all(not out.uses() and not out.is_graph_output() for out in node.outputs[1:])


def known_rank(*values: ir.Value | None) -> int | None:
    """The rank of the first of ``values`` whose shape is known."""
    for value in values:
        if value is not None and value.shape is not None:
            return len(value.shape)
    return None


def every_graph(graph: ir.Graph) -> list[ir.Graph]:
    """``graph`` and every control-flow body in it (nested ones included), outer first."""
    return [graph, *graph.subgraphs()]


class NameAllocator:
    """Hands out value names that no value in the model uses yet (:meth:`for_nodes`: node names)."""

    def __init__(self, graph: ir.Graph):
        self._used: set[str] = set()
        for g in (graph, *graph.subgraphs()):
            self._used.update(v.name for v in g.inputs if v.name)
            self._used.update(g.initializers)
            for node in g:
                self._used.update(v.name for v in node.outputs if v.name)

    @classmethod
    def for_nodes(cls, graph: ir.Graph) -> NameAllocator:
        """An allocator of node names that no node in the model has yet."""
        names = cls.__new__(cls)
        names._used = {node.name for g in (graph, *graph.subgraphs()) for node in g if node.name}
        return names

    def __call__(self, base: str) -> str:
        """A fresh name starting with ``base``."""
        name, i = base, 1
        while name in self._used:
            name = f"{base}_{i}"
            i += 1
        self._used.add(name)
        return name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer called ``name`` (already fresh)."""
    array = np.asarray(array)
    tensor = ir.tensor(np.array(array, order="C", copy=True), name=name)  # keeps 0-d arrays 0-d
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
    graph.register_initializer(value)
    return value


def drop_if_unused(graph: ir.Graph, values: Iterable[ir.Value | None]) -> None:
    """Remove the initializers among ``values`` that nothing reads any more."""
    for value in values:
        if value is None or not value.is_initializer() or value.name not in graph.initializers:
            continue
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[value.name]


def take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` (graph outputs included) read ``new``; ``new`` gets its name.

    ``old``'s producer is removed from ``graph``: it must have no other output in use.
    """
    producer = old.producer()
    name = old.name
    if old.type is not None:
        new.type = old.type
    if old.shape is not None:
        new.shape = old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if producer is not None:
        graph.remove(producer, safe=True)
    new.name = name


def append_add(graph: ir.Graph, value: ir.Value, bias: ir.Value, names: NameAllocator) -> ir.Node:
    """Insert ``value + bias`` after ``value``'s producer; every former reader reads the sum.

    The sum takes over ``value``'s name (so a graph output keeps its name); ``value``
    gets a fresh one.
    """
    producer = value.producer()
    assert producer is not None, "append_add needs a value produced by a node"
    uses = list(value.uses())
    output_slots = [i for i, out in enumerate(graph.outputs) if out is value]
    old_name = value.name or names("biased")
    value.name = names(f"{old_name}_nobias")
    add = ir.node("Add", [value, bias], name=names(f"{producer.name or old_name}_bias"))
    total = add.outputs[0]
    total.name = old_name
    total.type, total.shape = value.type, value.shape
    graph.insert_after(producer, add)
    for user, index in uses:
        user.replace_input_with(index, total)
    for i in output_slots:
        graph.outputs[i] = total
    return add
