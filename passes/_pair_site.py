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

3. ``Concat`` only places its inputs side by side: the pair moves onto every input, all on
   the one grid of the concatenation's range (NNCF's "unified scales"); ``Resize`` is
   crossed in ``nearest`` mode only (it copies values; linear modes mix them).
4. The pair may cover a region: a tensor read by several ops of the region (a
   spatial-pyramid block ``Concat(x, MaxPool(x), MaxPool(MaxPool(x)))``) is crossed once
   every op reading it is inside the region, so one pair on ``x`` feeds them all.

What it buys: the pair then sits right after the op that computed ``u`` (a Conv, a Relu, a
residual ``Add``), where a backend that fuses quantization into the producer (OpenVINO's
CPU plugin folds a FakeQuantize into the convolution's post-ops) writes ``u`` as uint8 and
runs the data movement on uint8, as NNCF's quantizer propagation places it.

5. A ``Split`` (several outputs) is crossed for a group of layers together: when every
   reader of every output of the split reads it through a pair of the same spec (its own
   input, or a ``Concat`` on its way to one), one pair on the split's input serves them
   all, on one range that covers every member's (the layers' input ranges are widened to
   it; a split's output range lies inside its input's, so nothing is clipped that was not
   before). This is how NNCF places one FakeQuantize before a YOLOv8 C2f block's split,
   which OpenVINO then runs on u8 with the residual ``Add`` reading both halves.
