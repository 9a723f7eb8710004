"""One tapped-model runner: every statistic the passes ask for, in one pass over the data.

A pass asks for *statistic points* (:class:`StatPoint`, NNCF's statistic points): a
tensor of the main graph and what to keep of it,

1. ``range``: a :class:`~compressor.quant.statistics.TensorStats` (min/max, histogram,
   non-finite and sentinel counts; with ``axis``, ``max |x|`` and the mean per channel
   along it) -- what quantization ranges, SmoothQuant and quantization's bias correction
   read;
2. ``moments``: a :class:`ChannelMoments` along ``axis`` (``sum x_c``, ``sum x_c^2``, for
   ``N x C x ...`` tensors the sum per channel and position, and with ``gram`` the channel
   Gram matrix ``sum x x^T``) -- what Wanda, SparseGPT, channel pruning and the sparsity
   passes' bias correction read.

:func:`run_points` adds every tapped tensor as an extra output of one copy of the model,
opens one ONNX Runtime session (CPU), streams the data once and feeds each batch to every
collector; only one batch's values are alive at a time. :func:`gather` remembers the
results in a pass context's ``cache`` under ``(sha256 of the model, sha256 of the data)``:
points already there are not run again (accuracy control's re-runs, sweep levels and
search candidates that start from the same model), and the missing ones of one request
run together, in one session.

Statistics of a model that changes between requests (sequential pruning) come from
:mod:`compressor.quant.staged`, which reduces batches with the same collectors.

Padding: when the data has an ``attention_mask`` input (``N x S``), token activations
(``N x S x ...``) enter the statistics at real tokens only; what a model computes at
padding positions is never used (see :mod:`compressor.flow.evaluation`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from compressor.data import MASK_INPUT
from compressor.errors import CompressorError, DataError
from compressor.model_io import clone_model, ir_version_for, model_bytes
from compressor.progress import Progress, no_progress
from compressor.quant.histogram import GrowingHistogram
from compressor.quant.statistics import TensorStats

if TYPE_CHECKING:
    from compressor.data import Dataset

__all__ = [
    "ChannelMoments",
    "Collected",
    "StatPoint",
    "activation_moments",
    "collect_statistics",
    "gather",
    "ort_failure",
    "run_points",
    "session_options",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StatPoint:
    """One statistic a pass asks for (module docstring, cases 1-2).

    Attributes:
        tensor: A graph input, initializer or node output of the main graph.
        kind: ``range`` (:class:`TensorStats`) or ``moments`` (:class:`ChannelMoments`).
        axis: The channel axis (``moments``: required; ``range``: optional per-channel
            ``max |x|`` and mean).
        gram: ``moments`` only: also keep the channel Gram matrix ``sum x x^T``.
    """

    tensor: str
    kind: Literal["range", "moments"] = "range"
    axis: int | None = None
    gram: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("range", "moments"):
            raise ValueError(f"statistic point kind must be 'range' or 'moments', got {self.kind!r}")
        if self.kind == "moments" and self.axis is None:
            raise ValueError(f"moments of {self.tensor!r} need a channel axis")
        if self.gram and self.kind != "moments":
            raise ValueError("a Gram matrix is a 'moments' statistic")

    def satisfied_by(self, other: StatPoint) -> bool:
        """Whether ``other``'s result answers this point too (a superset of what it keeps)."""
        if other.tensor != self.tensor or other.kind != self.kind:
            return False
        if self.kind == "range":
            return self.axis is None or other.axis == self.axis
        return other.axis == self.axis and (other.gram or not self.gram)


