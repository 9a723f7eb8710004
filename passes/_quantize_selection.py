"""Which layers and tensors ``quantize`` quantizes, why the others stay float, and what it
says when nothing was quantized.

1. The layers are those :func:`~._placement.find_layers` finds for the target (scope, op
   types, joins); with the transformer preset's ``eltwise`` (a model with attention) a
   residual join that is not a convolution's stays float (:func:`select_layers`); an op
   without weights that the target runs as a node unit is kept only where its output gets
   a pair (:func:`~._output_qdq.open_units`).
2. A weight holding NaN/inf cannot be quantized: refused, naming the layer and the weight
   (:func:`refuse_nonfinite_weights`, exit 2).
3. An activation computed only from integer inputs and used as a mask or shape path stays
   float (:func:`mask_path_tensors`, case 1 of :mod:`._placement`).
4. A run that quantizes nothing says why (:func:`nothing_quantized`): each distinct
   reason with how many layers it kept float, or that the quantizable ops are absent, or
   only inside ``If``/``Loop``/``Scan`` bodies.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from compressor.passes._float32 import HALF
from compressor.passes._layers import Layer
from compressor.passes._output_qdq import open_units
from compressor.passes._placement import find_layers, integer_derived, mask_uses
from compressor.passes._transformer_preset import is_transformer_residual
from compressor.targets.base import Capabilities, on_cpu

from compressor.errors import InvalidModel

if TYPE_CHECKING:
    from compressor.passes.quantize import QuantizeOptions

__all__ = ["half_precision", "mask_path_tensors", "nothing_quantized", "refuse_nonfinite_weights", "say_nothing_quantized",
           "select_layers"]

logger = logging.getLogger("compressor.passes.quantize")


def select_layers(graph: ir.Graph, caps: Capabilities, opts: QuantizeOptions,
                  preset: Collection[str]) -> tuple[list[Layer], dict[str, str]]:
    """The layers to quantize and the skipped ones with the reason (case 1)."""
    found, why = find_layers(graph, caps, ops=opts.ops, scope=opts.scope,
                             activation_matmuls=opts.activation_matmuls, eltwise=opts.eltwise)
    if "eltwise" in preset:  # a transformer's residual adds stay float, a convolution's join not
        for layer in [la for la in found if is_transformer_residual(la)]:
            found.remove(layer)
            why[layer.name] = "residual join in a model with attention (attention: auto)"
    for layer in [la for la in found if on_cpu(la.node)]:
        found.remove(layer)
        why[layer.name] = "runs on the CPU front end in float (qnn-cpu-front-end)"
    why.update(open_units(found))
    return found, why


def half_precision(layers: list[Layer]) -> list[tuple[str, str]]:
    """``(layer, why)`` for the layers whose activations or weight are float16/bfloat16."""
    out = []
    for layer in layers:
        values = [v for _, v in layer.activations] + ([layer.weight] if layer.weight is not None else [])
        half = next((v for v in values if v.dtype in HALF), None)
        if half is not None:
            out.append((layer.name, f"input {half.name!r} is {half.dtype.name.lower()}"))
    return out


def refuse_nonfinite_weights(layers: list[Layer], shown: int = 5) -> None:
    """Refuse layers whose constant weight holds NaN/inf (case 2).

    Raises:
        InvalidModel: naming each such layer and weight (exit 2).
    """
    found = []
    for layer in layers:
        if layer.weight is None or layer.weight.const_value is None:
            continue
        w = layer.weight.const_value.numpy()
        if w.dtype.kind == "f" and not np.isfinite(w).all():
            found.append(f"{layer.name}: weight {layer.weight.name!r} holds {int((~np.isfinite(w)).sum())} NaN/inf "
                         "value(s)")
    if found:
        raise InvalidModel(f"weights hold NaN/inf and cannot be quantized: {'; '.join(found[:shown])}"
                           f"{f' (+{len(found) - shown} more)' if len(found) > shown else ''}; fix the model's "
                           "weights, or keep those layers float with quantize: {scope: {exclude: [NAME]}}")


def mask_path_tensors(graph: ir.Graph, layers: list[Layer]) -> dict[str, str]:
    """The activation inputs of ``layers`` that stay float as mask or shape paths, with the reason (case 3)."""
    derived, used_as_mask = integer_derived(graph), mask_uses(graph)
    return {value.name: (f"derived only from integer input {derived[value.name]!r} and used as a mask/shape path "
                         f"({used_as_mask[value.name]})")
            for layer in layers for _, value in layer.activations
            if value.name in derived and value.name in used_as_mask}


def say_nothing_quantized(reason: str, caps: Capabilities) -> None:
    """Log that ``quantize`` quantized no layer, and why: a warning (the run is a no-op), except
    on a target without a float path (``caps.fallback == "int16"``, QNN HTP), whose own passes
    after ``quantize`` (``qnn-legalize``) quantize every tensor: there it is not a no-op."""
    if caps.fallback == "int16":
        logger.info("quantize: no layer quantized here (%s); the target's passes quantize every tensor after it "
                    "(it has no float path)", reason)
    else:
        logger.warning("quantize: nothing was quantized: %s", reason)


def nothing_quantized(model: ir.Model, skipped: dict[str, str], caps: Capabilities, shown: int = 3) -> str:
    """Why no layer was quantized (case 4)."""
    if not skipped:
        ops = "/".join(sorted(caps.quantizable))
        inner = [n.name or n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)
                 if n.graph is not model.graph and n.op_type in caps.quantizable]
        if inner:
            return (f"the main graph has no {ops} the target quantizes; {len(inner)} such node(s) inside "
                    f"If/Loop/Scan bodies (e.g. {inner[0]!r}) are left alone")
        return f"the model has no layer the target quantizes ({ops})"
    by_reason: dict[str, list[str]] = {}
    for name, why in sorted(skipped.items()):
        by_reason.setdefault(why, []).append(name)
    parts = [f"{len(names)} layer(s) {why} ({', '.join(names[:shown])}{', ...' if len(names) > shown else ''})"
             for why, names in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0]))]
    more = f"; {len(parts) - 2 * shown} more reason(s) in stats['skipped_layers']" if len(parts) > 2 * shown else ""
    return f"all {len(skipped)} candidate layer(s) kept float: " + "; ".join(parts[:2 * shown]) + more
