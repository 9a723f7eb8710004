"""Quantization arithmetic: scales, zero points, and ONNX-exact quantize/dequantize.

Quantization parameters (:func:`quant_params`), with ``[qmin, qmax]`` the dtype's range
(int8 -128..127, uint8 0..255, int16, uint16):

1. symmetric: ``a = max(|lo|, |hi|)``, ``scale = a / (2**(bits-1) - 1)``, zero point 0
   for signed and ``2**(bits-1)`` (128, 32768) for unsigned types;
2. asymmetric: ``lo' = min(lo, 0)``, ``hi' = max(hi, 0)`` (0 stays exact),
   ``scale = (hi' - lo') / (qmax - qmin)``, ``zp = clip(round(qmin - lo' / scale), qmin, qmax)``;
3. every scale is at least :data:`MIN_SCALE` (a zero range gives that, not 0), and is
   rounded up to float32 so the range stays covered.

:func:`quantize_array` / :func:`dequantize_array` mirror ONNX ``QuantizeLinear`` /
``DequantizeLinear`` bit for bit: ``q = saturate(round_half_even(x / scale) + zp)`` in
float32, ``x' = (q - zp) * scale``, with per-axis scales broadcast along ``axis``.
"""

from __future__ import annotations

import numpy as np

from compressor.errors import CompressorError, OptionsError
from compressor.quant.spec import QuantSpec

__all__ = ["MIN_SCALE", "dtype_bounds", "quant_params", "weight_quant_params", "quantize_array", "dequantize_array"]

MIN_SCALE = 1e-12
_INT_TYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}


def dtype_bounds(dtype: str) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``dtype``; raises :class:`OptionsError` unless int8/uint8/int16/uint16."""
    if dtype not in _INT_TYPES:
        raise OptionsError(f"quantization dtype {dtype!r} is not supported here; choose one of "
                           f"{', '.join(_INT_TYPES)}")
    info = np.iinfo(_INT_TYPES[dtype])
    return int(info.min), int(info.max)


def _float32_at_least(x: np.ndarray) -> np.ndarray:
    """``x`` (float64) cast to float32, rounded up where the cast rounded down."""
    y = x.astype(np.float32)
    return np.where(y.astype(np.float64) < x, np.nextafter(y, np.float32(np.inf)), y).astype(np.float32)


def quant_params(lo: float | np.ndarray, hi: float | np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``spec.dtype``) for the range ``[lo, hi]``.

    ``lo``/``hi`` may be arrays (one per channel); the results then have their shape.
    Formulas: module docstring, cases 1-3.

    Raises:
        OptionsError: an unsupported dtype.
        CompressorError: a non-finite bound or ``lo > hi``.
    """
    qmin, qmax = dtype_bounds(spec.dtype)
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise CompressorError(f"cannot quantize the range [{lo}, {hi}]: it is not finite")
    if (lo > hi).any():
        raise CompressorError(f"cannot quantize the range [{lo}, {hi}]: lo > hi")
    zp_type = _INT_TYPES[spec.dtype]
    if spec.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        half = 2 ** (np.dtype(zp_type).itemsize * 8 - 1)
        levels = 2 ** (spec.bits - 1) if spec.bits else half
        scale = np.maximum(amax / (levels - 1), MIN_SCALE)
        zp = np.full(amax.shape, 0 if qmin < 0 else half)
        return _float32_at_least(scale), zp.astype(zp_type)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale32 = _float32_at_least(np.maximum((hi - lo) / (qmax - qmin), MIN_SCALE))
    zp = np.clip(np.rint(qmin - lo / scale32.astype(np.float64)), qmin, qmax)
    return scale32, zp.astype(zp_type)


def weight_quant_params(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a constant weight: per channel along ``spec.axis``, or per tensor.

    Raises:
        CompressorError: the weight holds NaN/inf, or ``spec.axis`` is out of range.
    """
    w = np.asarray(w, np.float64)
    if not np.isfinite(w).all():
        raise CompressorError(f"weight of shape {w.shape} holds {int((~np.isfinite(w)).sum())} non-finite values; "
                              "it cannot be quantized")
    if spec.axis is None or w.ndim == 0:
        lo, hi = (w.min(), w.max()) if w.size else (0.0, 0.0)
        return quant_params(lo, hi, spec)
    if not -w.ndim <= spec.axis < w.ndim:
        raise CompressorError(f"weight of shape {w.shape}: per-channel axis {spec.axis} is out of range")
    others = tuple(a for a in range(w.ndim) if a != spec.axis % w.ndim)
    return quant_params(w.min(axis=others), w.max(axis=others), spec)


def _along(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a per-axis parameter to broadcast against a rank-``ndim`` tensor."""
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def quantize_array(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """ONNX ``QuantizeLinear``: ``saturate(round_half_even(x / scale) + zp)`` in float32.

    A 1-D ``scale``/``zp`` is applied along ``spec.axis`` (default 1, as in ONNX).
    """
    qmin, qmax = dtype_bounds(spec.dtype)
    x = np.asarray(x, np.float32)
    axis = spec.axis if spec.axis is not None else 1
    s = _along(np.asarray(scale, np.float32), x.ndim, axis)
    z = _along(np.asarray(zp), x.ndim, axis).astype(np.float32)
    q = np.rint(x / s) + z
    return np.clip(q, qmin, qmax).astype(_INT_TYPES[spec.dtype])


def dequantize_array(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(q - zp) * scale`` in float32, per axis as in :func:`quantize_array`."""
    q = np.asarray(q)
    axis = spec.axis if spec.axis is not None else 1
    s = _along(np.asarray(scale, np.float32), q.ndim, axis)
    z = _along(np.asarray(zp), q.ndim, axis).astype(np.int32)
    return ((q.astype(np.int32) - z).astype(np.float32) * s).astype(np.float32)
