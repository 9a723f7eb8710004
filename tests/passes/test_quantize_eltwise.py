"""``quantize`` on residual joins (``eltwise``): both Add inputs through Q/DQ for OpenVINO."""

from __future__ import annotations

import numpy as np
import pytest
from compressor.targets import get_target

from compressor.pipeline import PassContext, build_pass
from tests.ortutil import model_from_text, run_ort
from tests.passes.test_quantize import (
    HEADER,
    _activation_source,
    _clone,
    _cosine,
    _dataset,
    _node,
    _normal,
    _w,
)

pytest.importorskip("openvino", reason="the openvino package is not installed")

C = 8


def residual_block(rng: np.random.Generator):
    """x -> Conv -> Relu -> Conv -> Add(., x) -> Relu -> Conv, plus an Add of a constant."""
    return model_from_text(f"""{HEADER}
    g (float[N,{C},8,8] x) => (float[N,{C},8,8] y) {{
      [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      r1 = Relu(c1)
      [conv2] c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
      [residual] s = Add(c2, x)
      r2 = Relu(s)
      [conv3] c3 = Conv <pads = [1, 1, 1, 1]> (r2, w3, b3)
      [shift] y = Add(c3, offset)
    }}""", w1=_w(rng, C, C, 3, 3, fan_in=9 * C), b1=_w(rng, C) * 0.1, w2=_w(rng, C, C, 3, 3, fan_in=9 * C),
        b2=_w(rng, C) * 0.1, w3=_w(rng, C, C, 3, 3, fan_in=9 * C), b3=_w(rng, C) * 0.1,
        offset=np.full((1, C, 1, 1), 0.5, np.float32))


def _quantize_for_openvino(model, calib, **options):
    ctx = PassContext(target=get_target("openvino"), calibration=calib)
    folded = build_pass("fold-constants", None).run(model, ctx)
    ctx.properties.add("constants-folded")
    return build_pass("quantize", options).run(folded.model, ctx)


def test_residual_add_gets_both_inputs_quantized(tmp_path):
    model = residual_block(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 32, C, 8, 8)})
    result = _quantize_for_openvino(_clone(model), calib)
    q = result.model
    assert result.stats["layers"] == ["conv1", "conv2", "residual", "conv3"]
    residual = _node(q, "residual")
    assert [_activation_source(v).name for v in residual.inputs] == ["c2", "x"]
    # x feeds conv1 and the residual: one Q/DQ pair, shared.
    assert residual.inputs[1] is _node(q, "conv1").inputs[0]
    # An Add of a constant is no join: untouched, and not reported as a skipped layer.
    shift = _node(q, "shift")
    assert shift.inputs[0].name == "c3" and shift.inputs[1].producer() is None
    assert "shift" not in result.stats["skipped_layers"]

    feeds = {"x": _normal(2, 8, C, 8, 8)}
    ref = run_ort(model, feeds)[0]
    target = get_target("openvino")
    run = target.runner(target.lower(q, tmp_path / "ov"))
    assert _cosine(ref, run(feeds)[0]) >= 0.999
    convs = [layer for layer in run.layer_precisions() if layer["type"] == "Convolution"]
    assert len(convs) == 3 and all(layer["int8"] for layer in convs), convs


def test_eltwise_off_keeps_the_join_float_and_says_so(tmp_path):
    model = residual_block(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    result = _quantize_for_openvino(_clone(model), calib, eltwise=False)
    assert result.stats["layers"] == ["conv1", "conv2", "conv3"]
    assert result.stats["skipped_layers"] == {"residual": "join of activations (eltwise is off)"}
    residual = _node(result.model, "residual")
    assert residual.inputs[0].name == "c2" and residual.inputs[1].name == "x"


def test_a_transformer_residual_is_not_a_convolution_join(tmp_path):
    """OpenVINO fuses a quantized Add only into the convolution producing one input; the
    residual add after ``MatMul + bias`` (BERT's) stays float and is not reported."""
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[N,6,{C}] x) => (float[N,6,{C}] y) {{
      [dense] h0 = MatMul(x, w)
      h = Add(h0, b)
      [residual] s = Add(h, x)
      y = LayerNormalization <axis = -1> (s, gamma, beta)
    }}""", w=_w(rng, C, C), b=_w(rng, C) * 0.1, gamma=np.ones(C, np.float32), beta=np.zeros(C, np.float32))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, 6, C)})
    result = _quantize_for_openvino(_clone(model), calib)
    assert result.stats["layers"] == ["dense"]
    assert "residual" not in result.stats["skipped_layers"]
    assert [v.name for v in _node(result.model, "residual").inputs] == ["h", "x"]