@dataclasses.dataclass
class ChannelMoments:
    """Per-channel first and second moments of one tensor (case 2).

    Attributes:
        total: ``sum x_c`` over every sample and position.
        squares: ``sum x_c^2``.
        count: Values summed per channel.
        spatial: For an ``N x C x ...`` tensor with channels on axis 1, the sum over samples
            of ``x`` per channel and position (``C x H x W``), or ``None`` (other layouts,
            or sizes that changed between batches).
        samples: Samples summed into ``spatial``.
        gram: ``sum x x^T`` over the channels (``C x C``) when it was asked for, else ``None``.
    """

    total: np.ndarray
    squares: np.ndarray
    count: int
    spatial: np.ndarray | None = None
    samples: int = 0
    gram: np.ndarray | None = None

    @property
    def spatial_mean(self) -> np.ndarray | None:
        """``E[x]`` per channel and position, or ``None``."""
        return None if self.spatial is None else self.spatial / max(self.samples, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def norm(self) -> np.ndarray:
        """``||x_c||_2`` over everything seen."""
        return np.sqrt(self.squares)

    @classmethod
    def of_batch(cls, raw: np.ndarray, axis: int, mask: np.ndarray | None, gram: bool) -> ChannelMoments:
        """The moments of one batch ``raw``; ``mask`` is the feed's ``attention_mask`` (or ``None``)."""
        raw = np.asarray(raw)
        axis %= raw.ndim
        tokens = (mask is not None and mask.ndim == 2 and raw.ndim >= 3 and axis >= 2
                  and raw.shape[:2] == mask.shape)
        # token activations: only real tokens are kept, before any arithmetic
        real = raw[mask.astype(bool)] if tokens else raw
        flat = np.moveaxis(real, axis - 1 if tokens else axis, -1).reshape(-1, raw.shape[axis])
        x = flat.astype(np.float64)
        spatial = raw.astype(np.float64).sum(axis=0) if axis == 1 and raw.ndim >= 3 else None
        return cls(x.sum(axis=0), np.einsum("ij,ij->j", x, x), x.shape[0], spatial, raw.shape[0],
                   _gram(flat) if gram else None)

    def add(self, other: ChannelMoments) -> None:
        """Fold another batch's moments into these."""
        self.total = self.total + other.total
        self.squares = self.squares + other.squares
        if self.gram is not None and other.gram is not None:
            self.gram = self.gram + other.gram
        self.count += other.count
        if self.spatial is not None and other.spatial is not None and self.spatial.shape == other.spatial.shape:
            self.spatial = self.spatial + other.spatial
            self.samples += other.samples
        else:
            self.spatial = None


def _gram(flat: np.ndarray) -> np.ndarray:
    """``sum x x^T`` of one batch's ``positions x channels`` matrix.

    The product runs in the activation's float precision (float32: one batch's sum), the
    result is float64 so that batches accumulate without loss.
    """
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float32)
    flat = np.ascontiguousarray(flat)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow stays inf: the caller names the layer
        return (flat.T @ flat).astype(np.float64)


Collected = TensorStats | ChannelMoments


def main_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the main graph: inputs, node outputs, initializers."""
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


def session_options() -> ort.SessionOptions:
    """ONNX Runtime options of a statistics run (also :mod:`compressor.quant.staged`'s)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # keep fetched tensors unfused
    options.log_severity_level = 3
    # Between runs this process reduces the fetched tensors; spinning ORT workers
    # would fight numpy for the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _session(work: ir.Model) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(work)
    proto.ir_version = ir_version_for(work)
    return ort.InferenceSession(proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])


def ort_failure(err: Exception, data: Dataset) -> DataError:
    """The one-line error for ONNX Runtime failing on calibration data (exit 2)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split("] : ", 1)[-1].removeprefix("1 : FAIL : ")
    return DataError(f"calibration: the model fails in ONNX Runtime on the calibration data ({data.source}): "
                     f"{text[:300]}; check that the data is valid input for the model (shapes, dtypes, value "
                     "ranges) and that the model runs in ONNX Runtime as it is")


class _Collectors:
    """Every point's accumulator; :meth:`feed` folds one batch into all of them."""

    def __init__(self, points: Iterable[StatPoint], bins: int):
        self.results: dict[StatPoint, Collected | None] = {}
        for p in points:
            self.results[p] = (TensorStats(p.tensor, channel_axis=p.axis, histogram=GrowingHistogram(bins))
                               if p.kind == "range" else None)

    def feed(self, arrays: Mapping[str, np.ndarray], samples: int | None, raw_mask: np.ndarray | None,
             points: Iterable[StatPoint]) -> None:
        tokens = None if raw_mask is None else _token_mask({MASK_INPUT: raw_mask})
        for p in points:
            array = arrays[p.tensor]
            if p.kind == "range":
                self.results[p].update(array, samples, tokens)
                continue
            batch = ChannelMoments.of_batch(array, p.axis, raw_mask, p.gram)
            if self.results[p] is None:
                self.results[p] = batch
            else:
                self.results[p].add(batch)


