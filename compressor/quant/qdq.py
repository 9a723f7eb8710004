"""The one Q/DQ writer: QuantizeLinear/DequantizeLinear nodes and quantized initializers.

``quantize`` (the compute layers' inputs and weights) and the QNN HTP legalization
(every other tensor, biases, constants) both write through :class:`QdqWriter`, so the
graph form, the names and the opset rule are the same wherever a Q/DQ comes from:

1. an activation ``t`` is read as ``DQ(Q(t, s, z), s, z)``: one ``QuantizeLinear`` and
   one ``DequantizeLinear`` sharing the initializers ``<t>_scale`` and ``<t>_zero_point``;
   the DQ output ``<t>_dequantized`` has ``t``'s type and shape;
2. a constant is stored quantized (``<c>_quantized``) and read through
   ``DQ(q, s, z)`` (``axis`` set for a per-channel scale);
3. ``QuantizeLinear``/``DequantizeLinear`` take 16-bit integers from opset 21 on: when the
   writer has written a 16-bit Q/DQ, :meth:`QdqWriter.finish` converts the model to
   opset :data:`WIDE_OPSET` with ONNX's version converter (``model_io.upgrade_opset``),
   so the other ops follow (``ReduceMin``'s ``axes`` becomes an input at 18, for one);
   raising the opset number alone would leave them in a form the new opset refuses.

The writer works at two levels: :meth:`QdqWriter.pair` and :meth:`QdqWriter.constant`
take a scale and a zero point (the QNN HTP legalization's own encodings);
:meth:`QdqWriter.activation` and :meth:`QdqWriter.weight` take a :class:`QuantSpec` and a
range (or the weight itself), compute the parameters with :mod:`compressor.quant.math`,
and write each (tensor, spec) once, so every reader of a tensor shares one pair.
:meth:`QdqWriter.weight` also returns what the rounding changed (``DQ(Wq) − W``, which
bias correction removes) and the sizes before and after.

New nodes are collected and added by :meth:`QdqWriter.flush` or :meth:`QdqWriter.finish`,
which also removes what became unused and sorts the graph topologically.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common is not imported by onnx_ir itself)
from compressor.passes._graph import NameAllocator, add_initializer

from compressor.model_io import default_opset, to_proto, upgrade_opset
from compressor.quant.math import dequantize_array, quant_params, quantize_array, weight_quant_params
from compressor.quant.spec import QuantSpec

__all__ = ["QdqWriter", "QuantizedWeight", "WIDE_OPSET", "is_wide", "raise_opset"]

logger = logging.getLogger(__name__)

#: The first opset whose QuantizeLinear/DequantizeLinear take 16-bit integers.
WIDE_OPSET = 21

_WIDE_DTYPES = frozenset({np.dtype(np.uint16), np.dtype(np.int16)})


def is_wide(zero_point: np.ndarray) -> bool:
    """Whether a zero point (its dtype is the quantized type) is 16-bit."""
    return np.asarray(zero_point).dtype in _WIDE_DTYPES


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight :meth:`QdqWriter.weight` stored quantized.

    Attributes:
        value: The DQ output its readers use instead of the float weight.
        error: ``DQ(Wq) − W`` in float64 (what the rounding changed).
        float_bytes: Size of the float weight.
        quantized_bytes: Size of the stored integers.
    """

    value: ir.Value
    error: np.ndarray
    float_bytes: int
    quantized_bytes: int


