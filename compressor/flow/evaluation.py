"""Measuring a compressed artifact against its baseline.

Metrics:

* ``top1``: accuracy of the first output's argmax against the eval file's ``labels``;
  drop = baseline top-1 − compressed top-1.
* ``cosine``: fidelity to the baseline (the fp32 model run in the same backend); per
  sample, all float outputs flattened into one vector; drop = 1 − mean cosine. Where the
  outputs do not all have the samples first (a recurrent state ``[2, N, 128]`` beside
  ``[N, 10]``), a row is one call instead (:func:`collect_outputs`). When the
  data has an ``attention_mask`` input (``N x S``; stacked, ``N x B x S``), token outputs
  (``N x S x ...``; ``N x B x S x ...``) are compared on real tokens only: what a model
  writes at padding positions is never used. Reported with the minimum cosine, SQNR in dB
  (10·log10(‖ref‖² / ‖ref − out‖²) over all samples), the top-1 agreement of the first
  output's argmax, and the largest absolute difference.

The cosine of one vector per sample is dominated by the outputs' largest values: a
detector that writes box coordinates (0-320 px) beside class scores (0-1) in one output,
as ultralytics' YOLOv8 does, loses its scores' precision unseen (nudenet int8: cosine
0.9995 over the output, 0.914 on the score channels, AP50 vs fp32 0.71).
:func:`small_channels` finds such channels (axis 1 of an output of rank 3 or more) and
their cosine together; where their error is ten times what the gate's metric says
(``hidden``), the manifest's ``evaluation.small_channels`` and the summary say so.

SQNR is infinite when the outputs are identical to the baseline (no noise: exact rewrites
such as folding) and ``-inf`` when the baseline's outputs are all zero; in memory it is
that float, in every JSON file the tool writes (:mod:`compressor.strict_json`) it is
``null``. ``sqnr_db: null`` with ``max_abs_diff: 0`` means identical outputs.

Outputs the baseline itself computes as NaN or inf (ONNX's backend tests: ``Sqrt`` of a
negative input) are equal where the artifact computes the same value there and make the
metrics NaN where it does not; the flow warns when the baseline has any. Cosine and SQNR
scale rows of float64 values past ~1e150 down first, where a sum of squares would overflow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from compressor.data import MASK_INPUT, Dataset
from compressor.flow.cosine import (
    cosines,
    same_nonfinite_zeroed,
    scaled_down,
    small_channels,
)
from compressor.strict_json import jsonable

__all__ = ["Evaluation", "collect_outputs", "cosine_error", "cosine_mean", "drop_order", "fidelity", "nonfinite_share", "output_rows", "padding_keep",
           "per_output", "row_cosines", "sample_errors", "top1_accuracy", "small_channels", "compare", "evaluate",
           "measure_latency"]

logger = logging.getLogger(__name__)

RunFn = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


@dataclasses.dataclass
class Evaluation:
    """Result of comparing the compressed model with the baseline on one dataset.

    Attributes:
        metric: ``top1`` or ``cosine`` (see the module docstring).
        baseline: The baseline's metric (``{"top1": ...}`` or ``{"cosine_mean": 1.0}``).
        compressed: The compressed model's metric plus the fidelity figures of
            :func:`fidelity`. ``sqnr_db`` is ``inf`` for outputs identical to the baseline;
            :meth:`to_json` (and the manifest) write it as ``null``, as any non-finite value.
        drop: Baseline metric minus compressed metric.
        samples: Samples compared.
        source: Where the data came from.
    """

    metric: str
    baseline: dict[str, float]
    compressed: dict[str, float]
    drop: float
    samples: int
    source: str
    small_channels: dict[str, Any] | None = None  #: :func:`small_channels`

    def to_json(self) -> dict[str, Any]:
        """Strict-JSON-ready fields: non-finite floats (``sqnr_db`` of identical outputs) become ``None``."""
        return jsonable(dataclasses.asdict(self))


def collect_outputs(run: RunFn, data: Dataset, *, limit: int | None = None,
                    progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Run every batch and return, per output, one array of rows that line up across outputs.

    A row is one sample when every output of every call has the call's samples along its
    first axis (the batch), or when each call is one sample (data of layout 2). Otherwise
    (a recurrent state ``[2, N, 128]`` beside logits ``[N, 10]``, a scalar beside a batch)
    which axis is the batch cannot be read from the shapes, and every output gives one row
    per call (:func:`per_output`), so that all outputs have as many rows.
    """
    calls: list[list[np.ndarray]] = []
    sizes: list[int] = []
    stacked = all(data.stacked.values())
    batched = [name for name, whole in data.stacked.items() if not whole]
    for feed in data.batches(limit=limit):
        calls.append([np.asarray(out) for out in run(feed)])
        sizes.append(1 if stacked or not batched else len(feed[batched[0]]))
        if progress:
            progress(1)
    if not calls:
        return []
    if stacked:
        return [np.concatenate([call[i][None] for call in calls]) for i in range(len(calls[0]))]
    if all(out.ndim >= 1 and len(out) == size for call, size in zip(calls, sizes) for out in call):
        return [np.concatenate([call[i] for call in calls]) for i in range(len(calls[0]))]
    logger.debug("outputs %s of a call of %d sample(s) do not all have the samples first: one row per call",
                 ", ".join("x".join(map(str, out.shape)) or "scalar" for out in calls[0]), sizes[0])
    return per_output(calls)


