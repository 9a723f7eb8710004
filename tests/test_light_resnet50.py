"""``compress light_resnet50.onnx --recipe fold``: all 53 BatchNormalizations folded, outputs kept.

ONNX's test copy of ResNet-50 (opset 9, IR 3: every initializer also listed as a graph
input) builds its 239 weights with ConstantOfShape, all 0.02, so

* its softmax is flat (1000 equal logits): comparing it alone would pass whatever the
  folded network computed. The comparison adds the pre-softmax logits (the Gemm output)
  as a graph output of both models. They are ~1e19 and depend on every one of the 53
  folds (a wrong scale or shift anywhere changes them), so rtol 1e-3 is a real check.
* the conv weights are the same for every channel, so the logits cannot see a fold that
  mixes up channels. The first 14 BatchNormalizations have random per-channel statistics,
  so the output of the first Relu (stem Conv -> BN -> Relu) differs per channel; it is
  added as an output too, and checks the per-channel fold itself.

The reference is the unfolded file run by ONNX Runtime with graph optimisations off, so
that its BatchNormalizations really run as such (ONNX Runtime's default level fuses
Conv+BN itself, which would make both sides the same kind of computation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from compressor.cli import main

MODEL = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
INPUT = "gpu_0/data_0"


def _with_probes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` plus the first Relu's output and the logits as graph outputs."""
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    probes = [relu.output[0], gemm.output[0]]
    model.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in probes)
    return model, probes


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: x})


@pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is not shipped with this onnx build")
def test_fold_light_resnet50(tmp_path, capsys):
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((2, 1, 3, 224, 224)).astype(np.float32)  # 2 samples, one whole input each
    np.savez(tmp_path / "eval.npz", **{INPUT: samples})
    out = tmp_path / "out"

    code = main([str(MODEL), "--recipe", "fold", "--target", "onnx", "--eval", str(tmp_path / "eval.npz"),
                 "--latency-runs", "1", "-q", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err

    folded = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" not in ops
    assert "ConstantOfShape" not in ops
    assert ops.count("Conv") == 53
    assert [o.version for o in folded.opset_import if o.domain in ("", "ai.onnx")] == [9], "opset kept"
    assert [i.name for i in folded.graph.input] == [INPUT]
    manifest = json.loads((out / "manifest.json").read_text())
    bn = next(p for p in manifest["passes"] if p["name"] == "fold-batchnorm")
    assert bn["stats"]["bn_folded"] == 53 and bn["stats"]["bn_skipped"] == 0
    assert manifest["evaluation"]["samples"] == 2

    reference, probes = _with_probes(onnx.load(str(MODEL)))
    candidate, probes_after = _with_probes(folded)
    assert probes_after == probes, "the folded model keeps the probed value names"
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)  # not one of the eval samples
    want = _run(reference, x, optimize=False)
    got = _run(candidate, x, optimize=True)
    relu, logits = want[1], want[2]
    assert np.isfinite(logits).all() and np.abs(logits).min() > 1.0, "logits must be a non-trivial check"
    assert np.unique(relu.reshape(relu.shape[1], -1).mean(axis=1)).size > 1, "channels must differ"
    for name, w, g in zip(["softmax", f"first Relu ({probes[0]})", f"logits ({probes[1]})"], want, got):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4, err_msg=name)
