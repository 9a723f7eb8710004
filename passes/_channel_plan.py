"""The graph walk of ``prune-channels``: what changes when a producer's output channels go.

From a producer ``P``'s output ``y`` (channel axis 1 for Conv/Gemm, the last for MatMul),
:class:`Planner` follows ``y`` forward, as the cases of :mod:`.prune_channels` say:

1. per-channel ops are kept as they are;
2. per-channel affine ops get their parameters sliced (:class:`Plan` ``constants``);
3. readers (Conv, Gemm, MatMul, and Gemm/MatMul after a flatten) lose input channels
   (:class:`Plan` ``readers``, ``reshapes``).

Anything else raises :class:`~._graph.NotFoldable` with the reason, and ``P`` is skipped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import (
    NotFoldable,
    attr_int,
    label,
    only_first_output_used,
)

__all__ = ["FLOATS", "ONNX_DOMAINS", "Plan", "Planner", "Reader", "const_weight", "is_const"]

ONNX_DOMAINS = ("", "ai.onnx")
_UNARY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Erf", "Abs", "Neg", "Elu", "Selu", "Softplus",
                    "HardSigmoid", "HardSwish", "Clip", "Identity", "Dropout", "Celu", "ThresholdedRelu", "Mish"})
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


@dataclasses.dataclass
class Reader:
    """A node that reduces over the pruned channels (case 3)."""

    node: ir.Node
    features: int  # consecutive inputs per channel: 1, or H*W after a flatten (case 3d)


@dataclasses.dataclass
class Plan:
    """Everything that changes when the producer's output channels go."""

    producer: ir.Node
    channels: int
    values: list[tuple[ir.Value, int, int]] = dataclasses.field(default_factory=list)  # value, axis, features
    constants: list[tuple[ir.Node, int, int]] = dataclasses.field(default_factory=list)  # node, input, axis
    readers: list[Reader] = dataclasses.field(default_factory=list)
    reshapes: list[tuple[ir.Node, int]] = dataclasses.field(default_factory=list)  # node, features


def _rank(value: ir.Value) -> int:
    if value.shape is None:
        raise NotFoldable(f"the rank of `{value.name}` is unknown")
    return len(value.shape)


def is_const(value: ir.Value | None) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and not value.is_graph_input())


def const_weight(node: ir.Node, what: str, rank: int | None = None) -> np.ndarray:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not is_const(w) or w.const_value.dtype not in FLOATS:
        raise NotFoldable(f"{what} `{label(node)}` has no constant float weight")
    if rank is not None and len(w.shape) != rank:
        raise NotFoldable(f"{what} `{label(node)}` has a rank-{len(w.shape)} weight")
    return w.const_value.numpy()


