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
from compressor.passes._graph import (
    NameAllocator,
    NotFoldable,
    attr_int,
    label,
    only_first_output_used,
)
from compressor.passes._sparsity import (
    PRUNABLE_OPS,
    WeightLayer,
    count_macs,
    replace_constant,
    size_report,
    write_weight,
)
from compressor.passes._sparsity_moments import (
    add_output_bias,
    bias_delta,
    cached_moments,
    require_calibration,
)

from compressor.pipeline import Pass, PassContext, PassResult, register_pass
from compressor.scope import Scope

__all__ = ["PruneChannels", "PruneChannelsOptions"]

logger = logging.getLogger(__name__)

_ONNX = ("", "ai.onnx")
_UNARY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Erf", "Abs", "Neg", "Elu", "Selu", "Softplus",
                    "HardSigmoid", "HardSwish", "Clip", "Identity", "Dropout", "Celu", "ThresholdedRelu", "Mish"})
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


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


@dataclasses.dataclass
class _Reader:
    """A node that reduces over the pruned channels (case 3)."""

    node: ir.Node
    features: int  # consecutive inputs per channel: 1, or H*W after a flatten (case 3d)


@dataclasses.dataclass
class _Plan:
    """Everything that changes when the producer's output channels go."""

    producer: ir.Node
    channels: int
    values: list[tuple[ir.Value, int, int]] = dataclasses.field(default_factory=list)  # value, axis, features
    constants: list[tuple[ir.Node, int, int]] = dataclasses.field(default_factory=list)  # node, input, axis
    readers: list[_Reader] = dataclasses.field(default_factory=list)
    reshapes: list[tuple[ir.Node, int]] = dataclasses.field(default_factory=list)  # node, features


def _rank(value: ir.Value) -> int:
    if value.shape is None:
        raise NotFoldable(f"the rank of `{value.name}` is unknown")
    return len(value.shape)


def _is_const(value: ir.Value | None) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and not value.is_graph_input())


def _const_weight(node: ir.Node, what: str, rank: int | None = None) -> np.ndarray:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not _is_const(w) or w.const_value.dtype not in _FLOATS:
        raise NotFoldable(f"{what} `{label(node)}` has no constant float weight")
    if rank is not None and len(w.shape) != rank:
        raise NotFoldable(f"{what} `{label(node)}` has a rank-{len(w.shape)} weight")
    return w.const_value.numpy()


def _out_axis(node: ir.Node) -> int:
    if node.op_type == "Gemm":
        return 0 if attr_int(node, "transB", 0) else 1
    return 1 if node.op_type == "MatMul" else 0


