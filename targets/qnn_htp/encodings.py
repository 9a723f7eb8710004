"""AIMET encodings of a QDQ model, for Qualcomm's device flow (``qnn-htp`` writes ``model.encodings``).

The scale/offset of every quantized tensor in AIMET's JSON format (version 0.6.1), so
``qnn-onnx-converter --quantization_overrides`` uses exactly the encodings that were
evaluated.

AIMET's encoding is ``x = (q + offset) * scale`` with ``q`` unsigned in ``[0, 2^bw - 1]``; an
ONNX ``uint`` zero point ``z`` gives ``offset = -z`` and a signed one ``offset = -(z + 2^(bw-1))``
(symmetric int8 weights: ``offset = -128``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["aimet_encodings"]


def _aimet_entry(scale: float, zero_point: int, dtype: ir.DataType) -> dict[str, Any]:
    bits = int(dtype.bitwidth)
    signed = dtype.is_signed()
    offset = -(int(zero_point) + (1 << (bits - 1))) if signed else -int(zero_point)
    return {
        "bitwidth": bits,
        "dtype": "int",
        "is_symmetric": str(bool(signed and int(zero_point) == 0) or (not signed and int(zero_point) == 1 << (bits - 1))),
        "max": float((offset + (1 << bits) - 1) * np.float64(scale)),
        "min": float(offset * np.float64(scale)),
        "offset": offset,
        "scale": float(scale),
    }


def _param_name(value: ir.Value) -> str:
    return value.name.removesuffix("_quantized") if value.name else "?"


def aimet_encodings(model: ir.Model) -> dict[str, Any]:
    """Every Q/DQ encoding of ``model`` in AIMET's JSON format (0.6.1).

    Activations are keyed by the float tensor a ``QuantizeLinear`` reads (by the graph
    output's name where its ``DequantizeLinear`` is a graph output); parameters by the
    initializer a ``DequantizeLinear`` reads (without the ``_quantized`` suffix the
    quantize pass adds). Per-channel parameters get one entry per channel.
    """
    acts: dict[str, list[dict[str, Any]]] = {}
    params: dict[str, list[dict[str, Any]]] = {}
    outputs = {id(v): v.name for v in model.graph.outputs}
    bits: set[int] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        data, scale_v = node.inputs[0], node.inputs[1]
        zp_v = node.inputs[2] if len(node.inputs) > 2 else None
        if scale_v is None or scale_v.const_value is None:
            continue
        scale = np.atleast_1d(scale_v.const_value.numpy()).astype(np.float64)
        if zp_v is not None and zp_v.const_value is not None:
            zps, dtype = np.atleast_1d(zp_v.const_value.numpy()).astype(np.int64), zp_v.const_value.dtype
        else:
            zps, dtype = np.zeros(len(scale), np.int64), ir.DataType.UINT8
        zps = np.broadcast_to(zps, scale.shape)
        entries = [_aimet_entry(s, z, dtype) for s, z in zip(scale, zps)]
        if node.op_type == "QuantizeLinear" and data is not None:
            # A graph output is the DQ of this Q: the encoding belongs to the output's name.
            readers = [u.outputs[0] for u, _ in node.outputs[0].uses() if u.op_type == "DequantizeLinear"]
            name = next((outputs[id(v)] for v in readers if id(v) in outputs), data.name)
            acts.setdefault(name, entries)
            bits.add(entries[0]["bitwidth"])
        elif node.op_type == "DequantizeLinear" and data is not None and data.const_value is not None:
            params.setdefault(_param_name(data), entries)
    return {
        "version": "0.6.1",
        "activation_encodings": dict(sorted(acts.items())),
        "param_encodings": dict(sorted(params.items())),
        "excluded_layers": [],
        "quantizer_args": {
            "activation_bitwidth": max(bits) if bits else None,
            "param_bitwidth": 8,
            "dtype": "int",
            "per_channel_quantization": any(len(v) > 1 for v in params.values()),
            "quant_scheme": "post_training_tf",
        },
    }
