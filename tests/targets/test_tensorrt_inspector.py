"""The engine-layer summary against what TensorRT's inspector really emits (GPU only).

``test_tensorrt.py`` reads a hand-written inspector JSON; this test builds the int8 digits
engine and holds :func:`summarize_engine_layers` to the inspector's real output: the keys
it reads exist there, and every Conv/Gemm the QDQ model quantizes is inside a compute
layer the summary counts as int8 (explicit quantization makes TensorRT run a layer fused
with its Q/DQ in int8). Skipped where no engine can be built.
"""

from __future__ import annotations

import json
from pathlib import Path

import compressor.targets.tensorrt.engine as engine_module
import onnx_ir as ir
import pytest
from compressor.targets.tensorrt.engine import summarize_engine_layers, tensorrt_status

from compressor.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HAVE_TRT, WHY = tensorrt_status()

pytestmark = pytest.mark.skipif(not HAVE_TRT, reason=f"no TensorRT engine can be built here: {WHY}")


def test_summary_reads_the_real_inspector_output(tmp_path, monkeypatch, capsys):
    raw: list[str] = []

    def recording(info, log=()):
        raw.append(info)
        return summarize_engine_layers(info, log)

    monkeypatch.setattr(engine_module, "summarize_engine_layers", recording)
    out = tmp_path / "art"
    code = main([str(EXAMPLES / "digits_cnn.pt2"), "--target", "tensorrt", "--recipe", "int8",
                 "--calib", str(EXAMPLES / "digits_calib.npz"), "--eval", str(EXAMPLES / "digits_eval.npz"),
                 "--latency-runs", "1", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert raw, "no engine was inspected"
    data = json.loads(raw[-1])  # the int8 artifact's engine (the fp32 baseline's comes first)
    assert isinstance(data.get("Layers"), list) and data["Layers"], data
    for layer in data["Layers"]:
        assert isinstance(layer, dict) and {"Name", "LayerType"} <= set(layer), layer  # DETAILED verbosity
    summary = summarize_engine_layers(raw[-1])
    compute = [layer for layer in summary["per_layer"] if layer["compute"]]
    assert compute and all(layer["tactic"] for layer in compute), compute
    model = ir.load(out / "model.onnx")
    quantized = [n.name for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")
                 and any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                         for v in n.inputs[:2])]
    assert quantized
    int8_names = " | ".join(layer["name"] for layer in compute if layer["int8"])
    missing = [name for name in quantized if name not in int8_names]
    assert not missing, f"quantized layers not in an int8 engine layer: {missing}; engine layers: {compute}"
