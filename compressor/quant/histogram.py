"""A fixed-size, growing histogram of a tensor's values, and the clip searches run on it.

The histogram keeps two arrays of ``bins`` counts over the same magnitude range
``[0, R]`` (bin width ``w = R / bins``): one for ``x >= 0`` and one for ``|x|`` of
``x < 0``. Together they are a signed histogram over ``[-R, R]`` whose middle edge is
exactly 0, so both ``|x|`` statistics (symmetric quantization) and two-sided ones come
from the same counts. Exact zeros are also counted apart (they quantize without error).

Growth (the TensorRT / ONNX Runtime collectors' scheme): when a batch holds a magnitude
above ``R``, ``R`` is doubled ``k`` times (the least ``k`` with ``R * 2**k >= max|x|``) and
each run of ``2**k`` neighbouring bins is merged into one. Old bin ``i`` lies wholly
inside new bin ``i // 2**k``, so no count moves to a wrong bin and the total is kept;
memory stays ``2 * bins`` integers whatever the number of samples.

Clip searches (all vectorised over candidate thresholds ``t``, one histogram pass each):

1. Quantile: cumulative counts, linear interpolation inside the bin where the target
   count falls; the result lies in the true quantile's bin, so within one bin width.
2. Expected quantization MSE of clipping magnitudes at ``t`` with step ``delta``,
   over bin centres ``c_i`` with counts ``n_i``::

       E(t) = sum_{c_i > t} n_i (c_i - t)^2            # clipping error
            + (sum_{c_i <= t} n_i - zeros) delta^2 / 12  # uniform rounding error

   The clipping sum is ``S2 - 2 t S1 + t^2 S0`` with suffix sums ``S_k`` of ``n_i c_i^k``,
   so every candidate costs O(1) after one cumulative sum.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

__all__ = ["GrowingHistogram", "clip_error"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class GrowingHistogram:
    """Counts of ``x >= 0`` and of ``-x`` for ``x < 0`` over ``[0, range_max]``.

    Attributes:
        bins: Bins per sign.
        range_max: ``R``, the upper edge of the last bin (0 until a non-zero is seen).
        pos: Counts of non-negative values per bin (exact zeros land in bin 0).
        neg: Counts of ``|x|`` of negative values per bin.
        zeros: How many values were exactly 0.
    """

    bins: int = 2048
    range_max: float = 0.0
    pos: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    neg: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    zeros: int = 0

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError(f"a histogram needs at least 2 bins, got {self.bins}")
        if self.pos is None:
            self.pos = np.zeros(self.bins, np.int64)
        if self.neg is None:
            self.neg = np.zeros(self.bins, np.int64)

    @property
    def total(self) -> int:
        return int(self.pos.sum() + self.neg.sum())

    @property
    def bin_width(self) -> float:
        return self.range_max / self.bins

    @property
    def magnitude(self) -> np.ndarray:
        """Counts of ``|x|`` per bin."""
        return self.pos + self.neg

    def add(self, values: np.ndarray, peak: float | None = None) -> None:
        """Count finite ``values`` (the caller has removed non-finite ones and sentinels).

        ``peak`` is ``max |values|`` when the caller already knows it.
        """
        values = np.asarray(values).reshape(-1)
        if values.dtype.kind != "f":
            values = values.astype(np.float64)
        if values.size == 0:
            return
        mags = np.abs(values)
        peak = float(mags.max()) if peak is None else peak
        if peak > self.range_max:
            self._grow(peak)
        self.zeros += int(np.count_nonzero(values == 0))
        if self.range_max == 0.0:  # everything so far is 0: it all belongs in bin 0
            self.pos[0] += values.size
            return
        # One bincount over 2*bins slots: [0, bins) for x >= 0, [bins, 2*bins) for x < 0.
        idx = (mags * np.float64(self.bins / self.range_max)).astype(np.int32)
        np.minimum(idx, self.bins - 1, out=idx)
        np.add(idx, self.bins, out=idx, where=values < 0)
        counts = np.bincount(idx, minlength=2 * self.bins)
        self.pos += counts[: self.bins]
        self.neg += counts[self.bins :]

    def _grow(self, peak: float) -> None:
        if self.range_max == 0.0:  # bin 0 already holds the zeros, nothing to merge
            self.range_max = peak
            return
        doublings = 0
        new_range = self.range_max
        while new_range < peak:
            new_range *= 2.0
            doublings += 1
        factor = 1 << min(doublings, 62)
        if factor >= self.bins:
            self.pos = _collapse(self.pos)
            self.neg = _collapse(self.neg)
        else:
            target = np.arange(self.bins) // factor
            self.pos = np.bincount(target, weights=self.pos, minlength=self.bins).astype(np.int64)
            self.neg = np.bincount(target, weights=self.neg, minlength=self.bins).astype(np.int64)
        logger.debug("histogram range %.6g -> %.6g (%d doublings)", self.range_max, new_range, doublings)
        self.range_max = new_range

    def magnitude_quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of ``|x|``."""
        return _quantile(self.magnitude, self.bin_width, q)

    def signed_quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of ``x`` (signed bins ``[-R, R]``)."""
        counts = np.concatenate([self.neg[::-1], self.pos])
        return _quantile(counts, self.bin_width, q) - self.range_max

    def mse_threshold(self, levels_above_zero: int) -> float:
        """Magnitude clip ``t`` minimising :func:`clip_error` for a symmetric grid.

        Args:
            levels_above_zero: Steps between 0 and ``t`` (127 for symmetric int8), so
                ``delta = t / levels_above_zero``.
        """
        if self.range_max == 0.0:
            return 0.0
        counts = self.magnitude
        edges = np.arange(1, self.bins + 1, dtype=np.float64) * self.bin_width
        err = clip_error(counts, self.bin_width, edges, edges / levels_above_zero, self.zeros)
        return float(edges[int(np.argmin(err))])

    def mse_range(self, lo: float, hi: float, levels: int, candidates: int | None = None) -> tuple[float, float]:
        """Shrink ``(lo, hi)`` (``lo <= 0 <= hi``) by one factor ``a`` minimising the MSE.

        The grid has ``levels - 1`` steps over ``[a lo, a hi]``; the clipping error of each
        sign is taken on its own half of the histogram.
        """
        if hi - lo <= 0.0 or self.range_max == 0.0:
            return lo, hi
        n = candidates or self.bins
        alpha = np.arange(1, n + 1, dtype=np.float64) / n
        delta = alpha * (hi - lo) / (levels - 1)
        w = self.bin_width
        err = (clip_error(self.pos, w, alpha * hi, delta, 0, rounding=False)
               + clip_error(self.neg, w, alpha * -lo, delta, 0, rounding=False))
        inside = _count_at_or_below(self.pos, w, alpha * hi) + _count_at_or_below(self.neg, w, alpha * -lo)
        err += np.maximum(inside - self.zeros, 0) * delta**2 / 12.0
        best = float(alpha[int(np.argmin(err))])
        return lo * best, hi * best


def _collapse(counts: np.ndarray) -> np.ndarray:
    out = np.zeros_like(counts)
    out[0] = counts.sum()
    return out


def _quantile(counts: np.ndarray, width: float, q: float) -> float:
    total = counts.sum()
    if total == 0 or width == 0.0:
        return 0.0
    target = min(max(q, 0.0), 1.0) * total
    cdf = np.cumsum(counts)
    i = min(int(np.searchsorted(cdf, target, side="left")), len(counts) - 1)
    before = cdf[i - 1] if i > 0 else 0
    frac = (target - before) / counts[i] if counts[i] else 0.0
    return float((i + frac) * width)


def _centres(size: int, width: float) -> np.ndarray:
    return (np.arange(size) + 0.5) * width


def _suffix(a: np.ndarray) -> np.ndarray:
    """``out[k] = sum(a[k:])``, with ``out[len(a)] = 0``."""
    return np.concatenate([np.cumsum(a[::-1])[::-1], [0.0]])


def _count_at_or_below(counts: np.ndarray, width: float, thresholds: np.ndarray) -> np.ndarray:
    k = np.searchsorted(_centres(counts.size, width), thresholds, side="right")  # bins i < k: c_i <= t
    return np.concatenate([[0], np.cumsum(counts)])[k]


def clip_error(counts: np.ndarray, width: float, thresholds: np.ndarray, delta: np.ndarray,
               zeros: int, *, rounding: bool = True) -> np.ndarray:
    """Expected squared error ``E(t)`` (module docstring, case 2) for each threshold.

    Args:
        counts: Magnitude histogram counts (bin ``i`` centred at ``(i + 0.5) * width``).
        width: Bin width.
        thresholds: Candidate clip magnitudes ``t``.
        delta: Quantization step for each candidate.
        zeros: Exact zeros among the counts (no rounding error).
        rounding: Whether to add the rounding term.

    Returns:
        One summed error per candidate (not divided by the count).
    """
    counts = counts.astype(np.float64)
    centres = _centres(counts.size, width)
    k = np.searchsorted(centres, thresholds, side="right")  # bins i >= k have c_i > t
    s0, s1, s2 = _suffix(counts), _suffix(counts * centres), _suffix(counts * centres**2)
    clipped = s2[k] - 2.0 * thresholds * s1[k] + thresholds**2 * s0[k]
    if not rounding:
        return np.maximum(clipped, 0.0)
    inside = np.maximum(s0[0] - s0[k] - zeros, 0.0)
    return np.maximum(clipped, 0.0) + inside * np.asarray(delta) ** 2 / 12.0
