"""Widen a float16/bfloat16 graph to float32 for quantization, keeping its interface.

``quantize`` writes Q/DQ at opset 13, where QuantizeLinear takes float32 only, and it
calibrates float32 ranges; the CPU targets run the int8 layers' neighbours in float32
anyway. So a half-precision model is quantized as float32 inside:

1. every float16/bfloat16 initializer, ``Constant``/``ConstantOfShape`` value and value
   type becomes float32, in every (sub)graph;
2. ``Cast``/``EyeLike``/``Random*`` that produce half precision produce float32 (a
   ``Cast(to=float16)`` of a float32 input, as mixed exports have, becomes a no-op cast);
3. a half-precision graph input is cast to float32 right after it, and a half-precision
   graph output is cast back from float32 right before it, so the names, dtypes and
   shapes the user feeds and reads do not change.

Widening is exact (every float16/bfloat16 value is a float32 value); only the arithmetic
in between becomes float32, so the float layers compute slightly more precisely than
the half-precision baseline.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import NameAllocator

__all__ = ["HALF", "widen_to_float32"]

logger = logging.getLogger(__name__)

HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}
_VALUE_ATTRS = {"Constant": "value", "ConstantOfShape": "value"}


def _float32_tensor(tensor: ir.TensorProtocol, name: str | None = None) -> ir.Tensor:
    return ir.tensor(np.asarray(tensor.numpy(), dtype=np.float32), name=name or tensor.name)


def _widen_value(value: ir.Value) -> bool:
    if value.dtype not in HALF:
        return False
    if value.const_value is not None:
        value.const_value = _float32_tensor(value.const_value, value.name)
    value.type = ir.TensorType(ir.DataType.FLOAT)
    return True


def _graphs(graph: ir.Graph) -> list[ir.Graph]:
    return [graph, *graph.subgraphs()]


def widen_to_float32(model: ir.Model) -> int:
    """Make ``model`` compute in float32 (module docstring, steps 1-3); returns the values widened."""
    main = model.graph
    names = NameAllocator(main)
    boundary_in = [v for v in main.inputs if v.dtype in HALF and v.const_value is None]
    boundary_out = [(i, v, v.dtype) for i, v in enumerate(main.outputs) if v.dtype in HALF and v not in boundary_in]
    widened = 0
    for graph in _graphs(main):
        for value in (*graph.inputs, *graph.initializers.values()):
            if graph is main and value in boundary_in:
                continue
            widened += _widen_value(value)
        for node in graph:
            attr = _DTYPE_ATTRS.get(node.op_type)
            if attr and attr in node.attributes and node.attributes[attr].value in {int(d) for d in HALF}:
                node.attributes[attr] = ir.AttrInt64(attr, int(ir.DataType.FLOAT))
            attr = _VALUE_ATTRS.get(node.op_type)
            if attr and attr in node.attributes and node.attributes[attr].value.dtype in HALF:
                node.attributes[attr] = ir.AttrTensor(attr, _float32_tensor(node.attributes[attr].value))
            for out in node.outputs:
                widened += _widen_value(out)
    for value in boundary_in:  # step 3: the input stays half precision; readers get float32
        uses = list(value.uses())
        cast = ir.node("Cast", [value], attributes={"to": int(ir.DataType.FLOAT)},
                       name=names(f"{value.name}_to_float32"))
        wide = cast.outputs[0]
        wide.name, wide.type, wide.shape = names(f"{value.name}_float32"), ir.TensorType(ir.DataType.FLOAT), value.shape
        for user, index in uses:
            user.replace_input_with(index, wide)
        if len(main):
            main.insert_before(next(iter(main)), cast)
        else:
            main.append(cast)
        widened += 1
    for index, value, dtype in boundary_out:  # the output keeps its name and dtype; the float32 value is renamed
        name = value.name
        value.name = names(f"{name}_float32")
        cast = ir.node("Cast", [value], attributes={"to": int(dtype)}, name=names(f"{name}_from_float32"))
        narrow = cast.outputs[0]
        narrow.name, narrow.type, narrow.shape = name, ir.TensorType(dtype), value.shape
        main.append(cast)
        main.outputs[index] = narrow
    return widened