def start_collecting(points: list[StatPoint], values: Mapping[str, ir.Value], graph: ir.Graph, bins: int,
                     ) -> tuple[_Collectors, set[str], list[StatPoint]]:
    """The collectors of ``points`` with the constant ones already fed (the same in every
    batch: they enter once), the graph's data inputs, and the points to stream.

    Raises:
        CompressorError: a point's tensor is not among ``values`` (the main graph's), with
            the closest names.
    """
    missing = list(dict.fromkeys(p.tensor for p in points if p.tensor not in values))
    if missing:
        hints = [f"{n!r} (did you mean {', '.join(map(repr, difflib.get_close_matches(n, values, 3)))}?)"
                 if difflib.get_close_matches(n, values, 1) else repr(n) for n in missing]
        raise CompressorError(f"statistics: no tensor {', '.join(hints)} in the model's main graph")
    collectors = _Collectors(points, bins)
    inputs = {v.name for v in graph.inputs if v.const_value is None}
    constant = [p for p in points if p.tensor not in inputs and values[p.tensor].const_value is not None
                and values[p.tensor].producer() is None]
    collectors.feed({p.tensor: values[p.tensor].const_value.numpy() for p in constant}, None, None, constant)
    return collectors, inputs, [p for p in points if p not in constant]


def batch_size(data: Dataset, feed: Mapping[str, np.ndarray]) -> int:
    """Samples in one batch ``feed`` of ``data`` (1 when every input is one whole tensor per sample)."""
    return 1 if all(data.stacked.values()) else next(
        feed[s.name].shape[0] for s in data.specs if not data.stacked[s.name])


def require_results(collectors: _Collectors) -> None:
    """Raises CompressorError when a point got no batch (the data gave none to run)."""
    empty = [p.tensor for p, r in collectors.results.items() if r is None]
    if empty:
        raise CompressorError("statistics: the calibration data gave no batch to run (too few samples for the "
                              f"model's fixed batch size?), so there are no moments of {', '.join(map(repr, empty))}")


def run_points(
    model: ir.Model,
    data: Dataset,
    points: Collection[StatPoint],
    *,
    bins: int = 2048,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    bar: Progress | None = None,
) -> dict[StatPoint, Collected]:
    """Run ``model`` once over ``data`` and collect every point (no cache; see :func:`gather`).

    Args:
        model: The model (not changed: a copy gets the tapped tensors as extra outputs).
        data: The samples, in the batches :meth:`Dataset.batches` yields.
        points: What to collect.
        bins: Histogram bins per sign (``range`` points).
        limit: Use at most this many samples.
        progress: Called after each batch with the number of samples done so far.
        bar: Factory of a progress bar counting the samples (the CLI's, on a terminal).

    Returns:
        Point -> its :class:`TensorStats` or :class:`ChannelMoments`.

    Raises:
        CompressorError: a tensor that is not in the main graph, a per-channel axis whose
            size changes between batches, or moments asked of data that gave no batch.
        DataError: the model fails in ONNX Runtime on the data (exit 2).
    """
    start = time.perf_counter()
    points = list(dict.fromkeys(points))
    work = clone_model(model)
    graph = work.graph
    values = main_values(graph)
    collectors, inputs, streamed = start_collecting(points, values, graph, bins)
    fetch = list(dict.fromkeys(p.tensor for p in streamed if p.tensor not in inputs))
    outputs = {v.name for v in graph.outputs}
    for name in fetch:
        if name not in outputs:
            graph.outputs.append(values[name])
            outputs.add(name)
    session = _session(work) if fetch else None
    del work, graph, values
    samples = 0
    total = len(data) if limit is None else min(limit, len(data))
    with (bar or no_progress)("calibrate", total, "sample") as shown:
        for feed in data.batches(limit=limit) if streamed else ():
            batch = batch_size(data, feed)
            try:
                results = dict(zip(fetch, session.run(fetch, feed))) if session is not None else {}
            except Exception as err:  # ONNX Runtime's own error types: the model fails on this data
                raise ort_failure(err, data) from None
            results.update((n, feed[n]) for n in inputs if n in feed)
            mask = feed.get(MASK_INPUT)
            collectors.feed(results, batch, None if mask is None else np.asarray(mask), streamed)
            del results
            samples += batch
            shown.update(batch)
            if progress is not None:
                progress(samples)
    require_results(collectors)
    logger.info("statistics: %d point(s) on %d tensor(s), %d samples, one run in %.2fs", len(points),
                len({p.tensor for p in points}), samples, time.perf_counter() - start)
    return collectors.results


