"""The fine-tuning loop: masked student, frozen teacher, distillation loss, early stopping.

Deterministic for a seed: ``torch.manual_seed(seed)``, ``torch.use_deterministic_algorithms``
for the run (restored after), the data order from ``numpy.random.default_rng(seed)``
(a fresh permutation per pass over the data), batches of exactly ``batch`` samples (the
last short one of a pass is skipped), a linear learning-rate decay to 0 over ``steps``.
A token batch is cut to its longest real sequence (``attention_mask``): short sentences
padded to 128 would otherwise cost most of the training time on padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from compressor.data import MASK_INPUT, Dataset
from compressor.flow.evaluation import compare, drop_order
from compressor.progress import Progress, no_progress
from compressor.recover.config import RecoverConfig
from compressor.recover.distill import distill_loss, main_output
from compressor.recover.schedule import MaskedParams
from compressor.recover.teacher_cache import TeacherCache

__all__ = ["TrainResult", "fine_tune", "masked_step", "outputs_on"]

logger = logging.getLogger(__name__)

CURVE_POINTS = 100  # the loss curve in the manifest is subsampled to at most this many points


@dataclasses.dataclass
class TrainResult:
    """What one fine-tuning run did (the manifest's ``recovery`` record takes it)."""

    steps: int
    losses: list[float]
    evaluations: list[tuple[int, float]]  # (step, drop of the eval metric on the held-out part)
    best_step: int
    seconds: float
    stopped_early: bool

    def curve(self) -> list[list[float]]:
        """``[step, loss]`` pairs, at most :data:`CURVE_POINTS` of them (evenly spaced, last included)."""
        n = len(self.losses)
        idx = sorted(set(np.linspace(0, n - 1, min(n, CURVE_POINTS)).round().astype(int).tolist())) if n else []
        return [[i + 1, round(self.losses[i], 6)] for i in idx]


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded torch with deterministic algorithms for the block (the previous mode restored)."""
    import torch

    was = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def _tensors(data: Dataset, idx: np.ndarray, trim: bool = False) -> dict[str, Any]:
    """The samples ``idx`` as tensors; ``trim``: token inputs cut to the batch's longest real sequence."""
    import torch

    arrays = {spec.name: data.arrays[spec.name][idx] for spec in data.specs}
    mask = arrays.get(MASK_INPUT)
    if trim and mask is not None and mask.ndim == 2 and mask.any():
        length = int(np.flatnonzero(mask.any(0))[-1]) + 1  # padding is on the right: nothing real is cut
        if mask[:, length:].sum() == 0:
            arrays = {k: v[:, :length] if v.ndim >= 2 and v.shape[:2] == mask.shape else v for k, v in arrays.items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _order(n: int, batch: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield perm[start:start + batch]


def outputs_on(call: Callable[[dict[str, Any]], Any], data: Dataset, batch: int) -> list[np.ndarray]:
    """The main output of ``call`` on ``data`` (one array, samples first), without gradients."""
    import torch

    parts = []
    with torch.no_grad():
        for start in range(0, len(data), batch):
            idx = np.arange(start, min(start + batch, len(data)))
            parts.append(main_output(call(_tensors(data, idx))).float().numpy())
    return [np.concatenate(parts)]


def masked_step(loss: Any, optimizer: Any, decay: Any, masks: MaskedParams, step: int,
                on_step: Callable[[int, MaskedParams], None] | None) -> float:
    """One optimizer step with the masks held: backward, the schedule's gradient scale, the
    step, the masks applied again, the LR decay; returns the loss."""
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    scale = masks.before_step(step)
    optimizer.step()
    masks.after_step(scale)
    decay.step()
    if on_step is not None:
        on_step(step, masks)
    return float(loss.detach())


def fine_tune(student: Callable[[dict[str, Any]], Any], teacher: Callable[[dict[str, Any]], Any], params: list[Any],
              masks: MaskedParams, train: Dataset, holdout: Dataset | None, cfg: RecoverConfig, metric: str,
              progress: Progress = no_progress, on_step: Callable[[int, MaskedParams], None] | None = None,
              reference: list[np.ndarray] | None = None, start_drop: float | None = None) -> TrainResult:
    """Fine-tune ``params`` of ``student`` towards ``teacher`` on ``train`` (see the module docstring).

    Args:
        student: Calls the student module on a feed of tensors.
        teacher: Calls the frozen dense original.
        params: Every parameter trained (the masked ones among them).
        masks: The masks and their gradient schedule.
        train: Training samples (``labels`` used when present).
        holdout: Samples for early stopping (``None``: no evaluation, the last weights kept).
        cfg: The recipe's ``recover:`` section.
        metric: The recipe's accuracy metric (``auto``, ``top1``, ``cosine``).
        progress: Progress-bar factory; the bar shows the loss.
        on_step: Called after every optimizer step (tests check the masks there).
        reference: The teacher's outputs on ``holdout`` when already computed (the block phase did).
        start_drop: The student's held-out drop as it is now, when already measured.
    """
    import torch

    started = time.perf_counter()
    batch = min(cfg.batch, len(train))
    with deterministic(cfg.seed):
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / max(1, cfg.steps)))
        if reference is None and holdout is not None:
            reference = outputs_on(teacher, holdout, batch)

        def drop() -> float:
            return compare(reference, outputs_on(student, holdout, batch), holdout, metric).drop

        evaluations = [(0, drop() if start_drop is None else start_drop)] if holdout is not None else []
        best = (evaluations[0][1], 0, [p.detach().clone() for p in params]) if evaluations else None
        losses: list[float] = []
        stale, stopped = 0, False
        order = _order(len(train), batch, cfg.seed)
        labels = None if train.labels is None else torch.from_numpy(np.asarray(train.labels, dtype=np.int64))
        # Stored outputs pay only when a sample comes back: one pass over the data stores nothing.
        revisits = cfg.steps > len(train) // batch
        teacher_on = TeacherCache(teacher, cfg.teacher_cache_mb << 20 if revisits else 0)
        with progress("recover", cfg.steps, "step") as bar:
            for step in range(cfg.steps):
                idx = next(order)
                feed = _tensors(train, idx, trim=True)
                mask = feed.get(MASK_INPUT)
                with torch.no_grad():
                    target = teacher_on(feed, idx)
                loss = distill_loss(student(feed), target, kind=cfg.loss, temperature=cfg.temperature,
                                    hidden_weight=cfg.hidden_weight, label_weight=cfg.label_weight,
                                    labels=None if labels is None else labels[idx], mask=mask)
                losses.append(masked_step(loss, optimizer, decay, masks, step, on_step))
                bar.update(1)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
                if holdout is None or ((step + 1) % cfg.eval_every and step + 1 != cfg.steps):
                    continue
                evaluations.append((step + 1, drop()))
                logger.info("recover: step %d, loss %.5g, held-out drop %.6f", step + 1, losses[-1], evaluations[-1][1])
                if drop_order(evaluations[-1][1]) < drop_order(best[0]):
                    best, stale = (evaluations[-1][1], step + 1, [p.detach().clone() for p in params]), 0
                else:
                    stale += 1
                    if cfg.patience and stale >= cfg.patience:
                        stopped = True
                        logger.info("recover: no improvement in %d evaluations, stopping at step %d", stale, step + 1)
                        break
        best_step = len(losses)
        if best is not None and best[1] != len(losses):
            with torch.no_grad():
                for p, kept in zip(params, best[2]):
                    p.copy_(kept)
            best_step = best[1]
            logger.info("recover: keeping the weights of step %d (held-out drop %.6f)", best_step, best[0])
    logger.info("recover: teacher outputs reused for %d of %d samples (%.0f MB stored)", teacher_on.hits,
                teacher_on.hits + teacher_on.misses, teacher_on.used / 2**20)
    return TrainResult(len(losses), losses, evaluations, best_step, time.perf_counter() - started, stopped)
