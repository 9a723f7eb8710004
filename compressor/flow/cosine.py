"""Per-sample cosines of output rows, safe on NaN, inf and huge values, and the small-channel check.

:func:`cosines` is what :mod:`.evaluation`'s cosine metrics compute (one vector per sample,
made by its ``output_rows``): positions where both sides hold the same NaN or inf count as
equal, and rows of float64 values past ~1e150 are scaled down first, where a sum of squares
would overflow. :func:`small_channels` is the diagnostic :mod:`.evaluation` describes: the
channels of small values beside large ones that one cosine over a whole output hides.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["cosines", "same_nonfinite_zeroed", "scaled_down", "small_channels", "CHANNELS_MAX", "SMALL_SHARE", "HIDDEN_RATIO"]


def scaled_down(ref: np.ndarray, out: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``ref`` and ``out`` divided by their largest finite magnitude (per row for ``axis=1``, else overall).

    Cosine and SQNR do not change under one positive scale of both operands, but a sum of
    squares of float64 values beyond ~1e154 overflows to inf (ONNX's backend test data holds
    such values: inf / inf made the cosine of two equal rows NaN). Only rows that need it are
    scaled, so every other figure is computed exactly as before.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        big = np.maximum(np.abs(ref).max(axis=axis, keepdims=True, initial=0.0),
                         np.abs(out).max(axis=axis, keepdims=True, initial=0.0))
        scale = np.where(np.isfinite(big) & (big > 1e150), big, 1.0)
    return ref / scale, out / scale


def same_nonfinite_zeroed(ref: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ref`` and ``out`` with 0 where both hold the same non-finite value (NaN and NaN, inf and inf).

    A model may compute NaN or inf on its own data (ONNX's `Sqrt` of a negative input); where
    the artifact computes the same there, the two agree, and that position does not make the
    cosine NaN. A NaN or inf on one side only still does (the metrics then say NaN).
    """
    same = ~np.isfinite(ref) & ((ref == out) | (np.isnan(ref) & np.isnan(out)))
    if not same.any():
        return ref, out
    return np.where(same, 0.0, ref), np.where(same, 0.0, out)


def cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-sample cosine of two row matrices (``evaluation.output_rows``) (1 where both rows are zero)."""
    ref, out = scaled_down(*same_nonfinite_zeroed(ref, out), axis=1)
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN or inf on one side: the cosine says NaN
        dot = (ref * out).sum(axis=1)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
        both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(out, axis=1) == 0)
        # clipped: rounding can put two equal rows' cosine one ulp above 1 (a drop of -0.0000)
        return np.where(both_zero, 1.0, np.clip(dot / np.where(norms == 0, 1.0, norms), -1.0, 1.0))


#: The most channels along axis 1 :func:`small_channels` reads (more is a sequence or pixel axis).
CHANNELS_MAX = 1024
#: A channel is small when it holds at most this fraction of an even share of its output's energy.
SMALL_SHARE = 1e-3
#: Small channels whose error is this many times the gate's drop (or more) are hidden from the gate.
HIDDEN_RATIO = 10.0


def _span(channels: list[int]) -> str:
    """``4-21`` for a run of channels, else the list (``3, 7, 9``; the first eight)."""
    if channels == list(range(channels[0], channels[-1] + 1)) and len(channels) > 2:
        return f"{channels[0]}-{channels[-1]}"
    return ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")


def _comparable_rows(ref: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(ref, out, 1.0)`` as they are when finite and of moderate size (no copy); else with 0
    where either is not finite and both divided by ``ref``'s peak, returned third, so energies
    do not overflow."""
    peak = float(np.abs(ref).max(initial=0.0)) if np.isfinite(ref).all() and np.isfinite(out).all() else None
    if peak is not None and peak < 1e100:  # squares summed over ~1e9 values stay finite
        return ref, out, 1.0
    ref, out = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
    keep = np.isfinite(ref) & np.isfinite(out)
    ref, out = np.where(keep, ref, 0.0), np.where(keep, out, 0.0)
    scale = float(np.abs(ref).max(initial=0.0)) or 1.0
    return ref / scale, out / scale, scale


