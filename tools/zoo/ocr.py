"""Real task data and metrics for ddddocr's models: the text recogniser and the detector.

``common.onnx`` (``input1`` [1, 1, 64, W], CNN + LSTM, CTC over 8210 classes; its output
is really [T, 1, 8210] although the model declares [1, seqlen]): captcha-like images are
rendered with PIL and the fonts on the machine (``fc-list``; DejaVu at least): 4-6
characters of ddddocr's own charset (read from the wheel's ``charset_manager.py``, not
imported), per-character rotation, size, colour and offset, noise lines and dots, on a
150x50 canvas. Preprocessing is ddddocr 1.6's own (``OCREngine._preprocess_image``):
resize to height 64 keeping the aspect (LANCZOS; every image becomes 192 wide), grayscale,
divide by 255. Data: ``input1`` [N, 1, 64, 192]. Metric (:func:`score_text`): greedy CTC
decoding (argmax, collapse repeats, drop blank 0), character accuracy
(1 - edit distance / length, case-insensitive as captchas are) against the rendered text,
and the share of images whose decoded text equals fp32's.

``common_old.onnx`` takes the same input with the old charset; it is already quantized,
and the bench only checks that compressor refuses it.

``common_det.onnx`` (``images`` [1, 3, 416, 416], YOLOX-style, 3549 anchors x (box, obj,
cls)): characters scattered over a 320-480 x 160-240 canvas with their boxes known;
preprocessing is ddddocr's ``DetectionEngine.preproc`` (BGR, letterbox into 416x416
padded with 114, float 0-255, no normalisation), decoding its ``demo_postprocess`` +
NMS 0.45, score 0.1. Metric (:func:`score_boxes`): AP50 of the boxes against fp32's boxes
(and, for reference, against the rendered characters' boxes).
"""

from __future__ import annotations

import ast
import logging
import subprocess
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

logger = logging.getLogger("zoo.ocr")

Run = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]

OCR_INPUT = "input1"
OCR_HEIGHT = 64
CAPTCHA_SIZE = (150, 50)
DET_INPUT = "images"
DET_SIZE = 416
DET_PAD = 114
ALPHABET = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/l/I


def read_charset(charset_manager: Path, which: str = "beta") -> list[str]:
    """A ddddocr charset from ``charset_manager.py`` (parsed, never imported).

    ``common.onnx`` uses the ``beta`` charset, ``common_old.onnx`` the ``old`` one.
    """
    tree = ast.parse(charset_manager.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == f"_get_{which}_charset":
            for sub in ast.walk(node):
                if isinstance(sub, ast.Return) and sub.value is not None:
                    return list(ast.literal_eval(sub.value))
    raise ValueError(f"{charset_manager}: no _get_{which}_charset()")


@lru_cache(maxsize=1)
def fonts() -> tuple[str, ...]:
    """Latin TrueType fonts on this machine (``fc-list :lang=en``), DejaVu first."""
    try:
        listing = subprocess.run(["fc-list", ":lang=en", "file"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        listing = ""
    files = sorted({line.split(":")[0].strip() for line in listing.splitlines() if line.strip().endswith(":")
                    or ".ttf" in line})
    files = [f for f in files if f.lower().endswith((".ttf", ".otf")) and "math" not in f.lower()]
    if not files:
        raise RuntimeError("no TrueType fonts found with fc-list (apt-get install -y fonts-dejavu-core)")
    return tuple(sorted(files, key=lambda f: ("dejavu" not in f.lower(), f)))


def captcha(rng: np.random.Generator, alphabet: str = ALPHABET) -> tuple[object, str]:
    """A captcha-like RGB image (PIL) of 4-6 characters and its text."""
    from PIL import Image, ImageDraw, ImageFont

    text = "".join(rng.choice(list(alphabet), size=int(rng.integers(4, 7))))
    w, h = CAPTCHA_SIZE
    bg = tuple(int(v) for v in rng.integers(180, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(30, 120))):  # dots
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.point((x, y), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    font_file = str(rng.choice(fonts()))
    step = (w - 16) / len(text)
    for i, ch in enumerate(text):
        size = int(rng.integers(26, 36))
        font = ImageFont.truetype(font_file, size)
        glyph = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((size // 2, size // 4), ch, font=font,
                                   fill=tuple(int(v) for v in rng.integers(0, 120, 3)) + (255,))
        glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC)
        box = glyph.getbbox() or (0, 0, 1, 1)
        glyph = glyph.crop(box)
        x = int(8 + i * step + rng.uniform(-2, 2))
        y = int(max(0, (h - glyph.size[1]) / 2 + rng.uniform(-4, 4)))
        img.paste(glyph, (x, y), glyph)
    for _ in range(int(rng.integers(1, 4))):  # lines
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 160, 3)), width=int(rng.integers(1, 3)))
    return img, text


def ocr_preprocess(img: object) -> np.ndarray:
    """ddddocr 1.6's preprocessing: height 64 (LANCZOS), grayscale, /255 -> [1, 64, W]."""
    from PIL import Image

    width = int(img.size[0] * (OCR_HEIGHT / img.size[1]))
    gray = img.resize((width, OCR_HEIGHT), Image.LANCZOS).convert("L")
    return (np.asarray(gray, dtype=np.float32) / 255.0)[None]


def build_text(model: Path, out: Path, n_calib: int, n_eval: int, seed: int) -> None:
    """Recogniser data: captcha images at ddddocr's preprocessing, texts in truth.npz."""
    for split, count, offset in (("calib", n_calib, 0), ("eval", n_eval, 1000)):
        rng = np.random.default_rng(seed + offset)
        images, texts = zip(*(captcha(rng) for _ in range(count)))
        np.savez(out / f"{split}.npz", **{OCR_INPUT: np.stack([ocr_preprocess(i) for i in images])})
        if split == "eval":
            np.savez(out / "truth.npz", texts=np.array(texts))
        logger.info("%s: %d captchas", split, count)


def ctc_greedy(logits: np.ndarray) -> list[int]:
    """Greedy CTC: argmax per step, collapse repeats, drop the blank (index 0)."""
    idx = np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1]).argmax(-1)
    keep = np.r_[True, idx[1:] != idx[:-1]] & (idx != 0)
    return [int(i) for i in idx[keep]]


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(pred: Sequence[str], truth: Sequence[str], ignore_case: bool = True) -> float:
    """1 - total edit distance / total characters, floored at 0 per text; case-insensitive as captchas
    are, unless ``ignore_case`` is False (printed text)."""
    total = sum(len(t) for t in truth)
    fold = str.lower if ignore_case else str
    errors = sum(min(edit_distance(fold(p), fold(t)), len(t)) for p, t in zip(pred, truth))
    return 1.0 - errors / max(total, 1)