class _Planner:
    """Follows a producer's output forward (cases 1-3) and lists the edits."""

    def __init__(self, producer: ir.Node, channels: int):
        self.plan = _Plan(producer, channels)
        self.seen: dict[int, int] = {}  # value id -> channel axis
        self.binaries: dict[int, tuple[ir.Node, int]] = {}

    def run(self) -> _Plan:
        producer = self.plan.producer
        if producer.op_type in ("Conv", "Gemm") and len(producer.inputs) > 2 and producer.inputs[2] is not None \
                and not _is_const(producer.inputs[2]):
            raise NotFoldable(f"bias `{producer.inputs[2].name}` is not a constant")
        out = producer.outputs[0]
        axis = 1 if self.plan.producer.op_type in ("Conv", "Gemm") else _rank(out) - 1
        queue = [(out, axis)]
        try:
            while queue:
                value, ax = queue.pop()
                if id(value) in self.seen:
                    continue
                self.seen[id(value)] = ax
                self.plan.values.append((value, ax, 1))
                if value.is_graph_output():
                    raise NotFoldable(f"`{value.name}` is a graph output (the model's interface keeps its shape)")
                for node, index in list(value.uses()):
                    queue.extend(self._follow(value, ax, node, index))
        except NotFoldable:
            # a residual connection met on the way is the root cause: report it first
            for node, ax in self.binaries.values():
                self._check_binary(node, ax, partial=True)
            raise
        for node, ax in self.binaries.values():
            self._check_binary(node, ax)
        return self.plan

    def _follow(self, value: ir.Value, ax: int, node: ir.Node, index: int) -> list[tuple[ir.Value, int]]:
        op = node.op_type
        where = f"`{value.name}` feeds {op} `{label(node)}`"
        if node.domain not in _ONNX:
            raise NotFoldable(f"{where} (a custom op)")
        if op in _UNARY or op in _POOLS or op == "PRelu":
            if index != 0:
                raise NotFoldable(f"{where} as input {index}")
            if op in _POOLS and (ax != 1 or _rank(value) < 3):
                raise NotFoldable(f"{where}, which pools over the channel axis {ax}")
            if not only_first_output_used(node):
                raise NotFoldable(f"{where}, whose second output is used")
            if op == "Clip" and not all(v is None or _is_const(v) for v in node.inputs[1:]):
                raise NotFoldable(f"{where} with bounds that are not constants")
            if op == "PRelu":
                self._constant(node, 1, ax, _rank(value))
            return [(node.outputs[0], ax)]
        if op == "BatchNormalization":
            if index != 0 or ax != 1 or not only_first_output_used(node):
                raise NotFoldable(f"{where} not as a per-channel inference BN")
            for i in range(1, 5):
                self._constant(node, i, 0, 1, rank_of_const=1)
            return [(node.outputs[0], ax)]
        if op in _BINARY:
            out_rank = _rank(node.outputs[0])
            ax_out = ax + out_rank - _rank(value)
            self.binaries[id(node)] = (node, ax_out)
            return [(node.outputs[0], ax_out)]
        if op == "Conv" and index == 0 and ax == 1:
            _const_weight(node, "Conv")
            if attr_int(node, "group", 1) != 1:
                raise NotFoldable(f"{where}, a grouped convolution")
            self.plan.readers.append(_Reader(node, 1))
            return []
        if op in ("Gemm", "MatMul") and index == 0:
            self._linear_reader(node, where, ax == _rank(value) - 1, 1)
            return []
        if op in ("Reshape", "Flatten") and index == 0 and ax == 1:
            self._flatten(value, node, where)
            return []
        raise NotFoldable(f"{where} ({'a residual/' if op == 'Concat' else ''}not handled: it mixes channels or "
                          "changes the layout)")

    def _linear_reader(self, node: ir.Node, where: str, on_last_axis: bool, features: int) -> None:
        if node.op_type == "Gemm":
            if attr_int(node, "transA", 0):
                raise NotFoldable(f"{where} with transA=1")
        elif not on_last_axis:
            raise NotFoldable(f"{where}, which does not reduce over the channel axis")
        _const_weight(node, node.op_type, rank=2)
        self.plan.readers.append(_Reader(node, features))

    def _flatten(self, value: ir.Value, node: ir.Node, where: str) -> None:
        """Case 3d."""
        dims = list(value.shape) if value.shape is not None else []
        if len(dims) < 3 or not all(isinstance(d, int) for d in dims[1:]):
            raise NotFoldable(f"{where}: flattening needs static channel and spatial sizes")
        features = int(np.prod(dims[2:]))
        flat = node.outputs[0]
        if flat.shape is None or len(flat.shape) != 2:
            raise NotFoldable(f"{where}, not a flatten to 2-D")
        if node.op_type == "Flatten":
            if attr_int(node, "axis", 1) != 1:
                raise NotFoldable(f"{where} with axis != 1")
        else:
            shape = node.inputs[1] if len(node.inputs) > 1 else None
            if not _is_const(shape):
                raise NotFoldable(f"{where} with a shape that is not a constant")
            target = shape.const_value.numpy().tolist()
            total = self.plan.channels * features
            if len(target) != 2 or target[1] not in (total, -1) or (target[1] == -1 and target[0] in (-1,)):
                raise NotFoldable(f"{where} to {target}, not a flatten of {self.plan.channels}x{features}")
            if target[1] == -1 and target[0] == 0 and attr_int(node, "allowzero", 0):
                raise NotFoldable(f"{where} to {target} with allowzero=1")
            self.plan.reshapes.append((node, features))
        if flat.is_graph_output():
            raise NotFoldable(f"`{flat.name}` is a graph output (the model's interface keeps its shape)")
        self.plan.values.append((flat, 1, features))
        for reader, index in list(flat.uses()):
            rwhere = f"`{flat.name}` feeds {reader.op_type} `{label(reader)}`"
            if reader.op_type not in ("Gemm", "MatMul") or index != 0 or reader.domain not in _ONNX:
                raise NotFoldable(f"{rwhere} after a flatten (only Gemm/MatMul are handled there)")
            self._linear_reader(reader, rwhere, True, features)

    def _constant(self, node: ir.Node, index: int, ax: int, rank: int, rank_of_const: int | None = None) -> None:
        """A per-channel parameter of ``node`` (case 2): size C (sliced) or 1 on the channel axis."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            return
        if not _is_const(value):
            raise NotFoldable(f"{node.op_type} `{label(node)}`: input `{value.name}` is not a constant")
        shape = value.const_value.shape
        k = len(shape)
        if rank_of_const is not None and k != rank_of_const:
            raise NotFoldable(f"{node.op_type} `{label(node)}`: `{value.name}` has rank {k}")
        axis = ax - (rank - k)
        if axis < 0 or shape[axis] == 1:
            return  # broadcast along the channels: nothing to slice
        if shape[axis] != self.plan.channels:
            raise NotFoldable(f"{node.op_type} `{label(node)}`: `{value.name}` has {shape[axis]} entries on the "
                              f"channel axis, not {self.plan.channels}")
        self.plan.constants.append((node, index, axis))

    def _downstream(self, value: ir.Value) -> bool:
        """Whether ``value`` is computed from the producer's output (through anything)."""
        if not hasattr(self, "_reachable"):
            reachable: set[int] = set()
            stack = [self.plan.producer.outputs[0]]
            while stack:
                v = stack.pop()
                if id(v) in reachable:
                    continue
                reachable.add(id(v))
                stack.extend(out for user, _ in v.uses() for out in user.outputs)
            self._reachable = reachable
        return id(value) in self._reachable

    def _check_binary(self, node: ir.Node, ax: int, partial: bool = False) -> None:
        """Case 2: each input is on the pruned channels or a per-channel constant.

        ``partial``: the walk stopped early; only look for inputs from elsewhere.
        """
        rank = _rank(node.outputs[0])
        for index, value in enumerate(node.inputs):
            if value is None or id(value) in self.seen:
                continue
            if _is_const(value):
                if not partial:
                    self._constant(node, index, ax, rank)
                continue
            if partial and self._downstream(value):
                continue
            raise NotFoldable(f"{node.op_type} `{label(node)}` combines the pruned channels with `{value.name}`, "
                              "another tensor (a residual connection)")


