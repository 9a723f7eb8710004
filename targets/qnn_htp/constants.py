"""Cases 3 and 4 of ``qnn-quantize-tensors``: biases as int32, weights and other constants quantized.

:class:`ConstantEncoder` is a part of the pass's walker (:mod:`.quantize_tensors`); it reads
the walker's ``rules``, ``opts``, ``quantizable``, ``writer``, ``counts`` and ``const_cache``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from compressor.passes._layers import output_channel_axis
from compressor.targets.qnn_htp.qdq_graph import dq_encoding

from compressor.quant.math import quant_params, quantize_array, weight_quant_params
from compressor.quant.spec import QuantSpec

__all__ = ["ConstantEncoder"]

_BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
#: Ops whose input 1, a constant, is a weight quantized with the target's spec (case 4).
_LAYER_WEIGHTS = frozenset({"MatMul", "Gemm"})
_NORMS = frozenset({"LayerNormalization", "InstanceNormalization", "BatchNormalization", "GroupNormalization"})


def _channels_last(bias: np.ndarray, channels: int) -> np.ndarray:
    """``bias`` with ``channels`` entries on its last axis (case 3): broadcast there if it
    had one, leading axes of size 1 dropped (a Gemm's ``[1, N]`` or scalar ``C`` becomes ``[N]``)."""
    if bias.ndim == 0 or bias.shape[-1] != channels:
        bias = np.broadcast_to(bias, (*bias.shape[:-1], channels))
    return bias.reshape(channels) if bias.size == channels else np.ascontiguousarray(bias)


class ConstantEncoder:
    """The constants a node reads, quantized as HTP runs them (a mixin of the pass's walker)."""

    def constant(self, value: ir.Value, array: np.ndarray, spec: QuantSpec, axis: int | None = None,
                 scale: np.ndarray | None = None) -> ir.Value:
        """``DQ(quantized constant)``; ``scale`` given: int32 with that scale and zero point 0 (case 3)."""
        key = (id(value), f"{spec.dtype}:{spec.axis}:{axis}:{None if scale is None else scale.tobytes().hex()}",
               np.shape(array))  # a Gemm's scalar C is broadcast to each reader's own N
        if key in self.const_cache:
            return self.const_cache[key]
        array = np.asarray(array, np.float32)
        if scale is not None:
            scale = np.asarray(scale, np.float32)
            limit = np.iinfo(np.int32).max
            per = scale if axis is None else scale.reshape([-1 if a == axis else 1 for a in range(array.ndim)])
            q = np.clip(np.rint(array.astype(np.float64) / per), -limit, limit).astype(np.int32)
            zp = np.zeros(scale.shape, np.int32)
            self.counts["biases_int32"] += 1
        elif spec.axis is not None:  # case 4: a layer's weight per output channel
            scale, zp = weight_quant_params(array, spec)
            q = quantize_array(array, scale, zp, spec)
            axis = spec.axis
            self.counts["constants_quantized"] += 1
        else:  # case 4
            flat = array.reshape(-1)
            lo, hi = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)
            if lo == hi == 0.0:  # an all-zero constant: any scale is exact; keep it a sane one
                hi = 1.0
            scale, zp = quant_params(lo, hi, spec)
            q = quantize_array(array, scale, zp, spec)
            self.counts["constants_quantized"] += 1
        channel_axis = axis if axis is not None and np.asarray(scale).ndim == 1 else None
        out = self.writer.constant(value.name or "const", q, scale, zp, channel_axis,
                                   ir.TensorType(ir.DataType.FLOAT), ir.Shape(array.shape))
        self.const_cache[key] = out
        return out

    def constant_input(self, node: ir.Node, index: int, value: ir.Value, array: np.ndarray,
                       act: QuantSpec) -> ir.Value:
        """The DQ a node reads instead of float constant input ``index`` (cases 3 and 4)."""
        if node.op_type in _BIAS_OPS and index == 2 or node.op_type in _NORMS and index == 2:
            x = dq_encoding(node.inputs[0]) if node.inputs[0] is not None else None
            w = node.inputs[1]
            w_dq = w.producer() if w is not None else None
            if x is None or w_dq is None or w_dq.op_type != "DequantizeLinear":
                return self.constant(value, array, act)
            s_w = w_dq.inputs[1].const_value.numpy().astype(np.float64)
            scale = (float(x.scale) * s_w).astype(np.float32)
            if scale.ndim == 1 and scale.size > 1:  # per output channel: the bias's last axis
                array = _channels_last(array, scale.size)
                return self.constant(value, array, self.rules.bias, axis=array.ndim - 1, scale=scale)
            out_shape = node.outputs[0].shape
            if node.op_type == "Gemm" and out_shape is not None and isinstance(out_shape[-1], int):
                # per tensor (a B the Gemm computes, ONNX's test_operator_mm): C with N values on its last axis
                array = _channels_last(array, out_shape[-1])
            return self.constant(value, array, self.rules.bias, scale=scale.reshape(()))
        if node.op_type in _NORMS and index == 1:
            return self.constant(value, array, self.rules.norm_weight)
        weights = self.quantizable.get(node.op_type)
        if index == 1 and node.op_type in _LAYER_WEIGHTS and weights is not None:  # case 4: a layer's weight spec
            per_channel = self.opts.weights == "int8-per-channel" and weights.axis is not None and array.ndim >= 2
            axis = output_channel_axis(node, array.ndim) if per_channel else None
            return self.constant(value, array, dataclasses.replace(weights, axis=axis))
        return self.constant(value, array, act)
