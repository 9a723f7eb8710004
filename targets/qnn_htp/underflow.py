"""How much of a tensor its encoding rounds to zero, for the inputs where that loses the most.

An ``N``-bit asymmetric encoding of ``[0, hi]`` has step ``s = hi / (2^N - 1)``: every value
below ``s / 2`` becomes exactly 0. For most ops that is an absolute error under ``s / 2``;
for ``Log`` (``QdqRules.relative_inputs``) it is not: ``log(0)`` is the output encoding's
lowest code, so every such value leaves at the floor whatever it was. A power spectrum
before a log-compression (basic_pitch's ``normalized_log``: ``10 log10(|X|^2 + 1e-10)``) spans
over 100 dB; an 8-bit encoding of its range keeps 48 dB (in amplitude, 24 dB of power), a
16-bit one 96 dB, so most bins land on the floor (measured: 98% at 8 bits).

The fraction comes from the calibration histogram (:class:`~compressor.quant.histogram.GrowingHistogram`):
the counts of bins whose upper edge lies below ``s / 2``, so a lower bound (exact where
``s / 2`` falls on a bin edge).
"""

from __future__ import annotations

import numpy as np

from compressor.quant.statistics import TensorStats

__all__ = ["FLOOR_WARN", "floor_reason", "rounded_to_zero"]

#: The share of a ``relative_inputs`` tensor rounded to 0 from which ``qnn-quantize-tensors`` warns.
FLOOR_WARN = 0.01


def rounded_to_zero(stats: TensorStats, scale: float) -> float:
    """Fraction (0..1, at least) of the calibrated values of ``stats`` whose magnitude is below ``scale / 2``."""
    hist = stats.histogram
    total = hist.total
    if total == 0 or hist.range_max <= 0.0:
        return 0.0
    below = int(np.floor((scale / 2.0) / hist.bin_width)) if hist.bin_width > 0 else 0
    return float(hist.magnitude[:min(below, hist.bins)].sum()) / total


def floor_reason(op: str, tensor: str, stats: TensorStats | None, bits: int, scale: float,
                 span: tuple[float, float]) -> str | None:
    """Why ``op`` loses its input ``tensor`` to the floor, when at least ``FLOOR_WARN`` of it rounds to 0; else ``None``."""
    share = rounded_to_zero(stats, scale) if stats is not None else 0.0
    if share < FLOOR_WARN:
        return None
    return (f"{share:.0%} of its input {tensor!r} rounds to 0 at {bits} bits (step {scale:.3g} over "
            f"[{span[0]:.3g}, {span[1]:.3g}]); {op} reads them as its output's floor: no linear encoding holds "
            f"this tensor's range (a recipe step qnn-cpu-front-end: {{ops: [{op}]}} before quantize runs the {op} and "
            "what it is computed from in float on the CPU)")
