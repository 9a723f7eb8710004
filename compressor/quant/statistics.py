"""Activation calibration: streaming statistics, clip ranges, scales and zero points.

Statistics (:func:`collect_statistics`) run the model in ONNX Runtime with the wanted
intermediate tensors as extra outputs and fold each batch into a :class:`TensorStats` of
fixed size: running min/max, counts, non-finite and sentinel counts, optional
per-channel ``max |x|``, and a :class:`~compressor.quant.histogram.GrowingHistogram`. No sample
is kept, so memory does not grow with the number of samples.

Sentinels are finite values with ``|x| >= 1e30`` (attention masks filled with
``finfo.min`` ~ -3.4e38). They, and NaN/inf, are counted but kept out of min/max and the
histogram; a tensor holding any is reported by :meth:`TensorStats.problem` and must stay
float (quantizing a mask either loses the mask or every other value's resolution).

Ranges (:meth:`TensorStats.range`): ``minmax`` (observed), ``percentile`` (clip at a
quantile of ``|x|``, or of each tail), ``mse`` (the clip minimising the expected
rounding + clipping error of the histogram, see :mod:`compressor.quant.histogram`, case 2).

Scales and zero points from a range: :mod:`compressor.quant.math`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from compressor.data import MASK_INPUT, Dataset
from compressor.errors import CompressorError, DataError, OptionsError
from compressor.model_io import clone_model, ir_version_for
from compressor.progress import Progress, no_progress
from compressor.quant.histogram import GrowingHistogram

__all__ = ["SENTINEL", "CALIBRATORS", "TensorStats", "collect_statistics"]

logger = logging.getLogger(__name__)

SENTINEL = 1e30
#: Values per batch and tensor that go into the histogram (min/max use every value).
HISTOGRAM_SAMPLE = 1 << 18
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101)
_SENTINEL_TEXT = "1e30"
CALIBRATORS = ("minmax", "mean_minmax", "percentile", "mse")


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
        sample_min_sum: Sum over samples of each sample's min (``mean_minmax``).
        sample_max_sum: Sum over samples of each sample's max.
        sample_count: Samples summed (a batch whose leading axis is not the sample axis
            counts as one).
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
    sample_min_sum: float = 0.0
    sample_max_sum: float = 0.0
    sample_count: int = 0

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

    def update(self, array: np.ndarray, samples: int | None = None, tokens: np.ndarray | None = None) -> None:
        """Fold one batch of this tensor into the statistics.

        Args:
            array: The tensor's value for one batch.
            samples: Samples in the batch; when the leading axis has this size, each
                sample's min/max enters the ``mean_minmax`` sums, else the batch's.
            tokens: Which ``[sample, position]`` are real tokens (the feed's attention
                mask); for a ``[samples, positions, channels]`` tensor only those rows
                enter the statistics. Padding rows are masked out of attention and
                pooling, so their values need no range.
        """
        x = np.asarray(array)
        self.dtype = x.dtype.name
        self.batches += 1
        counts = None  # rows of ``x`` (as 2-D) per sample, for the mean_minmax sums
        if (tokens is not None and x.ndim == 3 and x.shape[:2] == tokens.shape and x.dtype.kind == "f"
                and self.channel_axis in (None, -1, 2)):
            x, counts = x[tokens], tokens.sum(axis=1)
        elif samples is not None and samples > 1 and x.ndim >= 2 and x.shape[0] == samples:
            counts = np.ones(samples, np.int64)
        self.count += x.size
        if x.size == 0:
            return
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        rows = x.reshape(1, -1) if counts is None else x.reshape(len(x), -1)
        row_lo, row_hi = rows.min(axis=1), rows.max(axis=1)
        lo, hi = row_lo.min(), row_hi.max()
        if np.isfinite(lo) and np.isfinite(hi) and max(-float(lo), float(hi)) < SENTINEL:
            # Fast path (almost every batch): nothing to mask out.
            if self.channel_axis is not None:
                self._update_channels(np.abs(x), x)
            self.min = min(self.min, float(lo))
            self.max = max(self.max, float(hi))
            self._update_samples(row_lo, row_hi, np.ones(1, np.int64) if counts is None else counts)
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
            # the batch counts as one sample: such a tensor stays float anyway (problem())
            self._update_samples(good.min(keepdims=True), good.max(keepdims=True), np.ones(1, np.int64))
            self.histogram.add(good)

    def _update_samples(self, row_lo: np.ndarray, row_hi: np.ndarray, counts: np.ndarray) -> None:
        """Add each sample's min/max to the ``mean_minmax`` sums; sample ``i`` owns the next
        ``counts[i]`` rows (a sample with none, all padding, is left out)."""
        starts = (np.cumsum(counts) - counts)[counts > 0]
        self.sample_min_sum += float(np.minimum.reduceat(row_lo, starts).sum(dtype=np.float64))
        self.sample_max_sum += float(np.maximum.reduceat(row_hi, starts).sum(dtype=np.float64))
        self.sample_count += len(starts)

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
            calibrator: ``minmax`` (the whole observed range), ``mean_minmax`` (the mean
                over samples of each sample's min and max: one outlier sample does not
                set the range; NNCF's default for per-tensor activations), ``percentile``
                or ``mse``.
            **kw: ``percentile`` (default 99.99) for ``percentile``; ``num_bits``
                (default 8) for ``mse``; ``symmetric`` (default True) for both: clip
                ``|x|`` at one threshold, else each side (``percentile`` cuts
                ``(100 - p) / 2`` percent off each tail; ``mse`` shrinks ``(min, max)``).

        Raises:
            OptionsError: an unknown calibrator or keyword.
        """
        allowed = {"minmax": set(), "mean_minmax": set(), "percentile": {"percentile", "symmetric"},
                   "mse": {"num_bits", "symmetric"}}
        if calibrator not in allowed:
            raise OptionsError(f"unknown calibrator {calibrator!r}; choose one of {', '.join(CALIBRATORS)}")
        unknown = sorted(set(kw) - allowed[calibrator])
        if unknown:
            raise OptionsError(f"calibrator {calibrator!r} takes {sorted(allowed[calibrator]) or 'no options'}, "
                               f"not {', '.join(unknown)}")
        if not self.finite_count:
            return 0.0, 0.0
        lo, hi, hist = self.min, self.max, self.histogram
        if calibrator == "mean_minmax" and self.sample_count:
            return self.sample_min_sum / self.sample_count, self.sample_max_sum / self.sample_count
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
    bar: Progress | None = None,
) -> dict[str, TensorStats]:
    """Run ``model`` on ``data`` in ONNX Runtime (CPU) and gather statistics of ``tensors``.

    Args:
        model: The float model (not changed).
        tensors: Names of graph inputs, initializers or node outputs of the main graph.
        data: Calibration data; batches as :meth:`Dataset.batches` yields them.
        channel_axes: Tensor name -> axis along which to keep ``max |x|`` per channel.
        bins: Histogram bins per sign.
        limit: Use at most this many samples.
        progress: Called after each batch with the number of samples done so far.
        bar: Factory of a progress bar counting the samples (the CLI's, on a terminal).

    Returns:
        One :class:`TensorStats` per requested name, in the order given.

    Raises:
        CompressorError: a name that is not in the main graph, or a per-channel axis whose
            size changes between batches.
        DataError: the model fails in ONNX Runtime on the data (exit 2, as the baseline's
            failure on evaluation data is).
    """
    start = time.perf_counter()
    channel_axes = dict(channel_axes or {})
    stats = {name: TensorStats(name, channel_axis=channel_axes.get(name), histogram=GrowingHistogram(bins))
             for name in dict.fromkeys(tensors)}
    values = _values(model.graph)
    missing = [name for name in stats if name not in values]
    if missing:
        hints = [f"{n!r} (did you mean {', '.join(map(repr, difflib.get_close_matches(n, values, 3)))}?)"
                 if difflib.get_close_matches(n, values, 1) else repr(n) for n in missing]
        raise CompressorError(f"calibration: no tensor {', '.join(hints)} in the model's main graph")
    constants = {n for n in stats if values[n].const_value is not None and values[n].producer() is None}
    for name in constants:
        stats[name].update(values[name].const_value.numpy())  # once: the same in every batch
    samples = 0
    total = len(data) if limit is None else min(limit, len(data))
    with (bar or no_progress)("calibrate", total, "sample") as shown:
        for batch, tokens, arrays in _stream(model, [n for n in stats if n not in constants], data, limit=limit):
            for name, array in arrays.items():
                stats[name].update(array, batch, tokens)
            del arrays
            samples += batch
            shown.update(batch)
            if progress is not None:
                progress(samples)
    flagged = sum(s.problem() is not None for s in stats.values())
    logger.info("calibration: %d tensors on %d samples in %.2fs (%d must stay float)",
                len(stats), samples, time.perf_counter() - start, flagged)
    return stats


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update((v.name, v) for node in graph for v in node.outputs)
    values.update(graph.initializers)
    return values


