"""``prune-channels``: structured pruning that removes whole output channels, so the graph shrinks.

For a producer ``P`` (Conv with ``group=1``, Gemm, MatMul with a constant 2-D weight) the
importance of output channel ``c`` is the norm of its weights, ``||W_c||_2`` (or
``||W_c||_1``): ``W[c]`` for Conv, row ``c`` of ``B`` (``transB=1``) or column ``c``
(``transB=0``) for Gemm, column ``c`` for MatMul. The ``floor(ratio * C)`` least important
channels are removed (the kept count rounded up to ``multiple_of``, at least 1).

Removing channel ``c`` of ``P``'s output ``y`` is exact for everything downstream that
computes channel ``c`` from channel ``c`` alone, and for the readers that *reduce* over
channels it drops one term of their sum. The pass follows ``y`` forward through:

1. per-channel ops, kept as they are: Relu, LeakyRelu, Sigmoid, Tanh, Gelu, Erf, Abs, Neg,
   Elu, Selu, Softplus, HardSigmoid, HardSwish, Clip (constant bounds), Identity,
   Dropout (inference), and, on NCHW tensors, MaxPool/AveragePool/GlobalAveragePool/
   GlobalMaxPool;
2. per-channel affine ops whose parameters are sliced: BatchNormalization (its 4 vectors),
   PRelu (the slope), Add/Sub/Mul/Div with a constant that is per-channel (size ``C``
   along the channel axis) or broadcast (size 1), or whose other input is itself on the
   pruned channels (``x * sigmoid(x)``);
3. the readers, whose *input* channels are removed:
   a. Conv (``group=1``): ``W'[:, c]`` removed (axis 1);
   b. Gemm (``transA=0``): rows ``c`` of ``B`` (``transB=0``) or columns (``transB=1``);
   c. MatMul with a constant 2-D weight, channels on the last axis: rows ``c`` of ``W``;
   d. after a flatten of an ``N x C x H x W`` tensor to ``N x (C H W)`` (Reshape with a
      constant shape, or Flatten with ``axis=1``), a Gemm/MatMul as in b/c: channel ``c``
      is features ``c*HW .. (c+1)*HW - 1``, and the Reshape's shape constant is updated.

Anything else on the way skips ``P`` with the reason in the stats: a residual Add (the
other input is another tensor), Concat, other Reshapes, Transpose, normalisations that mix
channels (LayerNormalization, Softmax), a grouped Conv, a graph output (the model's
interface keeps its shape).

The producer's bias (Conv input 2, Gemm ``C``) is sliced too. When the removed channels
are all-zero (weights and bias) and the path keeps zero at zero (no BatchNorm or
additive constant), the pruned model computes exactly what the original did.

Recovery (``bias_correction: true``, needs calibration data): a reader loses the terms
``W'[:, c] x_c`` of the removed channels; adding their mean back, ``b' = b + W'[:, R] E[x_R]``
(``R`` the removed channels, ``E[x]`` measured at the reader's input on the model as the
pass found it), restores its output mean (this is ``b + (W' - W'_pruned) E[x]``).

Stats: channels before/after per layer, MFLOPs (2 x multiply-accumulates per sample)
before and after, and the weights' dense and zlib-compressed size.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir
from compressor.passes._bias_correction import correct_bias
from compressor.passes._channel_plan import (
    FLOATS,
    ONNX_DOMAINS,
    Plan,
    Planner,
    Reader,
    const_weight,
    is_const,
)
from compressor.passes._graph import NameAllocator, NotFoldable, attr_int, label
from compressor.passes._layers import (
    PRUNABLE_OPS,
    Layer,
    output_channel_axis,
    weight_input_axis,
)
from compressor.passes._sparsity import (
    count_macs,
    replace_constant,
    require_calibration,
    size_report,
    write_weight,
)

from compressor.pipeline import Pass, PassContext, PassResult, register_pass
from compressor.quant.taps import StatPoint, gather
from compressor.scope import Scope

__all__ = ["PruneChannels", "PruneChannelsOptions"]

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class PruneChannelsOptions:
    """Options of ``prune-channels``.

    Attributes:
        ratio: Fraction of each layer's output channels removed, in [0, 1).
        criterion: Channel importance: ``l2`` or ``l1`` norm of its weights, or
            ``activation``: the output energy its readers lose (needs calibration data).
        multiple_of: Round the kept channel count up to a multiple of this (SIMD widths).
        ops: Producer op types pruned.
        scope: Which producers (exact names or ``re:`` patterns, on node or weight names).
        bias_correction: Give the readers the mean of what they lost, from calibration data.
    """

    ratio: float = 0.25
    criterion: Literal["l2", "l1", "activation"] = "l2"
    multiple_of: int = 1
    ops: tuple[str, ...] = PRUNABLE_OPS
    scope: Scope = Scope()
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"option 'ratio' must be in [0, 1), got {self.ratio}")
        if self.multiple_of < 1:
            raise ValueError(f"option 'multiple_of' must be >= 1, got {self.multiple_of}")
        bad = sorted(set(self.ops) - set(PRUNABLE_OPS))
        if bad:
            raise ValueError(f"option 'ops': {', '.join(bad)} cannot be pruned; choose from {', '.join(PRUNABLE_OPS)}")


def _channel_scores(w: np.ndarray, axis: int, criterion: str) -> np.ndarray:
    moved = np.moveaxis(np.abs(w.astype(np.float64)), axis, 0).reshape(w.shape[axis], -1)
    return moved.sum(axis=1) if criterion == "l1" else np.sqrt(np.square(moved).sum(axis=1))


def _activation_scores(plan: Plan, moments: dict, centred: bool) -> np.ndarray:
    """Criterion ``activation``: ``sqrt(sum_readers sum_f s_f ||W'[:, f]||^2)`` per channel.

    ``f`` runs over the reader inputs fed by the channel (1, or H*W after a flatten),
    ``s_f = Var[x_f]`` when bias correction restores the mean (``E[x_f^2]`` otherwise): the
    expected squared change of the readers' outputs when the channel goes.
    """
    energy = np.zeros(plan.channels)
    for reader in plan.readers:
        node = reader.node
        stats = moments.get(node.inputs[0].name)
        w = node.inputs[1].const_value.numpy().astype(np.float64)
        axis = weight_input_axis(node)
        if stats is None or stats.total.size != w.shape[axis]:
            raise NotFoldable(f"no calibration statistics for the input of `{label(node)}`")
        second = stats.squares / max(stats.count, 1)
        spread = np.maximum(second - np.square(stats.mean), 0.0) if centred else second
        column = np.square(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).sum(axis=1)
        energy += (spread * column).reshape(plan.channels, reader.features).sum(axis=1)
    return np.sqrt(energy)


def _kept(scores: np.ndarray, ratio: float, multiple_of: int) -> np.ndarray:
    """Sorted indices of the channels kept: the most important, ties to the earlier one."""
    c = scores.size
    keep = c - int(np.floor(ratio * c))
    keep = min(c, max(1, -(-keep // multiple_of) * multiple_of))
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:keep])


def _features(keep: np.ndarray, per_channel: int) -> np.ndarray:
    """Indices of the flattened features of the kept channels (case 3d)."""
    if per_channel == 1:
        return keep
    return (keep[:, None] * per_channel + np.arange(per_channel)[None, :]).reshape(-1)


class _Editor:
    """Applies a plan."""

    def __init__(self, graph: ir.Graph, names: NameAllocator, moments: dict | None):
        self.graph = graph
        self.names = names
        self.moments = moments
        self.corrected: dict[str, str] = {}

    def apply(self, plan: Plan, keep: np.ndarray) -> None:
        producer = plan.producer
        axis = output_channel_axis(producer, len(producer.inputs[1].shape))
        w = producer.inputs[1].const_value.numpy()
        write_weight(self.graph, producer.inputs[1], [producer], np.take(w, keep, axis=axis), self.names)
        bias_index = 2 if producer.op_type in ("Conv", "Gemm") else None
        if bias_index is not None and len(producer.inputs) > 2 and producer.inputs[2] is not None:
            arr = producer.inputs[2].const_value.numpy()
            if arr.ndim >= 1 and arr.shape[-1] == plan.channels:
                replace_constant(self.graph, producer, 2, np.take(arr, keep, axis=-1), self.names)
        for node, index, ax in plan.constants:
            arr = node.inputs[index].const_value.numpy()
            replace_constant(self.graph, node, index, np.take(arr, keep, axis=ax), self.names)
        for reader in plan.readers:
            self._reader(reader, plan.channels, keep)
        for node, features in plan.reshapes:
            shape = node.inputs[1].const_value.numpy().copy()
            if shape[1] != -1:
                shape[1] = keep.size * features
                replace_constant(self.graph, node, 1, shape, self.names)
        for value, ax, features in plan.values:
            if value.shape is not None and isinstance(value.shape[ax], int):
                dims = list(value.shape)
                dims[ax] = keep.size * features
                value.shape = ir.Shape(dims)

    def _reader(self, reader: Reader, channels: int, keep: np.ndarray) -> None:
        node = reader.node
        w = node.inputs[1].const_value.numpy()
        axis = weight_input_axis(node)
        kept = _features(keep, reader.features)
        if self.moments is not None:
            self._correct(node, w, axis, kept)
        write_weight(self.graph, node.inputs[1], [node], np.take(w, kept, axis=axis), self.names)

    def _correct(self, node: ir.Node, w: np.ndarray, axis: int, kept: np.ndarray) -> None:
        """Bias correction of a reader: ``b' = b + W[:, R] E[x_R]``."""
        x = node.inputs[0]
        stats = self.moments.get(x.name)
        if stats is None or stats.mean.size != w.shape[axis]:
            self.corrected[label(node)] = "skipped: no statistics for its input"
            return
        removed = np.ones(w.shape[axis], bool)
        removed[kept] = False
        delta_w = np.where(np.expand_dims(removed, tuple(a for a in range(w.ndim) if a != axis)), w, 0)
        self.corrected[label(node)] = correct_bias(self.graph, Layer(node, node.inputs[1]), delta_w, stats,
                                                   self.names)


def _reader_points(graph: ir.Graph) -> dict[str, StatPoint]:
    """Moments of every Conv/Gemm/MatMul activation input along its channel (reduction) axis."""
    points = {}
    for node in graph:
        if node.op_type in PRUNABLE_OPS and node.domain in ONNX_DOMAINS and node.inputs and node.inputs[0] is not None:
            x = node.inputs[0]
            if x.name and not is_const(x) and len(node.inputs) > 1 and is_const(node.inputs[1]):
                axis = Layer(node, node.inputs[1]).activation_axis()
                if axis is not None:
                    points[x.name] = StatPoint(x.name, "moments", axis)
    return points


@register_pass
class PruneChannels(Pass):
    """Remove the least important output channels of Conv/Gemm/MatMul layers, rewriting their readers."""

    name = "prune-channels"
    lossy = True
    description = "structured pruning: remove whole output channels (the graph gets smaller and faster)"
    Options = PruneChannelsOptions
    requires = frozenset({"constants-folded"})
    provides = frozenset({"pruned"})

    @property
    def needs_calibration(self) -> bool:
        """Bias correction and the ``activation`` criterion read calibration data."""
        return self.options.bias_correction or self.options.criterion == "activation"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts: PruneChannelsOptions = self.options
        graph = model.graph
        from onnx_ir.passes import common

        common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
        moments = None
        if self.needs_calibration:
            data = require_calibration(ctx.calibration, "prune-channels with bias_correction or criterion "
                                       "'activation'")
            points = _reader_points(graph)
            found = gather(model, data, points.values(), ctx.cache)
            moments = {name: found[p] for name, p in points.items()}
        macs_before = count_macs(graph)
        weights_before = [v.const_value.numpy() for v in graph.initializers.values()
                          if v.const_value is not None and v.const_value.dtype in FLOATS]
        names = NameAllocator(graph)
        editor = _Editor(graph, names, moments if opts.bias_correction else None)
        per_layer: dict[str, str] = {}
        skipped: dict[str, str] = {}
        removed = total = 0
        for node in list(graph):
            if node.op_type not in opts.ops or node.domain not in ONNX_DOMAINS or len(node.inputs) < 2:
                continue
            w_value = node.inputs[1]
            if not opts.scope.contains(node.name, w_value.name if w_value is not None else None):
                skipped[label(node)] = "outside the recipe's scope"
                continue
            try:
                w = const_weight(node, node.op_type)
                if node.op_type == "Conv" and attr_int(node, "group", 1) != 1:
                    raise NotFoldable("a grouped convolution (its output channels are tied to its input groups)")
                if node.op_type != "Conv" and w.ndim != 2:
                    raise NotFoldable(f"a rank-{w.ndim} weight")
                axis = output_channel_axis(node, w.ndim)
                channels = w.shape[axis]
                if channels - int(np.floor(opts.ratio * channels)) >= channels:
                    continue
                plan = Planner(node, channels).run()
                scores = (_activation_scores(plan, moments, opts.bias_correction) if opts.criterion == "activation"
                          else _channel_scores(w, axis, opts.criterion))
                keep = _kept(scores, opts.ratio, opts.multiple_of)
                if keep.size == channels:
                    continue
                editor.apply(plan, keep)
            except NotFoldable as why:
                skipped[label(node)] = str(why)
                logger.debug("`%s`: channels not pruned: %s", label(node), why)
                continue
            per_layer[label(node)] = f"{channels}->{keep.size}"
            removed += channels - keep.size
            total += channels
        if per_layer:
            common.RemoveUnusedNodesPass()(model)
        macs_after = count_macs(graph)
        weights_after = [v.const_value.numpy() for v in graph.initializers.values()
                         if v.const_value is not None and v.const_value.dtype in FLOATS]
        stats = {
            "layers_pruned": len(per_layer),
            "layers_skipped": len(skipped),
            "channels_removed": removed,
            "channels_before": total,
            "mflops_before": round(2 * macs_before / 1e6, 4),
            "mflops": round(2 * macs_after / 1e6, 4),
            "params_before": int(sum(a.size for a in weights_before)),
            "params": int(sum(a.size for a in weights_after)),
            **size_report(weights_before, weights_after),
            "per_layer": per_layer,
            "skipped_layers": dict(sorted(skipped.items())),
        }
        if opts.bias_correction:
            stats["bias_corrected"] = sum(1 for how in editor.corrected.values() if not how.startswith("skipped"))
            stats["bias_correction"] = editor.corrected
        return PassResult(model, bool(per_layer), stats)
