"""What a statistics run collects, and how one batch is folded into it.

A pass asks for *statistic points* (:class:`StatPoint`; the cases are those of
:mod:`compressor.quant.taps`); :class:`Collectors` holds every point's accumulator
(:class:`~compressor.quant.statistics.TensorStats` for ``range`` points,
:class:`ChannelMoments` for ``moments``) and folds one batch of fetched tensors into them,
padding tokens excluded. Both runners use it: :func:`compressor.quant.taps.run_points`
(the whole model in one run) and :class:`compressor.quant.staged.StagedStatistics` (stage
by stage on a changing model).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir

from compressor.data import MASK_INPUT
from compressor.errors import CompressorError
from compressor.quant.histogram import GrowingHistogram
from compressor.quant.statistics import TensorStats

if TYPE_CHECKING:
    from compressor.data import Dataset

__all__ = ["ChannelMoments", "Collected", "Collectors", "StatPoint", "batch_size", "main_values", "require_results",
           "start_collecting"]


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


class Collectors:
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
                     ) -> tuple[Collectors, set[str], list[StatPoint]]:
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
    collectors = Collectors(points, bins)
    inputs = {v.name for v in graph.inputs if v.const_value is None}
    constant = [p for p in points if p.tensor not in inputs and values[p.tensor].const_value is not None
                and values[p.tensor].producer() is None]
    collectors.feed({p.tensor: values[p.tensor].const_value.numpy() for p in constant}, None, None, constant)
    return collectors, inputs, [p for p in points if p not in constant]


def batch_size(data: Dataset, feed: Mapping[str, np.ndarray]) -> int:
    """Samples in one batch ``feed`` of ``data`` (1 when every input is one whole tensor per sample)."""
    return 1 if all(data.stacked.values()) else next(
        feed[s.name].shape[0] for s in data.specs if not data.stacked[s.name])


def require_results(collectors: Collectors) -> None:
    """Raises CompressorError when a point got no batch (the data gave none to run)."""
    empty = [p.tensor for p, r in collectors.results.items() if r is None]
    if empty:
        raise CompressorError("statistics: the calibration data gave no batch to run (too few samples for the "
                              f"model's fixed batch size?), so there are no moments of {', '.join(map(repr, empty))}")
