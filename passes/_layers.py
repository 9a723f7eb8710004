"""The layer model every pass shares: a compute node, its constant weight, and the axis rules.

A *layer* computes ``y[o] = sum_i W[o, i] x[i]`` for an output channel ``o`` and a
*reduction* index ``i``. Which axis of which tensor holds ``o`` and ``i`` is decided here,
once, for every pass (quantization's per-channel scales, bias correction, SmoothQuant,
the sparsity passes, TensorRT's Q/DQ placement):

1. output channels of the weight (:func:`output_channel_axis`): Conv ``W: M x C/g x k...``
   axis 0; ConvTranspose ``W: C x M/g x k...`` axis 1; Gemm ``B`` axis 0 with
   ``transB=1``, else 1; MatMul ``W: ... x K x N`` the last axis; LSTM/GRU/RNN
   ``W: dirs x gates·H x I`` (and ``R``) axis 1, one row per gate and hidden unit;
2. input channels of the weight (:func:`weight_input_axis`): Conv axis 1; Gemm ``B`` axis
   1 with ``transB=1``, else 0; MatMul (2-D) axis 0;
3. input channels of the activation (:func:`activation_channel_axis`): Conv axis 1 (every
   group's channels in order); Gemm ``A`` axis 0 with ``transA=1``, else 1; MatMul with a
   2-D weight the last axis; ``None`` for anything else (no per-channel reduction rule).

The *reduction-rows view* of a weight (:meth:`Layer.to_rows`) is a 2-D matrix ``R`` with
one row per (output channel, kernel position) and one column per input channel, so that a
row holds consecutive input channels, the order TensorRT's sparse kernels read N:M groups
in: Conv ``R = W.transpose(0, 2, ..., d+1, 1)`` reshaped to ``(M k1 ... kd) x C/g``;
Gemm ``R = B`` (``transB=1``) or ``B^T``; MatMul ``R = W^T``. Input channel ``j`` of row
``r`` is activation channel ``j`` (plus ``g(r) C/g`` in a grouped convolution).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import attr_int, label

from compressor.scope import Scope

if TYPE_CHECKING:
    from compressor.quant.spec import OpQuant

__all__ = [
    "PRUNABLE_OPS",
    "Layer",
    "activation_channel_axis",
    "find_weight_layers",
    "is_constant_float",
    "output_channel_axis",
    "weight_input_axis",
]

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")
_ONNX = ("", "ai.onnx")
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def output_channel_axis(node: ir.Node, rank: int) -> int:
    """The axis of a rank-``rank`` weight of ``node`` indexing output channels (case 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type in ("ConvTranspose", "LSTM", "GRU", "RNN"):
        return 1
    if node.op_type == "Gemm":
        return 0 if attr_int(node, "transB", 0) else 1
    return rank - 1  # MatMul: [.., K, N]


def weight_input_axis(node: ir.Node) -> int:
    """The axis of ``node``'s weight indexing input channels (case 2)."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if attr_int(node, "transB", 0) else 0
    return 0


def activation_channel_axis(node: ir.Node, weight_rank: int | None) -> int | None:
    """The axis of ``node``'s activation (input 0) that its reduction runs over (case 3)."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr_int(node, "transA", 0) else 1
    if node.op_type == "MatMul" and weight_rank == 2:
        return -1
    return None


def is_constant_float(value: ir.Value | None) -> bool:
    """A float initializer that is not a graph input (a caller cannot override it)."""
    return (value is not None and value.is_initializer() and value.const_value is not None
            and not value.is_graph_input() and value.const_value.dtype in _FLOATS)


@dataclasses.dataclass
class Layer:
    """A compute node with (usually) a constant weight; the module docstring has the layouts.

    Attributes:
        node: The compute node (Conv, Gemm, MatMul, ...).
        weight: Its constant weight (input 1), or ``None`` (both inputs are activations).
        quant: For ``quantize``: the target's scheme for its op type.
        activations: For ``quantize``: ``(input index, value)`` of the activation inputs to quantize.
    """

    node: ir.Node
    weight: ir.Value | None = None
    quant: OpQuant | None = None
    activations: list[tuple[int, ir.Value]] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        """The name every pass reports the layer by (:func:`label`: one spelling for unnamed nodes)."""
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

    def _weight_rank(self) -> int | None:
        if self.weight is None:
            return None
        if self.weight.const_value is not None:
            return len(self.weight.const_value.shape)
        return len(self.weight.shape) if self.weight.shape is not None else None

    def to_rows(self, w: np.ndarray) -> np.ndarray:
        """The reduction-rows view ``R`` of ``w``: rows x input channels."""
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

    def activation_axis(self) -> int | None:
        """The channel axis of :meth:`activation` that the reduction runs over (case 3)."""
        return activation_channel_axis(self.node, self._weight_rank())

    def output_axis(self) -> int:
        """The weight axis indexing output channels (case 1)."""
        rank = self._weight_rank()
        return output_channel_axis(self.node, 2 if rank is None else rank)

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


def find_weight_layers(graph: ir.Graph, ops: Iterable[str] = PRUNABLE_OPS,
                       scope: Scope = Scope()) -> tuple[list[Layer], dict[str, str]]:
    """The layers of ``ops`` with a constant float weight in ``scope``; and skipped ones with why.

    A Conv's weight needs rank >= 3, a Gemm's or MatMul's rank 2 (batched MatMul weights
    are skipped).
    """
    wanted = set(ops)
    layers: list[Layer] = []
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
        layers.append(Layer(node, w))
    return layers, skipped
