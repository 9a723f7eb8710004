"""Real task data and metrics for PaddleOCR's models as rapidocr-onnxruntime 1.4.4 ships them.

Three paddle2onnx exports (opset 11/12, weights as ``Constant`` nodes, dims
``p2o.DynamicDimension.N``), one input ``x`` each. Their pre/post-processing is the wheel's
own (``rapidocr_onnxruntime/ch_ppocr_{det,cls,rec}/``; read, not imported: it needs cv2,
pyclipper and shapely), redone here with PIL, numpy and scipy:

* **rec** ``ch_PP-OCRv4_rec_infer.onnx`` ([N, 3, 48, W] -> [N, T, 6625] softmax, CTC):
  printed text lines (words, numbers, punctuation; every character in the model's charset,
  which is its ``character`` metadata, one per line, with ``blank`` in front and ``" "``
  after, as ``CTCLabelDecode``), cropped to the line, BGR, resized to height 48 keeping the
  aspect (at most W = 320 wide), ``(x / 255 - 0.5) / 0.5``, zero-padded on the right
  (``TextRecognizer.resize_norm_img``). Metric: greedy CTC (argmax, collapse repeats, drop
  blank), character accuracy (case-sensitive) vs the printed text, agreement with fp32.
* **cls** ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` ([N, 3, 48, 192] -> [N, 2], labels
  ``0``/``180``): lines as for rec, half of them turned by 180 degrees, normalised as rec
  (``TextClassifier.resize_norm_img``). Metric: accuracy vs the known turn, agreement with fp32.
* **det** ``ch_PP-OCRv4_det_infer.onnx`` ([N, 3, H, W] -> [N, 1, H, W] text probability,
  DBNet): 320x320 pages with 2-5 text lines of 16-30 px at known places, BGR,
  ``(x / 255 - 0.5) / 0.5`` (``DetPreProcess``; the page is already a multiple of 32). A
  line's box is its ink box with a quarter of its height around it, as annotators draw one.
  Decoding follows ``DBPostProcess`` (thresh 0.3, 2x2 dilation, box score = mean
  probability in the box >= 0.5, unclip ratio 1.6 by ``area * ratio / perimeter``) with
  one simplification: regions are connected components and boxes axis-aligned (our lines
  are horizontal; cv2's ``minAreaRect`` would give the same box). Metric: AP50 of the boxes
  vs the printed lines' boxes and vs fp32's boxes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ocr import Run, ap50, char_accuracy, ctc_greedy, iou, text_line

logger = logging.getLogger("zoo.ppocr")

PP_INPUT = "x"
REC_HEIGHT, REC_WIDTH = 48, 320
CLS_HEIGHT, CLS_WIDTH = 48, 192
DET_SIZE = 320
WORDS = ("invoice total amount date order number price tax paid due customer account balance item unit "
         "page report model latency accuracy station platform train leaves open closed street road north "
         "south coffee bread milk sale free parking exit entry room floor hotel").split()
PUNCT = ".,:-/#%()"


def charset(model: Path) -> list[str]:
    """The recogniser's classes: ``blank``, the ``character`` metadata's lines, ``" "`` (``CTCLabelDecode``)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    chars = next((p.value for p in proto.metadata_props if p.key == "character"), None)
    if chars is None:
        raise ValueError(f"{model}: no 'character' in its metadata_props")
    return ["blank", *chars.splitlines(), " "]


def phrase(rng: np.random.Generator, max_chars: int) -> str:
    """Words, numbers and punctuation, at most ``max_chars`` characters."""
    parts: list[str] = []
    while True:
        kind = rng.random()
        if kind < 0.55:
            word = str(rng.choice(WORDS))
            word = word.upper() if rng.random() < 0.2 else word.capitalize() if rng.random() < 0.4 else word
        elif kind < 0.85:
            word = str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
            if rng.random() < 0.3:
                word += str(rng.choice(list(PUNCT))) + str(int(rng.integers(0, 100)))
        elif parts:
            word = str(rng.choice(list(PUNCT)))
        else:
            continue
        text = " ".join([*parts, word])
        if len(text) > max_chars:
            return " ".join(parts) or word[:max_chars]
        parts.append(word)


