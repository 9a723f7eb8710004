"""The one tapped-model runner (compressor/quant/taps.py): one run per (model, data) state."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import onnxruntime as ort
import pytest
from compressor.targets import get_target

from compressor.data import Dataset
from compressor.inputs import model_input_specs
from compressor.pipeline import PassContext, build_pass
from compressor.quant.taps import StatPoint, gather
from tests.ortutil import model_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
BATCHES = 4  # 16 samples, batch axis fixed at 4


def _mlp() -> ir.Model:
    """With its intermediate types inferred, as the pass manager leaves a model."""
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[4,8] x) => (float[4,4] y) {{
      m = MatMul(x, w1)
      h = Add(m, b1)
      r = Relu(h)
      y = MatMul(r, w2)
    }}""", w1=rng.standard_normal((8, 8)).astype(np.float32), b1=np.full(8, 0.1, np.float32),
        w2=rng.standard_normal((8, 4)).astype(np.float32))
    onnx_ir.passes.common.ShapeInferencePass()(model)
    return model


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


@pytest.fixture
def runs(monkeypatch):
    """Counts ONNX Runtime sessions opened and passes over the calibration data (4 batches each)."""
    seen = {"sessions": 0, "passes": 0}
    batches = []

    class Counted(ort.InferenceSession):
        def __init__(self, *args, **kwargs):
            seen["sessions"] += 1
            super().__init__(*args, **kwargs)

        def run(self, *args, **kwargs):
            batches.append(1)
            seen["passes"] = len(batches) / BATCHES
            return super().run(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Counted)
    return seen


def _data(model: ir.Model) -> Dataset:
    x = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    return Dataset({"x": x}, model_input_specs(model), {"x": False}, None, "test", "taps-mlp")


def test_sparsify_then_quantize_is_one_run_per_model_state(runs):
    """Wanda + bias correction on the dense model: one run; quantize (ranges and bias means) on
    the sparse model: one run. Re-runs (accuracy control, sweep levels) on the same states: none."""
    dense = _mlp()
    data = _data(dense)
    ctx = PassContext(target=get_target("onnx"), calibration=data, properties={"constants-folded"})
    sparsify = build_pass("sparsify-nm", {"mask": "wanda", "bias_correction": True})
    quantize = build_pass("quantize", {"bias_correction": True})
    sparse = sparsify.run(_clone(dense), ctx)
    assert sparse.stats["bias_corrected"] == 2
    assert runs == {"sessions": 1, "passes": 1}
    quantized = quantize.run(_clone(sparse.model), ctx)
    assert quantized.stats["bias_corrected"] == 2 and quantized.stats["layers_quantized"] == 2
    assert runs == {"sessions": 2, "passes": 2}
    # the same states again: everything from the cache
    build_pass("sparsify-nm", {"n": 1, "mask": "wanda", "bias_correction": True}).run(_clone(dense), ctx)
    quantize.run(_clone(sparse.model), ctx)
    assert runs == {"sessions": 2, "passes": 2}


def test_points_are_shared_across_passes_on_one_state(runs):
    """A range with a channel axis (SmoothQuant's) answers a plain range (quantize's); moments
    with a Gram matrix (SparseGPT's) answer moments without (Wanda's, bias correction's);
    only what is missing runs, all of it in one session."""
    model = _mlp()
    data = _data(model)
    cache: dict = {}
    first = gather(model, data, [StatPoint("r", "range", -1), StatPoint("x", "moments", -1, gram=True)], cache)
    assert runs == {"sessions": 1, "passes": 1}
    again = gather(_clone(model), data, [StatPoint("r"), StatPoint("x", "moments", -1)], cache)
    assert runs == {"sessions": 1, "passes": 1}
    assert again[StatPoint("r")] is first[StatPoint("r", "range", -1)]
    assert again[StatPoint("x", "moments", -1)].gram is not None
    gather(model, data, [StatPoint("r"), StatPoint("h"), StatPoint("m", "moments", -1)], cache)
    assert runs == {"sessions": 2, "passes": 2}
    # another model state is another key
    changed = _clone(model)
    changed.graph.initializers["b1"].const_value = ir.tensor(np.zeros(8, np.float32), name="b1")
    gather(changed, data, [StatPoint("r")], cache)
    assert runs == {"sessions": 3, "passes": 3}


def test_missing_tensor_names_the_nearest():
    model = _mlp()
    with pytest.raises(Exception, match=r"no tensor 'hh' \(did you mean 'h'"):
        gather(model, _data(model), [StatPoint("hh")], {})