def _cache_key(model: ir.Model, data: Dataset) -> str:
    return "statistics:" + hashlib.sha256(model_bytes(model)).hexdigest() + ":" + data.sha256


def _lookup(store: Mapping[StatPoint, Collected], point: StatPoint) -> Collected | None:
    if point in store:
        return store[point]
    return next((result for have, result in store.items() if point.satisfied_by(have)), None)


def gather(model: ir.Model, data: Dataset, points: Iterable[StatPoint], cache: dict, *,
           bar: Progress | None = None) -> dict[StatPoint, Collected]:
    """:func:`run_points`, remembered in ``cache`` per (model, data): each point is run once.

    The points not in the cache yet run together, in one session over the data. A point
    is answered by a cached one that keeps more (``range`` with a channel axis answers
    ``range`` without; ``moments`` with a Gram matrix answer ``moments`` without).

    Args:
        model: The model as the asking pass sees it (the key is its serialized bytes).
        data: The samples (the key is their sha256).
        points: What to collect.
        cache: A ``PassContext.cache``.
        bar: Progress bar factory, as in :func:`run_points`.
    """
    points = list(dict.fromkeys(points))
    if not points:
        return {}
    store = cache.setdefault(_cache_key(model, data), {})
    todo = [p for p in points if _lookup(store, p) is None]
    if todo:
        store.update(run_points(model, data, todo, bar=bar))
    return {p: _lookup(store, p) for p in points}


def activation_moments(model: ir.Model, axes: Mapping[str, int], data: Dataset, limit: int | None = None,
                       gram: Collection[str] = ()) -> dict[str, ChannelMoments]:
    """:class:`ChannelMoments` of each tensor of ``axes`` (name -> channel axis), one uncached run.

    Args:
        gram: Names (of ``axes``) whose channel Gram matrix is kept too.
    """
    points = {name: StatPoint(name, "moments", axis, name in gram) for name, axis in axes.items()}
    found = run_points(model, data, points.values(), limit=limit)
    return {name: found[p] for name, p in points.items()}


def collect_statistics(
    model: ir.Model,
    tensors: Iterable[str],
    data: Dataset,
    *,
    channel_axes: Mapping[str, int] | None = None,
    bins: int = 2048,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    bar: Progress | None = None,
) -> dict[str, TensorStats]:
    """:class:`TensorStats` of ``tensors`` (``range`` points), one uncached run.

    Args:
        channel_axes: Tensor name -> axis along which to keep ``max |x|`` and the mean per channel.
        bins, limit, progress, bar: As in :func:`run_points`.

    Returns:
        One :class:`TensorStats` per requested name, in the order given.
    """
    axes = dict(channel_axes or {})
    points = {name: StatPoint(name, "range", axes.get(name)) for name in dict.fromkeys(tensors)}
    found = run_points(model, data, points.values(), bins=bins, limit=limit, progress=progress, bar=bar)
    stats = {name: found[p] for name, p in points.items()}
    flagged = sum(s.problem() is not None for s in stats.values())
    logger.info("calibration: %d tensors (%d must stay float)", len(stats), flagged)
    return stats
