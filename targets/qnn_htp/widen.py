"""Which nodes run with 16-bit activations whatever the recipe's width, and why (``qnn-quantize-tensors`` case 2).

Two structures lose more at 8 bits than one encoding per tensor can give back:

1. **Square roots** (``QdqRules.root_inputs``: ``Sqrt``). A root halves the dynamic range
   in dB, so its input needs twice its output's bits: an 8-bit power ``|X|^2`` keeps 24 dB,
   its root then 24 dB of magnitude where an 8-bit magnitude keeps 48. :func:`root_chains`
   lists the root and the nodes computing its input through sums (``Add``, ``Sum``,
   ``ReduceSum``, ``ReduceMean``) and squares (``Pow`` by 2, ``Mul(x, x)``,
   ``ReduceSumSquare``), the squares included. silero-vad's STFT magnitude
   ``sqrt(re^2 + im^2)``: at 8 bits the imaginary part's square rounded to 0 everywhere and
   the output cosine fell by 0.06 on HTP; at 16 bits by 0.002.
2. **A state carried from one call to the next**: a graph input and a graph output of the
   same dtype and static shape joined by a path of elementwise and data-movement ops only,
   in a model with another input (the frame a streaming call brings; a one-input model
   whose output is its input plus a residual, or times a mask, carries nothing)
   (``state`` -> Gather -> ``c_0`` -> Mul -> Add -> ``c_1`` -> Unsqueeze -> Concat ->
   ``stateN``): what a streaming caller feeds back. Its error accumulates over the stream,
   which the per-call metrics the gate measures do not show, and such a tensor often stacks
   values of very different ranges under one encoding (silero-vad's ``state`` stacks ``h``,
   in ``[-1, 1]``, and the cell ``c``, up to ``±64``: at 8 bits ``h`` took ``c``'s step of
   0.5). :func:`carried_states` lists, per such pair, the nodes on those paths, the
   data-movement nodes reading the input (up to the first other op) and those writing the
   output. A compute layer on the way (a Conv, a MatMul) reads its own calibrated 8-bit
   encoding as before. On silero-vad on HTP at 8 bits the frame decisions of a stream
   agreed with fp32 on 82-91% of the frames, at 16 bits on 100%.

3. **A transformer's residual stream and the normalization reading it**
   (``QdqRules.norm_inputs``: ``LayerNormalization``): :func:`norm_chains` lists the
   normalization and the ``Add`` computing its input. The residual stream carries a few
   outlier channels (BERT-style models: tens against ones), so one 8-bit encoding of it
   erases the other channels, and the normalization scales what is left back up. MiniLM W8A8
   on HTP (16 sentences, token cosine): 0.70, with both at 16 bits 0.86 (either alone: no
   gain; as written on the CPU, pooled: 0.827 -> 0.920).

4. **A concatenation of ranges far apart** (:func:`mixed_concats`): one encoding for the
   output, and an input whose range is under 1/16 of the output's keeps under 4 of its 8
   bits. ultralytics' YOLOv8 ends in ``Concat(boxes in pixels [0, 320], class scores
   [0, 1])``: at 8 bits the scores took the boxes' step of 1.25 and every score became 0
   (nudenet on HTP: no box on 16 images, while the gate's cosine, dominated by the boxes,
   read a drop of 0.0009); at 16 bits the step is 0.005.

``qnn-legalize {roots: int8}``, ``{carried_states: int8}``, ``{norms: int8}`` and
``{concats: int8}`` leave each at the recipe's width.

Also here: ``Pow(x, 2)`` written ``Mul(x, x)`` (:func:`squares_as_mul`, the same float
result): HTP's 16-bit ``ElementWisePower`` was off from its Q/DQ graph by a tenth of the
output range on silero-vad's STFT power (mean error 0.0043 over ``[0, 0.13]``), its ``Mul``
ten times less.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import label
from compressor.targets.base import on_cpu
from compressor.targets.qnn_htp.concat_trees import concat_trees
from compressor.targets.qnn_htp.qdq_graph import QDQ_OPS, const_array
from compressor.targets.qnn_htp.rules import QdqRules

__all__ = ["carried_states", "describe", "mixed_concats", "norm_chains", "reaches_output", "root_chains",
           "squares_as_mul"]

#: Ops through which a root's input is a sum of squares (case 1): sums pass on, squares end the chain.
_SUMS = frozenset({"Add", "Sum", "ReduceSum", "ReduceMean"})
_SQUARES = frozenset({"ReduceSumSquare"})
#: A Concat input spanning under this fraction of the output's range is widened (case 4).
CONCAT_RANGE_RATIO = 1.0 / 16
#: Ops that move or stack values without computing new ones (case 2), beside the rules'
#: ``same_encoding`` ops (Gather, Slice, Reshape...).
_STACKS = frozenset({"Concat", "Split", *QDQ_OPS})
#: Elementwise ops a carried state may pass through (case 2): a recurrent cell's update.
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sigmoid", "Tanh", "Relu", "Clip", "Max", "Min",
                          "Where", "HardSigmoid", "LeakyRelu"})


def _standard(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _is_square(node: ir.Node) -> bool:
    """``Pow(x, 2)``, ``Mul(x, x)`` or ``ReduceSumSquare``."""
    if node.op_type in _SQUARES:
        return True
    if node.op_type == "Mul" and len(node.inputs) == 2:
        return node.inputs[0] is not None and node.inputs[0] is node.inputs[1]
    if node.op_type == "Pow" and len(node.inputs) == 2 and node.inputs[1] is not None:
        exponent = const_array(node.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0
    return False


def squares_as_mul(graph: ir.Graph) -> int:
    """``Pow(x, 2)`` rewritten as ``Mul(x, x)`` in ``graph`` (module docstring); how many."""
    count = 0
    for node in list(graph):
        if node.op_type != "Pow" or not _standard(node) or not _is_square(node) or on_cpu(node):
            continue
        x, name = node.inputs[0], node.outputs[0].name
        node.outputs[0].name = f"{name}_pow"  # the Mul's output takes the name (calibrated under it)
        mul = ir.node("Mul", [x, x], name=node.name, outputs=[ir.Value(name=name)])
        mul.outputs[0].dtype, mul.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
        graph.insert_before(node, mul)
        ir.convenience.replace_all_uses_with(node.outputs[0], mul.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count


def _chains(graph: ir.Graph, table: Mapping[str, frozenset[int]], passes: frozenset[str],
            ends: Callable[[ir.Node], bool]) -> dict[str, list[ir.Node]]:
    """Per node whose op ``table`` names, itself and the producers of those inputs, walked back
    through ``passes`` ops (listed, their non-constant inputs followed) up to the ``ends``
    (listed, not followed); anything else ends the walk unlisted."""
    chains: dict[str, list[ir.Node]] = {}
    for node in graph:
        indices = table.get(node.op_type)
        if not indices or not _standard(node):
            continue
        chain = [node]
        stack = [node.inputs[i] for i in indices if i < len(node.inputs)]
        seen: set[int] = set()
        while stack:
            value = stack.pop()
            producer = value.producer() if value is not None else None
            if producer is None or id(producer) in seen or not _standard(producer):
                continue
            if ends(producer) or producer.op_type in passes:
                seen.add(id(producer))
                chain.append(producer)
            if not ends(producer) and producer.op_type in passes:
                stack.extend(v for v in producer.inputs if v is not None and const_array(v) is None)
        chains[label(node)] = chain
    return chains


def root_chains(graph: ir.Graph, rules: QdqRules) -> dict[str, list[ir.Node]]:
    """Case 1: per root node (``QdqRules.root_inputs``), itself and the nodes computing its input
    through sums (``_SUMS``) and squares (the squares included); an input computed by anything
    else (a Conv, a graph input) ends the walk there."""
    return _chains(graph, rules.root_inputs, _SUMS, _is_square)


def norm_chains(graph: ir.Graph, rules: QdqRules) -> dict[str, list[ir.Node]]:
    """Case 3: per normalization (``QdqRules.norm_inputs``), itself and the ``Add``/``Sum`` computing its input."""
    return _chains(graph, rules.norm_inputs, frozenset(), lambda n: n.op_type in ("Add", "Sum"))


def _static(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(int(d) for d in value.shape)


def _reach(starts: Iterable[ir.Value], ops: frozenset[str], forward: bool) -> tuple[set[int], set[int]]:
    """ids of the nodes and values reachable from ``starts`` through ``ops`` (forward: readers; else producers)."""
    nodes: set[int] = set()
    values: set[int] = {id(v) for v in starts}
    stack = list(starts)
    while stack:
        value = stack.pop()
        if forward:
            following = [use.node for use in value.uses()]
        else:
            producer = value.producer()
            following = [producer] if producer is not None else []
        for node in following:
            if id(node) in nodes or node.op_type not in ops or not _standard(node):
                continue
            nodes.add(id(node))
            for v in (node.outputs if forward else node.inputs):
                if v is not None and id(v) not in values and const_array(v) is None:
                    values.add(id(v))
                    stack.append(v)
    return nodes, values


def carried_states(graph: ir.Graph, rules: QdqRules) -> dict[tuple[ir.Value, ir.Value], set[int]]:
    """Case 2: per (graph input, graph output) pair that carries a state, the ids of the nodes to widen."""
    found: dict[tuple[ir.Value, ir.Value], set[int]] = {}
    data_inputs = [v for v in graph.inputs if not v.is_initializer()]
    if len(data_inputs) < 2:  # nothing but the state: no stream to carry it through
        return found
    moves = rules.same_encoding | _STACKS
    path_ops = moves | _ELEMENTWISE
    outputs = [(y, _static(y)) for y in graph.outputs]
    to_output: dict[int, tuple[set[int], set[int]]] = {}
    for x in data_inputs:
        shape = _static(x)
        if shape is None or x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        from_x, _ = _reach([x], path_ops, forward=True)
        for y, y_shape in outputs:
            if y.dtype != x.dtype or y_shape != shape:
                continue
            if id(y) not in to_output:
                to_output[id(y)] = (_reach([y], path_ops, forward=False)[0], _reach([y], moves, forward=False)[0])
            to_y, moved_to_y = to_output[id(y)]
            on_path = from_x & to_y
            if on_path:
                found[(x, y)] = on_path | _reach([x], moves, forward=True)[0] | moved_to_y
    return found


def describe(states: dict[tuple[ir.Value, ir.Value], set[int]], graph: ir.Graph) -> dict[str, int]:
    """``{"x -> y": nodes widened}`` for the stats."""
    return {f"{x.name} -> {y.name}": sum(1 for n in graph if id(n) in ids and n.op_type not in QDQ_OPS)
            for (x, y), ids in states.items()}


def reaches_output(graph: ir.Graph, value: ir.Value, moves: frozenset[str]) -> bool:
    """Whether ``value`` reaches a graph output through ``moves``, Concats and Splits only."""
    return bool({id(v) for v in graph.outputs} & _reach([value], moves | _STACKS, forward=True)[1])


def mixed_concats(graph: ir.Graph, ranges: Mapping[str, tuple[float, float]],
                  moves: frozenset[str] = frozenset()) -> dict[str, str]:
    """``{Concat output name: why}`` for the Concats with an input spanning under
    :data:`CONCAT_RANGE_RATIO` of their output's range (case 4), from the calibrated ``ranges``
    (``(min, max)`` by tensor name, of the model without activation Q/DQ); both spans include 0,
    as an encoding's range does. A tree of Concats (:mod:`.concat_trees`) shares one encoding,
    so its leaf inputs are judged against the tree's range and all its Concats are named; a
    lone Concat is a tree of one.

    Only a Concat whose output reaches a graph output through ops in ``moves`` (that carry
    the encoding on: reshapes, transposes, slices) is widened: a compute layer reading it
    requantizes it to its own 8 bits over the whole range, so widening the Concat there would
    only add Converts. Keyed by output name (unique, and a node may have no name).
    """
    def span(r: tuple[float, float]) -> float:
        return max(r[1], 0.0) - min(r[0], 0.0)

    found: dict[str, str] = {}
    for tree in concat_trees(graph, moves, singletons=True):
        whole = tree.range(ranges)
        if whole is None or not span(whole) or not reaches_output(graph, tree.root.outputs[0], moves):
            continue
        for leaf in tree.leaves(moves):
            part = span(ranges[leaf.name]) if leaf.name in ranges else None
            if part is not None and part < CONCAT_RANGE_RATIO * span(whole):
                why = (f"input {leaf.name!r} spans {part:.3g} of the output's {span(whole):.3g}: "
                       f"{max(0.0, 8 + np.log2(max(part, 1e-30) / span(whole))):.1f} of 8 bits")
                found.update({name: why for name in tree.names})
                break
    return found
