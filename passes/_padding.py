"""What padding adds: the ``Pad`` values a quantization grid holds, and pools that average padding."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["averages_padding", "pad_adds_only_zeros"]


def pad_adds_only_zeros(node: ir.Node) -> bool:
    """Whether a ``Pad`` adds nothing but its input's values and zeros.

    True for ``edge``/``reflect``/``wrap`` (they repeat input values) and for ``constant``
    mode with no value or a zero value (an initializer or a ``Constant`` node); zero is on
    every grid whose range holds 0.
    """
    mode = node.attributes.get("mode")
    if mode is not None and mode.as_string() != "constant":
        return True
    fill = node.inputs[2] if len(node.inputs) > 2 else None
    if fill is None:
        return True
    const = fill.const_value
    if const is None and (p := fill.producer()) is not None and p.op_type == "Constant":
        attr = p.attributes.get("value")
        const = attr.as_tensor() if attr is not None else None
    return const is not None and not np.any(const.numpy())


def averages_padding(node: ir.Node) -> bool:
    """Whether an ``AveragePool`` counts padded positions in its means (``count_include_pad``
    with pads or ``auto_pad=SAME_*``). OpenVINO pads a u8 input with the integer 0, not the
    zero point, so on a grid whose zero point is not 0 its border means are wrong (68 output
    steps off where the Q/DQ model on ONNX Runtime is 1.4 off, measured in review)."""
    include = node.attributes.get("count_include_pad")
    if include is None or include.as_int() == 0:
        return False
    auto = node.attributes.get("auto_pad")
    if auto is not None and auto.as_string().startswith("SAME"):
        return True
    pads = node.attributes.get("pads")
    return pads is not None and any(pads.as_ints())
