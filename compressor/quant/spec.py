"""How a tensor is quantized, and what a target runs fast for one op type.

Core records: passes read them from a target's :class:`~compressor.targets.base.Capabilities`
and from recipes, so they live here rather than in a target module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["QuantSpec", "OpQuant"]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        dtype: ``int8``, ``uint8``, ``int16``, ``uint16`` or ``float8e4m3fn``.
        symmetric: Zero point fixed at 0 (int) / midpoint (uint).
        axis: Per-channel axis of the tensor, or ``None`` for per-tensor.
        bits: Narrower symmetric range than the dtype holds (7: ``|q| <= 63``, for int8
            kernels that would overflow with full-range weights), or ``None``.
    """

    dtype: str = "int8"
    symmetric: bool = True
    axis: int | None = None
    bits: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OpQuant:
    """The quantization a target runs fast for one op type.

    Attributes:
        weights: Spec of the constant weight input (``None``: the op has none).
        activations: Spec of the activation inputs.
        weight_input: Index of the weight input.
        joins_after: For an op without weights (a residual ``Add``): quantize a node only
            when one of its inputs comes straight from one of these ops (empty: any).
        activation_only: The spec of the inputs of a node whose inputs are all
            activations (``Q·Kᵀ``) when it differs from ``activations`` (``None``: the
            same). OpenVINO runs such a MatMul in int8 only with symmetric operands; a zero
            point on either makes its CPU plugin dequantize both and compute in f32.
    """

    activations: QuantSpec
    weights: QuantSpec | None = None
    weight_input: int = 1
    joins_after: frozenset[str] = frozenset()
    activation_only: QuantSpec | None = None
