"""The frozen teacher's outputs, computed once per training sample and reused on every later pass.

The teacher (the dense original) is frozen and runs without dropout, so its output for a
sample never changes during training: on the second and later passes over the training
data, a forward per step only recomputes what is already known. :class:`TeacherCache`
keeps, per sample, the main output and every hidden state; a token tensor (its first two
axes equal to the ``attention_mask``'s) is kept only at the sample's real positions and
padded with zeros when a batch is assembled, which the distillation loss never reads
(padding is excluded there). Padding on the right does not change a masked transformer's
outputs at the real positions, so a cached sample equals a live forward on any batch it
appears in, up to float rounding (tested on a small BERT).

Memory is bounded: samples are stored until ``budget_bytes`` is used, the rest are
computed live on every step (``0``: no cache, the live teacher every step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from compressor.data import MASK_INPUT
from compressor.recover.distill import TeacherOutput, hidden_states, main_output

__all__ = ["TeacherCache", "pad_rows"]

logger = logging.getLogger(__name__)


class TeacherCache:
    """Teacher outputs per training sample (module docstring).

    Args:
        teacher: Calls the frozen teacher on a feed of tensors.
        budget_bytes: Memory the stored outputs may take; ``0`` turns the cache off.
    """

    def __init__(self, teacher: Callable[[Mapping[str, Any]], Any], budget_bytes: int) -> None:
        self.teacher = teacher
        self.budget = budget_bytes
        self.used = 0
        self.hits = self.misses = 0
        self._store: dict[int, list[Any]] = {}
        self._token: list[bool] = []  # per stored tensor: kept at the real positions only

    def __call__(self, feed: Mapping[str, Any], idx: np.ndarray) -> Any:
        """The teacher's result on ``feed``, whose rows are the training samples ``idx``."""
        import torch

        if self.budget <= 0:
            return self.teacher(feed)
        mask = feed.get(MASK_INPUT)
        rows = [r for r, i in enumerate(idx.tolist()) if i not in self._store]
        self.misses += len(rows)
        self.hits += len(idx) - len(rows)
        fresh: dict[int, list[Any]] = {}
        if rows:
            sub = {k: v[rows] if torch.is_tensor(v) and v.dim() >= 1 and len(v) == len(idx) else v
                   for k, v in feed.items()}
            with torch.no_grad():
                result = self.teacher(sub)
            tensors = [main_output(result), *hidden_states(result)]
            sub_mask = sub.get(MASK_INPUT)
            self._token = [sub_mask is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(sub_mask.shape)
                           for t in tensors]
            for j, r in enumerate(rows):
                length = None if sub_mask is None else int(sub_mask[j].sum())  # padding is on the right
                kept: dict[int, Any] = {}  # a tensor the result holds twice (BERT's last hidden state) is kept once
                parts = [kept.setdefault(id(t), (t[j, :length] if token else t[j]).detach().clone())
                         for t, token in zip(tensors, self._token)]
                fresh[r] = parts
                size = sum(p.numel() * p.element_size() for p in {id(p): p for p in parts}.values())
                if self.used + size <= self.budget:
                    self._store[int(idx[r])] = parts
                    self.used += size
        per_row = [fresh[r] if r in fresh else self._store[int(i)] for r, i in enumerate(idx.tolist())]
        width = None if mask is None else mask.shape[1]
        batch = [pad_rows([p[k] for p in per_row], width) if token else torch.stack([p[k] for p in per_row])
                 for k, token in enumerate(self._token)]
        return TeacherOutput(batch[0], tuple(batch[1:]))


def pad_rows(parts: list[Any], width: int) -> Any:
    """Token rows of different lengths as one ``(rows, width, ...)`` tensor, zeros after each row's end."""
    out = parts[0].new_zeros((len(parts), width, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        out[r, :p.shape[0]] = p
    return out
