"""``prune-magnitude``: unstructured pruning of Conv/Gemm/MatMul weights (magnitude or SparseGPT).

With ``method: magnitude`` (the default), for a target sparsity ``s`` the
``k = floor(s * n)`` weights of smallest ``|w|`` are set to exactly 0 (``n`` weights
considered):

1. ``threshold: per-layer``: every weight tensor on its own, so each layer ends at
   sparsity ``s`` (weights already 0 count towards it);
2. ``threshold: global``: all in-scope weights ranked together by ``|w|``, one threshold
   ``t`` for the whole model; layers with small weights lose more, and the overall
   sparsity is ``s`` (``torch.nn.utils.prune.global_unstructured``).

Ties at the threshold are broken by position (a stable sort), so exactly ``k`` weights
go and runs are deterministic.

3. ``method: sparsegpt`` (Frantar & Alistarh 2023, needs calibration data, per-layer
   only): which weights go and how the kept ones change so that each layer's output on
   the calibration data moves least, by the OBS saliency ``w^2 / [H^-1]_jj^2`` and update
   of :mod:`._sparsegpt` (``H = 2 X X^T + lambda I``, ``X X^T`` of the layer's input with
   padding tokens excluded); the fraction ``s`` is pruned in every block of 128 input
   channels (``floor(s * rows * 128)`` weights per block), so each layer ends at about
   ``s``.

4. ``sequential`` (SparseGPT only; on by default): the layers go in stages, each stage's
   ``X X^T`` (and ``E[x]`` for bias correction) gathered on the model whose earlier stages
   are already pruned, reconstructed and bias-corrected (:mod:`._layerwise`, case 2);
   ``sequential: false`` takes every layer's statistics from the dense model in one run.

Training-free recovery (``bias_correction: true``, needs calibration data): pruning moves
each layer's output mean by ``(W_p - W) E[x]``; adding it back,
``b' = b + (W - W_p) E[x]``, with ``E[x]`` per input channel measured on the calibration
data on the model as the pass found it (see :mod:`._bias_correction`).

Stats: sparsity per layer and overall, the weights' dense and zlib-compressed size
before and after (zeros compress: the on-disk size of a sparse model in a zip archive).
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
from compressor.passes._sparsity import group_by_weight, pruning_stats, require_calibration

from compressor.pipeline import Pass, PassContext, PassResult, register_pass
from compressor.scope import Scope

__all__ = ["PruneMagnitude", "PruneMagnitudeOptions", "magnitude_masks"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PruneMagnitudeOptions:
    """Options of ``prune-magnitude``.

    Attributes:
        sparsity: Fraction of weights set to zero, in [0, 1).
        threshold: ``per-layer`` (each weight at ``sparsity``) or ``global`` (one
            magnitude threshold across all in-scope weights).
        method: ``magnitude`` (smallest ``|w|`` go, the rest unchanged) or ``sparsegpt``
            (OBS masks and reconstruction from calibration data; per-layer only).
        ops: Op types whose weights are pruned.
        scope: Which layers (exact names or ``re:`` patterns, on node or weight names).
        bias_correction: Restore each layer's output mean from calibration data.
        damp: SparseGPT's Hessian damping, relative to its mean diagonal (``> 0``).
        sequential: SparseGPT's statistics stage by stage on the model pruned so far (case
            4); unset: on for ``method: sparsegpt``, off otherwise.
    """

    sparsity: float = 0.5
    threshold: Literal["per-layer", "global"] = "per-layer"
    method: Literal["magnitude", "sparsegpt"] = "magnitude"
    ops: tuple[str, ...] = PRUNABLE_OPS
    scope: Scope = Scope()
    bias_correction: bool = False
    damp: float = DAMP
    sequential: bool | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < float("inf"):
            raise ValueError(f"option 'damp' must be a positive number, got {self.damp}")
        if self.sequential is None:  # resolved, so the recipe written into the artifact says what ran
            object.__setattr__(self, "sequential", self.method == "sparsegpt")
        elif self.sequential and self.method != "sparsegpt":
            raise ValueError(f"option 'sequential' applies to method 'sparsegpt' only, not {self.method!r}; drop it")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"option 'sparsity' must be in [0, 1), got {self.sparsity}")
        if self.method == "sparsegpt" and self.threshold != "per-layer":
            raise ValueError("option 'threshold': method 'sparsegpt' prunes each layer on its own; "
                             "use threshold: per-layer")
        bad = sorted(set(self.ops) - set(PRUNABLE_OPS))
        if bad:
            raise ValueError(f"option 'ops': {', '.join(bad)} cannot be pruned; choose from {', '.join(PRUNABLE_OPS)}")


def _smallest(mags: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest of a flat array (ties by position)."""
    if k <= 0:
        return np.zeros(0, np.int64)
    return np.argsort(mags, kind="stable")[:k]


