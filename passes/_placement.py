"""Where Q/DQ goes: the compute layers to quantize and the tensors that must stay float.

A *layer* is a compute node the target quantizes (``Capabilities.quantizable``: Conv,
MatMul, Gemm...) with its activation inputs and its constant weight. Tensors that must
stay float are never given Q/DQ:

1. tensors computed only from integer graph inputs and constants: attention-mask and
   shape/index paths (``(1 - mask) * finfo.min`` is such a tensor). A lookup of a float
   table by integer indices (``Gather(embeddings, input_ids)``) is data, not such a path;
   propagation stops there;
2. tensors whose calibrated statistics show non-finite values or sentinel values
   (``|x| >= 1e30``), reported by :meth:`TensorStats.problem`;
3. layers outside the recipe's scope or excluded by accuracy control.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import onnx_ir as ir

from compressor.scope import Scope
from compressor.targets.base import Capabilities, OpQuant

__all__ = ["Layer", "find_layers", "integer_derived", "is_constant", "output_channel_axis", "weight_channel_axis"]

logger = logging.getLogger(__name__)

_LOOKUPS = frozenset({"Gather", "GatherElements", "GatherND"})
FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


@dataclasses.dataclass
class Layer:
    """One compute node to quantize.

    Attributes:
        node: The compute node.
        quant: The target's scheme for its op type.
        activations: ``(input index, value)`` of the activation inputs to quantize.
        weight: The constant weight input (``None`` when both inputs are activations).
    """

    node: ir.Node
    quant: OpQuant
    activations: list[tuple[int, ir.Value]]
    weight: ir.Value | None

    @property
    def name(self) -> str:
        return self.node.name or f"{self.node.op_type}->{self.node.outputs[0].name}"


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOATS


def is_constant(value: ir.Value) -> bool:
    if value.const_value is not None and not value.is_graph_input():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def integer_derived(graph: ir.Graph) -> dict[str, str]:
    """Float tensors computed only from non-float graph inputs and constants (case 1).

    Returns:
        Tensor name -> the integer input it derives from (for the report).
    """
    origin: dict[int, str] = {}
    for value in graph.inputs:
        if value.const_value is None and not _is_float(value):
            origin[id(value)] = value.name
    derived: dict[str, str] = {}
    for node in graph:  # topological order
        if node.op_type in _LOOKUPS and node.inputs and _is_float(node.inputs[0]) and is_constant(node.inputs[0]):
            continue  # an embedding lookup: its output is real data (case 1)
        sources = []
        ok = True
        for value in node.inputs:
            if value is None:
                continue
            if id(value) in origin:
                sources.append(origin[id(value)])
            elif not is_constant(value):
                ok = False
                break
        if ok and sources:
            for out in node.outputs:
                origin[id(out)] = sources[0]
                if _is_float(out):
                    derived[out.name] = sources[0]
    return derived


def weight_channel_axis(node: ir.Node, weight: ir.Value) -> int:
    """The weight axis indexing output channels (the per-channel quantization axis)."""
    return output_channel_axis(node, len(weight.shape) if weight.shape is not None else 2)


def output_channel_axis(node: ir.Node, rank: int) -> int:
    """The output-channel axis of a rank-``rank`` weight of ``node``."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() else 1
    return rank - 1  # MatMul: [.., K, N], output channels on the last axis


def find_layers(graph: ir.Graph, caps: Capabilities, *, ops: Iterable[str] = (), scope: Scope = Scope(),
                exclude: Iterable[str] = (), activation_matmuls: bool = True,
                eltwise: bool = True) -> tuple[list[Layer], dict[str, str]]:
    """The layers to quantize, and the skipped compute nodes with the reason (case 3).

    Args:
        graph: The main graph.
        caps: The target's capabilities.
        ops: Restrict to these op types (empty: all the target quantizes).
        scope: The recipe's scope.
        exclude: Node names excluded by accuracy control.
        activation_matmuls: Also quantize MatMuls whose two inputs are activations.
        eltwise: Also quantize the joins the target lists without a weight (``Add``/``Sum``
            of activations only: residual adds; ``OpQuant.joins_after`` may require an
            input straight from, e.g., a convolution). An ``Add`` with a constant
            operand (a bias, a scale) is not a join and never a layer.
    """
    wanted = set(ops) or set(caps.quantizable)
    excluded = set(exclude)
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    for node in graph:
        quant = caps.quantizable.get(node.op_type)
        if quant is None or node.op_type not in wanted or node.domain not in ("", "ai.onnx"):
            continue
        layer = Layer(node, quant, [], None)
        if quant.weights is None:
            data = [v for v in node.inputs if v is not None]
            if len(data) < 2 or not all(_is_float(v) and not is_constant(v) for v in data):
                continue
            if quant.joins_after and not any((p := v.producer()) is not None and p.op_type in quant.joins_after
                                             for v in data):
                continue
            if not eltwise:
                skipped[layer.name] = "join of activations (eltwise is off)"
                continue
        weight_input = quant.weight_input if quant.weights is not None else None
        w = node.inputs[weight_input] if weight_input is not None and len(node.inputs) > weight_input else None
        weight_names = []
        if w is not None and w.const_value is not None and not w.is_graph_input() and _is_float(w):
            layer.weight = w
            weight_names.append(w.name)
        if layer.name in excluded:
            skipped[layer.name] = "reverted by accuracy control"
            continue
        if not scope.contains(layer.name, *weight_names):
            skipped[layer.name] = "outside the recipe's scope"
            continue
        data_inputs = [0] if node.op_type in ("Conv", "ConvTranspose", "Gemm") else range(len(node.inputs))
        for index in data_inputs:
            if index >= len(node.inputs):
                continue
            value = node.inputs[index]
            if value is None or value is layer.weight or not _is_float(value) or is_constant(value):
                continue
            layer.activations.append((index, value))
        two_activations = node.op_type == "MatMul" and len(layer.activations) == 2
        if layer.weight is None and quant.weights is not None and not (activation_matmuls and two_activations):
            skipped[layer.name] = ("both inputs are activations (activation_matmuls is off)"
                                   if two_activations else "weight is not a constant float initializer")
            continue
        if not layer.activations:
            skipped[layer.name] = "no float activation input"
            continue
        layers.append(layer)
    return layers, skipped