def _channel_scores(w: np.ndarray, axis: int, criterion: str) -> np.ndarray:
    moved = np.moveaxis(np.abs(w.astype(np.float64)), axis, 0).reshape(w.shape[axis], -1)
    return moved.sum(axis=1) if criterion == "l1" else np.sqrt(np.square(moved).sum(axis=1))


def _activation_scores(plan: _Plan, moments: dict, centred: bool) -> np.ndarray:
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
        axis = _reader_input_axis(node)
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


def _reader_input_axis(node: ir.Node) -> int:
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if attr_int(node, "transB", 0) else 0
    return 0


class _Editor:
    """Applies a plan."""

    def __init__(self, graph: ir.Graph, names: NameAllocator, moments: dict | None):
        self.graph = graph
        self.names = names
        self.moments = moments
        self.corrected: dict[str, str] = {}

    def apply(self, plan: _Plan, keep: np.ndarray) -> None:
        producer = plan.producer
        axis = _out_axis(producer)
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

    def _reader(self, reader: _Reader, channels: int, keep: np.ndarray) -> None:
        node = reader.node
        w = node.inputs[1].const_value.numpy()
        axis = _reader_input_axis(node)
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
        try:
            delta = bias_delta(WeightLayer(node, node.inputs[1]), delta_w, stats)
            self.corrected[label(node)] = add_output_bias(self.graph, node, delta, self.names)
        except NotFoldable as why:
            self.corrected[label(node)] = f"skipped: {why}"


def _reader_moment_axes(graph: ir.Graph) -> dict[str, int]:
    """Every Conv/Gemm/MatMul activation input with its channel (reduction) axis."""
    axes = {}
    for node in graph:
        if node.op_type in PRUNABLE_OPS and node.domain in _ONNX and node.inputs and node.inputs[0] is not None:
            x = node.inputs[0]
            if x.name and not _is_const(x) and len(node.inputs) > 1 and _is_const(node.inputs[1]):
                axes[x.name] = WeightLayer(node, node.inputs[1]).activation_axis()
    return axes


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
        import onnx_ir.passes.common as common

        common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
        moments = None
        if self.needs_calibration:
            data = require_calibration(ctx.calibration, "prune-channels with bias_correction or criterion "
                                       "'activation'")
            moments = cached_moments(model, _reader_moment_axes(graph), data, ctx.cache)
        macs_before = count_macs(graph)
        weights_before = [v.const_value.numpy() for v in graph.initializers.values()
                          if v.const_value is not None and v.const_value.dtype in _FLOATS]
        names = NameAllocator(graph)
        editor = _Editor(graph, names, moments if opts.bias_correction else None)
        per_layer: dict[str, str] = {}
        skipped: dict[str, str] = {}
        removed = total = 0
        for node in list(graph):
            if node.op_type not in opts.ops or node.domain not in _ONNX or len(node.inputs) < 2:
                continue
            w_value = node.inputs[1]
            if not opts.scope.contains(node.name, w_value.name if w_value is not None else None):
                skipped[label(node)] = "outside the recipe's scope"
                continue
            try:
                w = _const_weight(node, node.op_type)
                if node.op_type == "Conv" and attr_int(node, "group", 1) != 1:
                    raise NotFoldable("a grouped convolution (its output channels are tied to its input groups)")
                if node.op_type != "Conv" and w.ndim != 2:
                    raise NotFoldable(f"a rank-{w.ndim} weight")
                axis = _out_axis(node)
                channels = w.shape[axis]
                if channels - int(np.floor(opts.ratio * channels)) >= channels:
                    continue
                plan = _Planner(node, channels).run()
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
                         if v.const_value is not None and v.const_value.dtype in _FLOATS]
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
