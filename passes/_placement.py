"""Where Q/DQ goes: the compute layers to quantize and the tensors that must stay float.

A *layer* (:class:`~._layers.Layer`, the one layer model) is a compute node the target
quantizes (``Capabilities.quantizable``: Conv, MatMul, Gemm...) with its activation inputs
and its constant weight. Tensors that must
stay float are never given Q/DQ:

1. tensors computed only from integer graph inputs and constants *that are used as* an
   attention-mask or shape/index path (:func:`mask_uses`): added to attention scores on
   the way to a Softmax (``(1 - mask) * finfo.min`` is such a tensor), selected by or
   selecting in a ``Where``, or turned into a shape, index or axes operand (``Reshape``,
   ``Expand``, ``Slice``, ``Range``, ``ConstantOfShape``, ``Tile``...). Integer data that
   becomes a compute op's activation (a byte image ``Cast -> Div(255) -> Conv``, token
   counts, categorical features) is data and is quantized. A lookup of a float table by
   integer indices (``Gather(embeddings, input_ids)``) is data too; propagation stops there;
2. tensors whose calibrated statistics show non-finite values or sentinel values
   (``|x| >= 1e30``), reported by :meth:`TensorStats.problem`;
3. layers outside the recipe's scope (accuracy control gives layers back by editing the
   quantized graph, :mod:`compressor.quant.revert`, not by selecting them out here).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import onnx_ir as ir
from compressor.passes._layers import Layer
from compressor.passes._padding import averages_padding
from compressor.targets.base import Capabilities

from compressor.scope import Scope

__all__ = ["FEW_CHANNELS", "computed_by", "cover_state_ranges", "find_layers", "first_layers", "float_weight",
           "integer_derived", "is_constant", "mask_uses", "silu_input"]

logger = logging.getLogger(__name__)

_LOOKUPS = frozenset({"Gather", "GatherElements", "GatherND"})
#: Why a layer with fewer output channels than ``OpQuant.min_output_channels`` stays float
#: (the target's choice: such a layer still reads the pairs other layers write).
FEW_CHANNELS = "too few output channels"
FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
#: Ops whose weights multiply input 0 only: a convolution's or Gemm's bias, a recurrent op's
#: ``sequence_lens``, initial states and peepholes are not activations to quantize.
_ONE_DATA_INPUT = frozenset({"Conv", "ConvTranspose", "Gemm", "LSTM", "GRU", "RNN"})
#: Elementwise activations a backend fuses into the op before them (a convolution's
#: post-ops): an ``Add`` reading ``Relu(Conv(x))`` or ``SiLU(Conv(x))`` joins that convolution.
_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                          "Elu", "Selu", "Celu", "Gelu", "Mish", "Softplus"})


#: Ops that move a feature map's values without changing what they are: a value read through
#: them is still what its producer computed. Reshape/Transpose/Slice/Split are left out: a
#: detection head's box decoding slices and reshapes a convolution's output into
#: coordinates, and its ``Add`` of anchors is no join.
_MOVES = frozenset({"Resize", "Upsample", "MaxPool", "Pad", "DepthToSpace", "SpaceToDepth", "Identity", "Concat"})
_JOINS = frozenset({"Add", "Sum"})


def computed_by(value: ir.Value, ops: frozenset[str], depth: int = 8) -> bool:
    """Whether ``value`` comes from one of ``ops``: straight, through elementwise activations
    (``Mul(x, Sigmoid(x))``, the SiLU exporters write, counts as one), through a feature map's
    data movement (a ``Resize``, ``MaxPool``, ``Concat``: any input), or through a join of activations
    (an ``Add`` of no constant) with such an input. A feature pyramid's top-down
    ``Add(lateral, Resize(Add(Conv, ...)))`` is then a convolution's join; an ``Add`` with
    a constant operand (a bias, a position embedding) stops the walk, so a transformer's
    residual (``MatMul`` + bias) never is one."""
    if depth <= 0:  # a longer chain is not what one op computed
        return False
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type in ops:
        return True
    if producer.op_type in _ACTIVATIONS and producer.inputs and producer.inputs[0] is not None:
        return computed_by(producer.inputs[0], ops, depth - 1)
    if producer.op_type == "Mul" and (x := silu_input(producer)) is not None:
        return computed_by(x, ops, depth - 1)
    if producer.op_type in _MOVES:
        data = producer.inputs if producer.op_type == "Concat" else producer.inputs[:1]
        return any(v is not None and computed_by(v, ops, depth - 1) for v in data)
    if producer.op_type in _JOINS:
        data = [v for v in producer.inputs if v is not None]
        return (len(data) >= 2 and not any(is_constant(v) for v in data)
                and any(computed_by(v, ops, depth - 1) for v in data))
    return False


def silu_input(mul: ir.Node) -> ir.Value | None:
    """``x`` when ``mul`` is ``x * Sigmoid(x)``, else ``None``."""
    if len(mul.inputs) != 2 or None in mul.inputs:
        return None
    for x, s in (mul.inputs, reversed(mul.inputs)):
        p = s.producer()
        if p is not None and p.op_type == "Sigmoid" and p.inputs and p.inputs[0] is x:
            return x
    return None


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOATS


def is_constant(value: ir.Value) -> bool:
    if value.const_value is not None and not value.is_graph_input():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _derived_origin(graph: ir.Graph) -> dict[int, str]:
    """``id(value)`` -> the integer input it derives from, for every value (any dtype)
    computed only from non-float graph inputs and constants."""
    origin: dict[int, str] = {}
    for value in graph.inputs:
        if value.const_value is None and not _is_float(value):
            origin[id(value)] = value.name
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
    return origin


def integer_derived(graph: ir.Graph) -> dict[str, str]:
    """Float tensors computed only from non-float graph inputs and constants.

    Whether such a tensor must stay float depends on its use (:func:`mask_uses`).

    Returns:
        Tensor name -> the integer input it derives from (for the report).
    """
    origin = _derived_origin(graph)
    return {out.name: origin[id(out)] for node in graph for out in node.outputs
            if id(out) in origin and _is_float(out)}


# Inputs of these ops that are shapes, indices, axes, counts or sizes (never data).
_SHAPE_OPERANDS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Range": (0, 1, 2),
    "ConstantOfShape": (0,), "Pad": (1, 2, 3), "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,),
    "OneHot": (0, 1), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "CumSum": (1,),
    "Gather": (1,), "GatherElements": (1,), "GatherND": (1,), "ScatterND": (1,), "ScatterElements": (1,),
    "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "Trilu": (1,),
}
# Ops whose outputs depend on an input's shape only, never on its values.
_SHAPE_ONLY = frozenset({"Shape", "Size"})
# Ops by which a mask joins the attention scores, and those between the join and the Softmax.
_MASK_JOINS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum"})
_TO_SOFTMAX = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Reshape", "Identity", "Transpose",
                         "Squeeze", "Unsqueeze"})


def _softmax_after(value: ir.Value, depth: int = 4) -> ir.Node | None:
    """The Softmax ``value`` reaches through scaling and masking ops, if any."""
    for node, _ in value.uses():
        if node.op_type in ("Softmax", "LogSoftmax"):
            return node
        if node.op_type in _TO_SOFTMAX and depth > 0 and node.outputs:
            found = _softmax_after(node.outputs[0], depth - 1)
            if found is not None:
                return found
    return None


def mask_uses(graph: ir.Graph) -> dict[str, str]:
    """Integer-derived tensors used as a mask or shape path, and how (case 1).

    A tensor computed only from integer inputs is such a path when it, or a tensor
    computed from it and other integer-derived tensors, is

    - joined with data (``Add``/``Mul``...) on the way to a ``Softmax`` (an additive
      attention mask), or is a ``Softmax`` input itself,
    - an input of a ``Where`` (its condition or a selected branch),
    - a shape, index or axes operand (``Reshape``'s shape, ``Slice``'s starts...).

    ``Shape``/``Size`` read only the shape, so they are no use of the values. Any other
    use (a compute op's activation, a pooling ``Mul``) is a use as data.

    Returns:
        Tensor name -> how it is used (for the report), for integer-derived tensors
        (any dtype) with such a use.
    """
    origin = _derived_origin(graph)
    found: dict[int, str] = {}
    for node in reversed(list(graph)):  # readers before producers
        for out in node.outputs:
            if id(out) not in origin:
                continue
            for reader, index in out.uses():
                why = _use_as_mask(reader, index, origin, found)
                if why:
                    found[id(out)] = why
                    break
    return {out.name: found[id(out)] for node in graph for out in node.outputs if id(out) in found}


def _use_as_mask(reader: ir.Node, index: int, origin: dict[int, str], found: dict[int, str]) -> str | None:
    label = reader.name or reader.op_type
    if reader.op_type in _SHAPE_ONLY:
        return None
    if index in _SHAPE_OPERANDS.get(reader.op_type, ()):
        return f"shape/index operand of {reader.op_type} {label!r}"
    if reader.op_type in ("Softmax", "LogSoftmax"):
        return f"input of {reader.op_type} {label!r}"
    if reader.op_type == "Where":
        return f"input of Where {label!r}"
    for out in reader.outputs:  # still on the integer-derived path: how is the result used?
        if id(out) in found:
            return found[id(out)]
    if reader.op_type in _MASK_JOINS and reader.outputs and not any(id(o) in origin for o in reader.outputs):
        softmax = _softmax_after(reader.outputs[0])
        if softmax is not None:
            return f"joined with the scores by {reader.op_type} {label!r} before Softmax {softmax.name or 'Softmax'!r}"
    return None


def find_layers(graph: ir.Graph, caps: Capabilities, *, ops: Iterable[str] = (), scope: Scope = Scope(),
                activation_matmuls: bool = True,
                eltwise: bool = True) -> tuple[list[Layer], dict[str, str]]:
    """The layers to quantize, and the skipped compute nodes with the reason (case 3).

    Args:
        graph: The main graph.
        caps: The target's capabilities.
        ops: Restrict to these op types (empty: all the target quantizes).
        scope: The recipe's scope.
        activation_matmuls: Also quantize MatMuls whose two inputs are activations.
        eltwise: Also quantize the joins the target lists without a weight (``Add``/``Sum``
            of activations only: residual adds; ``OpQuant.joins_after`` may require an
            input from, e.g., a convolution: :func:`computed_by`). An
            ``Add`` with a constant operand (a bias, a scale) is not a join and never a
            layer. Ops without a weight that take one activation
            (``OpQuant.min_activations``: a ``Sigmoid``) are not joins and are found
            either way.
    """
    wanted = set(ops) or set(caps.quantizable)
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    for node in graph:
        quant = caps.quantizable.get(node.op_type)
        if quant is None or node.op_type not in wanted or node.domain not in ("", "ai.onnx"):
            continue
        layer = Layer(node, quant=quant)
        if quant.weights is None:
            data = [v for v in node.inputs if v is not None]
            if len(data) < quant.min_activations or not all(_is_float(v) and not is_constant(v) for v in data):
                continue
            if quant.joins_after and not any(computed_by(v, quant.joins_after) for v in data):
                continue
            if quant.sole_reader and any(v.is_graph_output() or len(v.uses()) > 1 for v in data):
                continue
            if node.op_type == "AveragePool" and averages_padding(node):
                continue
            if not eltwise and len(data) >= 2:
                skipped[layer.name] = "join of activations (eltwise is off)"
                continue
        weight_input = quant.weight_input if quant.weights is not None else None
        w = node.inputs[weight_input] if weight_input is not None and len(node.inputs) > weight_input else None
        weight_names = []
        if w is not None and w.const_value is not None and not w.is_graph_input() and _is_float(w):
            layer.weight = w
            weight_names.append(w.name)
        if not scope.contains(layer.name, *weight_names):
            skipped[layer.name] = "outside the recipe's scope"
            continue
        if layer.weight is not None and quant.shared_scale_inputs and not all(
                i < len(node.inputs) and _is_float(v := node.inputs[i]) and v.const_value is not None
                and not v.is_graph_input() for i in quant.shared_scale_inputs):
            skipped[layer.name] = (f"input(s) {list(quant.shared_scale_inputs)}, quantized with the weight's scales, "
                                   "are not constant float initializers")
            continue
        computed = [i for i in quant.constant_inputs
                    if i < len(node.inputs) and node.inputs[i] is not None and not is_constant(node.inputs[i])]
        if computed:
            skipped[layer.name] = (f"input(s) {computed} computed at run time: the target's int8 kernel needs "
                                   "them constant")
            continue
        data_inputs = [0] if node.op_type in _ONE_DATA_INPUT else range(len(node.inputs))
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
        if layer.weight is not None and quant.min_output_channels:
            shape = layer.weight.shape
            channels = shape[layer.output_axis()] if shape is not None and layer.output_axis() is not None else None
            if isinstance(channels, int) and channels < quant.min_output_channels:
                skipped[layer.name] = (f"{FEW_CHANNELS}: {channels} < {quant.min_output_channels} (the target's "
                                       "int8 kernel is slower than float there)")
                continue
        layers.append(layer)
    if caps.narrow_first_layers:
        first = first_layers(graph, caps)
        for layer in layers:
            spec = layer.quant.weights
            if id(layer.node) in first and layer.op in caps.narrow_first_layers and spec is not None and not spec.bits:
                layer.quant = dataclasses.replace(layer.quant, weights=dataclasses.replace(spec, bits=7))
    return layers, skipped


def first_layers(graph: ir.Graph, caps: Capabilities) -> set[int]:
    """``id`` of the nodes with a weight that the graph's inputs reach without passing another one
    (NNCF's "first layer": an image's ``Div``/``Sub``/``Slice``/``Concat`` before it do not count).

    Only float values (or untyped ones) are followed past a node, never a ``Shape``/``Size``
    (an integer input's ``Cast`` to float is followed): a ``Shape`` of the input that sizes a
    deep ``Resize`` does not make the convolution after it a first layer."""
    first: set[int] = set()
    seen: set[int] = set()
    todo = [v for v in graph.inputs]
    while todo:
        value = todo.pop()
        for node, _ in value.uses():
            if id(node) in seen:
                continue
            seen.add(id(node))
            quant = caps.quantizable.get(node.op_type)
            w = node.inputs[quant.weight_input] if quant is not None and quant.weights is not None \
                and len(node.inputs) > quant.weight_input else None
            if w is not None and is_constant(w):
                first.add(id(node))
            else:
                todo.extend(v for v in node.outputs if node.op_type not in ("Shape", "Size")
                            and (v.dtype is None or v.dtype in FLOATS))
    return first


def cover_state_ranges(layers: Iterable[Layer], ranges: dict[str, tuple[float, float]]) -> int:
    """Widen the ranges of the activation inputs of layers whose ``OpQuant.state_range`` says the
    kernel quantizes a state of its own on that grid (an LSTM's hidden state, in ``(-1, 1)``):
    a range that does not hold the state clips it (``X`` after a ReLU, on ``[0, hi]``, would
    clip every negative ``h`` to 0). Returns how many ranges were widened.
    """
    widened = 0
    for layer in layers:
        state = layer.quant.state_range if layer.quant is not None else None
        if state is None:
            continue
        for _, value in layer.activations:
            if value.name in ranges:
                lo, hi = ranges[value.name]
                new = (min(lo, state[0]), max(hi, state[1]))
                widened += new != (lo, hi)
                ranges[value.name] = new
    return widened


def float_weight(layer: Layer) -> bool:
    """Whether ``layer`` keeps its weight float under ``OpQuant.float_weight_below`` (its input pair stays)."""
    below = layer.quant.float_weight_below if layer.quant is not None else 0
    if not below or layer.weight is None or layer.weight.shape is None or len(layer.weight.shape) < 2:
        return False
    out_axis = layer.output_axis()
    dims = list(layer.weight.shape)
    pairs = dims[out_axis] * dims[1 - out_axis] if out_axis in (0, 1) else None
    return isinstance(pairs, int) and pairs < below
