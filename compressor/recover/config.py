"""The ``recover:`` section of a recipe: sparse fine-tuning with distillation.

```yaml
recover: {steps: 300, lr: 1.0e-4, batch: 16, seed: 0, schedule: pgf, pgf_decay: 0.25,
          loss: auto, hidden_weight: 1.0, patience: 3, qat: false, teacher_cache_mb: 1024,
          block_steps: 0, block_lr: 1.0e-3}
```

Plain, frozen data validated by :func:`compressor.options.parse_options` (an unknown key
lists the valid ones). Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["RecoverConfig"]


@dataclasses.dataclass(frozen=True)
class RecoverConfig:
    """``recover:`` section.

    Attributes:
        steps: Optimizer steps of the global loop at most (early stopping may end sooner); 0
            with ``block_steps``: the block phase alone (the held-out drop still measured).
        lr: AdamW learning rate.
        batch: Samples per step.
        seed: Seed of the data order and of torch; same seed, same artifact.
        schedule: ``fixed``: the masks from the one-shot passes are held, pruned weights get
            no gradient. ``pgf`` (progressive gradient flow): pruned weights get the gradient
            scaled by ``1 - t / (pgf_decay * steps)`` (0 after that), and the N:M mask is
            re-selected by magnitude after every step while the scale is above 0.
        pgf_decay: Fraction of ``steps`` over which the PGF scale decays to 0.
        loss: Output loss against the teacher (the dense original): ``kl`` (logits, with
            ``temperature``), ``mse``, ``cosine``; ``auto``: ``kl`` plus ``mse`` for a 2-D
            output (logits), else ``cosine`` per position (padding excluded).
        temperature: KL temperature.
        hidden_weight: Weight of the hidden-state MSE where the module exposes hidden states
            (Hugging Face ``output_hidden_states``); 0 turns it off.
        label_weight: Weight of the cross-entropy on ``labels`` when the training data has them.
        eval_every: Steps between evaluations on the held-out part of the training data.
        holdout: Fraction of the training samples held out for early stopping.
        patience: Evaluations without improvement of the metric before stopping (0: never stop
            early); the best weights seen are kept.
        qat: Fake-quantize during fine-tuning for the recipe's ``quantize`` step that follows
            (:mod:`compressor.recover.qat`): weights per output channel, symmetric, as that step
            quantizes them; layer inputs per tensor with learned (LSQ) scales, which that step
            then uses instead of calibrating. Needs a ``quantize`` step after the sparsity pass.
        train_embeddings: Train the ``nn.Embedding`` tables too. Off by default: no mask
            touches them, a step updates only the rows of its tokens while AdamW moves every
            row, and on MiniLM the word table is half the parameters (half the optimizer's time).
        teacher_cache_mb: Memory for the teacher's outputs per training sample, computed once
            and reused on later passes over the data (:mod:`compressor.recover.teacher_cache`);
            0: the teacher runs on every step. It also bounds the block phase's two states per
            sample (the student's input of a block, the teacher's output of it): the samples
            beyond it, in file order, are left out of that phase with a warning; with
            ``block_steps`` it must be above 0.
        block_steps: Block-wise reconstruction before the global loop
            (:mod:`compressor.recover.blockwise`): each repeated block of the module (a
            transformer's layers) trained alone for this many steps to give the teacher's
            output of that block from the student's own input of it, one block after the
            other; 0: none (the global loop alone). Applies to a module built of a chain of
            repeated blocks (an ``nn.ModuleList``, as in Hugging Face encoders); any other
            module trains with the global loop alone (``steps: 0`` then refused, exit 2).
        block_lr: AdamW learning rate of the block phase (linear decay to 0 in each block).
    """

    steps: int = 200
    lr: float = 1e-4
    batch: int = 16
    seed: int = 0
    schedule: Literal["fixed", "pgf"] = "fixed"
    pgf_decay: float = 0.25
    loss: Literal["auto", "kl", "mse", "cosine"] = "auto"
    temperature: float = 2.0
    hidden_weight: float = 1.0
    label_weight: float = 0.5
    eval_every: int = 25
    holdout: float = 0.1
    patience: int = 0
    qat: bool = False
    train_embeddings: bool = False
    teacher_cache_mb: int = 1024
    block_steps: int = 0
    block_lr: float = 1e-3

    def __post_init__(self) -> None:
        for key in ("steps", "batch", "eval_every"):
            if getattr(self, key) < 1 and not (key == "steps" and self.steps == 0 and self.block_steps > 0):
                raise ValueError(f"option {key!r} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "block_lr"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ValueError(f"option {key!r} must be in (0, 1), got {getattr(self, key)}")
        if self.block_steps < 0:
            raise ValueError(f"option 'block_steps' must be >= 0, got {self.block_steps}")
        if not 0.0 < self.pgf_decay <= 1.0:
            raise ValueError(f"option 'pgf_decay' must be in (0, 1], got {self.pgf_decay}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"option 'holdout' must be in [0, 1), got {self.holdout}")
        for key in ("temperature",):
            if not getattr(self, key) > 0:
                raise ValueError(f"option {key!r} must be > 0, got {getattr(self, key)}")
        for key in ("hidden_weight", "label_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"option {key!r} must be >= 0, got {getattr(self, key)}")
        if self.teacher_cache_mb < 0:
            raise ValueError(f"option 'teacher_cache_mb' must be >= 0, got {self.teacher_cache_mb}")
        if self.teacher_cache_mb == 0 and self.block_steps > 0:
            raise ValueError("option 'teacher_cache_mb' must be > 0 with block_steps (the block phase keeps its "
                             "per-sample states there), got 0")
        if self.patience < 0:
            raise ValueError(f"option 'patience' must be >= 0, got {self.patience}")
