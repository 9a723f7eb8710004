"""Reading the Q/DQ ``quantize`` wrote, for ``qnn-quantize-tensors``: encodings, pairs, float tensors.

* :class:`Encoding`: one quantized view of a tensor (dtype, scale, zero point, the DQ output).
* :func:`qdq_params` / :func:`dq_encoding` / :func:`dtype_of`: a per-tensor Q or DQ node's constant
  parameters, and the encoding a DQ output carries.
* :func:`activation_q_readers`: the ``(Q, DQ)`` pairs ``quantize`` put on an activation.
* :func:`stripped_model`: the model with every activation pair bypassed (its float statistics).
* :func:`runtime_floats`: the float tensors computed at run time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common is not imported by onnx_ir itself)

from compressor.model_io import clone_model

__all__ = ["QDQ_OPS", "Encoding", "activation_q_readers", "const_array", "dq_encoding", "dtype_of", "is_float",
           "qdq_params", "runtime_floats", "stripped_model"]

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_INT_DTYPES = {ir.DataType.UINT8: "uint8", ir.DataType.INT8: "int8", ir.DataType.UINT16: "uint16",
               ir.DataType.INT16: "int16", ir.DataType.INT32: "int32"}


@dataclasses.dataclass
class Encoding:
    """One quantized view of a tensor: its parameters and the DQ output readers use."""

    dtype: str
    scale: np.ndarray
    zero_point: np.ndarray
    value: ir.Value

    @property
    def bits(self) -> int:
        return 16 if "16" in self.dtype else 8

    def range(self) -> tuple[float, float]:
        info = np.iinfo(np.dtype(self.dtype))
        s, z = float(self.scale), float(self.zero_point)
        return (info.min - z) * s, (info.max - z) * s


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in _FLOATS


def const_array(value: ir.Value) -> np.ndarray | None:
    """The value of a constant (a non-input initializer), else ``None``."""
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    return None


def qdq_params(node: ir.Node) -> tuple[str, np.ndarray, np.ndarray] | None:
    """``(dtype, scale, zero point)`` of a per-tensor Q or DQ node with constant parameters."""
    scale, zp = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if scale is None or zp is None or scale.const_value is None or zp.const_value is None:
        return None
    if zp.const_value.dtype not in _INT_DTYPES or scale.const_value.numpy().size != 1:
        return None
    return _INT_DTYPES[zp.const_value.dtype], scale.const_value.numpy(), zp.const_value.numpy()


def dq_encoding(value: ir.Value) -> Encoding | None:
    """The encoding of ``value`` when it is the output of a per-tensor DequantizeLinear."""
    dq = value.producer()
    params = qdq_params(dq) if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.inputs) >= 3 else None
    return None if params is None else Encoding(*params, value)


def dtype_of(q: ir.Node) -> str:
    return (qdq_params(q) or ("",))[0]


def activation_q_readers(value: ir.Value) -> list[tuple[ir.Node, ir.Node]]:
    """``(Q, DQ)`` pairs reading ``value`` (what ``quantize`` inserted)."""
    pairs = []
    for user, _ in value.uses():
        if user.op_type != "QuantizeLinear" or user.inputs[0] is not value:
            continue
        dqs = [u for u, _ in user.outputs[0].uses() if u.op_type == "DequantizeLinear"]
        if len(dqs) == 1 and len(user.outputs[0].uses()) == 1:
            pairs.append((user, dqs[0]))
    return pairs


def stripped_model(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every activation Q -> DQ pair bypassed (weights stay dequantized)."""
    clone = clone_model(model)
    for node in list(clone.graph):
        if node.op_type != "QuantizeLinear":
            continue
        for dq, _ in list(node.outputs[0].uses()):
            if dq.op_type == "DequantizeLinear":
                dq.outputs[0].replace_all_uses_with(node.inputs[0], replace_graph_outputs=False)
    ir.passes.common.RemoveUnusedNodesPass()(clone)
    return clone


def runtime_floats(graph: ir.Graph) -> list[ir.Value]:
    """Float tensors computed at run time: float graph inputs and outputs of non-Q/DQ nodes."""
    out = [v for v in graph.inputs if is_float(v) and v.const_value is None]
    for node in graph:
        if node.op_type not in QDQ_OPS:
            out.extend(v for v in node.outputs if is_float(v))
    return out
