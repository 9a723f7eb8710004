"""Quantization inside control-flow bodies: which ``If`` branch the calibration data takes.

ONNX Runtime cannot return a tensor computed inside an ``If``/``Loop``/``Scan`` body as a
graph output, so the statistics runner (:mod:`compressor.quant.taps`) cannot tap a body
as it is. ``quantize`` reaches a body this way:

1. An ``If`` of the main graph whose condition is the same on every calibration sample
   (silero-vad's ``sr == 16000`` with the data at 16 kHz) runs one branch for all of them.
   The condition is tapped like any main-graph tensor (one statistics run, cached).
2. A *statistics copy* of the model has each such ``If`` replaced by the nodes of the
   branch the data takes (outer-scope names resolve the same: the branch's nodes read the
   very main-graph values they read inside the ``If``). On the calibration data it computes
   what the model computes, and the branch's tensors are main-graph tensors there, under
   their own names: the one runner gives them real ranges.
3. The taken branch is quantized in place by the same code as the main graph (the layers,
   pairs, output pairs and bias correction of :mod:`compressor.passes.quantize`), its
   statistics gathered on the copy; its Q/DQ parameters are initializers of the body, named
   fresh in the whole model. The branch keeps its outputs (names and count).

Left float, each named with the reason in ``stats["subgraphs_left_as_is"]``:

4. the branch no calibration sample takes (no statistics reach it);
5. both branches of an ``If`` whose condition differs between samples (a branch's
   statistics would need the samples split by the condition);
6. ``Loop``/``Scan`` bodies (a body tensor's range is over every iteration; not taken);
7. bodies nested in another body, a branch with attention blocks or any body when the
   recipe asks for SmoothQuant (its statistics run on the main graph), 16-bit activations
   (the opset conversion is model-wide), and every body on a target whose capabilities
   say it runs Q/DQ inside bodies slower than float (``Capabilities.quantize_in_bodies``).

A body is either wholly handled or left exactly as it was: never half rewritten.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import onnx_ir as ir
from compressor.passes._graph import NameAllocator, every_graph
from compressor.passes._quantize_selection import say_nothing_quantized
from compressor.passes._transformer_preset import attention_blocks
from compressor.targets.base import Capabilities

from compressor.model_io import clone_model
from compressor.pass_manager import control_flow_bodies
from compressor.pipeline import PassContext, PassResult
from compressor.quant.revert import QuantizationRecord
from compressor.quant.taps import StatPoint, gather

__all__ = ["BodyPlan", "plan_bodies", "quantize_bodies"]

logger = logging.getLogger(__name__)

_BRANCHES = ("then_branch", "else_branch")
_NESTED = "nested in another control-flow body"


@dataclasses.dataclass
class BodyPlan:
    """Which bodies ``quantize`` rewrites and which it leaves float, and why.

    Attributes:
        taken: Label -> the branch graph every calibration sample runs (case 1).
        left: Label -> why the body stays as it is (cases 4-7).
        statistics_model: The copy with each taken branch inlined (case 2), or ``None``.
        sizes: Label -> nodes in the body (for the report).
    """

    taken: dict[str, ir.Graph] = dataclasses.field(default_factory=dict)
    left: dict[str, str] = dataclasses.field(default_factory=dict)
    statistics_model: ir.Model | None = None
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)


def plan_bodies(model: ir.Model, ctx: PassContext, caps: Capabilities, opts: Any) -> BodyPlan:
    """Decide, before the main graph is quantized (its float values feed the statistics), what to do with each body.

    Args:
        model: The float model.
        ctx: The pass context (calibration data and statistics cache).
        caps: The target's capabilities (``quantize_in_bodies``).
        opts: The pass's :class:`~compressor.passes.quantize.QuantizeOptions`.
    """
    if caps.quantize_in_bodies:
        reason_not = caps.quantize_in_bodies
    elif opts.activations == "int16":
        reason_not = "16-bit activations are not written inside bodies (the opset conversion is model-wide); left float"
    elif opts.smoothquant is not None:
        reason_not = "SmoothQuant's statistics are taken on the main graph only; left float"
    else:
        reason_not = None
    plan = BodyPlan()
    main = model.graph
    ifs: list[ir.Node] = []
    labels_of: dict[tuple[int, str], str] = {}
    for label, node, attr, body in control_flow_bodies(main):
        plan.sizes[label] = sum(1 for _ in ir.traversal.RecursiveGraphIterator(body))
        labels_of[(id(node), attr)] = label
        if node.graph is not main:
            plan.left[label] = f"{_NESTED}; left float"
        elif node.op_type != "If" or attr not in _BRANCHES:
            plan.left[label] = (f"{node.op_type} body: its tensors' ranges over the iterations are not "
                                "taken; left float")
        elif reason_not:
            plan.left[label] = reason_not
        elif node not in ifs:
            ifs.append(node)
    if not ifs:
        return plan
    conds = {id(node): StatPoint(node.inputs[0].name) for node in ifs}
    found = gather(model, ctx.calibration, conds.values(), ctx.cache, bar=ctx.progress)
    chosen: dict[int, str] = {}
    for node in ifs:
        stats = found[conds[id(node)]]
        labels = {attr: labels_of[(id(node), attr)] for attr in _BRANCHES}
        if stats.count == 0 or stats.min != stats.max:
            for attr, label in labels.items():
                plan.left[label] = (f"the condition {node.inputs[0].name!r} differs between calibration samples "
                                    "(both branches run); left float")
            continue
        taken = _BRANCHES[0] if stats.max else _BRANCHES[1]
        other = _BRANCHES[1] if taken == _BRANCHES[0] else _BRANCHES[0]
        plan.left[labels[other]] = (f"no calibration data reaches it (every sample takes the {taken.split('_')[0]} "
                                    "branch); left float")
        body = node.attributes[taken].value
        if attention_blocks(body):
            plan.left[labels[taken]] = "holds attention blocks (SmoothQuant runs on the main graph only); left float"
            continue
        plan.taken[labels[taken]] = body
        chosen[id(node)] = taken
    if plan.taken:
        plan.statistics_model = _inlined_copy(model, chosen)
    return plan


def _inlined_copy(model: ir.Model, chosen: dict[int, str]) -> ir.Model:
    """A copy of ``model`` with each ``If`` of ``chosen`` (id -> branch) replaced by that branch's nodes (case 2)."""
    branches = {i: chosen[id(node)] for i, node in enumerate(model.graph) if id(node) in chosen}
    copy = clone_model(model)  # the same nodes in the same order
    graph = copy.graph
    for node, attr in [(node, branches[i]) for i, node in enumerate(graph) if i in branches]:
        body = node.attributes[attr].value
        outputs = list(body.outputs)
        body.outputs.clear()
        for value in list(body.initializers.values()):
            del body.initializers[value.name]
            graph.register_initializer(value)
        inner = list(body)
        for inner_node in inner:
            body.remove(inner_node)
        graph.insert_before(node, inner)
        for out, value in zip(node.outputs, outputs):
            out.replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
    return copy


