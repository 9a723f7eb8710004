"""Output Q/DQ: close a layer's node unit so that the backend fuses it into an integer kernel.

``quantize`` reads a layer's activation inputs and weight through Q/DQ. ONNX Runtime's QDQ
fusion (``onnxruntime/core/optimizer/qdq_transformer/selectors_actions``) turns a node unit
into an integer kernel only in these forms (checked with the optimized graph ONNX Runtime
writes, ``SessionOptions.optimized_model_filepath``):

1. ``DQ(x), DQ(w)[, b] -> Conv -> Q``: QLinearConv. Without the output ``Q`` the Conv runs
   in float on dequantized inputs (FusedConv), slower than the fp32 model. A float bias is
   quantized to int32 by ONNX Runtime itself;
2. ``DQ(x), DQ(w), b -> Gemm [-> Q]``: QGemm needs the output ``Q`` when there is a bias;
3. ``DQ(x), DQ(w) -> MatMul -> Q``: QLinearMatMul; a 2-D ``MatMul -> Add(b)`` becomes a
   Gemm first, so its ``Q`` goes after the ``Add`` (QGemm); without any ``Q`` a MatMul
   becomes MatMulIntegerToFloat, and a 2-D one with a bias ``Add`` a float Gemm;
4. a ``Relu`` (or ``Clip``) between the op and ``Q`` is removed when the ``Q``'s zero point
   is its lowest value (``ReluQuantFusion``; an asymmetric uint8 range from 0), so the
   pair goes after it;
5. ``DQ -> MaxPool -> Q`` (and ``Transpose``, ``Reshape``...) with the same scale and zero
   point on both sides is dropped, and the op runs on uint8 (:func:`~._output_ranges.carry_ranges`).

The placement is data of the target (``OpQuant.output``, ``OpQuant.output_after``): the
pair reads the layer's output, moved past single-reader ``output_after`` ops (an ``Add``
only with a constant operand: a bias), and every reader of that tensor reads the pair
instead. Its range comes from the same statistics run as the inputs' (the tensor is one
more :class:`~compressor.quant.taps.StatPoint`), so where the next layer quantizes the same
tensor with the same spec, the two share one pair (the Q/DQ writer writes one per tensor
and spec) and the output pair costs nothing.

6. A tensor that flows into a graph output without passing another quantized layer (the
   logits, a detection head's boxes and scores, through Reshape/Concat/Sigmoid) keeps its
   float value: its node unit runs as ``DQ`` + float, and the model's outputs carry no
   8-bit rounding of their own.

7. On ``onnx`` the Conv/Gemm pair is written after a Relu/Clip (``OpQuant.output_only_after``)
   or where every reader reads the tensor in 8 bits already (a quantized layer or node
   unit, directly or through ops that select values: :func:`_read_in_8_bits`); then the
   pair replaces a rounding instead of adding one. Before a float activation it would
   only add a rounding, which cost ddddocr's detector and basic-pitch their accuracy
   budget (figures in docs/design.md, "Where Q/DQ goes, per target").
8. Ops without weights that the backend runs as integer node units
   (``DQ(x)[, DQ(y)...] -> op -> Q``: ONNX Runtime's QLinearSigmoid, QLinearMul,
   QLinearAdd, QLinearConcat...) are layers too (``OpQuant.output`` on an op without
   ``weights``): inputs and output quantized, the output shared with the next unit's input
   (one pair per tensor and spec: same scale on both sides, so the fusions chain,
   ``QLinearConv -> QLinearSigmoid -> QLinearMul -> QLinearConv``). One whose output gets
   no pair (a graph output, a float reader) is not quantized at all (:func:`open_units`):
   its input pairs would only add roundings.

9. A SiLU's input ``x`` (read by ``Sigmoid(x)`` and ``Mul(x, Sigmoid(x))`` only, both
   quantized) is quantized over ``[max(lo, t), hi]``, where ``t < -1.28`` (SiLU's minimum)
   solves ``|t σ(t)| = Δ/2`` and ``Δ`` is the step of the SiLU output's grid: below ``t``
   the output is within half a step of 0 whatever ``x`` is, so clipping there changes it by
   less than its own rounding, while the full range (a pre-activation reaches about
   ``-hi``) would double ``x``'s step (:func:`floor_silu_inputs`).

10. A ``Concat`` node unit requantizes each input to its output's grid (QLinearConcat): an
    input that only the ``Concat`` reads, written by a quantized layer, is quantized over
    the output's range instead of its own, so the layer rounds once onto the grid the
    ``Concat`` copies (:func:`share_concat_ranges`). With the min-max calibrator the
    output's range is the union of the inputs'.

A tensor that only selects values of an output tensor (a max-pooled one) is quantized
over the output's range, not its own (case 5).

Accuracy control gives the output back with the layer: the readers rewired here are
recorded (``QuantizedLayer.outputs``) and read the float tensor again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection

import onnx_ir as ir
from compressor.passes._graph import label, sole_consumer
from compressor.passes._layers import Layer
from compressor.passes._output_ranges import selects
from compressor.passes._placement import is_constant

from compressor.quant.qdq import QdqWriter
from compressor.quant.revert import ActivationInput, QuantizedLayer
from compressor.quant.spec import QuantSpec

__all__ = ["LEFT_OPEN", "close_node_units", "open_units", "output_tensor", "quantize_output"]

logger = logging.getLogger(__name__)

_FLOAT = ir.DataType.FLOAT

#: Why :func:`open_units` keeps a layer float. Such a layer still reads the pairs others
#: write (it asked for no float input, unlike one out of scope).
LEFT_OPEN = "node unit left open: its output flows into a graph output or a float op"


def _moves_past(node: ir.Node, value: ir.Value, allowed: frozenset[str]) -> bool:
    """Whether the pair on ``value`` moves past its reader ``node`` (case 4; a bias ``Add``, case 3)."""
    if node.op_type not in allowed or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return False
    if node.op_type == "Add":
        others = [v for v in node.inputs if v is not value]
        return len(node.inputs) == 2 and len(others) == 1 and is_constant(others[0])
    if node.op_type == "Clip":
        return node.inputs[0] is value and all(v is None or is_constant(v) for v in node.inputs[1:])
    return True


#: Ops computing with a weight: one kept float (at a graph output, out of scope) reads a pair
#: on its input like a quantized one, a rounding of its input it would have quantized too.
_WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _reaches_graph_output(value: ir.Value, layer_nodes: Collection[int]) -> bool:
    """Whether ``value`` flows into a graph output through ops that are not quantized layers
    nor layers with a weight kept float (case 6)."""
    seen: set[int] = set()
    todo = [value]
    while todo:
        current = todo.pop()
        if current.is_graph_output():
            return True
        for reader, _ in current.uses():
            if id(reader) in layer_nodes or id(reader) in seen or reader.op_type in _WEIGHTED:
                continue
            seen.add(id(reader))
            todo.extend(reader.outputs)
    return False


def _read_in_8_bits(value: ir.Value, layer_nodes: Collection[int]) -> bool:
    """Whether every reader of ``value`` reads it through an 8-bit pair already (case 7).

    A reader does when it is a quantized layer (``layer_nodes``; before the pairs are
    written), a layer with a weight kept float (:data:`_WEIGHTED`), a ``QuantizeLinear``
    (after), or an op that selects values
    (:func:`~._output_ranges.selects`) whose outputs are all read so: the range carried along such a chain
    (:func:`~._output_ranges.carry_ranges`) makes its pairs exact. A graph output is not read in 8 bits.
    """
    if value.is_graph_output():
        return False
    uses = list(value.uses())
    if not uses:
        return False
    for reader, index in uses:
        if reader.op_type == "QuantizeLinear" or id(reader) in layer_nodes or reader.op_type in _WEIGHTED:
            continue
        outs = [o for o in reader.outputs if o is not None and (o.uses() or o.is_graph_output())]
        if index == 0 and selects(reader) and outs and all(_read_in_8_bits(o, layer_nodes) for o in outs):
            continue
        return False
    return True


def output_tensor(layer: Layer, layer_nodes: Collection[int]) -> ir.Value | None:
    """The tensor whose pair closes ``layer``'s node unit, or ``None`` (module docstring).

    ``None`` when the target gives the layer's op no output spec, the layer has no constant
    weight (and is no node unit without weights: ``OpQuant.weights`` ``None``), the tensor
    is not float32, the tensor reaches a graph output without passing another quantized
    layer (``layer_nodes``: ``id`` of every quantized layer's node; case 6), or the walk
    did not pass one of the ops ``OpQuant.output_only_after`` asks for and some reader
    reads the tensor in float (case 7).
    """
    quant = layer.quant
    if quant.output is None or not layer.node.outputs or (layer.weight is None and quant.weights is not None):
        return None
    value = layer.node.outputs[0]
    passed = set()
    while (reader := sole_consumer(value)) is not None and _moves_past(reader, value, quant.output_after):
        value = reader.outputs[0]
        passed.add(reader.op_type)
    if value.dtype != _FLOAT or _reaches_graph_output(value, layer_nodes):
        return None
    if not passed & quant.output_only_after and not _read_in_8_bits(value, layer_nodes):
        return None  # case 3: a MatMul without a bias Add is an integer kernel without the pair; case 7
    return value


def open_units(layers: list[Layer]) -> dict[str, str]:
    """Remove from ``layers`` the node units whose output gets no pair where the target
    needs one: units without weights (case 8) and ops with ``OpQuant.output_required``.

    Their input pairs alone would only round: the op runs in float on dequantized inputs
    (a weight dequantized at every call).
    Removing one can leave another without an 8-bit reader, so this repeats until none is left.

    Returns:
        Name -> why, for each layer with a weight removed (units without weights are only logged).
    """
    removed: dict[str, str] = {}
    while True:
        nodes = {id(layer.node) for layer in layers}
        open_ = [layer for layer in layers if layer.quant.output is not None and output_tensor(layer, nodes) is None
                 and (layer.quant.output_required or (layer.weight is None and layer.quant.weights is None))]
        if not open_:
            return removed
        for layer in open_:
            layers.remove(layer)
            if layer.weight is not None:  # a unit without weights is no layer a person asked for
                removed[layer.name] = LEFT_OPEN
            else:
                logger.debug("not quantized: %s: %s", layer.name, LEFT_OPEN)


def quantize_output(graph: ir.Graph, writer: QdqWriter, value: ir.Value, spec: QuantSpec,
                    lo: float, hi: float, keep_float: Collection[str] = ()) -> tuple[ActivationInput, ...]:
    """Make every reader of ``value`` in ``graph`` read its pair over ``[lo, hi]``.

    A reader that reads it through the pair already (a quantized layer's input) is left as
    it is; so are ``QuantizeLinear`` nodes (a pair of another spec), readers inside
    subgraphs, and the layers ``quantize`` kept float (named in ``keep_float``: out of
    scope, ``float_activations``, ``activation_matmuls: false``), whose float input was asked for.

    Returns:
        The readers rewired, as :class:`ActivationInput` (node keyed by its first output).
    """
    dq = writer.activation(value, spec, lo, hi)
    rewired = []
    for reader, index in list(value.uses()):
        if reader.op_type == "QuantizeLinear" or reader.graph is not graph or not reader.outputs \
                or label(reader) in keep_float:
            continue
        reader.replace_input_with(index, dq)
        rewired.append(ActivationInput(reader.outputs[0].name, index, value.name, float(lo), float(hi), spec))
    return tuple(rewired)


def close_node_units(graph: ir.Graph, writer: QdqWriter, layers: list[Layer], record: list[QuantizedLayer],
                     ranges: dict[str, tuple[float, float]],
                     keep_float: Collection[str] = ()) -> tuple[list[QuantizedLayer], int]:
    """Give each recorded layer of ``layers`` with an :func:`output_tensor` its output pair
    (read by every reader but the layers in ``keep_float``, see :func:`quantize_output`).

    Called once every layer's inputs are written, so that a tensor the next layer
    quantizes already reads that layer's pair, which the output shares. The output tensor
    is found again here (bias correction may have added an ``Add`` after a MatMul, which
    takes over the output's name) and its range looked up by name; one without a range
    (kept float by its statistics) gets no pair, nor does a layer whose inputs are not at
    the target's 8-bit spec (16-bit activations: no integer kernel to fuse into).

    Returns:
        The record with the rewired readers (``QuantizedLayer.outputs``), and how many
        layers got an output pair.
    """
    by_name = {layer.name: layer for layer in layers}
    layer_nodes = {id(by_name[done.name].node) for done in record if done.name in by_name}
    closed = 0
    out = []
    for done in record:
        layer = by_name.get(done.name)
        value = output_tensor(layer, layer_nodes) if layer is not None else None
        if value is None or value.name not in ranges or any(a.spec != layer.quant.activations
                                                                for a in done.activations):
            out.append(done)
            continue
        lo, hi = ranges[value.name]
        rewired = quantize_output(graph, writer, value, layer.quant.output, lo, hi, keep_float)
        out.append(dataclasses.replace(done, outputs=rewired))
        closed += 1
    return out, closed