def per_output(calls: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per output, one row per call (the call's result flattened), stacked.

    A row per call, not per sample: which axis of an output is the batch cannot be read from
    its shape (silero-vad's ``stateN`` is ``[2, batch, 128]`` beside ``output`` ``[batch, 1]``;
    at batch 2 every first axis is 2), and every output must give as many rows for the
    per-row metrics to line them up. A call shorter than the others (the last batch on a
    dynamic batch axis) is zero-padded to their length: zeros at the same place in both
    compared rows change no metric (cosine, SQNR, largest difference).
    """
    stacked = []
    for i in range(len(calls[0])):
        rows = [np.asarray(call[i]).reshape(-1) for call in calls]
        width = max(len(row) for row in rows)
        stacked.append(np.stack([np.pad(row, (0, width - len(row))) for row in rows]))
    return stacked


def _rows(outputs: Iterable[np.ndarray]) -> np.ndarray:
    """One vector per row (:func:`collect_outputs`): every output flattened past its first axis, concatenated.

    Outputs whose first axes differ (not collected by :func:`collect_outputs`) are one call's
    results: they make one row (:func:`per_output`).
    """
    arrays = [np.asarray(o, dtype=np.float64) for o in outputs]
    if len({len(a) if a.ndim else None for a in arrays}) > 1:
        arrays = per_output([arrays])
    parts = [a.reshape(len(a), -1) for a in arrays]
    return np.concatenate(parts, axis=1) if parts else np.zeros((0, 0))


def nonfinite_share(outputs: Iterable[np.ndarray]) -> tuple[int, int]:
    """How many values of float ``outputs`` are NaN or inf, of how many."""
    floats = [np.asarray(o) for o in outputs if np.asarray(o).dtype.kind == "f"]
    return sum(int((~np.isfinite(o)).sum()) for o in floats), sum(o.size for o in floats)


def output_rows(outputs: Iterable[np.ndarray]) -> np.ndarray:
    """Per-sample vectors of ``outputs`` (float64): what the cosine metrics compare."""
    return _rows(outputs)


def row_cosines(reference_rows: np.ndarray, outputs: list[np.ndarray]) -> np.ndarray:
    """The cosine of each row of ``outputs`` to its row of ``reference_rows`` (made by :func:`output_rows`);
    a row's cosine depends on that row alone."""
    return cosines(reference_rows, _rows(outputs))


def cosine_mean(reference_rows: np.ndarray, outputs: list[np.ndarray]) -> float:
    """:func:`fidelity`'s ``cosine_mean`` of ``outputs`` alone, against rows made once by :func:`output_rows`."""
    cos = row_cosines(reference_rows, outputs)
    return float(cos.mean()) if cos.size else 1.0


def cosine_error(cosines: np.ndarray) -> float:
    """``1 − mean`` of row ``cosines``, for comparing candidates (accuracy control's ranking):
    a row whose cosine is NaN (NaN or inf on one side only) counts as −1, the worst a cosine
    can be, so a candidate with fewer such rows ranks better instead of every error being NaN
    (the gate's own figures keep the NaN)."""
    if not cosines.size:
        return 0.0
    return float(1.0 - np.where(np.isnan(cosines), -1.0, cosines).mean())


def drop_order(drop: float) -> float:
    """``drop`` for ordering and budget checks: NaN (a NaN or inf on the artifact's side) as the
    largest drop, ``inf``, where ``NaN > budget`` would read as within it."""
    return math.inf if math.isnan(drop) else drop


def sample_errors(reference: list[np.ndarray], outputs: list[np.ndarray], data: Dataset) -> np.ndarray:
    """``1 − cosine`` per sample of ``outputs`` against ``reference`` (padding masked as in :func:`compare`)."""
    return 1.0 - cosines(_rows(mask_padding(reference, data)), _rows(mask_padding(outputs, data)))


def fidelity(reference: list[np.ndarray], outputs: list[np.ndarray]) -> dict[str, float]:
    """Cosine mean/min, SQNR (dB), top-1 agreement and max abs difference of ``outputs``.

    ``sqnr_db`` is ``inf`` when ``outputs`` equal ``reference`` exactly and ``-inf`` when the
    reference is all zeros (written as ``null`` in JSON; see the module docstring).
    """
    ref, out = same_nonfinite_zeroed(_rows(reference), _rows(outputs))
    cos = cosines(ref, out)
    diff = float(np.max(np.abs(ref - out))) if ref.size else 0.0
    ref, out = scaled_down(ref, out, axis=None)
    noise = float(((ref - out) ** 2).sum())
    signal = float((ref**2).sum())
    sqnr = float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
    first_ref, first_out = reference[0], outputs[0]
    if first_ref.ndim >= 2 and first_ref.shape[-1] > 1:
        agree = float((first_ref.argmax(-1) == first_out.argmax(-1)).mean())
    else:
        agree = float(np.isclose(first_ref, first_out, equal_nan=True).mean())
    return {
        "cosine_mean": float(cos.mean()) if cos.size else 1.0,
        "cosine_min": float(cos.min()) if cos.size else 1.0,
        "sqnr_db": sqnr,
        "top1_agreement": agree,
        "max_abs_diff": diff,
    }


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose argmax over the last axis equals the label."""
    pred = logits.reshape(len(logits), -1).argmax(axis=1)
    return float((pred == labels[: len(pred)]).mean())


def padding_keep(out: np.ndarray, data: Dataset) -> np.ndarray | None:
    """Which positions of a token output ``out`` are real tokens, broadcastable to ``out``.

    ``out`` holds rows as :func:`collect_outputs` returns them: ``N x S x ...`` for an
    ``attention_mask`` of ``N x S`` (layout 1), ``N x B x S x ...`` for a stacked one of
    ``N x B x S`` (layout 2, each sample a whole ``B x S`` input). ``None`` when ``data`` has
    no such mask or ``out`` does not start with the mask's shape (not a token output).
    """
    mask = data.arrays.get(MASK_INPUT)
    if mask is None or mask.ndim != (3 if data.stacked.get(MASK_INPUT) else 2) or out.dtype.kind != "f":
        return None
    mask = mask[: len(out)]
    if out.ndim > mask.ndim and out.shape[:mask.ndim] == mask.shape:
        return mask.astype(bool).reshape(mask.shape + (1,) * (out.ndim - mask.ndim))
    return None


def mask_padding(outputs: list[np.ndarray], data: Dataset) -> list[np.ndarray]:
    """Zero the padding positions of token outputs (see the module docstring)."""
    return [out if (keep := padding_keep(out, data)) is None else np.where(keep, out, 0) for out in outputs]


def compare(ref: list[np.ndarray], out: list[np.ndarray], data: Dataset, metric: str = "auto") -> Evaluation:
    """Score outputs ``out`` against the baseline's ``ref`` on ``data`` (see module docstring)."""
    ref, out = mask_padding(ref, data), mask_padding(out, data)
    if metric == "auto":
        metric = "top1" if data.labels is not None else "cosine"
    if metric == "top1" and data.labels is None:
        from compressor.errors import DataError

        raise DataError(f"eval {data.source}: metric 'top1' needs a 'labels' array in the eval file")
    fid = fidelity(ref, out)
    n = len(ref[0]) if ref else 0
    if metric == "top1" and data.specs and n != data.usable():
        from compressor.errors import DataError

        raise DataError(f"eval {data.source}: metric 'top1' needs one row of the first output per sample, but the "
                        f"model's outputs do not all have the samples first, so each of the {n} rows is one call of "
                        f"{data.batch_size()} samples ({data.usable()} in all); drop 'labels' from the eval file to "
                        "measure fidelity, or give each sample as one whole input tensor (an array with one axis "
                        "more than the input, fed one call per sample)")
    samples = data.usable() if data.specs else n  # rows are calls where outputs are not batch-first
    if metric == "top1":
        base_acc, comp_acc = top1_accuracy(ref[0], data.labels), top1_accuracy(out[0], data.labels)
        return Evaluation("top1", {"top1": base_acc}, {"top1": comp_acc, **fid}, base_acc - comp_acc, samples,
                          data.source, small_channels(ref, out, base_acc - comp_acc))
    drop = 1.0 - fid["cosine_mean"]
    return Evaluation("cosine", {"cosine_mean": 1.0}, fid, drop, samples, data.source,
                      small_channels(ref, out, drop))


def evaluate(baseline: RunFn, compressed: RunFn, data: Dataset, metric: str = "auto",
             progress: Callable[[int], None] | None = None) -> Evaluation:
    """Run both models on ``data`` and :func:`compare` them."""
    ref = collect_outputs(baseline, data, progress=progress)
    out = collect_outputs(compressed, data, progress=progress)
    return compare(ref, out, data, metric)


def measure_latency(run: RunFn, feed: Mapping[str, np.ndarray], *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one call, in milliseconds."""
    for _ in range(warmup):
        run(feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(feed)
        times.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(times))
