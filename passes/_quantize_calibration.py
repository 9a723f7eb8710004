"""``quantize``'s calibration: the ranges of the activations it quantizes, and bias correction's input means.

1. The activation inputs of the layers to quantize and the layer outputs that get a pair of
   their own (case 8 of :mod:`compressor.passes.quantize`) are statistics points; a tensor
   whose statistics show a problem (non-finite, sentinel-dominated) stays float with that
   reason.
2. Bias correction's input means (per position for a Conv: padding-exact) are gathered in
   the same run over the data.
3. Statistics depend only on the model before Q/DQ and the data: the runner caches them per
   (model, data), so accuracy control's re-runs calibrate nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import onnx_ir as ir
from compressor.passes._layers import Layer

from compressor.pipeline import PassContext
from compressor.quant.taps import StatPoint, TensorStats, gather

if TYPE_CHECKING:
    from compressor.passes.quantize import QuantizeOptions

__all__ = ["Calibration", "calibrate"]


@dataclasses.dataclass
class Calibration:
    """Ranges of the activations to quantize, input means for bias correction, and the tensors kept float."""

    ranges: dict[str, tuple[float, float]]
    means: dict[str, Any]
    tensor_skips: dict[str, str]


def calibrate(model: ir.Model, ctx: PassContext, opts: QuantizeOptions, layers: list[Layer],
              tensor_skips: dict[str, str], outputs: tuple[str, ...] | list[str] = ()) -> Calibration:
    """Ranges of the activation inputs of ``layers`` and of the ``outputs`` (case 1) and,
    for bias correction, their input means (case 2).

    Statistics depend only on the model before Q/DQ and the data: the runner caches them
    per (model, data), so accuracy control's re-runs calibrate nothing (case 3). Ranges and bias
    correction's input means (per position for a Conv: padding-exact) come in one run.
    """
    tensor_skips = dict(tensor_skips)
    names = sorted({v.name for layer in layers for _, v in layer.activations}.union(outputs) - set(tensor_skips))
    points = {n: StatPoint(n) for n in names}
    mean_points = {v.name: StatPoint(v.name, "moments", axis) for layer in layers
                   if layer.weight is not None and opts.bias_correction
                   for index, v in layer.activations[:1]
                   if index == 0 and v.name in points and (axis := layer.activation_axis()) is not None}
    # statistics of a body's tensors are taken on the copy with its If inlined (passes/_control_flow.py)
    found = gather(ctx.statistics_model or model, ctx.calibration, [*points.values(), *mean_points.values()],
                   ctx.cache, bar=ctx.progress)
    kwargs: dict[str, Any] = {"percentile": opts.percentile} if opts.calibrator == "percentile" else {}
    if opts.calibrator == "mse":
        kwargs["num_bits"] = 16 if opts.activations == "int16" else 8
    ranges = {}
    for name, point in points.items():
        stats: TensorStats = found[point]
        problem = stats.problem()
        if problem:
            tensor_skips[name] = problem
        else:
            ranges[name] = stats.range(opts.calibrator, **kwargs)
    return Calibration(ranges, {n: found[p] for n, p in mean_points.items()}, tensor_skips)
