"""Giving quantized layers back by editing the quantized graph, not by quantizing again.

``quantize`` records, per layer, every input it rewired (:class:`QuantizedLayer`):

* an activation input ``i`` of node ``n`` that now reads ``DQ(Q(x, s, z))``: the float
  tensor ``x``, its calibrated range ``[lo, hi]`` and the spec of the pair;
* the weight input, now ``DQ(Wq, s_c, 0)``: the float weight ``W`` itself (a copy, so the
  revert is exact: ``DQ(Wq)`` is not ``W``);
* a bias that bias correction replaced (``b' = b − E[x]·(DQ(Wq) − W)``): the original ``b``,
  or that the node had no bias input;
* the readers of the layer's output that now read its output pair (targets whose kernels
  need the output quantized, :mod:`compressor.passes._output_qdq`): each reader's input,
  the float tensor and its range, like an activation input.

Two edits use that record (:func:`give_back`), chosen by ``Capabilities.fallback``:

1. ``float``: node ``n`` reads ``x``, ``W`` and ``b`` again, and the readers of its output
   read the float output again. The layer computes exactly what
   it computes when it was never quantized (the tensors other layers read, and the Q/DQ
   pairs they share, are untouched); Q/DQ nodes and quantized initializers nothing reads
   any more are removed. An edge whose pair is also recorded by a layer that stays
   quantized is left on its pair: a pair moved above data movement for a group of layers
   (:mod:`compressor.passes._pair_site`, cases 4-6: the pair on a ``Split``'s input that a
   YOLOv8 block's convolutions, its residual ``Add`` and its ``Concat`` read) serves the
   others too, which would otherwise read float and run float. That edge goes float with
   the last of its layers given back.
2. ``int16``: on a target with no float path the activation inputs read a 16-bit pair
   over the same range instead, ``s16 = (hi − lo) / (2^16 − 1)`` (what ``quantize`` writes
   for a layer whose activations are 16-bit), written by the one Q/DQ writer
   (:class:`~compressor.quant.qdq.QdqWriter`, one pair per tensor however many layers read
   it); the weights stay int8. The writer converts the model to opset 21 (16-bit Q/DQ).

3. A layer inside a control-flow body (an ``If`` branch ``quantize`` calibrated,
   :mod:`compressor.passes._control_flow`) is edited where it is: its float weight is
   restored into its body, its 16-bit pairs are written into its body.

A layer every rewired input (and output) of which already reads a 16-bit pair (the
transformer preset's roles on a target without a float path, every layer of a W8A16
recipe) is left as it is by case 2, which writes the pair it reads (the same spec, the same
range): :func:`already_wide` names them, so accuracy control never tries them.

Nodes are found by the name of their first output (unique in SSA form, and kept through
serialization), so the record applies to any copy of the quantized model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common is not imported by onnx_ir itself)

from compressor.passes._graph import add_initializer

from compressor.quant.qdq import QdqWriter
from compressor.quant.spec import QuantSpec

__all__ = ["ActivationInput", "ConstantInput", "QuantizedLayer", "QuantizationRecord", "already_wide", "give_back",
           "widened"]

logger = logging.getLogger(__name__)

_WIDE = {"int8": "int16", "uint8": "uint16"}


def widened(spec: QuantSpec) -> QuantSpec:
    """An 8-bit activation spec at 16 bits (same signedness and symmetry)."""
    return dataclasses.replace(spec, dtype=_WIDE.get(spec.dtype, spec.dtype), signed_by_range=False)


@dataclasses.dataclass(frozen=True)
class ActivationInput:
    """Input ``index`` of node ``node`` read float tensor ``value`` through a Q/DQ pair (case 1, 2)."""

    node: str
    index: int
    value: str
    lo: float
    hi: float
    spec: QuantSpec


@dataclasses.dataclass(frozen=True)
class ConstantInput:
    """Input ``index`` of node ``node`` was the constant ``name`` holding ``array``.

    ``array`` is ``None`` when the node had no such input (bias correction added a bias).
    """

    node: str
    index: int
    name: str
    array: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
    """What ``quantize`` changed for one layer (module docstring).

    Attributes:
        name: The layer's name in reports.
        activations: The activation inputs it rewired.
        constants: The constants it replaced (the float weight, biases before correction).
        weight: Name of the float weight now stored quantized (``""``: none).
        weight_bytes: Size of that weight as float and as stored integers.
        outputs: The readers of its output it rewired to the output's pair.
    """

    name: str
    activations: tuple[ActivationInput, ...] = ()
    constants: tuple[ConstantInput, ...] = ()
    weight: str = ""
    weight_bytes: tuple[int, int] = (0, 0)
    outputs: tuple[ActivationInput, ...] = ()


@dataclasses.dataclass(frozen=True)
class QuantizationRecord:
    """Every layer ``quantize`` quantized, in the order it quantized them.

    Attributes:
        layers: The layers.
        weight_bytes: Size, as float and as stored integers, of every weight ``quantize``
            stored quantized (those of weight-only layers, which are not in ``layers``, too).
    """

    layers: tuple[QuantizedLayer, ...] = ()
    weight_bytes: tuple[int, int] = (0, 0)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def weight_sizes(self, given: Iterable[str] = ()) -> tuple[int, int]:
        """``weight_bytes`` after the ``given`` layers are given back as float (case 1).

        A weight is float again when every layer that read it quantized was given back; a
        weight another (quantized) layer still reads stays stored quantized.
        """
        given = set(given)
        back = {layer.weight: layer.weight_bytes for layer in self.layers if layer.weight and layer.name in given}
        kept = {layer.weight for layer in self.layers if layer.weight and layer.name not in given}
        freed = [size for name, size in back.items() if name not in kept]
        return (self.weight_bytes[0] - sum(f for f, _ in freed), self.weight_bytes[1] - sum(q for _, q in freed))

    def __getitem__(self, name: str) -> QuantizedLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"layer {name!r} was not quantized; quantized layers: {', '.join(self.names)}")


def already_wide(record: QuantizationRecord) -> list[str]:
    """The layers :func:`give_back` in ``int16`` mode leaves as they are (module docstring).

    Case 2 writes, for each activation input and output reader, the pair over the recorded
    range at ``widened(spec)``; where every spec is 16-bit already that is the pair the layer
    reads, so the edited model computes what the quantized one does.
    """
    return [layer.name for layer in record.layers
            if all(widened(act.spec) == act.spec for act in (*layer.activations, *layer.outputs))]


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of ``graph`` and of the control-flow bodies in it (names are unique model-wide)."""
    out: dict[str, ir.Value] = {}
    for g in (graph, *graph.subgraphs()):
        out.update((v.name, v) for v in g.inputs if v.name)
        out.update(g.initializers)
        for node in g:
            out.update((v.name, v) for v in node.outputs if v.name)
    return out


