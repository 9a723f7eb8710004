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
:mod:`compressor.quant.staged`, which reduces batches with the same collectors
(:mod:`compressor.quant.points`: the points, their accumulators, one batch folded in).

Padding: when the data has an ``attention_mask`` input (``N x S``), token activations
(``N x S x ...``) enter the statistics at real tokens only; what a model computes at
padding positions is never used (see :mod:`compressor.flow.evaluation`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from compressor.data import MASK_INPUT
from compressor.errors import DataError
from compressor.model_io import clone_model, ir_version_for, model_bytes
from compressor.progress import Progress, no_progress
from compressor.quant.points import (
    ChannelMoments,
    Collected,
    StatPoint,
    batch_size,
    main_values,
    require_results,
    start_collecting,
)
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