def _page(rng: np.random.Generator, size: tuple[int, int]):
    """A light, slightly noisy page (RGB, PIL)."""
    from PIL import Image

    base = rng.integers(170, 256, 3)
    noise = rng.normal(0, float(rng.uniform(0, 8)), (size[1], size[0], 1))
    pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def line_image(rng: np.random.Generator, text: str):
    """A text line cropped as a detector's box would be: a few pixels of page around the ink."""
    glyphs, (x1, y1, x2, y2) = text_line(rng, text, int(rng.integers(28, 44)))
    glyphs = glyphs.crop((x1, y1, x2, y2))
    pad = [int(v) for v in rng.integers(2, 8, 4)]
    page = _page(rng, (glyphs.size[0] + pad[0] + pad[2], glyphs.size[1] + pad[1] + pad[3]))
    page.paste(glyphs, (pad[0], pad[1]), glyphs)
    return page


def normalise(img, height: int, width: int) -> np.ndarray:
    """``resize_norm_img``: BGR, height ``height`` keeping the aspect (at most ``width``), [-1, 1], zero-padded."""
    from PIL import Image

    w, h = img.size
    resized_w = min(width, int(math.ceil(height * w / h)))
    bgr = np.asarray(img.convert("RGB").resize((resized_w, height), Image.BILINEAR), dtype=np.float32)[..., ::-1]
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = (bgr.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def build_rec(model: Path, out: Path, n_calib: int, n_eval: int, seed: int) -> None:
    """Recogniser data: printed lines of known text (every character in the model's charset)."""
    known = set(charset(model))
    for split, count, offset in (("calib", n_calib, 0), ("eval", n_eval, 1000)):
        rng = np.random.default_rng(seed + offset)
        texts = [phrase(rng, int(rng.integers(6, 15))) for _ in range(count)]
        missing = sorted({c for t in texts for c in t} - known)
        if missing:
            raise ValueError(f"characters not in the recogniser's charset: {missing}")
        images = [normalise(line_image(rng, t), REC_HEIGHT, REC_WIDTH) for t in texts]
        np.savez(out / f"{split}.npz", **{PP_INPUT: np.stack(images)})
        if split == "eval":
            np.savez(out / "truth.npz", texts=np.array(texts))
        logger.info("%s: %d text lines", split, count)


def score_rec(run: Run, truth: Mapping[str, np.ndarray], reference: Mapping[str, object] | None, *,
              images: np.ndarray, classes: Sequence[str]) -> dict[str, object]:
    """Character accuracy (case-sensitive) vs the printed text, exact agreement with fp32's texts."""
    texts = ["".join(classes[i] for i in ctc_greedy(run({PP_INPUT: images[k:k + 1]})[0]))
             for k in range(len(images))]
    ref = texts if reference is None else reference["texts"]
    return {"char_acc": char_accuracy(texts, [str(t) for t in truth["texts"]], ignore_case=False),
            "agree": float(np.mean([a == b for a, b in zip(texts, ref)])), "texts": texts}


def build_cls(model: Path, out: Path, n_calib: int, n_eval: int, seed: int) -> None:
    """Orientation data: printed lines, every other one turned by 180 degrees (label 1)."""
    for split, count, offset in (("calib", n_calib, 0), ("eval", n_eval, 1000)):
        rng = np.random.default_rng(seed + offset)
        labels = np.arange(count) % 2
        images = []
        for label in labels:
            img = line_image(rng, phrase(rng, int(rng.integers(4, 13))))
            images.append(normalise(img.rotate(180) if label else img, CLS_HEIGHT, CLS_WIDTH))
        np.savez(out / f"{split}.npz", **{PP_INPUT: np.stack(images)})
        if split == "eval":
            np.savez(out / "truth.npz", labels=labels)
        logger.info("%s: %d lines, %d turned", split, count, int(labels.sum()))


def score_cls(run: Run, truth: Mapping[str, np.ndarray], reference: Mapping[str, object] | None, *,
              images: np.ndarray) -> dict[str, object]:
    """Accuracy vs the known turn (``0``/``180``), agreement with fp32's labels."""
    pred = np.array([int(np.argmax(run({PP_INPUT: images[k:k + 1]})[0])) for k in range(len(images))])
    ref = pred if reference is None else np.asarray(reference["pred"])
    return {"acc": float(np.mean(pred == truth["labels"])), "agree": float(np.mean(pred == ref)), "pred": pred}


def page_with_lines(rng: np.random.Generator) -> tuple[object, np.ndarray]:
    """A 320x320 page with 2-5 non-overlapping text lines, and their ink boxes [K, 4] (x1y1x2y2)."""
    page = _page(rng, (DET_SIZE, DET_SIZE))
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(2, 6))):
        glyphs, (x1, y1, x2, y2) = text_line(rng, phrase(rng, int(rng.integers(5, 20))), int(rng.integers(16, 31)))
        glyphs = glyphs.crop((x1, y1, x2, y2))
        if glyphs.size[0] >= DET_SIZE - 8:
            continue
        for _try in range(30):
            x = int(rng.integers(4, DET_SIZE - glyphs.size[0] - 4))
            y = int(rng.integers(4, DET_SIZE - glyphs.size[1] - 4))
            cand = np.array([x - 6, y - 6, x + glyphs.size[0] + 6, y + glyphs.size[1] + 6], float)
            if all(iou(cand, np.array(b))[()] == 0 for b in boxes):
                page.paste(glyphs, (x, y), glyphs)
                m = glyphs.size[1] / 4  # the line's box as annotators draw it: a margin around the ink
                boxes.append([x - m, y - m, x + glyphs.size[0] + m, y + glyphs.size[1] + m])
                break
    return page, np.array(boxes, dtype=np.float32).reshape(-1, 4)


