"""Where a layer's input pair is written: moved up through ops that only move or select values.

A layer's activation input ``x`` is quantized as ``DQ(Q(x))`` over ``x``'s calibrated range
``[lo, hi]``. When ``x = f(u)`` for an op ``f`` that only moves, selects or pads values
(``Reshape``, ``Transpose``, ``Slice``, ``MaxPool``, ``Pad`` with zeros...: the target's
``Capabilities.input_pair_moves_through``), the pair can be written on ``u`` instead, with
the same range, and the layer computes exactly the same:

1. ``Q/DQ`` is elementwise and monotone, so it commutes with any op that only moves or
   selects values: ``f(DQ(Q(u))) = DQ(Q(f(u)))`` (a ``MaxPool`` too: the max of rounded
   values is the rounded max). Values of ``u`` outside ``[lo, hi]`` are clipped, but those
   are values ``f`` drops (a ``Slice``'s cut, a ``MaxPool``'s non-maxima): whatever reaches
   ``x`` lies in ``[lo, hi]``;
2. a constant ``Pad`` adds zeros, and ``0`` is on every grid (the zero point is an
   integer), so padding before or after the rounding gives the same tensor; a ``Pad`` with
   another constant value is not crossed. Nor is a constant ``Pad`` where the pair's zero
   point is not 0 (a signed range on a uint8 grid): the backend then pads the integers
   with the zero point, which OpenVINO's low-precision transformations do not carry into
   the next convolution (measured: basic-pitch's eight CQT convolutions fell to f32);
   ``reflect``/``edge`` pads only copy values and are crossed.

What it buys: the pair then sits right after the op that computed ``u`` (a Conv, a Relu, a
residual ``Add``), where a backend that fuses quantization into the producer (OpenVINO's
CPU plugin folds a FakeQuantize into the convolution's post-ops) writes ``u`` as uint8 and
runs the data movement on uint8, as NNCF's quantizer propagation places it.

The walk stops at a tensor that is a graph output, that a node other than the one on the
way reads (``Shape``/``Size`` read only the shape and do not count), or whose producer is
not crossable. One exception: the layer's own input may be read by other layers quantizing
it with the same spec (one tensor, one range): the pair moved above it is then theirs
together, so giving one of them back (accuracy control) gives back that shared input.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from compressor.quant.math import quant_params
from compressor.quant.spec import QuantSpec

if TYPE_CHECKING:
    from compressor.passes._layers import Layer

__all__ = ["Sites", "pair_site", "pair_sites"]

#: ``(id(layer node), input) -> (node, input, float tensor)`` that gets the input's pair.
Sites = dict[tuple[int, int], tuple[ir.Node, int, ir.Value]]

_SHAPE_ONLY = frozenset({"Shape", "Size"})


def _pads_zeros(node: ir.Node, zero_point: int) -> bool:
    """A ``Pad`` that adds zeros, on a grid whose zero point is 0 (case 2), or any other op."""
    if node.op_type != "Pad":
        return True
    mode = node.attributes.get("mode")
    if mode is not None and mode.as_string() != "constant":
        return True  # reflect/edge copy values: they only move (case 1)
    if zero_point != 0:
        return False
    fill = node.inputs[2] if len(node.inputs) > 2 else None
    if fill is None:
        return True
    const = fill.const_value
    if const is None and (p := fill.producer()) is not None and p.op_type == "Constant":
        attr = p.attributes.get("value")
        const = attr.as_tensor() if attr is not None else None
    return const is not None and not np.any(const.numpy())


def _readers_allow(value: ir.Value, reader: tuple[ir.Node, int], spec: QuantSpec, first: bool,
                   claims: Mapping[tuple[int, int], QuantSpec]) -> bool:
    """Whether ``value`` may be crossed from ``reader``: no other reader but shape readers, and,
    for the layer's own input (``first``), other layers quantizing it with ``spec``."""
    if value.is_graph_output():
        return False
    for node, index in value.uses():
        if (node, index) == reader or node.op_type in _SHAPE_ONLY:
            continue
        if not (first and claims.get((id(node), index)) == spec):
            return False
    return True


def pair_site(node: ir.Node, index: int, spec: QuantSpec, zero_point: int, through: Collection[str],
              claims: Mapping[tuple[int, int], QuantSpec]) -> tuple[ir.Node, int]:
    """The ``(node, input index)`` whose input gets the pair of ``node``'s input ``index``.

    Args:
        node: The layer.
        index: Its activation input.
        spec: The pair's spec.
        zero_point: The pair's zero point (case 2).
        through: Op types the pair moves up through (cases 1, 2).
        claims: ``(id(node), index) -> spec`` of every activation input quantized in this
            run (readers of the layer's own input that share its pair).
    """
    site = (node, index)
    first = True
    while through:
        value = site[0].inputs[site[1]]
        producer = value.producer() if value is not None else None
        if (producer is None or producer.op_type not in through or producer.domain not in ("", "ai.onnx")
                or not producer.inputs or producer.inputs[0] is None or len(producer.outputs) != 1
                or not _pads_zeros(producer, zero_point) or not _readers_allow(value, site, spec, first, claims)):
            break
        source = producer.inputs[0]
        if source.const_value is not None or source.dtype != value.dtype:
            break
        site, first = (producer, 0), False
    return site


def pair_sites(layers: Iterable[Layer], spec_of: Callable[[Layer], QuantSpec],
               ranges: Mapping[str, tuple[float, float]], through: Collection[str]) -> Sites:
    """Where the pair of each activation input of ``layers`` (the layers quantized in this run,
    their inputs' calibrated ``ranges``) goes.

    Found before any rewiring, so that layers sharing a pair find the same float tensor.
    """
    layers = list(layers)
    claims = {(id(la.node), i): spec_of(la) for la in layers for i, _ in la.activations}
    sites: Sites = {}
    for layer in layers:
        for index, value in layer.activations:
            spec = claims[(id(layer.node), index)]
            zero_point = int(np.ravel(quant_params(*ranges[value.name], spec)[1])[0])
            node, at = pair_site(layer.node, index, spec, zero_point, through, claims)
            sites[(id(layer.node), index)] = (node, at, node.inputs[at])
    return sites