def score_text(run: Run, input_names: Sequence[str], truth: Mapping[str, np.ndarray],
               reference: Mapping[str, object] | None = None, *, images: np.ndarray,
               charset: Sequence[str]) -> dict[str, object]:
    """Character accuracy vs the rendered text and exact agreement with fp32's texts."""
    texts = ["".join(charset[i] for i in ctc_greedy(run({OCR_INPUT: images[k:k + 1]})[0]) if i < len(charset))
             for k in range(len(images))]
    ref = texts if reference is None else reference["texts"]
    return {"char_acc": char_accuracy(texts, [str(t) for t in truth["texts"]]),
            "agree": float(np.mean([a == b for a, b in zip(texts, ref)])), "texts": texts}


# --- detector -----------------------------------------------------------------------------


def scatter_chars(rng: np.random.Generator) -> tuple[object, np.ndarray]:
    """A click-captcha-like image: 3-6 characters scattered, and their boxes [K, 4] (x1y1x2y2)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = int(rng.integers(320, 481)), int(rng.integers(160, 241))
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(150, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):  # background clutter
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(100, 256, 3)), width=int(rng.integers(1, 4)))
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(3, 7))):
        size = int(rng.integers(28, 52))
        font = ImageFont.truetype(str(rng.choice(fonts())), size)
        glyph = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((size // 2, size // 4), str(rng.choice(list(ALPHABET))), font=font,
                                   fill=tuple(int(v) for v in rng.integers(0, 110, 3)) + (255,))
        glyph = glyph.rotate(float(rng.uniform(-30, 30)), resample=Image.BICUBIC)
        glyph = glyph.crop(glyph.getbbox() or (0, 0, 1, 1))
        gw, gh = glyph.size
        for _try in range(20):  # place without overlapping the others
            x, y = int(rng.integers(0, max(1, w - gw))), int(rng.integers(0, max(1, h - gh)))
            cand = [x, y, x + gw, y + gh]
            if all(iou(np.array(cand, float), np.array(b))[()] == 0 for b in boxes):
                break
        img.paste(glyph, (x, y), glyph)
        boxes.append([float(v) for v in cand])
    return img, np.array(boxes, dtype=np.float32)


def det_preprocess(img: object) -> tuple[np.ndarray, float]:
    """ddddocr's ``DetectionEngine.preproc``: BGR, letterbox into 416x416 (pad 114), CHW float 0-255."""
    from PIL import Image

    rgb = np.asarray(img.convert("RGB"))
    r = min(DET_SIZE / rgb.shape[0], DET_SIZE / rgb.shape[1])
    nw, nh = int(rgb.shape[1] * r), int(rgb.shape[0] * r)
    resized = np.asarray(img.convert("RGB").resize((nw, nh), Image.BILINEAR))[..., ::-1]
    padded = np.full((DET_SIZE, DET_SIZE, 3), DET_PAD, dtype=np.uint8)
    padded[:nh, :nw] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32), r


