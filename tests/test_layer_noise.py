"""Each quantized layer's own noise from one tapped run (:mod:`compressor.flow.layer_noise`).

The tiny CNN and its quantization are those of ``tests/test_accuracy_control.py``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from compressor.data import load_npz
from compressor.flow.layer_noise import layer_noise, noise_model
from compressor.inputs import model_input_specs
from compressor.model_io import clone_model, model_bytes
from compressor.quant.revert import give_back
from tests.test_accuracy_control import LAYERS, _quantize, cnn, files  # noqa: F401  (files: the fixture)


def _outputs(model: ir.Model, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """``names`` of ``model`` on ``x``, with no graph optimization: ONNX Runtime's int8 fusions
    depend on which tensors are fetched, so only unfused graphs compute the same values."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes(model), opts, providers=["CPUExecutionProvider"]).run(names, {"x": x})


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layers_twin_computes_what_the_layer_computes_given_back(files, layer):
    """The twin reads what give_back gives the layer (float input, weight, bias before
    correction) on the same upstream values: its output is the given-back layer's output."""
    quantized = _quantize(files)
    tapped, taps = noise_model(quantized.model, quantized.quantization)
    (q_name, f_name), = taps[layer]
    x = np.random.default_rng(4).standard_normal((8, 4, 6, 6)).astype(np.float32)
    twin, = _outputs(tapped, x, [f_name])
    edited = give_back(clone_model(quantized.model), quantized.quantization, [layer])
    out = next(n for n in edited.graph if n.name == layer).outputs[0]
    edited.graph.outputs.append(out)
    given, = _outputs(edited, x, [out.name])
    np.testing.assert_allclose(twin, given, rtol=1e-6, atol=1e-6 * float(np.abs(given).max()))
    # the model's output and, per layer, a tap and a twin (fc2's tap is the model's output)
    assert len(tapped.graph.outputs) == 1 + 2 * len(LAYERS) - 1
    assert len(quantized.model.graph.outputs) == 1, "the quantized model is not changed"


def test_noise_is_the_relative_error_int8_adds(files):
    quantized = _quantize(files)
    data = load_npz(files["eval"], model_input_specs(cnn()))
    noise = layer_noise(quantized.model, quantized.quantization, data)
    assert list(noise) == LAYERS
    # 8-bit inputs and per-channel weights: each layer's own noise is far below 1% of its
    # output's energy (SQNR above 20 dB) and never zero.
    assert all(0 < n < 1e-2 for n in noise.values()), noise


def test_a_layer_quantized_on_a_coarser_grid_is_the_noisiest(files):
    """conv2's input pair gets a 16x larger step (4-bit-like): its noise ranks first."""
    quantized = _quantize(files)
    model = clone_model(quantized.model)
    conv2 = next(n for n in model.graph if n.name == "conv2")
    dq = conv2.inputs[0].producer()
    q = dq.inputs[0].producer()
    scale = dq.inputs[1]
    coarse = ir.tensor(scale.const_value.numpy() * 16, name=scale.name)
    scale.const_value = coarse
    assert q.inputs[1] is scale, "Q and DQ share the scale"
    data = load_npz(files["eval"], model_input_specs(cnn()))
    base = layer_noise(quantized.model, quantized.quantization, data)
    noise = layer_noise(model, quantized.quantization, data)
    assert max(noise, key=noise.get) == "conv2"
    # 16x the input's step is 256x its rounding noise energy; the weight's share is unchanged
    assert 10 * base["conv2"] < noise["conv2"] < 256 * base["conv2"]
