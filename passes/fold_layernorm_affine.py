"""``fold-layernorm-affine``: move LayerNormalization's scale and bias into the linear ops it feeds.

``LayerNormalization`` over the last axis computes ``y = n(x) * gamma + beta`` with
``n(x) = (x - mean) / sqrt(var + eps)``. When every reader of ``y`` is linear in it the
affine part can move into the readers' weights::

    y @ W + c = (n * gamma + beta) @ W + c = n @ (diag(gamma) W) + (beta @ W + c)

so ``W' = gamma[:, None] * W`` (row ``k`` of ``W`` scaled by ``gamma_k``) and
``c' = beta @ W + c``. The LayerNormalization keeps its normalisation with scale 1 and no
bias. The cases, by reader:

1. ``MatMul(y, W)`` with ``W`` a constant 2-D initializer (``D x M``); ``y`` may have any
   rank ``>= 2``. When the MatMul feeds only an ``Add`` of a constant bias ``c`` the
   new bias goes into that Add (``c' = c + beta @ W``); otherwise a new ``Add`` of
   ``beta @ W`` is inserted after the MatMul (dropped when ``beta @ W`` is all zero).
2. ``Gemm(y, B, C)`` with ``transA = 0`` and ``B`` constant: ``alpha * y B' + beta_g C'``
   with ``B'`` scaled along its ``D`` axis (rows for ``transB = 0``, columns for
   ``transB = 1``) and ``C' = alpha * beta @ B + beta_g * C``, ``beta_g`` set to 1.

The fold is all or nothing per LayerNormalization: if one reader is not linear in ``y``
(the residual ``Add`` of a pre-LN transformer reads it directly, for example), the
LayerNormalization is skipped and the reason is logged and counted. Other conditions:
the normalised axis is the last one, ``gamma``/``beta`` are constant 1-D initializers of
length ``D``, ``y`` is not a graph output, the Mean/InvStdDev outputs are unused, and the
affine part is not already the identity.

``If``/``Loop``/``Scan`` bodies are folded like the main graph, each on its own: a
LayerNormalization whose readers are all in its own graph (one read inside a nested
body is not folded, so no outer weight is changed for a body); new weights are named
fresh in the whole model and a body's outputs keep their names.

The result is exact up to float rounding. Only the ``LayerNormalization`` op (opset 17)
is handled: a LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add, as older
exporters write it, is not recognised and is left as it is (fuse it first).
The pass never changes the model's opset: the op does not exist below opset 17, so an
older model has nothing to fold here, and upgrading it (ONNX's version converter) would
only risk the converter's errors on ops this pass never touches.
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
    append_add,
    attr_float,
    attr_int,
    constant_array,
    drop_if_unused,
    every_graph,
    known_rank,
    label,
    only_first_output_used,
    sole_consumer,
)

from compressor.pipeline import Pass, PassContext, PassResult, register_pass

__all__ = ["FoldLayerNormAffine"]

logger = logging.getLogger(__name__)

_ONNX = ("", "ai.onnx")


def _constant_bias_add(mm: ir.Node) -> tuple[ir.Node, int] | None:
    """``(Add, index of the constant bias among its inputs)`` when ``mm`` feeds only such an Add."""
    add = sole_consumer(mm.outputs[0])
    if add is None or add.op_type != "Add" or add.domain not in _ONNX or len(add.inputs) != 2:
        return None
    other = 1 if add.inputs[0] is mm.outputs[0] else 0
    try:
        constant_array(add.inputs[other], "bias")
    except NotFoldable:
        return None
    return add, other


class _NothingToFold(NotFoldable):
    """The LN has nothing to fold (not a failure: not counted as skipped)."""


class _Folder:
    """Folds the LayerNormalizations of one graph; counts what it did."""

    def __init__(self, graph: ir.Graph, names: NameAllocator | None = None):
        self.graph = graph
        self.names = names or NameAllocator(graph)
        self.folded = 0
        self.consumers = 0
        self.skipped: Counter[str] = Counter()

    def run(self) -> None:
        for ln in [n for n in self.graph if n.op_type == "LayerNormalization" and n.domain in _ONNX]:
            try:
                gamma, beta = self._affine(ln)
                plans = [self._plan(user, index, gamma.shape[0]) for user, index in ln.outputs[0].uses()]
            except _NothingToFold as why:
                logger.debug("`%s`: %s; nothing to fold", label(ln), why)
                continue
            except NotFoldable as why:
                logger.debug("`%s`: %s; LayerNorm affine not folded", label(ln), why)
                self.skipped[why.key] += 1
                continue
            for plan in plans:
                plan(gamma, beta)
            self._reset_affine(ln, gamma)
            self.folded += 1
            self.consumers += len(plans)

    def _affine(self, ln: ir.Node) -> tuple[np.ndarray, np.ndarray]:
        """``(gamma, beta)`` of a foldable LN in float64; raises the reason otherwise."""
        y = ln.outputs[0]
        if y.is_graph_output():
            raise NotFoldable(f"its output `{y.name}` is a graph output")
        if not only_first_output_used(ln):
            raise NotFoldable("its Mean/InvStdDev outputs are used")
        if not y.uses():
            raise _NothingToFold("its output is not used")
        axis = attr_int(ln, "axis", -1)
        rank = known_rank(ln.inputs[0], y)
        if axis != -1 and (rank is None or axis != rank - 1):
            raise NotFoldable(f"it normalises from axis {axis}, not over the last axis only")
        gamma = constant_array(ln.inputs[1], "scale").astype(np.float64)
        has_beta = len(ln.inputs) > 2 and ln.inputs[2] is not None
        beta = constant_array(ln.inputs[2], "bias").astype(np.float64) if has_beta else np.zeros_like(gamma)
        if gamma.ndim != 1 or beta.shape != gamma.shape:
            raise NotFoldable(f"scale/bias shapes {gamma.shape}/{beta.shape} are not one vector over the last axis")
        if np.all(gamma == 1) and not np.any(beta):
            raise _NothingToFold("its affine part is already the identity")
        return gamma, beta

    def _plan(self, user: ir.Node, index: int, depth: int):
        """Check one reader of the LN output; return the rewrite to apply to it."""
        try:
            return self._plan_reader(user, index, depth)
        except NotFoldable as why:
            raise NotFoldable(f"reader `{label(user)}`: {why}") from None

    def _plan_reader(self, user: ir.Node, index: int, depth: int):
        if user.graph is not self.graph:
            raise NotFoldable("it is read inside a control-flow body (the body's weights are its own)")
        if user.domain in _ONNX and user.op_type == "MatMul" and index == 0:
            w = constant_array(user.inputs[1], "its weight")
            if w.ndim != 2 or w.shape[0] != depth:
                raise NotFoldable(f"its weight has shape {w.shape}, not ({depth}, M)")
            return lambda gamma, beta: self._fold_matmul(user, w, gamma, beta)
        if user.domain in _ONNX and user.op_type == "Gemm" and index == 0:
            if attr_int(user, "transA", 0):
                raise NotFoldable("it is a Gemm with transA=1")
            b = constant_array(user.inputs[1], "its weight")
            trans_b = attr_int(user, "transB", 0)
            if b.ndim != 2 or b.shape[1 if trans_b else 0] != depth:
                raise NotFoldable(f"its weight has shape {b.shape}, not matching {depth} features")
            has_c = len(user.inputs) > 2 and user.inputs[2] is not None
            c = constant_array(user.inputs[2], "its bias") if has_c else None
            return lambda gamma, beta: self._fold_gemm(user, b, c, trans_b, gamma, beta)
        raise NotFoldable(f"{user.op_type} (reading the LN output as input {index}) "
                          "is not a MatMul/Gemm with a constant weight")

    def _new_init(self, base: str | None, suffix: str, array: np.ndarray, like: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, self.names(f"{base or 'ln'}_{suffix}"), array.astype(like.dtype))

    # Case 1.
    def _fold_matmul(self, mm: ir.Node, w: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> None:
        w64 = w.astype(np.float64)
        shift = beta @ w64
        old_w = mm.inputs[1]
        mm.replace_input_with(1, self._new_init(old_w.name, "lnfolded", gamma[:, None] * w64, w))
        drop_if_unused(self.graph, [old_w])
        bias_add = _constant_bias_add(mm)
        if bias_add is not None:
            add, i = bias_add
            old_c = add.inputs[i]
            c = old_c.const_value.numpy()
            add.replace_input_with(i, self._new_init(old_c.name, "lnfolded", c.astype(np.float64) + shift, c))
            drop_if_unused(self.graph, [old_c])
        elif np.any(shift):
            append_add(self.graph, mm.outputs[0], self._new_init(old_w.name, "lnfolded_bias", shift, w), self.names)

    # Case 2.
    def _fold_gemm(self, gemm, b: np.ndarray, c, trans_b: int, gamma, beta) -> None:
        b64 = b.astype(np.float64)
        alpha = attr_float(gemm, "alpha", 1.0)
        beta_g = attr_float(gemm, "beta", 1.0)
        b_kn = b64.T if trans_b else b64
        c_new = alpha * (beta @ b_kn) + (0.0 if c is None else beta_g * c.astype(np.float64))
        b_new = b64 * (gamma[None, :] if trans_b else gamma[:, None])
        old = list(gemm.inputs)
        if len(gemm.inputs) < 3:
            gemm.resize_inputs(3)
        gemm.replace_input_with(1, self._new_init(old[1].name, "lnfolded", b_new, b))
        gemm.replace_input_with(2, self._new_init(old[1].name, "lnfolded_bias", c_new, b if c is None else c))
        gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        drop_if_unused(self.graph, old)

    def _reset_affine(self, ln: ir.Node, gamma: np.ndarray) -> None:
        """Scale 1, no bias: only the normalisation stays in the LN."""
        old = list(ln.inputs)
        like = old[1].const_value.numpy()
        ln.replace_input_with(1, self._new_init(ln.name or old[1].name, "scale_ones", np.ones_like(gamma), like))
        if len(ln.inputs) > 2:
            ln.replace_input_with(2, None)
            ln.resize_inputs(2)
        drop_if_unused(self.graph, old)


@register_pass
class FoldLayerNormAffine(Pass):
    """Fold LayerNormalization's scale/bias into the MatMul/Gemm weights it feeds."""

    name = "fold-layernorm-affine"
    description = "Fold LayerNormalization scale/bias into the following MatMul/Gemm weights (exact)"
    requires = frozenset({"constants-folded"})
    provides = frozenset({"layernorm-affine-folded"})
    walks_subgraphs = True  # each body is folded like the main graph (module docstring)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Fold every foldable LayerNormalization of the main graph and of every control-flow body, in place."""
        names = NameAllocator(model.graph)  # fresh in the whole model: a body sees the outer names
        folder = _Folder(model.graph, names)
        for graph in every_graph(model.graph):
            folder.graph = graph
            folder.run()
        stats = {
            "ln_folded": folder.folded,
            "consumers_rewritten": folder.consumers,
            "ln_skipped": sum(folder.skipped.values()),
            "skipped_reasons": dict(folder.skipped),
        }
        if folder.skipped:
            logger.info("fold-layernorm-affine: %d LayerNorm not folded: %s", stats["ln_skipped"],
                        stats["skipped_reasons"])
        return PassResult(model, folder.folded > 0, stats)
