"""Masks held during fine-tuning, and the progressive-gradient-flow (PGF) schedule.

Every masked parameter ``P`` keeps a dense shadow ``D`` (what the optimizer updates) and a
0/1 mask ``K``; the module always holds ``P = D * K``, so the forward pass sees the sparse
weight. One optimizer step, with ``g = dL/dP`` at the sparse weight:

1. ``g' = g * K + s(t) * g * (1 - K)``: kept weights get their gradient, pruned ones the
   gradient scaled by ``s(t)``;
2. the optimizer updates ``D`` with ``g'``;
3. while ``s(t) > 0`` the mask is re-selected from ``D`` by magnitude (N:M: the ``N``
   largest ``|D|`` of every group of ``M`` consecutive input channels; unstructured: the
   same number of weights per layer as the one-shot mask kept);
4. ``P = D * K``: every group of ``M`` holds at most ``N`` non-zeros after every step.

``fixed``: ``s(t) = 0`` (the masks never change; a pruned weight's ``D`` never moves, its
gradient and so its Adam moments being 0). ``pgf``: ``s(t) = max(0, 1 - t / T)``, with
``T = pgf_decay * steps``: pruned weights can grow back early on and the mask settles
before the end (Bambhaniya et al. 2024, "Progressive Gradient Flow for Robust N:M
Sparsity Training in Transformers", decaying-gradient variant).

Groups: input channels are axis 1 of a torch ``Linear`` (``out x in``) and ``Conv``
(``out x in x kh x kw``) weight; a group is ``M`` consecutive input channels at one kernel
position, the layout of the one-shot ``sparsify-nm`` pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["MaskedParam", "MaskedParams", "pgf_scale", "nm_mask", "nm_ok"]


def pgf_scale(step: int, steps: int, schedule: str, decay: float) -> float:
    """``s(t)``, the factor on pruned weights' gradient at optimizer step ``step`` (0-based)."""
    if schedule != "pgf":
        return 0.0
    horizon = max(1.0, decay * steps)
    return max(0.0, 1.0 - step / horizon)


def _rows(t: Any) -> Any:
    """The ``(positions, in channels)`` view of a weight (input channels on axis 1)."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _unrows(rows: Any, shape: Any) -> Any:
    moved = (shape[0], *shape[2:], shape[1])
    return rows.reshape(moved).movedim(-1, 1)


def nm_mask(weight: Any, n: int, m: int) -> Any:
    """The 0/1 mask keeping the ``n`` largest ``|w|`` of every group of ``m`` input channels."""
    import torch

    rows = _rows(weight.detach().abs())
    groups = rows.reshape(rows.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1, sorted=False).indices, True)
    return _unrows(keep.reshape(rows.shape), weight.shape).to(weight.dtype)


def nm_ok(weight: Any, n: int, m: int) -> bool:
    """Whether every group of ``m`` input channels of ``weight`` holds at most ``n`` non-zeros."""
    rows = _rows(weight.detach())
    return bool(((rows.reshape(rows.shape[0], -1, m) != 0).sum(-1) <= n).all())


def _topk_mask(weight: Any, k: int) -> Any:
    import torch

    flat = weight.detach().abs().reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k, sorted=False).indices] = True
    return keep.reshape(weight.shape).to(weight.dtype)


@dataclasses.dataclass
class MaskedParam:
    """One masked parameter.

    Attributes:
        name: The parameter's name in the module.
        param: The ``torch.nn.Parameter`` (holds ``D * K``).
        mask: ``K``, same shape, 0/1 in the parameter's dtype.
        dense: ``D``, the shadow the optimizer updates.
        pattern: ``("nm", n, m)`` or ``("count", kept)`` (unstructured: weights kept).
    """

    name: str
    param: Any
    mask: Any
    dense: Any
    pattern: tuple[Any, ...]

    def reselect(self) -> None:
        """A new mask from the shadow's magnitudes (step 3)."""
        if self.pattern[0] == "nm":
            self.mask = nm_mask(self.dense, self.pattern[1], self.pattern[2])
        else:
            self.mask = _topk_mask(self.dense, self.pattern[1])


class MaskedParams:
    """The masks of one fine-tuning run and its gradient schedule (see the module docstring).

    Args:
        params: The masked parameters; each ``param`` is set to ``dense * mask`` now.
        steps: Optimizer steps of the run.
        schedule: ``fixed`` or ``pgf``.
        decay: ``pgf_decay``.
    """

    def __init__(self, params: list[MaskedParam], steps: int, schedule: Literal["fixed", "pgf"] = "fixed",
                 decay: float = 0.25):
        import torch

        self.params, self.steps, self.schedule, self.decay = params, steps, schedule, decay
        self.scales: list[float] = []
        with torch.no_grad():
            for mp in params:
                mp.param.copy_(mp.dense * mp.mask)

    def before_step(self, step: int) -> float:
        """Steps 1 and the start of 2: scale the gradients, put the dense shadows in; returns ``s(t)``."""
        import torch

        scale = pgf_scale(step, self.steps, self.schedule, self.decay)
        self.scales.append(scale)
        with torch.no_grad():
            for mp in self.params:
                if mp.param.grad is not None:
                    mp.param.grad.mul_(mp.mask + scale * (1 - mp.mask))
                mp.param.copy_(mp.dense)
        return scale

    def after_step(self, scale: float) -> None:
        """Steps 2 (read the update back), 3 and 4."""
        import torch

        with torch.no_grad():
            for mp in self.params:
                mp.dense.copy_(mp.param)
                if scale > 0:
                    mp.reselect()
                mp.param.mul_(mp.mask)

    def check(self) -> list[str]:
        """Names of N:M parameters that break their pattern (empty when all hold)."""
        return [mp.name for mp in self.params if mp.pattern[0] == "nm" and not nm_ok(mp.param, *mp.pattern[1:])]
