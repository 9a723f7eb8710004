"""``sparsify-nm``: N:M structured sparsity (default 2:4) along the reduction dimension.

In every group of ``M`` consecutive input channels of a weight, at most ``N`` weights
stay non-zero: the pattern sparse tensor cores (NVIDIA Ampere and later, TensorRT's
sparse kernels) read. Groups run along the reduction-rows view ``R`` of the weight
(:mod:`._sparsity`): for a Conv ``W: M x C x kh x kw`` a group is
``W[o, c0:c0+M, i, j]`` (consecutive input channels at one kernel position); for Gemm
and MatMul it is ``M`` consecutive entries of the ``K`` (reduction) axis of one output
column. A layer whose input-channel count is not a multiple of ``M`` is skipped (sparse
kernels do not take it), with the reason in the stats.

Which ``M - N`` weights of a group go is decided by a score, the ``N`` largest kept
(ties by position); cases 1 and 2 keep the surviving weights as they were, case 3 also
updates them:

1. ``mask: magnitude``: ``S_ij = |W_ij|``;
2. ``mask: wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for
   LLMs"): ``S_ij = |W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the L2 norm of input
   channel ``j`` of the layer's activation over all calibration samples and positions
   (a streaming pass keeps ``sum x_j^2`` per channel). A weight reading a loud channel
   matters more than its magnitude alone says; for Conv the norm of channel ``j`` stands
   for every kernel position of it. Needs calibration data;
3. ``mask: sparsegpt`` (Frantar & Alistarh 2023): the mask is chosen and the kept weights
   are updated together, column group by column group, by the OBS saliency
   ``w^2 / [H^-1]_jj^2`` and update of :mod:`._sparsegpt` with ``H = 2 X X^T + lambda I``
   from calibration data (``X X^T`` per layer input, padding tokens excluded): kept weights
   change so that each layer's output on the calibration data moves as little as
   possible. Needs calibration data.

4. ``mask: keep``: the zeros already there stay and nothing else changes; a group holding
   more than ``N`` non-zeros (a weight the recovery stage could not mask) loses its
   smallest, by magnitude, with a warning naming the layer.

A weight that already holds at most ``N`` non-zeros in every group (a recovered,
fine-tuned N:M weight) is left exactly as it is under every mask: re-scoring it, or
SparseGPT's update of its kept weights, would undo the training (``already_sparse`` in
the stats).

Recovery (``bias_correction: true``): ``b' = b + (W - W_p) E[x]`` (see :mod:`._bias_correction`).

5. ``sequential`` (SparseGPT only; on by default): the layers go in stages, each stage's
   ``X X^T`` (and ``E[x]`` for bias correction) gathered on the model whose earlier stages
   are already pruned, reconstructed and bias-corrected (:mod:`._layerwise`, case 2);
   ``sequential: false`` takes every layer's statistics from the dense model in one run.

Symmetric int8 weight quantization afterwards maps 0 to 0 (``round(0 / s) = 0``, zero
point 0), so the pattern survives into a quantized artifact.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir
from compressor.passes._sparsegpt import DAMP, sparsegpt_weight
from compressor.passes._layers import PRUNABLE_OPS, Layer, find_weight_layers
from compressor.passes._layerwise import prune_layers
from compressor.passes._sparsity import group_by_weight, nm_keep_mask, pruning_stats, require_calibration

from compressor.pipeline import Pass, PassContext, PassResult, register_pass
from compressor.scope import Scope

__all__ = ["SparsifyNM", "SparsifyNMOptions", "nm_keep_mask", "nm_violations"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SparsifyNMOptions:
    """Options of ``sparsify-nm``.

    Attributes:
        n: Non-zeros kept per group (``1 <= n < m``).
        m: Group size (consecutive input channels).
        mask: ``magnitude``, ``wanda`` (``|W| * ||X||``), ``sparsegpt`` (OBS masks and
            reconstruction; these two need calibration data) or ``keep`` (the zeros there
            already, as the recovery stage leaves them).
        ops: Op types sparsified.
        scope: Which layers (exact names or ``re:`` patterns, on node or weight names).
        bias_correction: Restore each layer's output mean from calibration data.
        damp: SparseGPT's Hessian damping, relative to its mean diagonal (``> 0``).
        sequential: SparseGPT's statistics stage by stage on the model pruned so far (case
            5); unset: on for ``mask: sparsegpt``, off otherwise (other masks take the dense
            model's statistics).
    """

    n: int = 2
    m: int = 4
    mask: Literal["magnitude", "wanda", "sparsegpt", "keep"] = "magnitude"
    ops: tuple[str, ...] = PRUNABLE_OPS
    scope: Scope = Scope()
    bias_correction: bool = False
    damp: float = DAMP
    sequential: bool | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < float("inf"):
            raise ValueError(f"option 'damp' must be a positive number, got {self.damp}")
        if self.sequential is None:  # resolved, so the recipe written into the artifact says what ran
            object.__setattr__(self, "sequential", self.mask == "sparsegpt")
        elif self.sequential and self.mask != "sparsegpt":
            raise ValueError(f"option 'sequential' applies to mask 'sparsegpt' only, not {self.mask!r}; drop it")
        if not 1 <= self.n < self.m:
            raise ValueError(f"options 'n' and 'm' must satisfy 1 <= n < m, got {self.n}:{self.m}")
        bad = sorted(set(self.ops) - set(PRUNABLE_OPS))
        if bad:
            raise ValueError(f"option 'ops': {', '.join(bad)} cannot be sparsified; choose from "
                             f"{', '.join(PRUNABLE_OPS)}")


def nm_violations(rows: np.ndarray, n: int, m: int) -> int:
    """Groups of ``m`` consecutive entries along the last axis with more than ``n`` non-zeros."""
    r, k = rows.shape
    return int(((rows.reshape(r, k // m, m) != 0).sum(-1) > n).sum())


@register_pass
class SparsifyNM(Pass):
    """Keep N of every M consecutive input-channel weights (2:4 by default)."""

    name = "sparsify-nm"
    lossy = True
    description = ("N:M structured sparsity (default 2:4) along the reduction dimension, magnitude, Wanda or "
                   "SparseGPT masks")
    Options = SparsifyNMOptions
    requires = frozenset({"constants-folded"})
    provides = frozenset({"pruned", "nm-sparse"})

    @property
    def needs_calibration(self) -> bool:
        """Wanda and SparseGPT masks and bias correction read calibration data."""
        return self.options.mask in ("wanda", "sparsegpt") or self.options.bias_correction

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts: SparsifyNMOptions = self.options
        n, m = opts.n, opts.m
        graph = model.graph
        found, skipped = find_weight_layers(graph, opts.ops, opts.scope)
        layers: list[Layer] = []
        for layer in found:
            w = layer.array()
            channels = layer.to_rows(w).shape[1]
            if channels % m:
                skipped[layer.name] = f"{channels} input channels per group, not a multiple of m={m}"
            else:
                layers.append(layer)
        for name, why in skipped.items():
            logger.debug("`%s`: not sparsified: %s", name, why)
        # an already N:M weight is left as it is (see the module docstring): no statistics for it
        groups = group_by_weight(layers)
        todo = [nm_violations(group[0].to_rows(group[0].array()), n, m) > 0 for group in groups]
        needs = [bool(t and self.needs_calibration) for t in todo]
        reads = any(needs)
        data = require_calibration(ctx.calibration, f"sparsify-nm (mask {opts.mask!r}"
                                   f"{', bias_correction' if opts.bias_correction else ''})") if reads else None
        targets = getattr(getattr(ctx.target, "capabilities", None), "nm_patterns", ())
        done = prune_layers(model, groups, self._prune, data=data, cache=ctx.cache, needs_stats=needs,
                            gram=opts.mask == "sparsegpt", sequential=opts.sequential,
                            bias_correction=opts.bias_correction)
        already = len(todo) - sum(todo)
        stats = {
            "pattern": f"{n}:{m}",
            "mask": opts.mask,
            **({"damp": opts.damp, "sequential": done.sequential} if opts.mask == "sparsegpt" else {}),
            **({"statistics_stages": done.stages} if done.stages else {}),
            "layers_sparsified": len(done.per_layer),
            **({"already_sparse": already} if already else {}),
            "target_has_nm_kernels": (n, m) in tuple(tuple(p) for p in targets),
            **pruning_stats(done.dense, done.new, done.per_layer, skipped, done.corrected),
        }
        return PassResult(model, done.changed, stats)

    def _prune(self, group: list[Layer], w: np.ndarray, moments: dict) -> np.ndarray:
        """The new weight of ``group`` (cases 1-4); an already N:M weight as it is."""
        opts: SparsifyNMOptions = self.options
        n, m = opts.n, opts.m
        first = group[0]  # a weight shared by several layers gets the first one's mask
        if nm_violations(first.to_rows(w), n, m) == 0:  # already N:M: left exactly as it is
            return w
        if opts.mask == "keep":  # case 4
            logger.warning("`%s`: not %d:%d sparse before sparsify-nm {mask: keep}; its smallest weights go "
                           "(magnitude)", first.name, n, m)
        if opts.mask == "sparsegpt":  # case 3
            grams = [moments[layer.activation().name].gram for layer in group]
            return sparsegpt_weight(first, w, grams, n=n, m=m, damp=opts.damp)
        rows = first.to_rows(w)
        scores = np.abs(rows.astype(np.float64))
        if opts.mask == "wanda":
            scores = scores * first.row_channel_values(moments[first.activation().name].norm, w.shape)
        keep = nm_keep_mask(scores, n, m)
        return first.from_rows(np.where(keep, rows, np.zeros((), w.dtype)), w.shape)
