"""Activation ranges learned in training (``recover: {qat: true}``), handed to ``quantize``.

The recovery stage fake-quantizes each layer's input with a learned scale ``s`` and a zero
point ``z`` (:mod:`compressor.recover.qat`); the int8 step must write exactly that
quantizer. It is handed over as the range

    ``lo = s · (qmin − z)``, ``hi = s · (qmax − z)``  (symmetric: ``hi = s · (qmax − z)``, ``lo = −hi``)

which :func:`compressor.quant.math.quant_params` turns back into ``(s, z)`` exactly:
``(hi − lo) / (qmax − qmin) = s`` (``s`` is float32 and ``qmax − z`` a small integer, so
the products are exact in float64) and ``qmin − lo / s = z``; ``lo <= 0 <= hi`` since
``qmin <= z <= qmax``, so the asymmetric case's widening to include 0 changes nothing.
Symmetric: ``max(|lo|, |hi|) / (qmax − z) = s`` with the spec's own ``z`` (0, or the
midpoint of an unsigned type).

An entry is keyed by what survives capture and the graph passes: the name of the
layer's weight initializer and of its activation input in the captured graph. ``quantize``
uses it only where both still name the layer's weight and input; a pass that changed the
input (SmoothQuant's ``X / s``, LayerNorm-affine folding) or the weight writes new names,
and such a layer is calibrated as usual (:meth:`LearnedRanges.match` says why).

Plain data, no torch import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from compressor.quant.spec import QuantSpec

__all__ = ["LearnedRange", "LearnedRanges"]


@dataclasses.dataclass(frozen=True)
class LearnedRange:
    """The learned quantizer of one layer's activation input.

    Attributes:
        weight: The layer's weight initializer name in the captured graph.
        tensor: The activation input's name there.
        lo: ``s · (qmin − z)``.
        hi: ``s · (qmax − z)``.
        spec: The activation spec it was learned for (dtype, symmetry).
    """

    weight: str
    tensor: str
    lo: float
    hi: float
    spec: QuantSpec


@dataclasses.dataclass(frozen=True)
class LearnedRanges:
    """Every learned activation range of one recovery run.

    Attributes:
        entries: One per fake-quantized layer (layers reading one tensor share its range).
        weights: How the weights were fake-quantized in training (the int8 step's scheme).
    """

    entries: tuple[LearnedRange, ...]
    weights: str = "per-output-channel symmetric min/max, as quantize"

    def match(self, layers: Iterable[Any], spec_of: Callable[[Any], QuantSpec]
              ) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
        """The learned ranges that apply to ``layers`` (``quantize``'s :class:`~compressor.passes._layers.Layer`).

        Args:
            layers: The layers whose activation inputs get Q/DQ.
            spec_of: The activation spec ``quantize`` gives a layer's input.

        Returns:
            Tensor name -> ``(lo, hi)``; and, for entries that do not apply, the weight
            name -> why (calibrated instead).
        """
        by_weight = {e.weight: e for e in self.entries}
        found: dict[str, tuple[float, float]] = {}
        unused: dict[str, str] = {}
        seen: set[str] = set()
        for layer in layers:
            entry = by_weight.get(getattr(layer.weight, "name", None) or "")
            if entry is None:
                continue
            seen.add(entry.weight)
            value = layer.activations[0][1] if layer.activations else None
            spec = spec_of(layer)
            if value is None or value.name != entry.tensor:
                unused[entry.weight] = (f"its input is now {getattr(value, 'name', None)!r}, not {entry.tensor!r} "
                                        "(a pass rewrote it)")
            elif ((spec := spec.for_range(entry.lo, entry.hi)).dtype, spec.symmetric) != (entry.spec.dtype,
                                                                                      entry.spec.symmetric):
                unused[entry.weight] = f"quantize uses {spec.dtype} for it, training {entry.spec.dtype}"
            elif found.get(entry.tensor, (entry.lo, entry.hi)) != (entry.lo, entry.hi):
                unused[entry.weight] = f"another learned range of {entry.tensor!r} came first"
            else:
                found[entry.tensor] = (entry.lo, entry.hi)
        for entry in self.entries:
            if entry.weight not in seen:
                unused.setdefault(entry.weight, "no quantized layer reads this weight (renamed by a pass, or out of "
                                                "quantize's scope)")
        return found, unused