6. Pairs of several layers that land on one tensor with the same spec (a block's output
   read by the next block's convolution and, through a ``Concat``, by another; two
   ``Slice``s of one tensor) share one range, the union of theirs, so one pair is written
   where two would each cost the backend a float requantization (NNCF's unified scales).

The move stops at a tensor that is a graph output, that a node outside the region reads
(``Shape``/``Size`` read only the shape and do not count), or whose producer is not
crossable. One exception: the layer's own input may be read by other layers quantizing
it with the same spec (one tensor, one range): the pair moved above it is then theirs
together. A pair that several layers read (this case, 4, 5 and 6) stays while any of them
is quantized: giving one back (accuracy control, :mod:`compressor.quant.revert`) makes its
weight float, and the shared input goes float with the last of them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from compressor.passes._padding import pad_adds_only_zeros
from compressor.passes._placement import is_constant

from compressor.quant.math import quant_params
from compressor.quant.spec import QuantSpec

if TYPE_CHECKING:
    from compressor.passes._layers import Layer

__all__ = ["Sites", "pair_site", "pair_sites"]

#: ``(id(layer node), input) -> [(node, input, float tensor)]``: the edges that get the input's pair.
Sites = dict[tuple[int, int], list[tuple[ir.Node, int, ir.Value]]]

_SHAPE_ONLY = frozenset({"Shape", "Size"})


def _pads_zeros(node: ir.Node, zero_point: int) -> bool:
    """A ``Pad`` that adds zeros, on a grid whose zero point is 0 (case 2), or any other op."""
    if node.op_type != "Pad":
        return True
    mode = node.attributes.get("mode")
    if mode is not None and mode.as_string() != "constant":
        return True  # reflect/edge copy values: they only move (case 1)
    return zero_point == 0 and pad_adds_only_zeros(node)


def _crossable(producer: ir.Node | None, value: ir.Value, through: Collection[str], zero_point: int) -> bool:
    """Whether the pair may move from ``value`` to the data inputs of its ``producer`` (cases 1-3)."""
    if (producer is None or producer.op_type not in through or producer.domain not in ("", "ai.onnx")
            or len(producer.outputs) != 1 or not _pads_zeros(producer, zero_point)):
        return False
    if producer.op_type == "Resize":  # case 1 for nearest only: linear/cubic mix values
        mode = producer.attributes.get("mode")
        if mode is not None and mode.as_string() != "nearest":
            return False
    sources = _data_inputs(producer)
    return bool(sources) and all(v is not None and v.const_value is None and not is_constant(v)
                                 and v.dtype == value.dtype for v in sources)


def _data_inputs(node: ir.Node) -> list[ir.Value | None]:
    """The inputs whose values ``node`` moves (every input of a Concat, else the first)."""
    return list(node.inputs) if node.op_type == "Concat" else list(node.inputs[:1])


def pair_site(node: ir.Node, index: int, spec: QuantSpec, zero_point: int, through: Collection[str],
              claims: Mapping[tuple[int, int], QuantSpec]) -> list[tuple[ir.Node, int]]:
    """The ``(node, input index)`` edges whose inputs get the pair of ``node``'s input ``index``.

    The region between the pair and the layer grows one producer at a time (case 4): a
    tensor is crossed when its producer is crossable and every reader of it reads it inside
    the region (``Shape``/``Size`` aside), so the region's values depend only on the pair's.

    Args:
        node: The layer.
        index: Its activation input.
        spec: The pair's spec.
        zero_point: The pair's zero point (case 2).
        through: Op types the pair moves up through (cases 1-3).
        claims: ``(id(node), index) -> spec`` of every activation input quantized in this
            run (readers of the layer's own input that share its pair).
    """
    edges: list[tuple[ir.Node, int]] = [(node, index)]
    start = node.inputs[index]
    changed = bool(through)
    while changed:
        changed = False
        inside = {(id(n), i) for n, i in edges}
        for n, i in edges:
            value = n.inputs[i]
            producer = value.producer() if value is not None else None
            if value is None or value.is_graph_output() or not _crossable(producer, value, through, zero_point):
                continue
            readers = [(r, j) for r, j in value.uses() if r.op_type not in _SHAPE_ONLY]
            if not all((id(r), j) in inside or (value is start and claims.get((id(r), j)) == spec)
                       for r, j in readers):
                continue
            edges = [e for e in edges if e[0].inputs[e[1]] is not value]
            edges += [(producer, k) for k, v in enumerate(producer.inputs) if v in _data_inputs(producer)]
            changed = True
            break
    return edges


def pair_sites(layers: Iterable[Layer], spec_of: Callable[[Layer], QuantSpec],
               ranges: dict[str, tuple[float, float]], through: Collection[str], fixed: Collection[str] = ()) -> Sites:
    """Where the pair of each activation input of ``layers`` (the layers quantized in this run,
    their inputs' calibrated ``ranges``) goes.

    Found before any rewiring, so that layers sharing a pair find the same float tensor.
    A group of layers whose pairs meet (cases 5, 6) gets one range: ``ranges`` is widened
    in place for their inputs, unless that changes one of the ``fixed`` ranges (learned in
    training: ``recover: {qat: true}``).
    """
    layers = list(layers)
    claims = {(id(la.node), i): spec_of(la) for la in layers for i, _ in la.activations}
    inputs = {(id(la.node), i): (la.node, v.name) for la in layers for i, v in la.activations}
    sites: Sites = {}
    for layer in layers:
        for index, value in layer.activations:
            sites[(id(layer.node), index)] = _edges(layer.node, index, claims, ranges[value.name], through)
    found = dict(sites)  # each layer's own region, before any group moved it
    if _share_ranges(sites, found, claims, inputs, ranges, through, fixed):
        _share_ranges(sites, found, claims, inputs, ranges, through, fixed)  # a moved pair may meet another
    return sites


def _edges(node: ir.Node, index: int, claims: Mapping[tuple[int, int], QuantSpec], rng: tuple[float, float],
           through: Collection[str]) -> list[tuple[ir.Node, int, ir.Value]]:
    spec = claims[(id(node), index)]
    zero_point = int(np.ravel(quant_params(*rng, spec.for_range(*rng))[1])[0])
    return [(n, at, n.inputs[at]) for n, at in pair_site(node, index, spec, zero_point, through, claims)]


def _share_ranges(sites: Sites, found: Sites, claims: Mapping[tuple[int, int], QuantSpec],
                  inputs: Mapping[tuple[int, int], tuple[ir.Node, str]], ranges: dict[str, tuple[float, float]],
                  through: Collection[str], fixed: Collection[str] = ()) -> bool:
    """Cases 5 and 6: one range for every group of layers whose pairs meet; whether a pair moved.

    Layers are grouped when their pairs land on the same float tensor with the same spec
    (case 6), when they read one tensor (ranges are per tensor), or when they read a
    ``Split`` only through pairs of one spec (case 5: their pairs then move onto the split's
    input). Each group's inputs get the union of their ranges, so one pair serves them all.
    A group stays as it was where the union would change where a member's pair goes (its
    region in ``found``: a ``Pad`` crossed only on a zero point of 0) or a range in
    ``fixed`` (learned in training).
    """
    parent = {key: key for key in sites}

    def root(key: tuple[int, int]) -> tuple[int, int]:
        while parent[key] != key:
            parent[key] = key = parent[parent[key]]
        return key

    def join(keys: Iterable[tuple[int, int]]) -> None:
        first, *rest = keys
        for key in rest:
            parent[root(key)] = root(first)

    readers: dict[int, tuple[ir.Node, set[tuple[int, int]]]] = {}
    meeting: dict[object, list[tuple[int, int]]] = {}
    for key, edges in sites.items():
        meeting.setdefault(inputs[key][1], []).append(key)
        for _, _, value in edges:
            meeting.setdefault((id(value), claims[key]), []).append(key)
            split = value.producer() if value is not None else None
            if split is not None and split.op_type == "Split" and split.domain in ("", "ai.onnx"):
                readers.setdefault(id(split), (split, set()))[1].add(key)
    for keys in meeting.values():
        join(keys)
    moves: list[tuple[ir.Node, set[tuple[int, int]]]] = []
    for split, keys in readers.values() if "Split" in through else ():
        source = split.inputs[0] if split.inputs else None
        if source is None or is_constant(source) or any(v.is_graph_output() or v.dtype != source.dtype
                                                         for v in split.outputs):
            continue
        uses = {(id(r), j) for v in split.outputs for r, j in v.uses() if r.op_type not in _SHAPE_ONLY}
        covered = {(id(n), at) for key in keys for n, at, v in sites[key] if v in split.outputs}
        if uses == covered and len({claims[key] for key in keys}) == 1:
            join(keys)
            moves.append((split, keys))
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for key in sites:
        groups.setdefault(root(key), []).append(key)
    kept: set[tuple[int, int]] = set()
    for keys in groups.values():
        names = {inputs[key][1] for key in keys}
        lo, hi = min(ranges[n][0] for n in names), max(ranges[n][1] for n in names)
        if len(names) > 1 and (any(ranges[n] != (lo, hi) for n in names if n in fixed) or any(
                _edges(inputs[key][0], key[1], claims, (lo, hi), through) != found[key] for key in keys)):
            continue
        kept.update(keys)
        ranges.update(dict.fromkeys(names, (lo, hi)))
    moved = False
    for split, keys in moves:
        if keys <= kept:
            moved = True
            for key in keys:
                sites[key] = [*(e for e in sites[key] if e[2] not in split.outputs), (split, 0, split.inputs[0])]
    return moved