def quantize_bodies(model: ir.Model, ctx: PassContext, plan: BodyPlan, main: PassResult,
                    quantize_graph: Callable[..., PassResult]) -> PassResult:
    """Quantize each taken branch of ``plan`` in place (case 3); the pass's result over the whole model.

    Args:
        model: The model :func:`plan_bodies` planned on, whose main graph is now quantized.
        ctx: The pass context.
        plan: From :func:`plan_bodies`, made on the float model.
        main: The main graph's result.
        quantize_graph: Quantizes the graph of the model it is given, statistics from
            ``ctx.statistics_model`` when set.
    """
    stats = dict(main.stats)
    layers = list(main.quantization.layers if main.quantization else ())
    weight_bytes = list(main.quantization.weight_bytes if main.quantization else (0, 0))
    quantized: dict[str, int] = {}
    left = dict(plan.left)
    sub = dataclasses.replace(ctx, statistics_model=plan.statistics_model, learned_ranges=None)
    taken = plan.taken
    if main.model is not model:  # 16-bit pairs in the main graph: converted to another opset, new graphs
        left.update((label, "the model was converted to opset 21 for 16-bit pairs in the main graph; left float")
                    for label in taken)
        taken = {}
    for label, body in taken.items():
        result = _quantize_body(model, body, sub, quantize_graph)
        count = result.stats["layers_quantized"]
        if not count and not result.stats["layers_weight_only"]:
            left[label] = f"nothing in it the target quantizes ({result.stats.get('nothing_quantized', 'no layer')})"
            continue
        quantized[label] = count
        layers.extend(result.quantization.layers)
        weight_bytes = [a + b for a, b in zip(weight_bytes, result.quantization.weight_bytes)]
        for key in ("layers_quantized", "layers_float", "layers_weight_only", "layer_outputs_quantized",
                    "tensors_float", "bias_corrected"):
            stats[key] = stats.get(key, 0) + result.stats[key]
        for key in ("weight_mb_fp32", "weight_mb_int8"):
            stats[key] = round(stats.get(key, 0.0) + result.stats[key], 3)
        stats["layers"] = [*stats.get("layers", []), *result.stats["layers"]]
        for key in ("skipped_layers", "skipped_tensors", "weight_only_layers"):
            stats[key] = dict(sorted({**stats.get(key, {}), **result.stats[key]}.items()))
    model = main.model
    if quantized:
        stats.pop("nothing_quantized", None)
        stats["subgraphs_quantized"] = quantized
        _rename_clashes(model.graph)
        logger.info("quantize: %s", "; ".join(f"{label}: {n} layer(s) quantized" for label, n in quantized.items()))
    elif plan.taken and stats.get("nothing_quantized"):  # the main graph left saying so to us
        say_nothing_quantized(stats["nothing_quantized"],
                              ctx.target.capabilities if ctx.target is not None else Capabilities())
    if left:
        # the bodies of the main graph first; those nested in them are counted, not listed, in the log
        nested = {label: why for label, why in left.items() if why.startswith(_NESTED)}
        outer = {label: why for label, why in left.items() if label not in nested}
        stats["subgraphs_left_as_is"] = {label: f"{plan.sizes.get(label, 0)} nodes; {why}"
                                         for label, why in {**outer, **nested}.items()}
        logger.warning("quantize left %d control-flow bod%s float: %s%s", len(left), "y" if len(left) == 1 else "ies",
                       "; ".join(f"{label}: {why}" for label, why in outer.items()),
                       f"{'; ' if outer else ''}{len(nested)} bodies nested in others "
                       "(all in stats['subgraphs_left_as_is'])" if nested else "")
    modified = main.modified or bool(quantized)
    record = QuantizationRecord(tuple(layers), tuple(weight_bytes))
    return PassResult(model, modified, stats, quantization=record)


