"""``fold-batchnorm``: merge an inference-mode BatchNormalization into the linear op before it.

In inference mode BN is an affine map per channel ``c``::

    BN(y)_c = gamma_c * (y_c - mean_c) / sqrt(var_c + eps) + beta_c = s_c * y_c + t_c
    s = gamma / sqrt(var + eps),   t = beta - mean * s

so when ``y = W x + b`` is linear with a per-channel output, BN(y) = (s*W) x + (s*(b - mean) + beta):

    W' = W * gamma / sqrt(var + eps)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta        (b = 0 when there is no bias)

BN's channel axis is axis 1 of its input. The producers handled, and where their
per-output-channel axis lies:

1. ``Conv``: output channels are axis 0 of ``W`` (``M x C/group x k...``), whatever
   ``group`` is; the bias (input 3) is added or replaced.
2. ``ConvTranspose``: ``W`` is ``C x M/group x k...``; output channel
   ``o = g * (M/group) + j`` comes from rows of group ``g``, column ``j``. ``W`` is viewed
   as ``group x C/group x M/group x k...`` and scaled along its third axis.
3. ``Gemm``: ``Y = alpha * A B + beta * C``, 2-D, channels are its columns: columns of
   ``B`` (``transB=0``) or rows (``transB=1``). The new ``C`` is
   ``s * (beta * C - mean) + beta_BN`` with ``beta`` set to 1.
4. ``MatMul`` with a constant 2-D weight ``W`` (``K x M``) and a 2-D output, so that
   BN's axis 1 is the last axis: ``W' = W * s`` along columns. When the MatMul feeds only
   an ``Add`` of a constant bias that feeds only the BN, the bias is folded into that Add;
   otherwise a new ``Add`` of ``b'`` is inserted.

Conditions (each failure is logged at debug level and counted under its reason):
the BN is in inference mode (no training outputs read, ``training_mode`` not 1,
``spatial`` not 0); the producer's output feeds only the BN; the weight, bias and BN
parameters are constant initializers (not overridable graph inputs) of a float type; the
shapes agree. A BN without a foldable producer is left alone.

The folded producer's output takes over the BN's output value name, so graph outputs keep
their names.

5. ``If``/``Loop``/``Scan`` bodies are folded like the main graph, each on its own: a BN and
   its producer in the same body (a BN whose producer is in an outer graph is not folded;
   an outer graph's values the body reads are never changed). New weights are initializers
   of the body, named fresh in the whole model; a body's outputs keep their names. New weights get fresh names; initializers shared with other nodes are never
changed, and old ones that nothing reads any more are removed.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import (
    NameAllocator,
    NotFoldable,
    add_initializer,
    attr_float,
    attr_int,
    constant_array,
    drop_if_unused,
    every_graph,
    known_rank,
    label,
    only_first_output_used,
    sole_consumer,
    take_over,
)

from compressor.pipeline import Pass, PassContext, PassResult, register_pass

__all__ = ["FoldBatchNorm"]

logger = logging.getLogger(__name__)

_ONNX = ("", "ai.onnx")


def _is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.op_type in op_types and node.domain in _ONNX


def _matmul_before(add: ir.Node) -> tuple[ir.Node, int] | None:
    """``(MatMul, index of its output among the Add's inputs)`` when the Add follows one."""
    for i, value in enumerate(add.inputs[:2]):
        if value is not None and _is_op(value.producer(), "MatMul"):
            return value.producer(), i
    return None


def _candidate_producer(bn: ir.Node) -> ir.Node | None:
    """The node a BN could fold into (cases 1-4), or ``None`` for a standalone BN."""
    x = bn.inputs[0] if bn.inputs else None
    producer = x.producer() if x is not None else None
    if _is_op(producer, "Conv", "ConvTranspose", "Gemm", "MatMul"):
        return producer
    if _is_op(producer, "Add") and len(producer.inputs) == 2 and _matmul_before(producer):
        return producer
    return None


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(s, mean, beta)`` of an inference-mode BN, in float64."""
    if len(bn.inputs) < 5:
        raise NotFoldable("BN has fewer than 5 inputs")
    if not only_first_output_used(bn) or attr_int(bn, "training_mode", 0) == 1:
        raise NotFoldable("BN is in training mode (its running-statistics outputs are used)")
    if attr_int(bn, "spatial", 1) == 0:
        raise NotFoldable("BN has spatial=0 (per-element statistics)")
    gamma, beta, mean, var = (
        constant_array(v, what).astype(np.float64)
        for v, what in zip(bn.inputs[1:5], ("BN scale", "BN bias", "BN mean", "BN variance"))
    )
    if gamma.ndim != 1 or not gamma.shape == beta.shape == mean.shape == var.shape:
        raise NotFoldable("BN parameters are not four vectors of one length")
    eps = attr_float(bn, "epsilon", 1e-5)
    s = gamma / np.sqrt(var + eps)
    return s, mean, beta


def _check_channels(s: np.ndarray, channels: int, node: ir.Node) -> None:
    if s.shape[0] != channels:
        raise NotFoldable(f"BN has {s.shape[0]} channels but its producer `{label(node)}` has {channels}")


class _Folder:
    """Folds BNs of one graph; counts what it did."""

    def __init__(self, graph: ir.Graph, names: NameAllocator | None = None):
        self.graph = graph
        self.names = names or NameAllocator(graph)
        self.folded = 0
        self.skipped: Counter[str] = Counter()

    def new_init(self, base: str | None, suffix: str, array: np.ndarray, like: np.ndarray) -> ir.Value:
        """Register a new initializer with ``like``'s dtype and a fresh name."""
        return add_initializer(self.graph, self.names(f"{base or 'bn'}_{suffix}"), array.astype(like.dtype))

    def run(self) -> None:
        for bn in [n for n in self.graph if n.op_type == "BatchNormalization" and n.domain in _ONNX]:
            producer = _candidate_producer(bn)
            if producer is None:
                continue  # a standalone BN: nothing to fold into, not counted
            try:
                if producer.graph is not self.graph:
                    raise NotFoldable(f"its producer `{label(producer)}` is outside the control-flow body "
                                      "the BN is in")
                if sole_consumer(bn.inputs[0]) is not bn:
                    raise NotFoldable(f"the output of its producer `{label(producer)}` is also read "
                                      "by another node or is a graph output")
                s, mean, beta = _bn_affine(bn)
                fold = getattr(self, f"_fold_{producer.op_type.lower()}")
                fold(producer, bn, s, mean, beta)
            except NotFoldable as why:
                logger.debug("`%s`: %s, BN not folded", label(bn), why)
                self.skipped[why.key] += 1
                continue
            self.folded += 1

    # Case 1.
    def _fold_conv(self, conv: ir.Node, bn: ir.Node, s, mean, beta) -> None:
        w = constant_array(conv.inputs[1], "weight")
        _check_channels(s, w.shape[0], conv)
        b = constant_array(conv.inputs[2], "bias") if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        w_new = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
        self._rewrite_conv(conv, bn, w, w_new, b, s, mean, beta)

    # Case 2.
    def _fold_convtranspose(self, conv: ir.Node, bn: ir.Node, s, mean, beta) -> None:
        w = constant_array(conv.inputs[1], "weight")
        group = attr_int(conv, "group", 1)
        if w.ndim < 3 or w.shape[0] % group:
            raise NotFoldable(f"weight of shape {w.shape} does not match group={group}")
        _check_channels(s, w.shape[1] * group, conv)
        b = constant_array(conv.inputs[2], "bias") if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        grouped = w.astype(np.float64).reshape((group, w.shape[0] // group) + w.shape[1:])
        scale = s.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        w_new = (grouped * scale).reshape(w.shape)
        self._rewrite_conv(conv, bn, w, w_new, b, s, mean, beta)

    def _rewrite_conv(self, conv, bn, w, w_new, b, s, mean, beta) -> None:
        b64 = np.zeros_like(s) if b is None else b.astype(np.float64)
        b_new = (b64 - mean) * s + beta
        old = list(conv.inputs)
        base = conv.inputs[1].name
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(1, self.new_init(base, "bnfolded", w_new, w))
        conv.replace_input_with(2, self.new_init(base, "bnfolded_bias", b_new, w if b is None else b))
        self._finish(conv.outputs[0], bn, old)

    # Case 3.
    def _fold_gemm(self, gemm: ir.Node, bn: ir.Node, s, mean, beta) -> None:
        w = constant_array(gemm.inputs[1], "weight B")
        if w.ndim != 2:
            raise NotFoldable(f"Gemm weight has rank {w.ndim}")
        trans_b = attr_int(gemm, "transB", 0)
        _check_channels(s, w.shape[0] if trans_b else w.shape[1], gemm)
        has_c = len(gemm.inputs) > 2 and gemm.inputs[2] is not None
        c = constant_array(gemm.inputs[2], "bias C") if has_c else None
        beta_g = attr_float(gemm, "beta", 1.0)
        w_new = w.astype(np.float64) * (s[:, None] if trans_b else s[None, :])
        c64 = np.zeros_like(s) if c is None else beta_g * c.astype(np.float64)
        c_new = s * (c64 - mean) + beta
        old = list(gemm.inputs)
        base = gemm.inputs[1].name
        if len(gemm.inputs) < 3:
            gemm.resize_inputs(3)
        gemm.replace_input_with(1, self.new_init(base, "bnfolded", w_new, w))
        gemm.replace_input_with(2, self.new_init(base, "bnfolded_bias", c_new, w if c is None else c))
        gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        self._finish(gemm.outputs[0], bn, old)

    # Case 4, with a bias Add.
    def _fold_add(self, add: ir.Node, bn: ir.Node, s, mean, beta) -> None:
        mm, i = _matmul_before(add)
        bias_value = add.inputs[1 - i]
        b = constant_array(bias_value, "MatMul bias")
        if b.ndim > 2:
            raise NotFoldable(f"MatMul bias `{bias_value.name}` has rank {b.ndim}, so the BN input is not 2-D")
        if sole_consumer(mm.outputs[0]) is not add:
            raise NotFoldable(f"MatMul `{label(mm)}` feeds other nodes besides the bias Add")
        w_new, w = self._matmul_weight(mm, bn, s)
        b_new = (b.astype(np.float64) - mean) * s + beta
        old = [*mm.inputs, *add.inputs]
        mm.replace_input_with(1, self.new_init(mm.inputs[1].name, "bnfolded", w_new, w))
        add.replace_input_with(1 - i, self.new_init(bias_value.name, "bnfolded", b_new, b))
        self._finish(add.outputs[0], bn, old)

    # Case 4, without a bias.
    def _fold_matmul(self, mm: ir.Node, bn: ir.Node, s, mean, beta) -> None:
        w_new, w = self._matmul_weight(mm, bn, s)
        old = list(mm.inputs)
        mm.replace_input_with(1, self.new_init(mm.inputs[1].name, "bnfolded", w_new, w))
        bias = self.new_init(mm.inputs[1].name, "bnfolded_bias", beta - mean * s, w)
        add = ir.node("Add", [mm.outputs[0], bias], name=self.names(f"{mm.name or 'matmul'}_bn_bias"))
        self.graph.insert_after(mm, add)
        self._finish(add.outputs[0], bn, old)

    def _matmul_weight(self, mm: ir.Node, bn: ir.Node, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = constant_array(mm.inputs[1], "MatMul weight")
        if w.ndim != 2:
            raise NotFoldable(f"MatMul weight has rank {w.ndim}, not 2")
        rank = known_rank(bn.inputs[0], bn.outputs[0], mm.inputs[0])
        if rank is None:
            raise NotFoldable("the MatMul output rank is unknown, so BN's channel axis cannot be matched")
        if rank != 2:
            raise NotFoldable(f"BN normalises axis 1 of a rank-{rank} MatMul output, not its last axis")
        _check_channels(s, w.shape[1], mm)
        return w.astype(np.float64) * s[None, :], w

    def _finish(self, new_out: ir.Value, bn: ir.Node, old_inputs) -> None:
        """Hand the BN's output (and its name) to ``new_out``; drop what nothing reads."""
        bn_inputs = list(bn.inputs)
        take_over(self.graph, bn.outputs[0], new_out)
        drop_if_unused(self.graph, [*old_inputs, *bn_inputs])


@register_pass
class FoldBatchNorm(Pass):
    """Fold inference-mode BatchNormalization into a preceding Conv, ConvTranspose, Gemm or MatMul."""

    name = "fold-batchnorm"
    description = "Fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul weights"
    requires = frozenset({"constants-folded"})
    provides = frozenset({"bn-folded"})
    walks_subgraphs = True  # case 5

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Fold every foldable BN of the main graph and of every control-flow body, in place."""
        names = NameAllocator(model.graph)  # fresh in the whole model: a body sees the outer names
        folder = _Folder(model.graph, names)
        for graph in every_graph(model.graph):
            folder.graph = graph
            folder.run()
        stats = {
            "bn_folded": folder.folded,
            "bn_skipped": sum(folder.skipped.values()),
            "skipped_reasons": dict(folder.skipped),
        }
        if folder.skipped:
            logger.info("fold-batchnorm: %d BN not folded: %s", stats["bn_skipped"], stats["skipped_reasons"])
        return PassResult(model, folder.folded > 0, stats)
