"""Test helpers: build small models from ONNX text, run them through ONNX Runtime."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compressor.model_io import to_proto
from compressor.targets import get_target
from compressor.targets.base import Target
from compressor.targets.onnx import OnnxTarget
from compressor.targets.qnn_htp.rules import HTP_QDQ_RULES, QNN_HTP_CAPABILITIES

__all__ = ["SimulatedHtp", "int8_weight_extremes", "model_from_text", "run_ort", "random_feeds", "op_counts", "assert_same_outputs",
           "onnx_specs_target", "saturating_qdq_conv"]


def model_from_text(text: str, **initializers: np.ndarray) -> ir.Model:
    """An ``ir.Model`` from ONNX text, with ``initializers`` (name -> array) attached.

    Arrays the graph does not read are attached too (``ir.from_onnx_text`` refuses them);
    one named like a graph input makes that input an overridable default.
    """
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, name) for name, a in initializers.items())
    return ir.serde.deserialize_model(proto)


def run_ort(model: ir.Model | onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` on CPU with ONNX Runtime; graph optimisations off, so what runs is the graph."""
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def random_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float inputs for every non-initializer graph input (static shapes only)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dims = [int(d) for d in value.shape]
        feeds[value.name] = rng.standard_normal(dims).astype(value.dtype.numpy())
    return feeds


def op_counts(model: ir.Model) -> Counter[str]:
    """How many nodes of each op type the main graph has."""
    return Counter(node.op_type for node in model.graph)


def assert_same_outputs(
    before: list[np.ndarray], after: list[np.ndarray], rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    """Every output of ``after`` matches ``before`` within tolerance."""
    assert len(before) == len(after)
    for i, (want, got) in enumerate(zip(before, after)):
        assert want.shape == got.shape, f"output {i}: shape {got.shape} != {want.shape}"
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"output {i}")


def int8_weight_extremes(path) -> list[int]:
    """The largest ``|q|`` of each int8 constant a DequantizeLinear reads in the ONNX file ``path``."""
    model = onnx.load(path)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [int(np.abs(weights[n.input[0]].astype(np.int16)).max()) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in weights and weights[n.input[0]].dtype == np.int8]


def onnx_specs_target(target_cpu: str = "host") -> Target:
    """The ``onnx`` target with its quantization specs but without its speed rules.

    ``OpQuant.output_required`` and ``min_output_channels`` keep float, on ONNX Runtime, a
    layer at the graph output and a convolution with fewer than 16 output channels: the
    small nets of the tests that check the pass's mechanics (grids, give-back, ranking)
    would lose those layers. The rules themselves are tested in
    ``tests/passes/test_onnx_node_units.py``.
    """
    target = get_target("onnx", target_cpu)
    caps = target.capabilities
    target.capabilities = dataclasses.replace(caps, quantizable={
        op: dataclasses.replace(q, output_required=False, min_output_channels=0) for op, q in caps.quantizable.items()})
    return target


def saturating_qdq_conv() -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """DQ(x u8) -> Conv(DQ(w s8)) -> Q -> DQ, with 255 x 127 products in every pair: ONNX
    Runtime's fused u8s8 kernel without VNNI sums pairs in int16 (2 * 255 * 127 > 32767).

    Returns:
        The model (static shapes), an input and the output the graph says (float math, then
        Q/DQ; output step 0.5).
    """
    x_scale, w_scale, y_scale = 0.02, 0.01, 0.5
    w = np.full((4, 16, 1, 1), 127, np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(w_scale, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
             numpy_helper.from_array(np.array(0, np.uint8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "sat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    x = np.full((1, 16, 2, 2), 255 * x_scale, np.float32)
    xd = np.round(x / x_scale).clip(0, 255) * x_scale
    c = np.einsum("nchw,oc->nohw", xd, w[:, :, 0, 0].astype(np.float32) * w_scale)
    expected = np.round(c / y_scale).clip(0, 255) * y_scale
    return ir.serde.deserialize_model(proto), x, expected.astype(np.float32)


class SimulatedHtp(OnnxTarget):
    """qnn-htp's capabilities and Q/DQ rules (no float path: fallback int16), run by ONNX Runtime CPU."""

    name = "qnn-htp-simulated"
    qdq_rules = HTP_QDQ_RULES

    def __init__(self) -> None:
        super().__init__()
        self.capabilities = QNN_HTP_CAPABILITIES