def build_boxes(model: Path, out: Path, n_calib: int, n_eval: int, seed: int) -> None:
    """Detector data: letterboxed images; rendered boxes (in 416-space) in truth.npz."""
    for split, count, offset in (("calib", n_calib, 0), ("eval", n_eval, 1000)):
        rng = np.random.default_rng(seed + offset)
        images, boxes = [], []
        for _ in range(count):
            img, b = scatter_chars(rng)
            x, r = det_preprocess(img)
            images.append(x)
            boxes.append(b * r)
        np.savez(out / f"{split}.npz", **{DET_INPUT: np.stack(images)})
        if split == "eval":
            np.savez(out / "truth.npz", boxes=np.concatenate(boxes),
                     image=np.concatenate([np.full(len(b), i) for i, b in enumerate(boxes)]))
        logger.info("%s: %d images, %d characters", split, count, sum(len(b) for b in boxes))


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1y1x2y2 box with each of ``boxes``."""
    boxes = np.atleast_2d(boxes)
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def det_decode(output: np.ndarray, nms: float = 0.45, score_thr: float = 0.1) -> np.ndarray:
    """ddddocr's ``demo_postprocess`` + class-agnostic NMS: [K, 5] x1y1x2y2 score (416-space)."""
    pred = np.array(output, dtype=np.float64).reshape(-1, np.asarray(output).shape[-1])
    grids, strides = [], []
    for stride in (8, 16, 32):
        n = DET_SIZE // stride
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    pred[:, :2] = (pred[:, :2] + grid) * stride
    pred[:, 2:4] = np.exp(pred[:, 2:4]) * stride
    scores = (pred[:, 4:5] * pred[:, 5:]).max(1)
    xyxy = np.c_[pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2]
    keep_mask = scores > score_thr
    xyxy, scores = xyxy[keep_mask], scores[keep_mask]
    order, keep = scores.argsort()[::-1], []
    while order.size:
        i = order[0]
        keep.append(i)
        order = order[1:][iou(xyxy[i], xyxy[order[1:]]) <= nms] if order.size > 1 else order[1:]
    return np.c_[xyxy[keep], scores[keep]] if keep else np.zeros((0, 5))


def ap50(dets: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> float:
    """AP at IoU 0.5 (all-point interpolation) of per-image detections [K, 5] vs boxes [M, 4]."""
    scored = sorted(((d[4], i, d[:4]) for i, ds in enumerate(dets) for d in ds), key=lambda x: -x[0])
    n_truth = sum(len(t) for t in truths)
    if n_truth == 0:
        return 1.0 if not scored else 0.0
    used = [np.zeros(len(t), dtype=bool) for t in truths]
    tp = np.zeros(len(scored))
    for k, (_, i, box) in enumerate(scored):
        if len(truths[i]):
            ious = iou(box, truths[i])
            j = int(ious.argmax())
            if ious[j] >= 0.5 and not used[i][j]:
                used[i][j] = True
                tp[k] = 1
    recall = np.r_[0, np.cumsum(tp) / n_truth]
    precision = np.r_[1, np.cumsum(tp) / np.arange(1, len(tp) + 1)]
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def score_boxes(run: Run, input_names: Sequence[str], truth: Mapping[str, np.ndarray],
                reference: Mapping[str, object] | None = None, *, images: np.ndarray) -> dict[str, object]:
    """AP50 of the detections against fp32's boxes and against the rendered boxes."""
    dets = [det_decode(run({DET_INPUT: images[k:k + 1]})[0]) for k in range(len(images))]
    rendered = [truth["boxes"][truth["image"] == k] for k in range(len(images))]
    ref = [d[:, :4] for d in dets] if reference is None else [d[:, :4] for d in reference["dets"]]
    return {"ap50_vs_fp32": ap50(dets, ref), "ap50_vs_rendered": ap50(dets, rendered), "dets": dets}


# --- printed text lines (PaddleOCR's models, ppocr.py) ------------------------------------


def text_line(rng: np.random.Generator, text: str, height: int, font_file: str | None = None,
              ink: tuple[int, int, int] | None = None) -> tuple[object, tuple[int, int, int, int]]:
    """``text`` printed on one line, as an RGBA image just large enough, and its ink box (x1y1x2y2).

    The font is ``font_file`` or one of :func:`fonts`, sized so that the line is about ``height``
    pixels tall; the background is transparent, so the caller pastes it on any page.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_file or str(rng.choice(fonts())), max(8, int(height * 0.8)))
    x1, y1, x2, y2 = font.getbbox(text)
    img = Image.new("RGBA", (x2 - min(x1, 0) + 4, y2 - min(y1, 0) + 4), (0, 0, 0, 0))
    colour = ink or tuple(int(v) for v in rng.integers(0, 90, 3))
    ImageDraw.Draw(img).text((2 - min(x1, 0), 2 - min(y1, 0)), text, font=font, fill=colour + (255,))
    return img, img.getbbox() or (0, 0, img.size[0], img.size[1])