class QdqWriter:
    """Adds Q/DQ nodes and quantized initializers to ``graph`` (module docstring, cases 1-3).

    Args:
        graph: The graph written into.
        node_names: Allocates node names; default: names no node of ``graph`` has (a second
            writer on a graph, give_back's after quantize's, must not reuse the first's).
    """

    def __init__(self, graph: ir.Graph, node_names: Callable[[str], str] | None = None):
        self.graph = graph
        self.names = NameAllocator(graph)
        self.node_names = node_names or NameAllocator.for_nodes(graph)
        self.nodes: list[ir.Node] = []
        self.written = 0
        self.wide = False
        self._activations: dict[tuple[int, QuantSpec, float, float], ir.Value] = {}
        self._weights: dict[tuple[int, QuantSpec], QuantizedWeight] = {}

    def params(self, base: str, scale: np.ndarray, zero_point: np.ndarray) -> tuple[ir.Value, ir.Value]:
        """Initializers ``<base>_scale`` (float32) and ``<base>_zero_point`` (its own dtype)."""
        self.wide = self.wide or is_wide(zero_point)
        return (add_initializer(self.graph, self.names(f"{base}_scale"), np.asarray(scale, np.float32)),
                add_initializer(self.graph, self.names(f"{base}_zero_point"), np.asarray(zero_point)))

    def pair(self, value: ir.Value, scale: np.ndarray, zero_point: np.ndarray) -> ir.Value:
        """``value -> Q -> DQ`` (case 1); returns the DQ output, which readers use instead."""
        base = value.name or "t"
        s, z = self.params(base, scale, zero_point)
        q = ir.node("QuantizeLinear", [value, s, z], name=self.node_names(f"{base}_QuantizeLinear"))
        q.outputs[0].name = self.names(f"{base}_quantized")
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=self.node_names(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = self.names(f"{base}_dequantized")
        dq.outputs[0].type, dq.outputs[0].shape = value.type, value.shape
        self.nodes += [q, dq]
        return dq.outputs[0]

    def constant(self, base: str, quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                 axis: int | None, type_: ir.TypeProtocol, shape: ir.Shape) -> ir.Value:
        """``DQ(quantized, scale, zero_point)`` over a new initializer (case 2); returns the DQ output.

        Args:
            base: Name the new initializers and nodes start with.
            quantized: The stored integers.
            scale: Scale (per channel along ``axis`` when 1-D).
            zero_point: Zero point, of the quantized dtype.
            axis: Channel axis of a per-channel scale, else ``None``.
            type_: Type of the dequantized value (the float constant's).
            shape: Its shape.
        """
        q_value = add_initializer(self.graph, self.names(f"{base}_quantized"), quantized)
        s, z = self.params(base, scale, zero_point)
        attrs = {"axis": axis} if axis is not None else {}
        dq = ir.node("DequantizeLinear", [q_value, s, z], attributes=attrs,
                     name=self.node_names(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = self.names(f"{base}_dequantized")
        dq.outputs[0].type, dq.outputs[0].shape = type_, shape
        self.nodes.append(dq)
        return dq.outputs[0]

    def activation(self, value: ir.Value, spec: QuantSpec, lo: float, hi: float) -> ir.Value:
        """The pair (case 1) reading ``value`` on the ``spec`` grid over ``[lo, hi]``, written once per
        (value, spec, range): a tensor read on the grids of two ranges gets two pairs (a target
        whose pairs stay at the layers' inputs; OpenVINO's moved pairs that meet share one
        range, :mod:`compressor.passes._pair_site` case 6)."""
        spec = spec.for_range(lo, hi)
        key = (id(value), spec, float(lo), float(hi))
        if key not in self._activations:
            self._activations[key] = self.pair(value, *quant_params(lo, hi, spec))
        return self._activations[key]

    def weight(self, value: ir.Value, spec: QuantSpec, shared_with: tuple[ir.Value, ...] = ()) -> QuantizedWeight:
        """The constant ``value`` stored quantized with ``spec`` (case 2), written once per (value, spec).

        With ``shared_with`` (constants of the same size along ``spec.axis``), the scales are
        taken over ``value`` and those together, so that they all read the same scales.
        """
        key = (id(value), spec, tuple(id(v) for v in shared_with))
        if key not in self._weights:
            w = value.const_value.numpy().astype(np.float32)
            if shared_with:
                joint = _side_by_side([w, *(v.const_value.numpy() for v in shared_with)], spec.axis)
                scale, zp = weight_quant_params(joint, spec if spec.axis is None else dataclasses.replace(spec, axis=0))
            else:
                scale, zp = weight_quant_params(w, spec)
            wq = quantize_array(w, scale, zp, spec)
            error = dequantize_array(wq, scale, zp, spec).astype(np.float64) - w
            dq = self.constant(value.name, wq, scale, zp, spec.axis, value.type, value.shape)
            self._weights[key] = QuantizedWeight(dq, error, w.nbytes, wq.nbytes)
        return self._weights[key]

    @property
    def weights(self) -> list[QuantizedWeight]:
        """Every weight :meth:`weight` stored, in the order it stored them."""
        return list(self._weights.values())

    def flush(self) -> None:
        """Add the nodes written so far to the graph (unsorted; :meth:`finish` sorts)."""
        self.graph.extend(self.nodes)
        self.written += len(self.nodes)
        self.nodes = []

    def finish(self, model: ir.Model) -> ir.Model:
        """Add the new nodes, drop what became unused, sort; case 3 when a 16-bit Q/DQ was written.

        Returns:
            The model (a new object when it was converted to :data:`WIDE_OPSET`).

        Raises:
            UnsupportedModel: the version converter cannot upgrade one of the model's ops (exit 4).
        """
        self.flush()
        if not self.written:
            return model
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.TopologicalSortPass()(model)
        if self.wide and default_opset(model) < WIDE_OPSET:
            model = raise_opset(model, WIDE_OPSET)
        return model


def raise_opset(model: ir.Model, opset: int) -> ir.Model:
    """``model`` at ``opset`` (case 3): converted where an op changes form, else the same graph.

    Where the converter rewrites no node (only the opset number and inferred shapes
    differ), the model keeps its own graph with the new opset number, so its bytes are
    what they were apart from that number.

    Raises:
        UnsupportedModel: the version converter cannot upgrade one of the model's ops (exit 4).
    """
    converted = upgrade_opset(model, opset)
    if _nodes(converted) != _nodes(model):
        return converted
    model.opset_imports[""] = opset
    return model


def _nodes(model: ir.Model) -> list[bytes]:
    return [node.SerializeToString(deterministic=True) for node in to_proto(model).graph.node]


def _side_by_side(arrays: list[np.ndarray], axis: int | None) -> np.ndarray:
    """``arrays`` as one matrix with ``axis`` first (one row per channel), or as one vector."""
    if axis is None:
        return np.concatenate([np.ravel(a) for a in arrays])
    return np.concatenate([np.moveaxis(np.asarray(a), axis, 0).reshape(a.shape[axis], -1) for a in arrays], axis=1)