class Planner:
    """Follows a producer's output forward (cases 1-3) and lists the edits."""

    def __init__(self, producer: ir.Node, channels: int):
        self.plan = Plan(producer, channels)
        self.seen: dict[int, int] = {}  # value id -> channel axis
        self.binaries: dict[int, tuple[ir.Node, int]] = {}

    def run(self) -> Plan:
        producer = self.plan.producer
        if producer.op_type in ("Conv", "Gemm") and len(producer.inputs) > 2 and producer.inputs[2] is not None \
                and not is_const(producer.inputs[2]):
            raise NotFoldable(f"bias `{producer.inputs[2].name}` is not a constant")
        out = producer.outputs[0]
        axis = 1 if self.plan.producer.op_type in ("Conv", "Gemm") else _rank(out) - 1
        queue = [(out, axis)]
        try:
            while queue:
                value, ax = queue.pop()
                if id(value) in self.seen:
                    continue
                self.seen[id(value)] = ax
                self.plan.values.append((value, ax, 1))
                if value.is_graph_output():
                    raise NotFoldable(f"`{value.name}` is a graph output (the model's interface keeps its shape)")
                for node, index in list(value.uses()):
                    queue.extend(self._follow(value, ax, node, index))
        except NotFoldable:
            # a residual connection met on the way is the root cause: report it first
            for node, ax in self.binaries.values():
                self._check_binary(node, ax, partial=True)
            raise
        for node, ax in self.binaries.values():
            self._check_binary(node, ax)
        return self.plan

    def _follow(self, value: ir.Value, ax: int, node: ir.Node, index: int) -> list[tuple[ir.Value, int]]:
        op = node.op_type
        where = f"`{value.name}` feeds {op} `{label(node)}`"
        if node.domain not in ONNX_DOMAINS:
            raise NotFoldable(f"{where} (a custom op)")
        if op in _UNARY or op in _POOLS or op == "PRelu":
            if index != 0:
                raise NotFoldable(f"{where} as input {index}")
            if op in _POOLS and (ax != 1 or _rank(value) < 3):
                raise NotFoldable(f"{where}, which pools over the channel axis {ax}")
            if not only_first_output_used(node):
                raise NotFoldable(f"{where}, whose second output is used")
            if op == "Clip" and not all(v is None or is_const(v) for v in node.inputs[1:]):
                raise NotFoldable(f"{where} with bounds that are not constants")
            if op == "PRelu":
                self._constant(node, 1, ax, _rank(value))
            return [(node.outputs[0], ax)]
        if op == "BatchNormalization":
            if index != 0 or ax != 1 or not only_first_output_used(node):
                raise NotFoldable(f"{where} not as a per-channel inference BN")
            for i in range(1, 5):
                self._constant(node, i, 0, 1, rank_of_const=1)
            return [(node.outputs[0], ax)]
        if op in _BINARY:
            out_rank = _rank(node.outputs[0])
            ax_out = ax + out_rank - _rank(value)
            self.binaries[id(node)] = (node, ax_out)
            return [(node.outputs[0], ax_out)]
        if op == "Conv" and index == 0 and ax == 1:
            const_weight(node, "Conv")
            if attr_int(node, "group", 1) != 1:
                raise NotFoldable(f"{where}, a grouped convolution")
            self.plan.readers.append(Reader(node, 1))
            return []
        if op in ("Gemm", "MatMul") and index == 0:
            self._linear_reader(node, where, ax == _rank(value) - 1, 1)
            return []
        if op in ("Reshape", "Flatten") and index == 0 and ax == 1:
            self._flatten(value, node, where)
            return []
        raise NotFoldable(f"{where} ({'a residual/' if op == 'Concat' else ''}not handled: it mixes channels or "
                          "changes the layout)")

    def _linear_reader(self, node: ir.Node, where: str, on_last_axis: bool, features: int) -> None:
        if node.op_type == "Gemm":
            if attr_int(node, "transA", 0):
                raise NotFoldable(f"{where} with transA=1")
        elif not on_last_axis:
            raise NotFoldable(f"{where}, which does not reduce over the channel axis")
        const_weight(node, node.op_type, rank=2)
        self.plan.readers.append(Reader(node, features))

    def _flatten(self, value: ir.Value, node: ir.Node, where: str) -> None:
        """Case 3d."""
        dims = list(value.shape) if value.shape is not None else []
        if len(dims) < 3 or not all(isinstance(d, int) for d in dims[1:]):
            raise NotFoldable(f"{where}: flattening needs static channel and spatial sizes")
        features = int(np.prod(dims[2:]))
        flat = node.outputs[0]
        if flat.shape is None or len(flat.shape) != 2:
            raise NotFoldable(f"{where}, not a flatten to 2-D")
        if node.op_type == "Flatten":
            if attr_int(node, "axis", 1) != 1:
                raise NotFoldable(f"{where} with axis != 1")
        else:
            shape = node.inputs[1] if len(node.inputs) > 1 else None
            if not is_const(shape):
                raise NotFoldable(f"{where} with a shape that is not a constant")
            target = shape.const_value.numpy().tolist()
            total = self.plan.channels * features
            if len(target) != 2 or target[1] not in (total, -1) or (target[1] == -1 and target[0] in (-1,)):
                raise NotFoldable(f"{where} to {target}, not a flatten of {self.plan.channels}x{features}")
            if target[1] == -1 and target[0] == 0 and attr_int(node, "allowzero", 0):
                raise NotFoldable(f"{where} to {target} with allowzero=1")
            self.plan.reshapes.append((node, features))
        if flat.is_graph_output():
            raise NotFoldable(f"`{flat.name}` is a graph output (the model's interface keeps its shape)")
        self.plan.values.append((flat, 1, features))
        for reader, index in list(flat.uses()):
            rwhere = f"`{flat.name}` feeds {reader.op_type} `{label(reader)}`"
            if reader.op_type not in ("Gemm", "MatMul") or index != 0 or reader.domain not in ONNX_DOMAINS:
                raise NotFoldable(f"{rwhere} after a flatten (only Gemm/MatMul are handled there)")
            self._linear_reader(reader, rwhere, True, features)

    def _constant(self, node: ir.Node, index: int, ax: int, rank: int, rank_of_const: int | None = None) -> None:
        """A per-channel parameter of ``node`` (case 2): size C (sliced) or 1 on the channel axis."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            return
        if not is_const(value):
            raise NotFoldable(f"{node.op_type} `{label(node)}`: input `{value.name}` is not a constant")
        shape = value.const_value.shape
        k = len(shape)
        if rank_of_const is not None and k != rank_of_const:
            raise NotFoldable(f"{node.op_type} `{label(node)}`: `{value.name}` has rank {k}")
        axis = ax - (rank - k)
        if axis < 0 or shape[axis] == 1:
            return  # broadcast along the channels: nothing to slice
        if shape[axis] != self.plan.channels:
            raise NotFoldable(f"{node.op_type} `{label(node)}`: `{value.name}` has {shape[axis]} entries on the "
                              f"channel axis, not {self.plan.channels}")
        self.plan.constants.append((node, index, axis))

    def _downstream(self, value: ir.Value) -> bool:
        """Whether ``value`` is computed from the producer's output (through anything)."""
        if not hasattr(self, "_reachable"):
            reachable: set[int] = set()
            stack = [self.plan.producer.outputs[0]]
            while stack:
                v = stack.pop()
                if id(v) in reachable:
                    continue
                reachable.add(id(v))
                stack.extend(out for user, _ in v.uses() for out in user.outputs)
            self._reachable = reachable
        return id(value) in self._reachable

    def _check_binary(self, node: ir.Node, ax: int, partial: bool = False) -> None:
        """Case 2: each input is on the pruned channels or a per-channel constant.

        ``partial``: the walk stopped early; only look for inputs from elsewhere.
        """
        rank = _rank(node.outputs[0])
        for index, value in enumerate(node.inputs):
            if value is None or id(value) in self.seen:
                continue
            if is_const(value):
                if not partial:
                    self._constant(node, index, ax, rank)
                continue
            if partial and self._downstream(value):
                continue
            raise NotFoldable(f"{node.op_type} `{label(node)}` combines the pruned channels with `{value.name}`, "
                              "another tensor (a residual connection)")
