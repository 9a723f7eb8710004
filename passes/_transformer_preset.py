"""The transformer preset of ``quantize`` (``attention: auto``, the default).

NNCF's user must ask for ``model_type=TRANSFORMER``; here a model gets the preset when
:mod:`._attention` finds attention blocks in it by structure (a MatMul of two activations
feeding a Softmax whose output is the left operand of a second one), and only the
options the recipe leaves unset take it. Each setting was measured on all-MiniLM-L6-v2
(docs/design.md, "One int8 recipe"):

1. ``float_activations: [attention-keys, attention-context]``: the key projections keep
   a float input (int8 weights) and ``probs · V`` stays float: softmax cancels an error
   common to every key, so query errors are damped and key errors are not;
2. ``smoothquant: {alpha: 0.9}`` on the linear layers (outlier channels of LayerNorm
   outputs moved into the weights), with 8-bit activations only: with ``activations:
   int16`` (W8A16) an outlier channel costs the activations little, and smoothing only
   makes the int8 weights harder (MiniLM on QNN HTP, as-written simulation: pooled cosine
   0.9986 with it, 0.9996 without);
3. residual joins stay float unless one input comes from a convolution (straight, through
   its activation or a feature map's data movement: ``computed_by``; a convolution's join
   keeps the residual path in int8; a transformer's residual add carries the outliers):
   :func:`is_transformer_residual`.

A model without attention blocks is quantized exactly as with ``attention: off``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import onnx_ir as ir
from compressor.passes._attention import attention_projections
from compressor.passes._layers import Layer
from compressor.passes._placement import computed_by
from compressor.passes._smoothquant import SmoothQuantOptions

__all__ = ["TRANSFORMER_PRESET", "attention_blocks", "float_activation_layers", "is_transformer_residual",
           "with_preset"]

OptionsT = TypeVar("OptionsT")

#: What ``attention: auto`` gives the unset options of a model with attention blocks (1, 2).
TRANSFORMER_PRESET: dict[str, Any] = {
    "float_activations": ("attention-keys", "attention-context"),
    "smoothquant": SmoothQuantOptions(alpha=0.9),
}
_CONVS = frozenset({"Conv", "ConvTranspose"})


def attention_blocks(graph: ir.Graph) -> int:
    """How many attention blocks (scores MatMuls feeding a Softmax) :mod:`._attention` finds."""
    return sum("attention-scores" in roles for roles in attention_projections(graph).values())


def with_preset(opts: OptionsT, blocks: int, float_roles: tuple[str, ...] | None = None
                ) -> tuple[OptionsT, tuple[str, ...]]:
    """``opts`` (``quantize``'s options) with the unset ones filled, and the names the preset set.

    ``float_roles``: the target's own float roles for the preset (its capabilities'
    ``preset_float_roles``; ``None``: the preset's). Without attention blocks the unset
    options take their plain defaults: no float roles, no SmoothQuant, every join the
    target lists.
    """
    preset: dict[str, object] = {}
    if blocks:
        own = TRANSFORMER_PRESET if float_roles is None else {**TRANSFORMER_PRESET, "float_activations": float_roles}
        preset = {k: v for k, v in own.items() if getattr(opts, k) is None}
        if getattr(opts, "activations", "int8") == "int16":  # (2): nothing to migrate at 16 bits
            preset.pop("smoothquant", None)
        if opts.eltwise is None:
            preset["eltwise"] = True  # a convolution's joins only: the caller drops is_transformer_residual ones (3)
    resolved = dataclasses.replace(opts, **preset)
    return dataclasses.replace(resolved, eltwise=resolved.eltwise is not False,
                               float_activations=resolved.float_activations or ()), tuple(preset)


def is_transformer_residual(layer: Layer) -> bool:
    """A join of activations (no weight) with no input from a convolution (:func:`computed_by`, (3))."""
    if layer.weight is not None or layer.quant.weights is not None:
        return False
    return not any(computed_by(v, _CONVS) for _, v in layer.activations)


def float_activation_layers(graph: ir.Graph, roles: tuple[str, ...]) -> dict[str, str]:
    """Node name -> why its activations stay float, for the layers with one of ``roles``."""
    if not roles:
        return {}
    found = {name: sorted(set(has) & set(roles)) for name, has in attention_projections(graph).items()}
    return {name: f"activation kept float (float_activations: {', '.join(which)})"
            for name, which in found.items() if which}