def _token_mask(feed: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The feed's ``attention_mask`` (``[samples, positions]``) as booleans, if it has one."""
    mask = feed.get(MASK_INPUT)
    if mask is None or np.ndim(mask) != 2 or not np.asarray(mask).any():
        return None
    return np.asarray(mask).astype(bool)


def _stream(model: ir.Model, tensors: Sequence[str], data: Dataset, *,
            limit: int | None = None) -> Iterator[tuple[int, np.ndarray | None, dict[str, np.ndarray]]]:
    """Yield ``(samples in the batch, token mask, {name: value})`` for each batch of ``data``.

    Node outputs (``tensors``: distinct graph inputs or node outputs of the main graph) become
    extra outputs of a copy of ``model`` run in ONNX Runtime (CPU); graph inputs come from
    the feed. The token mask is the feed's ``attention_mask`` as booleans (``None``
    without one). Only one batch's values are alive at a time.
    """
    work = clone_model(model)
    graph = work.graph
    inputs = {v.name for v in graph.inputs if v.const_value is None}
    values = _values(graph)
    fetch = []
    outputs = {v.name for v in graph.outputs}
    for name in tensors:
        if name in inputs:
            continue
        fetch.append(name)
        if name not in outputs:
            graph.outputs.append(values[name])
            outputs.add(name)
    session = None
    if fetch:
        proto = ir.serde.serialize_model(work)
        proto.ir_version = ir_version_for(work)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # keep fetched tensors unfused
        options.log_severity_level = 3
        # Between runs this process reduces the fetched tensors; spinning ORT workers
        # would fight numpy for the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del proto
    del work
    for feed in data.batches(limit=limit):
        batch = 1 if all(data.stacked.values()) else next(
            feed[s.name].shape[0] for s in data.specs if not data.stacked[s.name])
        try:
            results = dict(zip(fetch, session.run(fetch, feed))) if session is not None else {}
        except Exception as err:  # ONNX Runtime's own error types: the float model fails on this data
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            text = text.split("] : ", 1)[-1].removeprefix("1 : FAIL : ")
            raise DataError(f"calibration: the model fails in ONNX Runtime on the calibration data ({data.source}): "
                            f"{text[:300]}; check that the data is valid input for the model (shapes, dtypes, value "
                            "ranges) and that the model runs in ONNX Runtime as it is") from None
        yield batch, _token_mask(feed), {name: feed[name] if name in inputs else results[name] for name in tensors}
