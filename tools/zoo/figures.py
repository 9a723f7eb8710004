"""Data and metric for nudenet 3.4.2's ``320n.onnx`` (a YOLOv8n detector exported by ultralytics).

The model finds 18 classes of body parts (faces, feet, covered and exposed parts). No
photographs are on the machine and none may be downloaded, so the images are drawn: 1-3
figures (head with eyes and mouth, neck, torso, arms, legs) in skin tones, some parts
dressed in a coloured garment, on a gradient background with noise and clutter. They are
not photographs; the metric therefore compares the int8 model with fp32, not with a truth.

Preprocessing is nudenet's ``_read_image``: the image padded to a square at the bottom and
right with black, resized to 320x320, RGB, / 255 (our images are drawn square: no pad).
Decoding is its ``_postprocess``: [1, 22, 2100] -> rows of (cx, cy, w, h, 18 class
scores), the best class >= 0.2, ``cv2.dnn.NMSBoxes`` (score 0.25, IoU 0.45, across classes).
Metric (:func:`score_parts`): AP50 vs fp32's boxes, a detection matching only a box of
its own class; and how many boxes fp32 and int8 find.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from ocr import Run, ap50, iou

logger = logging.getLogger("zoo.figures")

NUDE_INPUT = "images"
NUDE_SIZE = 320
SKIN = ((255, 224, 196), (234, 192, 160), (198, 134, 100), (141, 85, 54), (224, 172, 140), (110, 70, 50))


def _gradient(rng: np.random.Generator, size: int):
    from PIL import Image

    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    pixels = a[None, None, :] * (1 - t) + b[None, None, :] * t + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.broadcast_to(pixels, (size, size, 3)), 0, 255).astype(np.uint8), "RGB")


def figure(draw, rng: np.random.Generator, cx: float, top: float, scale: float) -> None:
    """One standing figure: head, neck, torso, arms, legs; a garment over some parts."""
    skin = SKIN[int(rng.integers(len(SKIN)))]
    cloth = tuple(int(v) for v in rng.integers(0, 256, 3))
    s = scale
    head = (cx - 0.12 * s, top, cx + 0.12 * s, top + 0.3 * s)
    torso = (cx - 0.25 * s, top + 0.36 * s, cx + 0.25 * s, top + 1.0 * s)
    for side in (-1, 1):  # arms, legs
        arm = [(cx + side * 0.22 * s, top + 0.4 * s), (cx + side * 0.4 * s, top + 0.75 * s + rng.uniform(-0.1, 0.1) * s)]
        draw.line(arm, fill=skin, width=max(2, int(0.09 * s)))
        leg = [(cx + side * 0.12 * s, top + 0.98 * s), (cx + side * 0.18 * s, top + 1.6 * s)]
        draw.line(leg, fill=cloth if rng.random() < 0.5 else skin, width=max(2, int(0.12 * s)))
        draw.ellipse((leg[1][0] - 0.08 * s, leg[1][1] - 0.03 * s, leg[1][0] + 0.08 * s, leg[1][1] + 0.04 * s), fill=skin)
    draw.rectangle((cx - 0.05 * s, top + 0.26 * s, cx + 0.05 * s, top + 0.4 * s), fill=skin)
    draw.ellipse(torso, fill=skin)
    if rng.random() < 0.6:  # a garment over the chest, the belly or the hips
        y0 = top + float(rng.choice([0.4, 0.6, 0.75])) * s
        draw.rectangle((torso[0], y0, torso[2], min(torso[3], y0 + 0.3 * s)), fill=cloth)
    draw.ellipse(head, fill=skin)
    hair = tuple(int(v) for v in rng.integers(0, 120, 3))
    draw.chord((head[0], head[1] - 0.02 * s, head[2], head[1] + 0.16 * s), 180, 360, fill=hair)
    for side in (-1, 1):
        ex, ey = cx + side * 0.05 * s, top + 0.13 * s
        draw.ellipse((ex - 0.018 * s, ey - 0.012 * s, ex + 0.018 * s, ey + 0.012 * s), fill=(30, 30, 30))
    draw.arc((cx - 0.05 * s, top + 0.17 * s, cx + 0.05 * s, top + 0.24 * s), 20, 160, fill=(150, 40, 40),
             width=max(1, int(0.012 * s)))


def scene(rng: np.random.Generator):
    """A 320x320 scene (RGB, PIL): 1-3 figures at different sizes, clutter behind them."""
    from PIL import ImageDraw

    img = _gradient(rng, NUDE_SIZE)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 8))):
        x, y = rng.integers(0, NUDE_SIZE, 2)
        w, h = rng.integers(20, 120, 2)
        draw.rectangle((int(x), int(y), int(x + w), int(y + h)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(int(rng.integers(1, 4))):
        scale = float(rng.uniform(90, 190))
        figure(draw, rng, float(rng.uniform(40, NUDE_SIZE - 40)), float(rng.uniform(-0.1 * scale, NUDE_SIZE - 1.2 * scale)),
               scale)
    return img


def preprocess(img) -> np.ndarray:
    """nudenet's ``_read_image`` for a square image: 320x320, RGB, / 255, CHW."""
    from PIL import Image

    rgb = np.asarray(img.convert("RGB").resize((NUDE_SIZE, NUDE_SIZE), Image.BILINEAR), dtype=np.float32)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1) / 255.0, dtype=np.float32)