def magnitude_masks(weights: list[np.ndarray], sparsity_level: float, threshold: str) -> list[np.ndarray]:
    """Keep-masks (``True`` = kept) for ``weights`` (cases 1 and 2 of the module docstring)."""
    masks = [np.ones(w.shape, bool) for w in weights]
    if threshold == "per-layer":
        for w, mask in zip(weights, masks):
            mask.reshape(-1)[_smallest(np.abs(w).reshape(-1), int(np.floor(sparsity_level * w.size)))] = False
        return masks
    flat = np.concatenate([np.abs(w).reshape(-1).astype(np.float64) for w in weights]) if weights else np.zeros(0)
    drop = np.zeros(flat.size, bool)
    drop[_smallest(flat, int(np.floor(sparsity_level * flat.size)))] = True
    start = 0
    for w, mask in zip(weights, masks):
        mask.reshape(-1)[drop[start:start + w.size]] = False
        start += w.size
    return masks


@register_pass
class PruneMagnitude(Pass):
    """Set the smallest-magnitude weights of Conv/Gemm/MatMul layers to zero."""

    name = "prune-magnitude"
    lossy = True
    description = "unstructured pruning: magnitude (per-layer or global threshold) or SparseGPT (per layer)"
    Options = PruneMagnitudeOptions
    requires = frozenset({"constants-folded"})
    provides = frozenset({"pruned"})

    @property
    def needs_calibration(self) -> bool:
        """SparseGPT and bias correction read calibration data."""
        return self.options.method == "sparsegpt" or self.options.bias_correction

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts: PruneMagnitudeOptions = self.options
        graph = model.graph
        layers, skipped = find_weight_layers(graph, opts.ops, opts.scope)
        for name, why in skipped.items():
            logger.debug("`%s`: not pruned: %s", name, why)
        data = None
        if self.needs_calibration and layers:
            what = " and ".join(x for x, on in (("method sparsegpt", opts.method == "sparsegpt"),
                                                ("bias_correction", opts.bias_correction)) if on)
            data = require_calibration(ctx.calibration, f"prune-magnitude with {what}")
        groups = group_by_weight(layers)
        dense = [group[0].array() for group in groups]
        if opts.method == "sparsegpt":  # case 3
            def prune(group: list[Layer], w: np.ndarray, moments: dict) -> np.ndarray:
                grams = [moments[layer.activation().name].gram for layer in group]
                return sparsegpt_weight(group[0], w, grams, sparsity=opts.sparsity, damp=opts.damp)
        else:  # cases 1 and 2: the masks of all weights together (a global threshold)
            masks = {id(group[0].node): mask
                     for group, mask in zip(groups, magnitude_masks(dense, opts.sparsity, opts.threshold))}

            def prune(group: list[Layer], w: np.ndarray, moments: dict) -> np.ndarray:
                return np.where(masks[id(group[0].node)], w, np.zeros((), w.dtype))
        done = prune_layers(model, groups, prune, data=data, cache=ctx.cache,
                            needs_stats=[data is not None] * len(groups), gram=opts.method == "sparsegpt",
                            sequential=opts.sequential, bias_correction=opts.bias_correction)
        after, per_layer, corrected = done.new, done.per_layer, done.corrected
        total = sum(w.size for w in dense)
        stats = {
            "method": opts.method,
            **({"damp": opts.damp, "sequential": done.sequential} if opts.method == "sparsegpt" else {}),
            **({"statistics_stages": done.stages} if done.stages else {}),
            "layers_pruned": len(per_layer),
            "sparsity_before": round(sum(int((w == 0).sum()) for w in dense) / total, 4) if total else 0.0,
            **pruning_stats(dense, after, per_layer, skipped, corrected),
        }
        return PassResult(model, done.changed, stats)
