"""The one Q/DQ writer (``compressor/quant/qdq.py``): graph form, names, and the opset rule."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from compressor.targets.onnx import ort_session

from compressor.model_io import to_proto
from compressor.quant.qdq import WIDE_OPSET, QdqWriter
from compressor.quant.spec import QuantSpec
from tests.ortutil import model_from_text

REDUCE = '''<ir_version: 8, opset_import: ["" : 13]>
g (float[2,6] x) => (float[2,1] y) {
  r = Relu(x)
  y = ReduceMin <axes = [1], keepdims = 1> (r)
}'''


def _quantize_relu_input(dtype: type, text: str = REDUCE) -> ir.Model:
    model = model_from_text(text)
    writer = QdqWriter(model.graph)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.replace_input_with(0, writer.pair(relu.inputs[0], np.float32(1 / 64), np.asarray(0, dtype)))
    return writer.finish(model)


def test_pair_form_and_names():
    model = _quantize_relu_input(np.uint8)
    q, dq = [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert (q.name, dq.name, dq.outputs[0].name) == ("x_QuantizeLinear", "x_DequantizeLinear", "x_dequantized")
    assert q.inputs[1] is dq.inputs[1] and q.inputs[2] is dq.inputs[2]  # one scale, one zero point
    assert dq.outputs[0].shape == model.graph.inputs[0].shape
    assert model.opset_imports[""] == 13  # 8-bit Q/DQ: no upgrade


def test_16_bit_pair_converts_the_model_to_opset_21():
    """``ReduceMin``'s ``axes`` is an input from opset 18: the writer converts the op, not only the number."""
    model = _quantize_relu_input(np.uint16)
    assert model.opset_imports[""] == WIDE_OPSET
    reduce_min = next(n for n in model.graph if n.op_type == "ReduceMin")
    assert "axes" not in reduce_min.attributes and len(reduce_min.inputs) == 2
    x = np.random.default_rng(0).uniform(-1, 1, (2, 6)).astype(np.float32)
    (y,) = ort_session(model).run(None, {"x": x})
    expected = np.maximum(np.clip(np.rint(x * 64), 0, 65535) / 64, 0).min(axis=1, keepdims=True)
    np.testing.assert_allclose(y, expected, atol=1e-7)


@pytest.mark.parametrize("opset", [13, 17])
def test_16_bit_pair_keeps_a_graph_the_converter_would_not_change(opset):
    """Where no op changes form up to opset 21, only the number changes: the nodes are the writer's own."""
    text = f'''<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2,6] x) => (float[2,6] y) {{
      y = Relu(x)
    }}'''
    wide = _quantize_relu_input(np.uint16, text)
    assert wide.opset_imports[""] == WIDE_OPSET
    narrow = _quantize_relu_input(np.uint8, text)
    assert [n.op_type for n in wide.graph] == [n.op_type for n in narrow.graph]
    assert len(to_proto(wide).graph.value_info) == len(to_proto(narrow).graph.value_info)


def test_activation_pair_is_written_once_per_tensor_and_spec():
    """Every reader of a tensor shares its pair for one spec (quantize and give_back both rely
    on it); another spec is another pair."""
    model = model_from_text('''<ir_version: 8, opset_import: ["" : 13]>
    g (float[2,6] x) => (float[2,6] y) {
      a = Relu(x)
      b = Sigmoid(x)
      y = Add(a, b)
    }''')
    writer = QdqWriter(model.graph)
    x = model.graph.inputs[0]
    u8, u16 = QuantSpec("uint8", False, None), QuantSpec("uint16", False, None)
    first, again = writer.activation(x, u8, -1.0, 1.0), writer.activation(x, u8, -1.0, 1.0)
    wide = writer.activation(x, u16, -1.0, 1.0)
    assert first is again and wide is not first
    relu, sigmoid, _ = model.graph
    relu.replace_input_with(0, first)
    sigmoid.replace_input_with(0, wide)
    model = writer.finish(model)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph) == 2
    assert model.opset_imports[""] == WIDE_OPSET


def test_a_second_writer_names_its_nodes_apart_from_the_first_writers():
    """give_back widens one reader of a tensor whose 8-bit pair another reader keeps: its
    writer is a second one on the graph, and its ``x_QuantizeLinear`` duplicated the node
    name quantize's writer gave (ONNX Runtime: "two nodes with same node name"; ddddocr's
    detector on qnn-htp under accuracy control)."""
    model = model_from_text('''<ir_version: 8, opset_import: ["" : 13]>
    g (float[2,6] x) => (float[2,6] y) {
      a = Relu(x)
      b = Sigmoid(x)
      y = Add(a, b)
    }''')
    u8, u16 = QuantSpec("uint8", False, None), QuantSpec("uint16", False, None)
    relu, sigmoid, _ = model.graph
    first = QdqWriter(model.graph)
    narrow = first.activation(model.graph.inputs[0], u8, -1.0, 1.0)
    relu.replace_input_with(0, narrow)
    sigmoid.replace_input_with(0, narrow)
    model = first.finish(model)
    second = QdqWriter(model.graph)
    sigmoid.replace_input_with(0, second.activation(model.graph.inputs[0], u16, -1.0, 1.0))
    model = second.finish(model)
    names = [n.name for n in model.graph if n.name]
    assert len(names) == len(set(names)) and "x_QuantizeLinear" in names, names
    x = np.random.default_rng(0).uniform(-1, 1, (2, 6)).astype(np.float32)
    (y,) = ort_session(model).run(None, {"x": x})
    np.testing.assert_allclose(y, np.maximum(x, 0) + 1 / (1 + np.exp(-x)), atol=2 / 255)  # an 8-bit step of [-1, 1]


def test_weight_is_stored_quantized_with_its_error_and_sizes():
    """``DQ(Wq) − W`` is within half a quantization step of each output channel; the sizes are
    the float and the int8 arrays'."""
    model = model_from_text('''<ir_version: 8, opset_import: ["" : 13]>
    g (float[2,6] x) => (float[2,4] y) {
      y = MatMul(x, w)
    }''', w=np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    writer = QdqWriter(model.graph)
    w = model.graph.initializers["w"]
    spec = QuantSpec("int8", True, 1)
    stored = writer.weight(w, spec)
    assert writer.weight(w, spec) is stored and writer.weights == [stored]
    array = w.const_value.numpy()
    step = np.abs(array).max(axis=0) / 127
    assert np.all(np.abs(stored.error) <= step / 2 * (1 + 1e-6))
    assert (stored.float_bytes, stored.quantized_bytes) == (6 * 4 * 4, 6 * 4)
    assert stored.value.producer().op_type == "DequantizeLinear"