def _channel_energy(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """The sum of squares of ``x`` per index of its ``axis`` (1 or the last), in float64 without a
    float64 copy of ``x`` (nor any copy: no transpose)."""
    if axis == x.ndim - 1:
        v = x.reshape(-1, x.shape[-1])  # a view of a contiguous array
        return np.einsum("pc,pc->c", v, v, dtype=np.float64)
    v = x.reshape(x.shape[0], x.shape[1], -1)
    return np.einsum("ncp,ncp->c", v, v, dtype=np.float64)


def _log_energy(x: np.ndarray) -> float:
    """log of the sum of squares of ``x``'s finite values (``-inf`` when none is above 0)."""
    flat, _, scale = _comparable_rows(x.reshape(-1), x.reshape(-1))
    energy = float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return float(np.log(energy)) + 2.0 * float(np.log(scale)) if energy > 0 else float("-inf")


def small_channels(reference: list[np.ndarray], outputs: list[np.ndarray], drop: float) -> dict[str, Any] | None:
    """The channels of small values beside large ones in one output, and how well ``outputs`` reproduce them.

    Along axis 1 of each float output of rank >= 3 (at most :data:`CHANNELS_MAX` channels; else
    along its last axis, for a channels-last output such as YOLOv5's ``[N, anchors, 4 + 1 + classes]``),
    a channel is small when its energy (sum of squares over samples and positions) is at
    most :data:`SMALL_SHARE` of an even share of the output's: a detector's class scores
    (0-1) beside box coordinates (0-320). Their cosine is taken over all of them together
    (every sample and position), so the active ones count and the ones that stay near 0
    (a class never seen) do not dominate. Values that are not finite on either side are
    left out, and each output is scaled by its peak first, so neither NaN nor float64 past
    1e154 spoil the energies. Magnitudes alone cannot tell scores that matter from the
    probabilities of classes the data never shows: those round to 0 at 8 bits and are
    reported too (a warning, never the gate).

    Returns:
        For the output whose small channels are reproduced worst: ``{"output": index, "axis",
        "channels": "4-21", "count", "of", "cosine", "energy_share" (of all outputs),
        "hidden"}``, ``hidden`` when ``1 - cosine`` is at least :data:`HIDDEN_RATIO` times
        ``max(drop, 1e-4)``; ``None`` when no output has small channels.
    """
    found: list[tuple[int, dict[str, Any]]] = []
    for index, (ref, out) in enumerate(zip(reference, outputs)):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.dtype.kind != "f" or ref.ndim < 3 or ref.shape != out.shape:
            continue
        axis = next((a for a in (1, ref.ndim - 1) if 1 < ref.shape[a] <= CHANNELS_MAX), None)
        if axis is None:
            continue
        ref, out, _ = _comparable_rows(ref, out)
        energy = _channel_energy(ref, axis)  # channels last ([N, anchors, 6]): read in place, no copy
        small = np.flatnonzero(energy * len(energy) <= SMALL_SHARE * energy.sum())
        if not small.size or energy[small].sum() == 0:
            continue
        cos = float(cosines(np.take(ref, small, axis=axis).astype(np.float64).reshape(1, -1),
                             np.take(out, small, axis=axis).astype(np.float64).reshape(1, -1))[0])
        found.append((index, {"output": index, "axis": axis, "channels": _span(small.tolist()), "count": int(small.size),
                              "of": int(len(energy)), "cosine": cos,
                              "energy_share": float(energy[small].sum() / energy.sum())}))
    worst = None
    if found:  # each output's share of all outputs' energy, on logs (no overflow)
        logs = [_log_energy(np.asarray(r)) for r in reference if np.asarray(r).dtype.kind == "f"]
        top = max(logs)
        log_total = top + float(np.log(sum(np.exp(e - top) for e in logs if e > float("-inf"))))
        for index, record in found:
            record["energy_share"] *= float(np.exp(_log_energy(np.asarray(reference[index])) - log_total))
            if worst is None or record["cosine"] < worst["cosine"]:
                worst = record
    if worst is not None:
        worst["hidden"] = bool(1.0 - worst["cosine"] >= HIDDEN_RATIO * max(drop, 1e-4))
    return worst
