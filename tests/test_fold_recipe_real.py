"""``fold-layernorm-affine`` end to end on a real architecture: a pre-LN transformer (OPT).

OPT (``do_layer_norm_before``) normalises before each attention and each MLP, and those
LayerNorms feed only ``nn.Linear`` layers (MatMul + Add): the pass must fold every one of
them, and skip the final LayerNorm (its output is the graph's). A small OPT built from its
config with random weights has the same graph as a trained one; folding is exact, so the
artifact's outputs equal the captured model's up to float32 rounding. (The LayerNorms get a
non-trivial scale and bias, as training gives them: a fresh one is the identity, nothing to fold.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from compressor.cli import main
from compressor.model_io import load_onnx
from tests.ortutil import run_ort

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

LAYERS = 2
#: float32 unit roundoff; the fold reorders sums of ``hidden`` products per output.
EPS32 = 2.0**-24


def _expected_folds(graph) -> tuple[int, int]:
    """``(foldable, total)`` LayerNorms: foldable when every reader of the output is a MatMul/Gemm."""
    outputs = {v.name for v in graph.outputs}
    foldable = total = 0
    for node in graph:
        if node.op_type != "LayerNormalization":
            continue
        total += 1
        out = node.outputs[0]
        readers = [use.node.op_type for use in out.uses()]
        foldable += bool(readers) and out.name not in outputs and all(op in ("MatMul", "Gemm") for op in readers)
    return foldable, total


def test_fold_recipe_folds_every_pre_ln_layernorm_of_opt(tmp_path, capsys):
    hidden = 64
    config = transformers.OPTConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, ffn_dim=128, max_position_embeddings=64,
                                    word_embed_proj_dim=hidden, do_layer_norm_before=True)
    transformers.set_seed(0)
    model = transformers.OPTModel(config).eval()
    import torch

    with torch.no_grad():  # a trained LayerNorm's affine part is not the identity a fresh one has
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
    folder = tmp_path / "opt"
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 128, size=(8, 1, 16)).astype(np.int64)
    np.savez(tmp_path / "eval.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    out, dump = tmp_path / "out", tmp_path / "dump"
    code = main([str(folder), "--recipe", "fold", "--eval", str(tmp_path / "eval.npz"), "--latency-runs", "1",
                 "--dump-passes", str(dump), "-o", str(out)])
    assert code == 0, capsys.readouterr().err

    captured = load_onnx(dump / "00-input.onnx")
    before_fold = load_onnx(max(dump.glob("*fold-batchnorm.onnx")))
    foldable, total = _expected_folds(before_fold.graph)
    assert foldable == 2 * LAYERS and total == 2 * LAYERS + 1, (foldable, total)  # the final LN is the output
    manifest = json.loads((out / "manifest.json").read_text())
    stats = next(p for p in manifest["passes"] if p["name"] == "fold-layernorm-affine")["stats"]
    assert stats["ln_folded"] == foldable and stats["ln_skipped"] == total - foldable, stats

    artifact = load_onnx(out / "model.onnx")
    for node in artifact.graph:  # what was folded keeps its normalisation only: gamma 1, no beta
        if node.op_type == "LayerNormalization" and node.outputs[0].name not in {v.name for v in artifact.graph.outputs}:
            assert np.all(node.inputs[1].const_value.numpy() == 1) and (len(node.inputs) < 3 or node.inputs[2] is None)
    feeds = {"input_ids": ids[0], "attention_mask": np.ones_like(ids[0])}
    ref, got = run_ort(captured, feeds)[0], run_ort(artifact, feeds)[0]
    # Exact up to rounding: per output, a sum of `hidden` products reordered, through 2 LN-fed
    # layers per block (generous: 8 * hidden * eps * scale per layer).
    tolerance = 8 * hidden * EPS32 * np.abs(ref).max() * 2 * LAYERS
    assert np.abs(ref - got).max() <= tolerance, np.abs(ref - got).max()
