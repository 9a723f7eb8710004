"""The ranges of the output pairs: carried, shared and floored (cases 5, 9 and 10 of :mod:`._output_qdq`).

Every range comes from the one statistics run; these rules replace some of them so that a
pair costs no rounding of its own where the backend copies or selects values:

5. an op that only selects values of its input (:data:`SELECTING`, :func:`selects`)
   carries the input's range to its outputs (:func:`carry_ranges`): ``Q(DQ(q)) = q``, and
   ONNX Runtime runs the op on uint8;
9. a SiLU's input is floored where SiLU is within half a step of 0 (:func:`floor_silu_inputs`);
10. a ``Concat`` unit's sole-reader inputs take its output range (:func:`share_concat_ranges`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from compressor.passes._layers import Layer
from compressor.passes._padding import pad_adds_only_zeros
from compressor.passes._placement import is_constant, silu_input

from compressor.quant.math import dtype_bounds

__all__ = ["SELECTING", "carry_ranges", "floor_silu_inputs", "selects", "share_concat_ranges", "silu_floor",
           "silu_output"]


#: Ops whose output holds values of their first input only (picked, moved or reshaped;
#: ``Resize`` interpolates between them, ``Pad`` adds zeros: see :func:`selects`).
SELECTING = frozenset({"MaxPool", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity",
                       "Dropout", "DepthToSpace", "SpaceToDepth", "Resize", "Split", "Slice", "Gather", "Expand",
                       "Tile", "Pad"})


def selects(node: ir.Node) -> bool:
    """Whether ``node`` is a :data:`SELECTING` op whose outputs stay within its first input's range.

    ``Pad`` only in ``constant`` mode with a zero (or no) value: zero is on every grid the
    writer makes (its ranges hold 0), another constant may not be; a ``Gather`` from a
    constant table is a lookup, not a selection of an activation.
    """
    if node.op_type not in SELECTING or node.domain not in ("", "ai.onnx") or not node.inputs:
        return False
    if node.op_type == "Pad":
        return pad_adds_only_zeros(node)
    return node.inputs[0] is not None and not is_constant(node.inputs[0])


def carry_ranges(graph: ir.Graph, ranges: dict[str, tuple[float, float]], outputs: list[str]) -> int:
    """Give a tensor that selects values of an output tensor the output's range (case 5).

    ``MaxPool``, ``Transpose``, ``Reshape``... (:data:`SELECTING`) only pick or move the
    values of their input; the input's output pair puts them on its grid, so a pair with
    the same scale and zero point after the op re-quantizes them exactly (``Q(DQ(q)) = q``)
    and ONNX Runtime drops the ``DQ -> op -> Q`` around it (the op runs on uint8), where a
    range of its own (a max-pooled tensor's is narrower) would round a second time.
    Followed in graph order, so chains of such ops carry the range on.

    Returns:
        How many ranges were replaced.
    """
    carried = set(outputs)
    changed = 0
    for node in graph:
        if not selects(node):
            continue
        source = node.inputs[0]
        if source.name not in carried or source.name not in ranges:
            continue
        for out in node.outputs:  # Split: every piece; tensors nothing quantizes carry the range on
            if out is None:
                continue
            if out.name in ranges and ranges[out.name] != ranges[source.name]:
                changed += 1
            ranges[out.name] = ranges[source.name]
            carried.add(out.name)
    return changed

#: Where SiLU, ``x σ(x)``, has its minimum (-0.278): below it, it rises back towards 0.
_SILU_ARGMIN = -1.2784645


def _silu_floor(step: float) -> float:
    """The ``t < -1.28`` with ``|t σ(t)| = step / 2`` (case 9), by bisection."""
    lo, hi = -100.0, _SILU_ARGMIN
    for _ in range(60):
        mid = (lo + hi) / 2
        if -mid / (1 + np.exp(-mid)) > step / 2:
            hi = mid
        else:
            lo = mid
    return hi


def silu_output(x: ir.Value) -> ir.Value | None:
    """The output of the SiLU ``Mul(x, Sigmoid(x))`` when those two nodes are all that reads
    ``x`` (the ``QuantizeLinear`` of an encoding of ``x`` aside; ``x`` no graph output), else ``None``."""
    if x.is_graph_output():
        return None
    readers = {id(node): node for node, _ in x.uses() if node.op_type != "QuantizeLinear"}
    mul = next((n for n in readers.values() if n.op_type == "Mul" and silu_input(n) is x), None)
    # the Sigmoid silu_input found reads x: with the Mul, x's only two readers
    return mul.outputs[0] if mul is not None and len(readers) == 2 else None


def silu_floor(out_range: tuple[float, float], levels: int, symmetric: bool = False) -> float:
    """The lowest input a SiLU's input grid needs: below it ``|SiLU|`` is under half a step
    of an output grid of ``levels`` steps over ``out_range`` (which holds 0), so a value
    clamped up to it changes the output by less than that grid's rounding (case 9);
    ``symmetric``: a grid of ``levels`` steps over ``[-a, a]``, ``a`` the range's largest magnitude."""
    lo_out, hi_out = out_range
    span = 2 * max(abs(lo_out), abs(hi_out)) if symmetric else hi_out - min(lo_out, 0.0)
    return _silu_floor(span / levels)


def floor_silu_inputs(layers: list[Layer], ranges: dict[str, tuple[float, float]]) -> int:
    """Raise the lower bound of each quantized SiLU's input range to its floor (case 9).

    Args:
        layers: The quantized layers (the ``Sigmoid`` and the ``Mul`` of a SiLU both among
            them, or its input is read in float and left alone).
        ranges: Tensor name -> range, changed in place.

    Returns:
        How many ranges were raised.
    """
    muls = {id(layer.node): layer for layer in layers if layer.op == "Mul"}
    raised = 0
    for layer in layers:
        if layer.op != "Sigmoid" or not layer.activations:
            continue
        x = layer.activations[0][1]
        out = silu_output(x)
        mul = muls.get(id(out.producer())) if out is not None else None
        if mul is None or x.name not in ranges or out.name not in ranges:
            continue
        spec = mul.quant.activations.for_range(*ranges[out.name])  # a signed grid has twice the step
        qmin, qmax = dtype_bounds(spec.dtype)
        floor = silu_floor(ranges[out.name], qmax - qmin, symmetric=spec.symmetric)
        lo, hi = ranges[x.name]
        if lo < floor < hi:
            ranges[x.name] = (floor, hi)
            raised += 1
    return raised


def share_concat_ranges(layers: list[Layer], ranges: dict[str, tuple[float, float]]) -> int:
    """Give a ``Concat`` unit's sole-reader inputs written by quantized layers the output's range (case 10).

    Returns:
        How many ranges were replaced.
    """
    producers = {id(layer.node) for layer in layers}
    shared = 0
    for layer in layers:
        if layer.op != "Concat" or layer.quant.output is None or layer.weight is not None:
            continue
        out = layer.node.outputs[0].name
        if out not in ranges:
            continue
        for _, value in layer.activations:
            producer = value.producer()
            if producer is None or id(producer) not in producers or value.name not in ranges \
                    or value.is_graph_output() or {id(node) for node, _ in value.uses()} != {id(layer.node)}:
                continue
            if ranges[value.name] != ranges[out]:
                ranges[value.name] = ranges[out]
                shared += 1
    return shared
