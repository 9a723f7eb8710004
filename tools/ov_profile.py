"""Where OpenVINO's CPU plugin spends its time: several IRs side by side on the same input.

For each ``.xml`` the model is compiled in f32 (``INFERENCE_PRECISION_HINT``; ``--precision
device``: no hint, the device's default, bf16 on AVX512-BF16 CPUs) with
``PERF_COUNT`` on, called ``--rounds`` times round-robin with the others (so a load change on
this shared machine hits every model alike), and the per-layer times of
``infer_request.get_profiling_info()`` are averaged and summed by (layer type, kernel):
``Convolution/jit_avx2_I8`` is an int8 convolution, ``.../brgconv_avx2_f32`` a float one,
``Subgraph`` a fused elementwise chain (a standalone FakeQuantize shows as one). With
``--layers`` it also lists every layer of the first model with its time in each model
(matched by name), which is how an f32 layer that costs more than its int8 twin is found.

    python tools/ov_profile.py --npz eval.npz fp32.xml ours/model.xml nncf/model.xml [--threads 1] [--batch 8]

The input is the first sample of ``--npz`` (keyed by input name, first axis = samples).
Wall times are medians over the rounds, so on a loaded machine compare within one run only.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time
from pathlib import Path

import numpy as np


def _feed(compiled, npz: Path, batch: int = 1) -> dict:
    """The first ``batch`` samples of ``npz`` for each input of ``compiled`` (matched by name, else in order)."""
    data = np.load(npz)
    feed = {}
    for i, port in enumerate(compiled.inputs):
        name = port.get_any_name()
        key = name if name in data.files else data.files[min(i, len(data.files) - 1)]
        value = data[key][0:batch]
        feed[port] = value if value.ndim == len(port.get_partial_shape()) else data[key][0]
    return feed


def profile(xmls: list[Path], npz: Path, rounds: int, threads: int | None, batch: int = 1,
            precision: str = "f32") -> list[dict]:
    """Per model: median wall ms, mean µs per (type, kernel) and per layer, layer counts.

    ``precision``: the float precision hint (``f32``), or ``device`` for none (the device's
    default: bf16 on AVX512-BF16 CPUs, which is what a plain compile runs).
    """
    import openvino as ov

    core = ov.Core()
    config = {"PERF_COUNT": True, "NUM_STREAMS": 1}
    if precision != "device":
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    models = []
    for xml in xmls:
        compiled = core.compile_model(core.read_model(xml), "CPU", config)
        request = compiled.create_infer_request()
        models.append({"xml": xml, "request": request, "feed": _feed(compiled, npz, batch), "walls": [],
                       "by_kind": collections.defaultdict(float), "by_layer": collections.defaultdict(float),
                       "count": collections.Counter()})
    for m in models:
        for _ in range(3):
            m["request"].infer(m["feed"])
    for _ in range(rounds):
        for m in models:
            start = time.perf_counter()
            m["request"].infer(m["feed"])
            m["walls"].append((time.perf_counter() - start) * 1e3)
            for p in m["request"].get_profiling_info():
                if p.status != p.Status.EXECUTED:
                    continue
                us = p.real_time.total_seconds() * 1e6 / rounds
                m["by_kind"][(p.node_type, p.exec_type)] += us
                m["by_layer"][p.node_name] += us
    for m in models:
        for p in m["request"].get_profiling_info():
            if p.status == p.Status.EXECUTED:
                m["count"][(p.node_type, p.exec_type)] += 1
        m["wall_ms"] = statistics.median(m["walls"])
    return models


def render(models: list[dict], layers: bool) -> str:
    """The table by (type, kernel), largest first; with ``layers`` one row per layer of the first model."""
    kinds = sorted({k for m in models for k in m["by_kind"]},
                   key=lambda k: -max(m["by_kind"].get(k, 0.0) for m in models))
    head = "| type / kernel | " + " | ".join(f"{i}: n, µs" for i in range(len(models))) + " |"
    lines = [*(f"{i}: {m['xml']}  (median {m['wall_ms']:.2f} ms)" for i, m in enumerate(models)), "",
             head, "|---|" + "---|" * len(models)]
    for k in kinds:
        cells = " | ".join(f"{m['count'].get(k, 0)}, {m['by_kind'].get(k, 0.0):.0f}" for m in models)
        lines.append(f"| {k[0]} / {k[1]} | {cells} |")
    if layers:
        lines += ["", "| layer (model 0) | " + " | ".join(f"{i}: µs" for i in range(len(models))) + " |",
                  "|---|" + "---|" * len(models)]
        for name, us in sorted(models[0]["by_layer"].items(), key=lambda kv: -kv[1]):
            cells = " | ".join(f"{m['by_layer'][name]:.0f}" if name in m["by_layer"] else "-" for m in models)
            lines.append(f"| {name[:70]} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("xmls", nargs="+", type=Path, help="OpenVINO IR files (.xml)")
    p.add_argument("--npz", type=Path, required=True, help="data file; its first sample is the input")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, help="INFERENCE_NUM_THREADS (default: the plugin's)")
    p.add_argument("--layers", action="store_true", help="also one row per layer of the first model")
    p.add_argument("--batch", type=int, default=1, help="samples per call, the first of --npz")
    p.add_argument("--precision", default="f32",
                   help="float precision hint (f32, bf16, f16), or 'device' for none: the device's default")
    args = p.parse_args()
    load = os.getloadavg()
    models = profile(args.xmls, args.npz, args.rounds, args.threads, args.batch, args.precision)
    print(render(models, args.layers))
    print(f"\nload average {load[0]:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
