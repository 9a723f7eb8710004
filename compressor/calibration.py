"""Activation calibration: streaming statistics, clip ranges, scales and zero points.

Statistics (:func:`collect_statistics`) run the model in ONNX Runtime with the wanted
intermediate tensors as extra outputs and fold each batch into a :class:`TensorStats` of
fixed size: running min/max, counts, non-finite and sentinel counts, optional
per-channel ``max |x|``, and a :class:`~compressor.histogram.GrowingHistogram`. No sample
is kept, so memory does not grow with the number of samples.

Sentinels are finite values with ``|x| >= 1e30`` (attention masks filled with
``finfo.min`` ~ -3.4e38). They, and NaN/inf, are counted but kept out of min/max and the
histogram; a tensor holding any is reported by :meth:`TensorStats.problem` and must stay
float (quantizing a mask either loses the mask or every other value's resolution).

Ranges (:meth:`TensorStats.range`): ``minmax`` (observed), ``percentile`` (clip at a
quantile of ``|x|``, or of each tail), ``mse`` (the clip minimising the expected
rounding + clipping error of the histogram, see :mod:`compressor.histogram`, case 2).

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

import dataclasses
import difflib
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from compressor.data import Dataset
from compressor.errors import CompressorError, OptionsError
from compressor.histogram import GrowingHistogram
from compressor.model_io import ir_version_for
from compressor.targets.base import QuantSpec

__all__ = [
    "SENTINEL",
    "MIN_SCALE",
    "CALIBRATORS",
    "TensorStats",
    "collect_statistics",
    "quant_params",
    "weight_quant_params",
    "quantize_array",
    "dequantize_array",
    "dtype_bounds",
]

logger = logging.getLogger(__name__)

SENTINEL = 1e30
#: Values per batch and tensor that go into the histogram (min/max use every value).
HISTOGRAM_SAMPLE = 1 << 18
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101)
_SENTINEL_TEXT = "1e30"
MIN_SCALE = 1e-12
CALIBRATORS = ("minmax", "percentile", "mse")
_INT_TYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}


@dataclasses.dataclass(eq=False)
class TensorStats:
    """Running statistics of one tensor; its size does not depend on the sample count.

    Attributes:
        name: The tensor's name in the graph.
        dtype: The numpy dtype name of the tensor.
        count: Every element seen.
        nonfinite: NaN and +-inf elements.
        sentinels: Finite elements with ``|x| >= SENTINEL``.
        min: Smallest finite, non-sentinel value (``inf`` until one is seen).
        max: Largest finite, non-sentinel value (``-inf`` until one is seen).
        batches: Batches folded in.
        channel_axis: Axis of :attr:`channel_absmax`, or ``None``.
        channel_absmax: ``max |x|`` per channel along ``channel_axis`` (finite, non-sentinel).
        channel_sum: Sum of ``x`` per channel (for the per-channel mean, bias correction).
        channel_count: Values summed per channel.
        histogram: Counts of the finite, non-sentinel values.
    """

    name: str
    dtype: str = "float32"
    count: int = 0
    nonfinite: int = 0
    sentinels: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    batches: int = 0
    channel_axis: int | None = None
    channel_absmax: np.ndarray | None = None
    channel_sum: np.ndarray | None = None
    channel_count: int = 0
    histogram: GrowingHistogram = dataclasses.field(default_factory=GrowingHistogram)

    @property
    def finite_count(self) -> int:
        """Elements that entered min/max and the histogram."""
        return self.count - self.nonfinite - self.sentinels

    @property
    def nonfinite_count(self) -> int:
        return self.nonfinite

    @property
    def sentinel_fraction(self) -> float:
        return self.sentinels / self.count if self.count else 0.0

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.finite_count else 0.0

    def nbytes(self) -> int:
        """Bytes held in arrays (the part that could grow; it does not)."""
        extra = 0 if self.channel_absmax is None else self.channel_absmax.nbytes
        return self.histogram.pos.nbytes + self.histogram.neg.nbytes + extra

    def update(self, array: np.ndarray) -> None:
        """Fold one batch of this tensor into the statistics."""
        x = np.asarray(array)
        self.dtype = x.dtype.name
        self.batches += 1
        self.count += x.size
        if x.size == 0:
            return
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        lo, hi = x.min(), x.max()
        if np.isfinite(lo) and np.isfinite(hi) and max(-float(lo), float(hi)) < SENTINEL:
            # Fast path (almost every batch): nothing to mask out.
            if self.channel_axis is not None:
                self._update_channels(np.abs(x), x)
            self.min = min(self.min, float(lo))
            self.max = max(self.max, float(hi))
            self.histogram.add(self._sample(x), peak=max(-float(lo), float(hi)))
            return
        finite = np.isfinite(x)
        mags = np.abs(np.where(finite, x, 0.0))
        sentinel = mags >= SENTINEL
        keep = finite & ~sentinel
        self.nonfinite += int(x.size - np.count_nonzero(finite))
        self.sentinels += int(np.count_nonzero(sentinel))
        if self.channel_axis is not None:
            self._update_channels(np.where(keep, mags, 0.0), np.where(keep, x, 0.0))
        good = x[keep]
        if good.size:
            self.min = min(self.min, float(good.min()))
            self.max = max(self.max, float(good.max()))
            self.histogram.add(good)

    def _sample(self, x: np.ndarray) -> np.ndarray:
        """At most about :data:`HISTOGRAM_SAMPLE` values of ``x`` for the histogram.

        Min/max (and so the range the histogram covers) stay exact. The stride is a prime
        coprime with the last axis, so every channel is sampled (transformer outlier
        channels included), and its offset moves from batch to batch.
        """
        flat = x.reshape(-1)
        if flat.size <= HISTOGRAM_SAMPLE:
            return flat
        stride = next(p for p in _PRIMES if p * HISTOGRAM_SAMPLE >= flat.size and (x.shape[-1] % p) != 0) \
            if flat.size <= _PRIMES[-1] * HISTOGRAM_SAMPLE else flat.size // HISTOGRAM_SAMPLE | 1
        return flat[self.batches % stride::stride]

    @property
    def channel_mean(self) -> np.ndarray | None:
        """Mean of ``x`` per channel along ``channel_axis`` (``None`` without channel stats)."""
        if self.channel_sum is None or not self.channel_count:
            return None
        return self.channel_sum / self.channel_count

    def _update_channels(self, mags: np.ndarray, values: np.ndarray) -> None:
        axis = self.channel_axis
        if not -mags.ndim <= axis < mags.ndim:
            raise CompressorError(f"tensor {self.name!r}: channel axis {axis} is out of range for rank {mags.ndim}")
        axis %= mags.ndim
        others = tuple(a for a in range(mags.ndim) if a != axis)
        sums = values.sum(axis=others, dtype=np.float64)
        self.channel_sum = sums if self.channel_sum is None or self.channel_sum.shape != sums.shape \
            else self.channel_sum + sums
        self.channel_count += values.size // max(values.shape[axis], 1)
        per_channel = mags.max(axis=others)
        if self.channel_absmax is None:
            self.channel_absmax = per_channel
        elif self.channel_absmax.shape != per_channel.shape:
            raise CompressorError(f"tensor {self.name!r}: axis {axis} had {self.channel_absmax.size} channels, "
                                  f"now {per_channel.size}; a per-channel axis must have a fixed size")
        else:
            np.maximum(self.channel_absmax, per_channel, out=self.channel_absmax)

    def range(self, calibrator: str = "minmax", **kw: float | bool) -> tuple[float, float]:
        """The clip range ``(lo, hi)`` chosen by ``calibrator``, within the observed range.

        Args:
            calibrator: ``minmax``, ``percentile`` or ``mse``.
            **kw: ``percentile`` (default 99.99) for ``percentile``; ``num_bits``
                (default 8) for ``mse``; ``symmetric`` (default True) for both: clip
                ``|x|`` at one threshold, else each side (``percentile`` cuts
                ``(100 - p) / 2`` percent off each tail; ``mse`` shrinks ``(min, max)``).

        Raises:
            OptionsError: an unknown calibrator or keyword.
        """
        allowed = {"minmax": set(), "percentile": {"percentile", "symmetric"}, "mse": {"num_bits", "symmetric"}}
        if calibrator not in allowed:
            raise OptionsError(f"unknown calibrator {calibrator!r}; choose one of {', '.join(CALIBRATORS)}")
        unknown = sorted(set(kw) - allowed[calibrator])
        if unknown:
            raise OptionsError(f"calibrator {calibrator!r} takes {sorted(allowed[calibrator]) or 'no options'}, "
                               f"not {', '.join(unknown)}")
        if not self.finite_count:
            return 0.0, 0.0
        lo, hi, hist = self.min, self.max, self.histogram
        symmetric = bool(kw.get("symmetric", True))
        if calibrator == "percentile":
            p = float(kw.get("percentile", 99.99))
            if not 0.0 < p <= 100.0:
                raise OptionsError(f"percentile must be in (0, 100], got {p}")
            if symmetric:
                t = hist.magnitude_quantile(p / 100.0)
                return max(lo, -t), min(hi, t)
            tail = (100.0 - p) / 200.0
            return max(lo, hist.signed_quantile(tail)), min(hi, hist.signed_quantile(1.0 - tail))
        if calibrator == "mse":
            bits = int(kw.get("num_bits", 8))
            if not 2 <= bits <= 32:
                raise OptionsError(f"num_bits must be in 2..32, got {bits}")
            if symmetric:
                t = hist.mse_threshold(2 ** (bits - 1) - 1)
                return max(lo, -t), min(hi, t)
            return hist.mse_range(min(lo, 0.0), max(hi, 0.0), 2**bits)
        return lo, hi

    def problem(self) -> str | None:
        """Why this tensor must stay float, or ``None`` when it can be quantized."""
        reasons = []
        if np.dtype(self.dtype).kind != "f":
            reasons.append(f"it is {self.dtype}, not floating point")
        if self.nonfinite:
            reasons.append(f"{self.nonfinite} non-finite values (NaN/inf) seen during calibration")
        if self.sentinels:
            frac = self.sentinel_fraction * 100.0
            shown = f"{frac:.0f}%" if frac >= 1.0 else f"{frac:.2g}%"
            reasons.append(f"{shown} of values are sentinels (|x| >= {_SENTINEL_TEXT}), keep float")
        if self.count == 0:
            reasons.append("no values seen during calibration")
        return f"tensor {self.name!r}: {'; '.join(reasons)}" if reasons else None


def collect_statistics(
    model: ir.Model,
    tensors: Sequence[str],
    data: Dataset,
    *,
    channel_axes: Mapping[str, int] | None = None,
    bins: int = 2048,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, TensorStats]:
    """Run ``model`` on ``data`` in ONNX Runtime (CPU) and gather statistics of ``tensors``.

    The tensors become extra outputs of a copy of the model (``model`` is not changed);
    graph inputs are read from the feeds, initializers once from their values.

    Args:
        model: The float model.
        tensors: Names of graph inputs, initializers or node outputs of the main graph.
        data: Calibration data; batches as :meth:`Dataset.batches` yields them.
        channel_axes: Tensor name -> axis along which to keep ``max |x|`` per channel.
        bins: Histogram bins per sign.
        limit: Use at most this many samples.
        progress: Called after each batch with the number of samples done so far.

    Returns:
        One :class:`TensorStats` per requested name, in the order given.

    Raises:
        CompressorError: a name that is not in the main graph, or a per-channel axis whose
            size changes between batches.
    """
    start = time.perf_counter()
    channel_axes = dict(channel_axes or {})
    stats = {name: TensorStats(name, channel_axis=channel_axes.get(name), histogram=GrowingHistogram(bins))
             for name in dict.fromkeys(tensors)}
    work = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    graph = work.graph
    inputs = {v.name for v in graph.inputs if v.const_value is None}
    values = {v.name: v for v in graph.inputs}
    values.update((v.name, v) for node in graph for v in node.outputs)
    values.update(graph.initializers)
    missing = [name for name in stats if name not in values]
    if missing:
        hints = [f"{n!r} (did you mean {', '.join(map(repr, difflib.get_close_matches(n, values, 3)))}?)"
                 if difflib.get_close_matches(n, values, 1) else repr(n) for n in missing]
        raise CompressorError(f"calibration: no tensor {', '.join(hints)} in the model's main graph")
    fetch = []
    outputs = {v.name for v in graph.outputs}
    for name in stats:
        value = values[name]
        if name in inputs:
            continue
        if value.const_value is not None and value.producer() is None:
            stats[name].update(value.const_value.numpy())
            continue
        fetch.append(name)
        if name not in outputs:
            graph.outputs.append(value)
            outputs.add(name)
    proto = ir.serde.serialize_model(work)
    proto.ir_version = ir_version_for(work)
    session = None
    if fetch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # keep fetched tensors unfused
        options.log_severity_level = 3
        # Between runs this process histograms the fetched tensors; spinning ORT workers
        # would fight numpy for the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del proto, work
    samples = 0
    for feed in data.batches(limit=limit):
        results = session.run(fetch, feed) if session is not None else []
        for name, array in zip(fetch, results):
            stats[name].update(array)
        del results
        for name in stats:
            if name in feed:
                stats[name].update(feed[name])
        samples += 1 if all(data.stacked.values()) else next(
            feed[s.name].shape[0] for s in data.specs if not data.stacked[s.name])
        if progress is not None:
            progress(samples)
    flagged = sum(s.problem() is not None for s in stats.values())
    logger.info("calibration: %d tensors on %d samples in %.2fs (%d must stay float)",
                len(stats), samples, time.perf_counter() - start, flagged)
    return stats


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