def give_back(model: ir.Model, record: QuantizationRecord, layers: Iterable[str],
              mode: Literal["float", "int16"] = "float") -> ir.Model:
    """Edit ``model`` (in place) so the ``layers`` of ``record`` are float, or 16-bit (module docstring).

    Args:
        model: A copy of the model ``quantize`` returned with ``record``.
        record: What ``quantize`` recorded.
        layers: Names of the layers to give back.
        mode: ``float`` (case 1) or ``int16`` (case 2).

    Returns:
        ``model``.

    Raises:
        KeyError: a layer that ``record`` does not hold, or a node or tensor the record
            names that the model does not have (another model than the one recorded).
    """
    chosen = [record[name] for name in layers]
    if not chosen:
        return model
    graph = model.graph
    values = _values(graph)
    # a layer quantize found inside a control-flow body is edited in its body (case 3)
    nodes = {node.outputs[0].name: node for node in ir.traversal.RecursiveGraphIterator(graph) if node.outputs}
    writer = QdqWriter(graph)  # case 2: the one Q/DQ writer, which converts to opset 21 in finish
    body_writers: dict[int, QdqWriter] = {}
    restored: dict[str, ir.Value] = {}
    given = {layer.name for layer in chosen}
    kept = {(act.node, act.index) for layer in record.layers if layer.name not in given
            for act in (*layer.activations, *layer.outputs)}
    for layer in chosen:
        for act in (*layer.activations, *layer.outputs):
            node, source = nodes[act.node], values[act.value]
            if mode == "float":  # case 1
                if (act.node, act.index) not in kept:  # a pair a quantized layer also reads stays
                    node.replace_input_with(act.index, source)
                continue
            into = writer if node.graph is graph else body_writers.setdefault(
                id(node.graph), QdqWriter(node.graph, writer.node_names))
            into.names = writer.names  # fresh in the whole model
            node.replace_input_with(act.index, into.activation(source, widened(act.spec), act.lo, act.hi))
        if mode != "float":
            continue
        for const in layer.constants:  # case 1: the float weight and the bias before correction
            node = nodes[const.node]
            if const.array is None:
                node.resize_inputs(const.index)
                continue
            if const.name not in restored:
                current = values.get(const.name)
                if current is not None and current.is_initializer() and current.const_value is not None and \
                        np.array_equal(current.const_value.numpy(), const.array):
                    restored[const.name] = current  # still there (another reader kept it)
                else:
                    name = writer.names(const.name if const.name not in values else f"{const.name}_float")
                    restored[const.name] = add_initializer(node.graph, name, const.array)
            node.replace_input_with(const.index, restored[const.name])
    for body_writer in body_writers.values():
        body_writer.flush()
        writer.wide = writer.wide or body_writer.wide
        writer.written += body_writer.written  # so finish sorts the bodies too
    ir.passes.common.RemoveUnusedNodesPass()(model)
    model = writer.finish(model)
    logger.debug("gave back %d layer(s) as %s: %s", len(chosen), mode, ", ".join(layer.name for layer in chosen))
    return model
