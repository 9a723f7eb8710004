"""A digest of what a model computes, whatever its values and nodes are named.

Two copies of a model edited differently can compute the same thing under other names:
accuracy control's candidate with one more layer promoted to 16 bits writes a fresh Q/DQ
pair (``x_scale_2``...) where the pair it replaces had the same parameters, and the
passes after ``quantize`` then give the same graph under new names. Serialized bytes
differ; :func:`model_digest` does not.

The digest is a hash over the graph from its outputs back (a Merkle hash):

1. a node: its op (domain, type, overload), its attributes (a tensor by its contents, a
   body graph by its own digest), the digests of its inputs in order, its output count;
2. a value: its producer's digest and output index; a graph input by its name (what
   callers feed), dtype and shape; a constant by its dtype, shape and bytes; anything
   else (a value read from nowhere) by its name;
3. a graph: its inputs, then each output's name and value digest; a model: its opsets,
   its main graph, its functions (serialized).

Node and value names, node order, metadata (but where a node runs, ``targets.base.RUNS_ON``,
which decides how the target splits the artifact) and nodes nothing reads (they compute
nothing the outputs show) are left out. Equal digests mean the same computation on the
same constants, so the same lowered artifact up to names; a difference in anything left
in (a graph input renamed, a body's names) only makes two equal computations look
different, never the reverse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import onnx_ir as ir

from compressor.pass_manager import outer_reads
from compressor.targets.base import RUNS_ON

__all__ = ["model_digest"]


class _Digests:
    """The digests of one model's nodes, values and tensors (by object id), computed once each."""

    def __init__(self) -> None:
        self.values: dict[int, bytes] = {}
        self.tensors: dict[int, bytes] = {}

    def tensor(self, tensor: ir.TensorProtocol) -> bytes:
        key = id(tensor)
        if key not in self.tensors:
            h = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            h.update(tensor.tobytes())
            self.tensors[key] = h.digest()
        return self.tensors[key]

    def attribute(self, attr: ir.Attr) -> bytes:
        """An attribute's name, type and value (case 1)."""
        head = f"{attr.name}|{attr.type}|".encode()
        if attr.is_ref():
            return head + repr(attr.ref_attr_name).encode()
        value = attr.value
        if attr.type == ir.AttributeType.TENSOR:
            return head + self.tensor(value)
        if attr.type == ir.AttributeType.TENSORS:
            return head + b"".join(self.tensor(t) for t in value)
        if attr.type == ir.AttributeType.GRAPH:
            return head + self.graph(value)
        if attr.type == ir.AttributeType.GRAPHS:
            return head + b"".join(self.graph(g) for g in value)
        return head + repr(value).encode()

    def value(self, value: ir.Value | None) -> bytes:
        """Case 2 for a value whose producer (if any) is digested already."""
        if value is None:
            return b"none"
        key = id(value)
        if key in self.values:
            return self.values[key]
        if value.producer() is not None:
            raise RuntimeError(f"value {value.name!r} digested before its producer")
        h = hashlib.sha256()
        if value.is_graph_input():
            h.update(f"input|{value.name}|{value.dtype}|{value.shape}|".encode())
        if value.const_value is not None:
            h.update(b"const|" + self.tensor(value.const_value))
        elif not value.is_graph_input():
            h.update(f"unbound|{value.name}".encode())
        self.values[key] = h.digest()
        return self.values[key]

    def node(self, node: ir.Node) -> None:
        """Case 1, and the digests of the node's outputs."""
        h = hashlib.sha256(f"{node.domain}|{node.op_type}|{node.overload}|{len(node.outputs)}|"
                           f"{node.metadata_props.get(RUNS_ON, '')}|".encode())
        for name in sorted(node.attributes):
            h.update(self.attribute(node.attributes[name]))
        for value in node.inputs:
            h.update(b"<" + self.value(value))
        digest = h.digest()
        for index, out in enumerate(node.outputs):
            self.values[id(out)] = hashlib.sha256(digest + index.to_bytes(4, "little")).digest()

    def graph(self, graph: ir.Graph) -> bytes:
        """Case 3: the nodes the outputs read, producers first (an outer value a body reads included)."""
        for node in _producers_first(graph.outputs, self.values):
            self.node(node)
        h = hashlib.sha256(b"graph|")
        for value in graph.inputs:
            h.update(self.value(value))
        for value in graph.outputs:
            h.update(f"output|{value.name}|".encode() + self.value(value))
        return h.digest()


def _producers_first(outputs: Iterable[ir.Value], done: dict[int, bytes]) -> list[ir.Node]:
    """The nodes computing ``outputs``, each after the producers of its inputs and of the outer
    values its bodies read (depth first, iterative: a deep graph does not recurse)."""
    order: list[ir.Node] = []
    seen: set[int] = set()
    stack: list[tuple[ir.Node, bool]] = [(p, False) for v in outputs
                                         if id(v) not in done and (p := v.producer()) is not None]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for value in outer_reads(node):
            if value is None or id(value) in done:
                continue
            producer = value.producer()
            if producer is not None and id(producer) not in seen:
                stack.append((producer, False))
    return order


def model_digest(model: ir.Model) -> str:
    """sha256 (hex) of what ``model`` computes, independent of names (module docstring)."""
    digests = _Digests()
    h = hashlib.sha256(repr(sorted(model.opset_imports.items())).encode())
    h.update(digests.graph(model.graph))
    for key in sorted(model.functions):
        h.update(repr(key).encode() + ir.serde.serialize_function(model.functions[key]).SerializeToString())
    return h.hexdigest()
