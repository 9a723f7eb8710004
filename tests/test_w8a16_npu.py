"""``--recipe w8a16-npu --target qnn-htp`` end to end on the bundled digits CNN.

What the recipe promises (``recipes/w8a16-npu.yaml``): int8 symmetric weights, uint16
activations on every tensor, int32 biases, and a model the HTP runs wholly (CPU fallback
disabled), within the recipe's accuracy budget.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMPUTE = ("Conv", "Gemm", "MatMul")


def _qnn_available() -> str | None:
    from compressor.targets import get_target

    try:
        get_target("qnn-htp")
    except Exception as err:  # onnxruntime-qnn missing: the target says what to install
        return str(err)
    return None


def test_w8a16_npu_on_qnn_htp(tmp_path, capsys):
    why = _qnn_available()
    if why:
        pytest.skip(why)
    out = tmp_path / "art"
    code = main([str(EXAMPLES / "digits_cnn.pt2"), "--recipe", "w8a16-npu", "--target", "qnn-htp",
                 "--input", "images=1x1x8x8", "--calib", str(EXAMPLES / "digits_calib.npz"),
                 "--eval", str(EXAMPLES / "digits_eval.npz"), "--latency-runs", "1", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gate"]["passed"] is True, manifest["gate"]
    assert manifest["qnn_htp"]["ran_wholly_on_htp"] is True and manifest["qnn_htp"]["float_nodes"] == []
    if platform.machine().lower() in ("x86_64", "amd64"):  # the HTP library emulates the NPU there
        assert manifest["latency"]["compressed_note"] == "HTP emulated on this x86 CPU: not the device's latency"
    # The device's constant error per class went into the classifier's int32 bias (measured on HTP).
    (correction,) = [p for p in manifest["passes"] if p["name"] == "device-bias-correction"]
    assert correction["modified"] and correction["stats"]["outputs_corrected"] == 1, correction["stats"]

    model = onnx.load(out / "model.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    # Every activation quantizer is uint16.
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers and all(inits[n.input[2]].dtype == np.uint16 for n in quantizers), \
        {n.name: inits[n.input[2]].dtype for n in quantizers}
    # Every compute node reads dequantized inputs: int8 symmetric weights, int32 biases.
    compute = [n for n in model.graph.node if n.op_type in COMPUTE]
    assert compute
    for node in compute:
        dqs = [producer.get(name) for name in node.input if name]
        assert all(dq is not None and dq.op_type == "DequantizeLinear" for dq in dqs), node.name
        weight = inits[dqs[1].input[0]]
        assert weight.dtype == np.int8 and not inits[dqs[1].input[2]].any(), node.name  # symmetric: zero point 0
        if len(dqs) > 2:
            assert inits[dqs[2].input[0]].dtype == np.int32, node.name
