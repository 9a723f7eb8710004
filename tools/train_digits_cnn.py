"""Train the bundled default model: a small BatchNorm CNN on sklearn's 8x8 digits.

Writes three files into ``--out`` (default ``examples/``):

* ``digits_cnn.pt2``   -- ``torch.export`` program, input ``images`` (N x 1 x 8 x 8 float32
  in [0, 1]) with a dynamic batch dimension, output logits (N x 10).
* ``digits_calib.npz`` -- ``images``: 256 samples from the training split, for calibration.
* ``digits_eval.npz``  -- ``images`` and ``labels`` (int64): the held-out 20% stratified
  split, never used for training or calibration.

The run is deterministic (fixed seeds, single thread, deterministic algorithms), so a
rerun reproduces the same weights and the same eval accuracy.

Usage::

    python tools/train_digits_cnn.py --out examples/ --epochs 40
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
CALIB_SIZE = 256
EVAL_FRACTION = 0.2


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, max-pool, Conv-BN-ReLU, then an MLP head with BatchNorm1d."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64, bias=False),
            nn.BatchNorm1d(64),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)
        return self.classifier(self.head(x.flatten(1)))


def make_deterministic(seed: int) -> None:
    """Pin every source of nondeterminism the CPU training run touches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def load_splits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_eval, y_eval); images N x 1 x 8 x 8 float32 in [0, 1]."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        images, labels, test_size=EVAL_FRACTION, stratify=labels, random_state=seed
    )
    return x_train, y_train, x_eval, y_eval


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (zero fill), drawn from ``gen``."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    shifts = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = padded[i, :, dy : dy + 8, dx : dx + 8]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def train(
    x_train: np.ndarray, y_train: np.ndarray, epochs: int, batch_size: int, seed: int
) -> DigitsCNN:
    model = DigitsCNN()
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = -(-len(xt) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = perm[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample per batch
                continue
            loss = loss_fn(model(augment(xt[idx], gen)), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {total / len(xt):.4f}")
    return model.eval()


def export_model(model: DigitsCNN, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        model.eval(), (example,), dynamic_shapes={"images": {0: batch}}
    )
    torch.export.save(program, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    make_deterministic(args.seed)
    x_train, y_train, x_eval, y_eval = load_splits(args.seed)
    print(f"train {len(x_train)} samples, eval {len(x_eval)} samples")

    model = train(x_train, y_train, args.epochs, args.batch_size, args.seed)
    print(f"train accuracy {accuracy(model, x_train, y_train):.4f}")
    print(f"eval accuracy  {accuracy(model, x_eval, y_eval):.4f}")

    calib_idx = np.random.RandomState(args.seed).choice(len(x_train), CALIB_SIZE, replace=False)
    calib = np.ascontiguousarray(x_train[np.sort(calib_idx)])

    args.out.mkdir(parents=True, exist_ok=True)
    export_model(model, torch.from_numpy(calib[:2]), args.out / "digits_cnn.pt2")
    np.savez(args.out / "digits_calib.npz", images=calib)
    np.savez(
        args.out / "digits_eval.npz",
        images=np.ascontiguousarray(x_eval),
        labels=np.ascontiguousarray(y_eval),
    )
    for name in ("digits_cnn.pt2", "digits_calib.npz", "digits_eval.npz"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
