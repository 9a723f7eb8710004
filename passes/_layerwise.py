"""Layer-wise pruning from calibration statistics: all layers from the dense model, or stage by stage.

The sparsity passes decide each weight from statistics of its layer's input (Wanda's
``||X||``, SparseGPT's ``X X^T``, bias correction's ``E[x]``). :func:`prune_layers` takes
them in one of two ways:

1. *Dense* (one shot): every layer's statistics come from the model as the pass found it,
   in one statistics run (:func:`._sparsity.input_moments`, cached per model and data).
2. *Sequential* (SparseGPT's sequential variant, Frantar & Alistarh 2023, section 3.4):
   the layers are split into stages (:func:`plan_stages`) and each stage's statistics are
   gathered on the model whose earlier stages are already pruned, reconstructed and (with
   bias correction) bias-corrected, so a layer's Hessian ``X Xᵀ`` is that of the inputs it
   will really see, and its reconstruction ``min ||W X - W_p X||`` is taken on them; its
   bias correction ``b' = b + (W - W_p) E[x]`` reads the same inputs. The statistics come
   from :class:`compressor.quant.staged.StagedStatistics`, which runs every node of the
   model once over the calibration data across all stages.

Stages (:func:`plan_stages`): the stage of a layer is one more than the highest stage of
the pruned layers its input depends on (through any path of the graph; graph inputs and
constants are at stage 0). Layers reading the same input (a transformer's Q, K and V) or
independent branches share a stage; the attention output projection, the two FFN layers
and the next block's Q/K/V follow one by one (4 stages per BERT block); a plain CNN gets
one stage per layer. A weight shared by several layers at the same stage is pruned once,
from the sum of their statistics; one shared across stages (a layer reused deeper in the
graph) makes the pass take dense statistics for every layer, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from compressor.passes._bias_correction import correct_biases
from compressor.passes._graph import NameAllocator
from compressor.passes._layers import Layer
from compressor.passes._sparsity import input_moments, moment_points, write_groups

from compressor.pass_manager import outer_reads
from compressor.quant.staged import StagedStatistics
from compressor.quant.taps import ChannelMoments

if TYPE_CHECKING:
    from compressor.data import Dataset

__all__ = ["LayerwiseResult", "plan_stages", "prune_layers"]

logger = logging.getLogger(__name__)

Prune = Callable[[Sequence[Layer], np.ndarray, Mapping[str, ChannelMoments]], np.ndarray]


def plan_stages(graph: ir.Graph, groups: Sequence[Sequence[Layer]]) -> list[list[int]] | None:
    """Indices of ``groups`` (layers sharing a weight) by stage, earliest first (module docstring).

    ``None`` when a shared weight's readers fall in different stages (one of them deeper
    than another, e.g. an encoder layer reused after others): the earlier reader would run
    with the weight still dense while the layers after it are pruned on its output, and its
    pruned weight would arrive after them. Such a model takes dense statistics (case 1).
    """
    of_node = {id(layer.node): i for i, group in enumerate(groups) for layer in group}
    level: dict[int, int] = {}  # id(value) -> highest stage of the pruned layers it depends on
    stage = [0] * len(groups)
    for node in graph:
        upstream = max((level.get(id(v), 0) for v in outer_reads(node)), default=0)
        if id(node) in of_node:
            index = of_node[id(node)]
            if stage[index] and upstream + 1 != stage[index]:
                return None
            stage[index] = upstream + 1
            upstream = stage[index]
        for out in node.outputs:
            level[id(out)] = upstream
    by_stage: dict[int, list[int]] = {}
    for index, s in enumerate(stage):
        by_stage.setdefault(s, []).append(index)
    return [by_stage[s] for s in sorted(by_stage)]


class LayerwiseResult:
    """What :func:`prune_layers` did, for the pass's stats.

    Attributes:
        dense: Each group's weight before.
        new: Each group's weight after.
        per_layer: Layer name -> sparsity of its new weight.
        corrected: Layer name -> how its bias was corrected (bias correction only).
        stages: Statistics stages run (``0``: dense statistics or none).
        sequential: Whether the statistics were sequential (asked for, and no weight shared
            across stages made the pass take the dense model's).
    """

    def __init__(self) -> None:
        self.dense: list[np.ndarray] = []
        self.new: list[np.ndarray] = []
        self.per_layer: dict[str, float] = {}
        self.corrected: dict[str, str] = {}
        self.stages = 0
        self.sequential = False

    @property
    def changed(self) -> bool:
        """Whether any weight or bias changed."""
        return bool(self.corrected) or any(not np.array_equal(a, b) for a, b in zip(self.dense, self.new))


def prune_layers(model: ir.Model, groups: Sequence[Sequence[Layer]], prune: Prune, *, data: Dataset | None,
                 cache: dict, needs_stats: Sequence[bool], gram: bool, sequential: bool,
                 bias_correction: bool) -> LayerwiseResult:
    """Give every group of layers its pruned weight and (optionally) correct their biases.

    Args:
        model: Changed in place.
        groups: Layers sharing a weight (:func:`._sparsity.group_by_weight`).
        prune: ``(group, dense weight, moments by activation name) -> new weight``.
        data: Calibration data (``None`` when no group needs statistics).
        cache: The pass context's statistics cache (dense statistics only).
        needs_stats: Per group, whether its pruning or bias correction reads statistics.
        gram: Gather ``X X^T`` too (SparseGPT).
        sequential: Case 2 of the module docstring, else case 1.
        bias_correction: ``b' = b + (W - W_p) E[x]`` for every changed layer.
    """
    graph = model.graph
    names = NameAllocator(graph)
    out = LayerwiseResult()
    out.dense = [group[0].array() for group in groups]
    order = [layer.name for group in groups for layer in group]  # before a new Add renames an unnamed node's label
    out.new = list(out.dense)
    stats_layers = [layer for group, need in zip(groups, needs_stats) if need for layer in group]
    planned = plan_stages(graph, groups) if sequential and stats_layers else None
    if sequential and stats_layers and planned is None:
        shared = [layer.name for group in groups if len(group) > 1 for layer in group]
        logger.warning("sequential statistics: a weight is shared by layers at different depths (among %s); every "
                       "layer's statistics come from the dense model instead", ", ".join(shared[:6]))
    out.sequential = sequential and (planned is not None or not stats_layers)
    if planned is None:  # case 1
        moments = input_moments(model, stats_layers, data, cache, gram=gram) if stats_layers else {}
        out.new = [prune(group, w, moments) for group, w in zip(groups, out.dense)]
        out.per_layer, changed = write_groups(graph, groups, out.dense, out.new, names)
        if bias_correction:
            out.corrected = correct_biases(graph, changed, moments, names)
        return out
    plain = [i for i, need in enumerate(needs_stats) if not need]  # case 2: those without statistics first
    stages = [s for s in [plain, *([i for i in stage if needs_stats[i]] for stage in planned)] if s]
    staged = StagedStatistics(model, data)
    for k, stage in enumerate(stages):
        members = [groups[i] for i in stage]
        moments: dict[str, ChannelMoments] = {}
        if stage is not plain:
            points = moment_points([layer for group in members for layer in group], gram)
            later = [layer.activation() for s in stages[k + 1:] for i in s for layer in groups[i]]
            found = staged.collect(points.values(), later=[v for v in later if v is not None])
            moments = {name: found[p] for name, p in points.items()}
            out.stages += 1
        for i in stage:
            out.new[i] = prune(groups[i], out.dense[i], moments)
        per_layer, changed = write_groups(graph, members, [out.dense[i] for i in stage],
                                          [out.new[i] for i in stage], names)
        out.per_layer.update(per_layer)
        if bias_correction:
            out.corrected.update(correct_biases(graph, changed, moments, names))
    logger.info("sequential statistics: %s", staged.summary)
    out.per_layer = {name: out.per_layer[name] for name in order if name in out.per_layer}
    return out
