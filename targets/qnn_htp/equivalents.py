"""Ops the QNN EP refuses or HTP fails to finalize, rewritten as exact equivalents it runs.

Both run first in ``qnn-quantize-tensors``, on the float layers ``quantize`` left, before
the calibration of the tensors it adds Q/DQ to (so a tensor a rewrite adds is calibrated
too) and before ``C`` becomes an int32 bias (its scale is ``s_x·s_w``, of the folded weight).

**``Gemm`` coefficients** (:func:`fold_gemm_coefficients`). The QNN EP builds ``Gemm`` as
HTP's FullyConnected, which has no coefficients: it refuses ``alpha != 1`` ("QNN
FullyConnected Op only support alpha=1.0") and fails to add a bias read with ``beta != 1``
("Failed to add node"; measured with ``beta`` 0 and 0.5). Old exporters write both
(PyTorch's ``mm`` as ``Gemm(A, B, C=0, beta=0)``: ONNX's ``test_operator_mm``).
``Y = alpha·A·B + beta·C`` is the same with:

* ``beta == 0``: ``C`` dropped;
* ``beta != 1`` and ``C`` a constant: ``C`` replaced by ``beta·C``;
* ``alpha != 1`` and ``B`` a float constant: ``B`` replaced by ``alpha·B``; ``B`` a
  ``DequantizeLinear`` of a constant with a constant scale (``quantize``'s int8 weight): a
  new ``DequantizeLinear`` with scale ``|alpha|·s``, exact, of the same integers (so the
  zeros of a sparse weight stay) or, for ``alpha < 0``, of the negated ones where that is
  exact (zero point 0, no code at the type's minimum).

Anything else (an ``alpha`` with ``B`` computed by the graph, a ``beta`` with ``C`` computed)
is left as it is, and the EP's refusal names the node.

**``Selu``** (:func:`selu_as_elu`): HTP fails to finalize it (``QNN_COMMON_ERROR_MEM_ALLOC``,
ONNX's ``test_operator_selu``); ``Selu(x; alpha, gamma) = gamma · Elu(x; alpha)``, and HTP
runs ``Elu`` and ``Mul``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compressor.passes._graph import NameAllocator, add_initializer, attr_float, drop_if_unused, take_over
from compressor.targets.base import on_cpu
from compressor.targets.qnn_htp.qdq_graph import const_array

__all__ = ["fold_gemm_coefficients", "selu_as_elu"]


def _scaled_weight(graph: ir.Graph, names: NameAllocator, weight: ir.Value, alpha: float) -> ir.Value | None:
    """``alpha · weight`` as a new constant or a new DequantizeLinear (module docstring), else ``None``."""
    array = const_array(weight)
    if array is not None and array.dtype.kind == "f":
        return add_initializer(graph, names(f"{weight.name}_alpha"), (array * np.asarray(alpha, array.dtype)))
    dq = weight.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or alpha == 0:
        return None
    ints, scale = const_array(dq.inputs[0]), const_array(dq.inputs[1])
    if ints is None or scale is None:
        return None
    codes = dq.inputs[0]
    if alpha < 0:  # a scale stays positive: the codes are negated, where that is exact (symmetric, no -128)
        zero = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros(1)
        if zero is None or np.any(zero != 0) or ints.dtype.kind != "i" or ints.min() <= np.iinfo(ints.dtype).min:
            return None
        codes = add_initializer(graph, names(f"{codes.name}_negated"), -ints)
    new_scale = add_initializer(graph, names(f"{dq.inputs[1].name}_alpha"),
                                scale * np.asarray(abs(alpha), scale.dtype))
    new = ir.node("DequantizeLinear", [codes, new_scale, *dq.inputs[2:]],
                  attributes=dict(dq.attributes), name=names(f"{dq.name or 'dq'}_alpha"))
    new.outputs[0].name = names(f"{weight.name}_alpha")
    new.outputs[0].type, new.outputs[0].shape = weight.type, weight.shape
    graph.insert_after(dq, new)
    return new.outputs[0]


def fold_gemm_coefficients(graph: ir.Graph) -> int:
    """Fold ``alpha``/``beta`` of every ``Gemm`` of ``graph`` where it can (module docstring); returns how many."""
    names = NameAllocator(graph)
    count = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or on_cpu(node):
            continue
        alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
        changed = False
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        old = [node.inputs[1], node.inputs[2] if has_c else None]
        if has_c and beta == 0.0:
            node.resize_inputs(2)
            changed = True
        elif has_c and beta != 1.0 and (c := const_array(node.inputs[2])) is not None and c.dtype.kind == "f":
            node.replace_input_with(2, add_initializer(graph, names(f"{node.inputs[2].name}_beta"),
                                                        c * np.asarray(beta, c.dtype)))
            changed = True
        if changed or not has_c:
            node.attributes.pop("beta", None)
        if alpha != 1.0 and (scaled := _scaled_weight(graph, names, node.inputs[1], alpha)) is not None:
            node.replace_input_with(1, scaled)
            node.attributes.pop("alpha", None)
            changed = True
        for value in old:  # what the Gemm read before, when nothing else reads it
            producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type == "DequantizeLinear" and not value.uses() \
                    and not value.is_graph_output():
                inputs = list(producer.inputs)  # remove() detaches them
                graph.remove(producer, safe=True)
                drop_if_unused(graph, inputs)
            elif value is not None:
                drop_if_unused(graph, [value])
        count += changed
    return count


def selu_as_elu(graph: ir.Graph) -> int:
    """Every ``Selu`` of ``graph`` as ``Mul(Elu(x; alpha), gamma)`` (module docstring); returns how many."""
    names = NameAllocator(graph)
    count = 0
    for node in list(graph):
        if node.op_type != "Selu" or node.domain not in ("", "ai.onnx") or on_cpu(node):
            continue
        alpha = attr_float(node, "alpha", 1.67326319217681884765625)
        gamma = attr_float(node, "gamma", 1.05070102214813232421875)
        base = node.name or "selu"
        elu = ir.node("Elu", [node.inputs[0]], attributes={"alpha": alpha}, name=names(f"{base}_elu"))
        out = node.outputs[0]
        elu.outputs[0].name = names(f"{out.name}_elu")
        elu.outputs[0].type, elu.outputs[0].shape = out.type, out.shape
        dtype = out.dtype.numpy() if out.dtype is not None else np.dtype(np.float32)  # float16 Selu: float16 gamma
        scale = add_initializer(graph, names(f"{base}_gamma"), np.asarray(gamma, dtype))
        mul = ir.node("Mul", [elu.outputs[0], scale], name=names(f"{base}_gamma_mul"))
        graph.insert_after(node, [elu, mul])
        take_over(graph, out, mul.outputs[0])
        count += 1
    return count
