"""Benchmark: INT8 CNNs on OpenVINO CPU, compressor vs NNCF, in one run.

Rows:
* digits CNN (examples/, batch 64): OpenVINO fp32, NNCF int8 (its defaults, the same 256
  calibration samples) and compressor int8 -> openvino; top-1 on the held-out eval set and
  latency.
* ResNet-50 (the onnx wheel's light_resnet50.onnx, batch 1, 224x224; its weights are
  constants, so speed only): OpenVINO fp32, NNCF int8, compressor int8, with quantize time.

Latencies are medians of interleaved runs in one process, in f32 and, where the CPU
plugin's default float precision is not f32 (bf16 on AVX512-BF16/AMX CPUs), also in that
default (what a model compiled with no config gets); the header says which the device uses.

    python tools/bench_cnn.py [--out bench-out/cnn]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
from bench_minilm import (  # tools/ is on sys.path as a script
    cpu_line,
    device_columns,
    device_header,
    time_interleaved,
)

ROOT = Path(__file__).resolve().parents[1]
RESNET = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"


def _top1(run, images: np.ndarray, labels: np.ndarray) -> float:
    logits = np.concatenate([run({"images": images[i:i + 64]})[0] for i in range(0, len(images), 64)])
    return float((logits.argmax(1) == labels).mean())


def digits(out: Path) -> list[list[str]]:
    import nncf
    import openvino as ov
    from compressor.targets.openvino import OpenVinoRunner

    from compressor.capture import capture
    from compressor.flow.compress import compress
    from compressor.model_io import save_model

    save_model(capture(ROOT / "examples/digits_cnn.pt2").model, out / "digits.onnx")
    ov.save_model(ov.convert_model(str(out / "digits.onnx")), str(out / "digits_fp32.xml"), compress_to_fp16=False)
    result = compress(out / "digits.onnx", recipe="int8", outdir=out / "digits_int8", target="openvino",
                      calib=ROOT / "examples/digits_calib.npz", eval_data=ROOT / "examples/digits_eval.npz",
                      latency_runs=1)
    quant_s = next(r["seconds"] for r in result.manifest["passes"] if r["name"] == "quantize")
    # NNCF's default on the same 256 calibration samples (as the CLI run's), beside ours
    calib = np.load(ROOT / "examples/digits_calib.npz")["images"]
    start = time.perf_counter()
    q = nncf.quantize(ov.convert_model(str(out / "digits.onnx")),
                      nncf.Dataset([{"images": calib[i:i + 1]} for i in range(len(calib))]), subset_size=len(calib))
    nncf_s = time.perf_counter() - start
    ov.save_model(q, str(out / "digits_nncf.xml"), compress_to_fp16=False)
    ev = np.load(ROOT / "examples/digits_eval.npz")
    xmls = {"fp32": out / "digits_fp32.xml", "nncf": out / "digits_nncf.xml", "int8": out / "digits_int8/model.xml"}
    acc = {k: _top1(OpenVinoRunner(x), ev["images"], ev["labels"]) for k, x in xmls.items()}
    ms = time_interleaved(xmls, {"images": ev["images"][:64]}, 200)
    return [["digits CNN, OpenVINO fp32", f"{ms['fp32']:.3f}", "1.00x", *device_columns(ms, "fp32", "fp32"),
             f"{acc['fp32'] * 100:.2f}", "-", "-"],
            ["digits CNN, NNCF int8 -> OpenVINO", f"{ms['nncf']:.3f}", f"{ms['fp32'] / ms['nncf']:.2f}x",
             *device_columns(ms, "nncf", "fp32"), f"{acc['nncf'] * 100:.2f}",
             f"{(acc['fp32'] - acc['nncf']) * 100:+.2f}", f"{nncf_s:.2f}"],
            ["digits CNN, compressor int8 -> openvino", f"{ms['int8']:.3f}", f"{ms['fp32'] / ms['int8']:.2f}x",
             *device_columns(ms, "int8", "fp32"), f"{acc['int8'] * 100:.2f}",
             f"{(acc['fp32'] - acc['int8']) * 100:+.2f}", f"{quant_s:.2f}"]]


def resnet(out: Path) -> list[list[str]]:
    import nncf
    import openvino as ov

    from compressor.flow.compress import compress

    rng = np.random.default_rng(0)
    calib = rng.random((64, 1, 3, 224, 224), dtype=np.float32)
    np.savez(out / "resnet_calib.npz", **{"gpu_0/data_0": calib})
    fp32 = ov.convert_model(str(RESNET))
    ov.save_model(fp32, str(out / "resnet_fp32.xml"), compress_to_fp16=False)
    start = time.perf_counter()
    q = nncf.quantize(ov.convert_model(str(RESNET)), nncf.Dataset([{"gpu_0/data_0": c} for c in calib]),
                      subset_size=len(calib))
    nncf_s = time.perf_counter() - start
    ov.save_model(q, str(out / "resnet_nncf.xml"), compress_to_fp16=False)
    result = compress(RESNET, recipe="int8", outdir=out / "resnet_int8", target="openvino",
                      calib=out / "resnet_calib.npz", latency_runs=1)
    quant_s = next(r["seconds"] for r in result.manifest["passes"] if r["name"] == "quantize")
    xmls = {"fp32": out / "resnet_fp32.xml", "nncf": out / "resnet_nncf.xml", "ours": out / "resnet_int8/model.xml"}
    ms = time_interleaved(xmls, {"gpu_0/data_0": calib[0]}, 30)
    return [["ResNet-50, OpenVINO fp32", f"{ms['fp32']:.1f}", "1.00x", *device_columns(ms, "fp32", "fp32"),
             "-", "-", "-"],
            ["ResNet-50, NNCF int8 -> OpenVINO", f"{ms['nncf']:.1f}", f"{ms['fp32'] / ms['nncf']:.2f}x",
             *device_columns(ms, "nncf", "fp32"), "-", "-", f"{nncf_s:.1f}"],
            ["ResNet-50, compressor int8 -> openvino", f"{ms['ours']:.1f}", f"{ms['fp32'] / ms['ours']:.2f}x",
             *device_columns(ms, "ours", "fp32"), "-", "-", f"{quant_s:.1f}"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/cnn"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = digits(args.out) + resnet(args.out)
    device_line, device_cols = device_header("ms")
    header = ["system", "ms", "vs OV fp32", *device_cols, "top-1 %", "top-1 drop (points)",
              "quantize s (ours: the quantize pass; NNCF: nncf.quantize)"]
    print(f"{cpu_line()}\n{device_line}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join("| " + " | ".join(r) + " |" for r in rows))


if __name__ == "__main__":
    main()
