"""Statistics stage by stage (compressor/quant/staged.py): each node runs once, later changes are seen."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import pytest

from compressor.data import Dataset
from compressor.errors import DataError
from compressor.inputs import model_input_specs
from compressor.quant.staged import StagedStatistics
from compressor.quant.taps import StatPoint, run_points
from tests.ortutil import model_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _chain(side: bool = False) -> ir.Model:
    """``y = relu(relu(x W1) W2) W3``, one token axis and an attention mask; with ``side``
    an output head ``side = sigmoid(x W1)`` beside the chain."""
    rng = np.random.default_rng(0)
    head = (", float[N,3,8] side", "side = Sigmoid(a)") if side else ("", "")
    return model_from_text(f"""{HEADER}
    g (float[N,3,8] x, int64[N,3] attention_mask) => (float[N,3,4] y{head[0]}) {{
      a = MatMul(x, w1)
      {head[1]}
      h1 = Relu(a)
      b = MatMul(h1, w2)
      h2 = Relu(b)
      y = MatMul(h2, w3)
    }}""", w1=rng.standard_normal((8, 8)).astype(np.float32), w2=rng.standard_normal((8, 8)).astype(np.float32),
        w3=rng.standard_normal((8, 4)).astype(np.float32))


def _data(model: ir.Model, samples: int = 10) -> Dataset:
    rng = np.random.default_rng(1)
    arrays = {"x": rng.standard_normal((samples, 3, 8)).astype(np.float32),
              "attention_mask": (rng.random((samples, 3)) > 0.3).astype(np.int64)}
    arrays["attention_mask"][:, 0] = 1
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays.values())).hexdigest()
    return Dataset(arrays, model_input_specs(model), {k: False for k in arrays}, None, "test", digest)


def _point(name: str) -> StatPoint:
    return StatPoint(name, "moments", -1, gram=True)


def test_staged_requests_equal_one_run_and_run_each_node_once():
    """Unchanged model: three requests give the one-run runner's moments (padding excluded), each node runs once."""
    model = _chain()
    data = _data(model)
    names = ("x", "h1", "h2")
    whole = run_points(model, data, [_point(n) for n in names])
    staged = StagedStatistics(model, data)
    for name in names:
        got = staged.collect([_point(name)])[_point(name)]
        ref = whole[_point(name)]
        np.testing.assert_allclose(got.gram, ref.gram, rtol=1e-6)
        np.testing.assert_allclose(got.total, ref.total, rtol=1e-6)
        assert got.count == ref.count == int(data.arrays["attention_mask"].sum())
    assert staged.summary.startswith("3 stages, 4 nodes run once")  # a, h1, b, h2; the last MatMul never


def test_a_change_before_a_stage_runs_is_seen():
    """Case 2: after the request for ``h1``, ``w2`` changes; the request for ``h2`` sees ``relu(h1 W2')``."""
    model = _chain()
    data = _data(model)
    staged = StagedStatistics(model, data)
    staged.collect([_point("h1")])
    new = np.zeros((8, 8), np.float32)
    new[0, 0] = 2.0
    model.graph.initializers["w2"].const_value = ir.tensor(new, name="w2")
    got = staged.collect([_point("h2")])[_point("h2")]
    x, mask = data.arrays["x"].astype(np.float64), data.arrays["attention_mask"].astype(bool)
    w1 = model.graph.initializers["w1"].const_value.numpy().astype(np.float64)
    h2 = np.maximum(np.maximum(x @ w1, 0) @ new.astype(np.float64), 0)[mask]
    np.testing.assert_allclose(got.gram, h2.T @ h2, rtol=1e-5, atol=1e-6)


def test_a_model_failing_on_the_data_is_exit_2():
    model = _chain()
    rng = np.random.default_rng(2)
    arrays = {"x": rng.standard_normal((4, 3, 5)).astype(np.float32), "attention_mask": np.ones((4, 3), np.int64)}
    data = Dataset(arrays, model_input_specs(model), {k: False for k in arrays}, None, "bad.npz", "0")
    with pytest.raises(DataError, match=r"calibration: the model fails in ONNX Runtime on the calibration data "
                                        r"\(bad.npz\)"):
        StagedStatistics(model, data).collect([_point("h1")])


def test_only_what_the_later_requests_need_is_held():
    """An output head reads ``a`` beside the chain: with the later requests named, ``a`` is not
    held for every calibration batch after the request for ``h1`` (it was, for nothing)."""
    model = _chain(side=True)
    data = _data(model)
    h2 = next(v for node in model.graph for v in node.outputs if v.name == "h2")
    everything, named = StagedStatistics(model, data), StagedStatistics(model, data)
    everything.collect([_point("h1")])
    named.collect([_point("h1")], later=[h2])
    assert set(everything._held[0]) == {"a", "h1"} and set(named._held[0]) == {"h1"}
    whole = run_points(model, data, [_point("h2")])[_point("h2")]
    np.testing.assert_allclose(named.collect([_point("h2")], later=[])[_point("h2")].gram, whole.gram, rtol=1e-6)
    assert named._held == [{} for _ in named._held]