def _quantize_body(model: ir.Model, body: ir.Graph, ctx: PassContext,
                   quantize_graph: Callable[..., PassResult]) -> PassResult:
    """Run the main graph's quantization on ``body``, seen as the graph of a model of its own."""
    saved = dict(body.opset_imports)
    body.opset_imports.update(model.opset_imports)  # the view's opset is the model's
    try:
        view = ir.Model(body, ir_version=model.ir_version)
        result = quantize_graph(view, ctx, alone=False)  # the caller says when nothing was quantized
    finally:
        body.opset_imports.clear()
        body.opset_imports.update(saved)
    if result.model is not view:
        raise AssertionError("quantizing a control-flow body converted it to another opset")
    return result


def _rename_clashes(main: ir.Graph) -> None:
    """Give a fresh name to each body value named like a value of another graph (new Q/DQ parameters).

    A body's pairs on an outer tensor the main graph quantizes too would be named alike
    (``<tensor>_scale``); ONNX forbids a body to reuse an outer name.
    """
    seen: set[str] = set()
    names = NameAllocator(main)
    for graph in every_graph(main):
        values = {id(v): v for v in (*graph.inputs, *graph.initializers.values(),
                                     *(out for node in graph for out in node.outputs)) if v.name}
        for value in values.values():
            if value.name in seen and graph is not main and not value.is_graph_output():
                if value.is_initializer():
                    del graph.initializers[value.name]
                    value.name = names(value.name)
                    graph.register_initializer(value)
                else:
                    value.name = names(value.name)
            seen.add(value.name)