def build_scenes(model: Path, out: Path, n_calib: int, n_eval: int, seed: int) -> None:
    """Detector data: drawn scenes (no truth: the metric is agreement with fp32)."""
    for split, count, offset in (("calib", n_calib, 0), ("eval", n_eval, 1000)):
        rng = np.random.default_rng(seed + offset)
        np.savez(out / f"{split}.npz", **{NUDE_INPUT: np.stack([preprocess(scene(rng)) for _ in range(count)])})
        if split == "eval":
            np.savez(out / "truth.npz", count=np.array(count))
        logger.info("%s: %d scenes", split, count)


def decode(output: np.ndarray, score_thr: float = 0.25, nms: float = 0.45) -> np.ndarray:
    """nudenet's ``_postprocess`` in the model's pixels: [K, 6] x1y1x2y2 score class."""
    rows = np.asarray(output, dtype=np.float64).reshape(np.asarray(output).shape[-2:]).T
    cls, score = rows[:, 4:].argmax(1), rows[:, 4:].max(1)
    keep = score >= max(score_thr, 0.2)
    rows, cls, score = rows[keep], cls[keep], score[keep]
    xyxy = np.c_[rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2]
    order, kept = score.argsort()[::-1], []
    while order.size:
        i = order[0]
        kept.append(i)
        order = order[1:][iou(xyxy[i], xyxy[order[1:]]) <= nms] if order.size > 1 else order[1:]
    return np.c_[xyxy[kept], score[kept], cls[kept]] if kept else np.zeros((0, 6))


def _by_class(boxes: np.ndarray) -> np.ndarray:
    """Boxes moved apart by class (class k shifted by k * 10000 px), so that AP50 matches within a class."""
    shifted = boxes.copy()
    shifted[:, [0, 2]] += boxes[:, 5:6] * 10000
    return shifted


def score_parts(run: Run, truth: Mapping[str, np.ndarray], reference: Mapping[str, object] | None, *,
                images: np.ndarray) -> dict[str, object]:
    """AP50 (class-aware) vs fp32's boxes; the number of boxes found."""
    dets = [decode(run({NUDE_INPUT: images[k:k + 1]})[0]) for k in range(len(images))]
    ref = dets if reference is None else reference["dets"]
    return {"ap50_vs_fp32": ap50([_by_class(d)[:, :5] for d in dets], [_by_class(r)[:, :4] for r in ref]),
            "boxes": float(sum(len(d) for d in dets)), "dets": dets}
