"""What ``quantize`` records of a layer's bias correction, so accuracy control can give the layer back.

Bias correction (:func:`~._bias_correction.correct_bias`) replaces a bias in one of three
ways, and the record (:class:`~compressor.quant.revert.ConstantInput`) keeps what was there
before, so that :func:`~compressor.quant.revert.give_back` restores it exactly:

1. a new value on an input of the layer or of a node reading its output (a Gemm's ``C``,
   a following ``Add``'s constant): the input index and the old tensor;
2. a new tensor on the same value (corrected in place): the same, keyed by the value;
3. an input that was not there (a Conv or Gemm without a bias): recorded with no array, so
   giving back drops the input again;
4. a new ``Add(y, b)`` after a layer without a bias (a MatMul): the Add takes over ``y``'s
   name (:func:`~._graph.append_add`), the layer's records follow the rename, and giving
   the layer back sets ``b`` to 0 (``y + 0 = y`` exactly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from compressor.passes._bias_correction import correct_bias
from compressor.passes._layers import Layer

from compressor.quant.revert import ActivationInput, ConstantInput

__all__ = ["correct_bias_recorded"]

_Inputs = dict[tuple[str, int], tuple[ir.Value | None, Any]]


def correct_bias_recorded(graph: ir.Graph, layer: Layer, delta: np.ndarray, mean: Any, names: Callable[[str], str],
                          key: str, edits: list[ActivationInput], constants: list[ConstantInput],
                          ) -> tuple[bool, list[ActivationInput], list[ConstantInput]]:
    """Correct ``layer``'s bias by ``delta`` (``W − DQ(Wq)``) and record what changed (cases 1-4).

    Args:
        graph: The graph.
        layer: The quantized layer.
        delta: ``W − DQ(Wq)``.
        mean: The statistics of the layer's input (``E[x]``).
        names: Allocates fresh value names.
        key: The name of the layer's output, which its records name the node by.
        edits: The layer's activation records so far.
        constants: The layer's constant records so far.

    Returns:
        Whether the bias was corrected, and the layer's records after it.
    """
    before = _bias_inputs(layer.node)
    how = correct_bias(graph, layer, delta, mean, names)
    constants = constants + _changed_bias(before, _bias_inputs(layer.node))
    if how == "new add":  # case 4
        edits, constants = _rekey_new_add(layer.node, key, edits, constants)
    return not how.startswith("skipped"), edits, constants


def _bias_inputs(node: ir.Node) -> _Inputs:
    """The inputs bias correction may replace, with their tensors: the layer's own, and those
    of the nodes reading its output (cases 1-3)."""
    readers = [node, *(use.node for use in node.outputs[0].uses())]
    return {(n.outputs[0].name, i): (v, None if v is None else v.const_value) for n in readers
            for i, v in enumerate(n.inputs)} | {(n.outputs[0].name, len(n.inputs)): (None, None) for n in readers}


def _changed_bias(before: _Inputs, after: _Inputs) -> list[ConstantInput]:
    """The biases bias correction replaced, as they were (cases 1-3)."""
    out = []
    for (node, index), (old, tensor) in before.items():
        now = after.get((node, index), (None, None))
        if now[0] is old and now[1] is tensor:
            continue
        if old is None:  # case 3: no bias before, giving back drops the added input
            out.append(ConstantInput(node, index, "", None))
        elif tensor is not None:
            out.append(ConstantInput(node, index, old.name, tensor.numpy().copy()))
    return out


def _rekey_new_add(node: ir.Node, key: str, edits: list[ActivationInput],
                   constants: list[ConstantInput]) -> tuple[list[ActivationInput], list[ConstantInput]]:
    """Edits keyed by the layer's new output name, plus the added bias's zeroing (case 4)."""
    out = node.outputs[0]
    add = next(use.node for use in out.uses() if use.node.op_type == "Add" and use.node.outputs[0].name == key)
    bias = add.inputs[1]
    edits = [dataclasses.replace(e, node=out.name) if e.node == key else e for e in edits]
    constants = [dataclasses.replace(c, node=out.name) if c.node == key else c for c in constants]
    constants.append(ConstantInput(key, 1, bias.name, np.zeros_like(bias.const_value.numpy())))
    return edits, constants
