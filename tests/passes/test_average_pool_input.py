"""``quantize`` on ``openvino``: an average pool of a convolution's output reads it through a pair.

NNCF places a FakeQuantize before a ResNet's global AvgPool: the CPU plugin then folds it into
the last block's convolution (u8 output) and pools on u8. Without it that block wrote f32 and
the pool ran f32 (ResNet-50 on an AMX Xeon, float layers in f32: docs/design.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.ortutil import model_from_text, run_ort
from tests.passes.test_pair_site import _quantize, _runtime
from tests.passes.test_quantize import HEADER, _activation_source, _clone, _dataset, _node, _normal, _w

pytest.importorskip("openvino", reason="the openvino package is not installed")

C, K = 8, 5


def pooled_head(rng: np.random.Generator, pool: str, source: str = "conv"):
    """``source`` (a Conv + Relu, or the graph input itself) -> ``pool`` -> Flatten -> Gemm."""
    body = ("[conv] c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)\n      [act] a = Relu(c)" if source == "conv"
            else "[act] a = Relu(x)")
    attrs = " <kernel_shape = [8, 8]>" if pool == "AveragePool" else ""
    return model_from_text(f"""{HEADER}
    g (float[1,{C},8,8] x) => (float[1,{K}] y) {{
      {body}
      [pool] p = {pool}{attrs}(a)
      [flatten] f = Flatten(p)
      [fc] y = Gemm <transB = 1> (f, w2, b2)
    }}""", w1=_w(rng, C, C, 3, 3, fan_in=9 * C), b1=_w(rng, C) * 0.1, w2=_w(rng, K, C, fan_in=C),
        b2=_w(rng, K) * 0.1)


@pytest.mark.parametrize("pool", ["GlobalAveragePool", "AveragePool"])
def test_a_pool_of_a_convolution_runs_on_u8(tmp_path, pool):
    model = pooled_head(np.random.default_rng(0), pool)
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    quantized = _quantize(_clone(model), calib).model
    assert _activation_source(_node(quantized, "pool").inputs[0]).name == "a"  # the pool's own pair
    assert _activation_source(_node(quantized, "flatten").inputs[0]).name == "p"  # the Gemm's, moved up
    runner, layers = _runtime(quantized, tmp_path / "ov")
    pools = [v for v in layers.values() if "pool" in v[2].split(",")]  # AvgPool: Pooling, a global one: Reduce
    assert pools and all(precision in ("u8", "i8") for _, precision, _ in pools), pools
    assert all(layer["int8"] for layer in runner.layer_precisions()), runner.layer_precisions()
    # within a few steps of the output's int8 scale of fp32 (three roundings on the way: the
    # Conv's input, the pool's input, the Gemm's input), as the other openvino placements
    x = _normal(7, 1, C, 8, 8)
    reference = run_ort(model, {"x": x})[0]
    step = float(np.abs(reference).max()) / 127
    assert np.abs(runner({"x": x})[0] - reference).max() < 8 * step


def test_a_pool_of_the_graph_input_gets_no_pair_of_its_own(tmp_path):
    """No convolution to fold a FakeQuantize into: a pair there would only add a rounding."""
    model = pooled_head(np.random.default_rng(1), "GlobalAveragePool", source="input")
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    quantized = _quantize(_clone(model), calib).model
    assert _node(quantized, "pool").inputs[0].name == "a"
    assert _activation_source(_node(quantized, "flatten").inputs[0]).name == "p"


def test_a_squeeze_excite_pool_beside_a_float_reader_gets_no_pair_of_its_own(tmp_path):
    """The pooled tensor is also read by the block's float ``Mul``: a pair on the pool's input
    could not fold into the convolution (its output stays f32 for the Mul) and would run as a
    FakeQuantize of its own."""
    rng = np.random.default_rng(2)
    model = model_from_text(f"""{HEADER}
    g (float[1,{C},8,8] x) => (float[1,{C},8,8] y) {{
      [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      [act] a = Relu(c)
      [pool] p = GlobalAveragePool(a)
      [squeeze] q = Conv(p, w2, b2)
      [gate] s = Sigmoid(q)
      [excite] e = Mul(a, s)
      [conv2] y = Conv <pads = [1, 1, 1, 1]> (e, w3, b3)
    }}""", w1=_w(rng, C, C, 3, 3, fan_in=9 * C), b1=_w(rng, C) * 0.1, w2=_w(rng, C, C, 1, 1, fan_in=C),
        b2=_w(rng, C) * 0.1, w3=_w(rng, C, C, 3, 3, fan_in=9 * C), b3=_w(rng, C) * 0.1)
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    quantized = _quantize(_clone(model), calib).model
    assert _node(quantized, "pool").inputs[0].name == "a"
    assert _activation_source(_node(quantized, "squeeze").inputs[0]).name == "p"  # the 1x1 Conv's own pair


@pytest.mark.parametrize("include", [1, 0])
def test_an_average_pool_that_counts_padding_gets_no_pair_of_its_own(tmp_path, include):
    """A signed input (no Relu: the u8 zero point is not 0) and pads counted in the means: the
    plugin would pad the integers with 0, not the zero point, and move every border mean.
    Without ``count_include_pad`` the pads are not in the means and the pair is fine."""
    rng = np.random.default_rng(3)
    model = model_from_text(f"""{HEADER}
    g (float[1,{C},8,8] x) => (float[1,{C},8,8] y) {{
      [conv] c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      [pool] p = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = {include}> (c)
      [conv2] y = Conv <pads = [1, 1, 1, 1]> (p, w2, b2)
    }}""", w1=_w(rng, C, C, 3, 3, fan_in=9 * C), b1=_w(rng, C) * 0.1, w2=_w(rng, C, C, 3, 3, fan_in=9 * C),
        b2=_w(rng, C) * 0.1)
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    quantized = _quantize(_clone(model), calib).model
    if include:
        assert _node(quantized, "pool").inputs[0].name == "c"
    else:
        assert _activation_source(_node(quantized, "pool").inputs[0]).name == "c"
    runner, _ = _runtime(quantized, tmp_path / "ov")
    x = _normal(7, 1, C, 8, 8)
    reference = run_ort(model, {"x": x})[0]
    step = float(np.abs(reference).max()) / 127
    assert np.abs(runner({"x": x})[0] - reference).max() < 8 * step

