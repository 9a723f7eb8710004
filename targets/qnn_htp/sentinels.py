"""``qnn-clamp-sentinels``: finite mask constants, so a quantized mask has a usable range.

Rule (QNN HTP runs every tensor quantized): a float constant holding sentinels
``|c| >= 1e30`` (additive attention masks filled with ``finfo(float32).min``) gets
``sign(c) * |mask_value|`` there, other elements unchanged. Quantized over
``[finfo.min, max]`` a mask's scale would be ~1e36 and every real score would round to
one level; at ``-100`` a masked key's softmax weight is ``exp(-100 - s)`` relative to a
real score ``s``, about ``4e-44`` for ``s`` near 0: the key stays masked.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common is not imported by onnx_ir itself)

from compressor.targets.base import on_cpu
from compressor.pipeline import Pass, PassContext, PassResult, register_pass
from compressor.quant.statistics import SENTINEL

__all__ = ["ClampSentinels", "ClampSentinelsOptions", "clamp_sentinels"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClampSentinelsOptions:
    """Options of ``qnn-clamp-sentinels``.

    Attributes:
        mask_value: What sentinel elements become (their sign kept).
    """

    mask_value: float = -100.0

    def __post_init__(self) -> None:
        if not -1e4 <= self.mask_value <= -10.0:
            raise ValueError(f"option 'mask_value' must be in [-1e4, -10], got {self.mask_value}")


def clamp_sentinels(graph: ir.Graph, mask_value: float) -> int:
    """Replace the sentinels of ``graph``'s float initializers (module docstring); returns how many changed."""
    count = 0
    for name, value in list(graph.initializers.items()):
        if value.const_value is None or value.is_graph_input():
            continue
        uses = list(value.uses())
        if uses and all(on_cpu(user) for user, _ in uses):  # the CPU front end keeps float32 constants
            continue
        array = value.const_value.numpy()
        if array.dtype.kind != "f":
            continue
        mask = np.abs(array.astype(np.float64)) >= SENTINEL
        if not mask.any():
            continue
        fixed = np.where(mask, np.sign(array) * abs(mask_value), array).astype(array.dtype)
        value.const_value = ir.tensor(fixed, name=name)
        count += 1
    return count


@register_pass
class ClampSentinels(Pass):
    """Sentinel constants (``finfo.min`` masks) become ``mask_value`` (module docstring)."""

    name = "qnn-clamp-sentinels"
    lossy = True
    description = "replace finfo.min mask constants by a finite value a quantized tensor can hold (QNN HTP)"
    Options = ClampSentinelsOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        count = clamp_sentinels(model.graph, self.options.mask_value)
        if count:
            logger.info("qnn-clamp-sentinels: %d constant(s) held sentinels, now %g", count, self.options.mask_value)
        return PassResult(model, count > 0, {"sentinels_clamped": count})