def det_preprocess(img) -> np.ndarray:
    """``DetPreProcess`` on a page already 320x320: BGR, [-1, 1], CHW."""
    bgr = np.asarray(img.convert("RGB"), dtype=np.float32)[..., ::-1]
    return np.ascontiguousarray(((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1), dtype=np.float32)


def build_det(model: Path, out: Path, n_calib: int, n_eval: int, seed: int) -> None:
    """Detector data: pages of text lines; the lines' boxes in truth.npz."""
    for split, count, offset in (("calib", n_calib, 0), ("eval", n_eval, 1000)):
        rng = np.random.default_rng(seed + offset)
        pages, boxes = zip(*(page_with_lines(rng) for _ in range(count)))
        np.savez(out / f"{split}.npz", **{PP_INPUT: np.stack([det_preprocess(p) for p in pages])})
        if split == "eval":
            np.savez(out / "truth.npz", boxes=np.concatenate(boxes),
                     image=np.concatenate([np.full(len(b), i) for i, b in enumerate(boxes)]))
        logger.info("%s: %d pages, %d lines", split, count, sum(len(b) for b in boxes))


def db_boxes(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.5, unclip: float = 1.6) -> np.ndarray:
    """``DBPostProcess`` with axis-aligned boxes: [K, 5] x1y1x2y2 score, in the map's pixels."""
    from scipy import ndimage

    pred = np.asarray(prob, dtype=np.float64).reshape(np.asarray(prob).shape[-2:])
    # cv2.dilate with a 2x2 kernel (anchor at its centre, (1, 1)) grows a region by one pixel
    # right and down; scipy's origin 0 would grow it left and up
    mask = ndimage.binary_dilation(pred > thresh, structure=np.ones((2, 2)), origin=-1)
    labels, _ = ndimage.label(mask)
    h, w = pred.shape
    out = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y1, y2, x1, x2 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        bw, bh = x2 - x1, y2 - y1
        if min(bw, bh) < 3:
            continue
        score = float(pred[y1:y2, x1:x2].mean())
        if score < box_thresh:
            continue
        d = bw * bh * unclip / (2 * (bw + bh))
        box = [max(0.0, x1 - d), max(0.0, y1 - d), min(float(w), x2 + d), min(float(h), y2 + d)]
        if min(box[2] - box[0], box[3] - box[1]) < 5:
            continue
        out.append([*box, score])
    return np.array(out, dtype=np.float64).reshape(-1, 5)


def score_det(run: Run, truth: Mapping[str, np.ndarray], reference: Mapping[str, object] | None, *,
              images: np.ndarray) -> dict[str, object]:
    """AP50 of the DB boxes vs the printed lines' boxes and vs fp32's boxes."""
    dets = [db_boxes(run({PP_INPUT: images[k:k + 1]})[0]) for k in range(len(images))]
    printed = [truth["boxes"][truth["image"] == k] for k in range(len(images))]
    ref = [d[:, :4] for d in (dets if reference is None else reference["dets"])]
    return {"ap50_vs_fp32": ap50(dets, ref), "ap50_vs_printed": ap50(dets, printed), "dets": dets}
