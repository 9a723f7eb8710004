"""One-shot masks from the graph passes, mapped back onto the module's parameters.

The recipe's own sparsity passes (SparseGPT, Wanda, magnitude: one code path with the
one-shot flow) run on the captured dense graph; every weight they change is traced back
to the module parameter it came from, and training starts from the one-shot weights with
their masks.

Tracing a graph weight ``G`` (of a Conv/Gemm/MatMul) back to a parameter ``P``: in the
reduction-rows view (:mod:`compressor.passes._sparsity`: one row per output channel and
kernel position, input channels along the row) both are the same matrix up to one factor
per output channel, ``R(G)[o] = r_o · R(P)[o]``: ``r_o = 1`` for a Linear (its MatMul form
``Wᵀ`` has the same rows view) and ``γ_o / sqrt(σ²_o + ε)`` for a Conv the exporter fused a
BatchNorm into. Candidates are the parameters named by the weight (its name, or the
``folded_from`` record of the exporter's optimizer, see
:func:`compressor.capture.name_folded_weights`), else every parameter of the same rows
shape; the first whose ``r`` explains ``G`` to float precision wins. The parameter then
starts at ``R(G_pruned)[o] / r_o`` with the mask ``G_pruned != 0``. A changed weight no
parameter explains is named in a warning and trains dense; the pass after recovery prunes
it one-shot.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from compressor.passes._layers import PRUNABLE_OPS, Layer, find_weight_layers
from compressor.scope import Scope

__all__ = ["MappedWeight", "map_pruned_weights"]

logger = logging.getLogger(__name__)

_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_RTOL = 1e-4


@dataclasses.dataclass
class MappedWeight:
    """A pruned graph weight traced to a module parameter (arrays in the parameter's shape)."""

    param: str
    graph_weight: str
    weight: np.ndarray  # the one-shot weight (zeros where pruned)
    mask: np.ndarray  # 1 where kept


def _source_names(value: ir.Value) -> list[str]:
    names = [value.name or ""]
    try:
        sources = ast.literal_eval(value.metadata_props.get(_FOLDED_FROM, ""))
        names += [s for s in sources if isinstance(s, str)] if isinstance(sources, list) else []
    except (ValueError, SyntaxError):
        pass
    return [n for n in names if n]


def _rows(p: np.ndarray) -> np.ndarray:
    return np.moveaxis(p, 1, -1).reshape(-1, p.shape[1])


def _unrows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.moveaxis(rows.reshape((shape[0], *shape[2:], shape[1])), -1, 1)


def _ratio(g_rows: np.ndarray, p_rows: np.ndarray, out: int) -> np.ndarray | None:
    """Per-output-channel ``r`` with ``g = r · p`` to float precision, or None."""
    if g_rows.shape != p_rows.shape or g_rows.shape[0] % out:
        return None
    g, p = g_rows.reshape(out, -1).astype(np.float64), p_rows.reshape(out, -1).astype(np.float64)
    pp = (p * p).sum(1)
    r = np.where(pp > 0, (g * p).sum(1) / np.where(pp > 0, pp, 1.0), 1.0)
    scale = max(float(np.abs(g).max()), 1e-30)
    return r if float(np.abs(g - r[:, None] * p).max()) <= _RTOL * scale else None


def _layers(model: ir.Model) -> dict[str, Layer]:
    found, _ = find_weight_layers(model.graph, PRUNABLE_OPS, Scope())
    return {layer.node.name: layer for layer in found if layer.node.name}


def map_pruned_weights(before: ir.Model, after: ir.Model, params: Mapping[str, np.ndarray]
                       ) -> tuple[list[MappedWeight], list[str]]:
    """Trace every weight the sparsity passes changed (``before`` → ``after``) to a parameter.

    Args:
        before: The graph just before the first sparsity pass.
        after: The graph after the last one (same node names).
        params: The module's parameters (numpy, at least 2-D, input channels on axis 1).

    Returns:
        The mapped weights, and the names of changed graph weights no parameter explains.
    """
    old, new = _layers(before), _layers(after)
    mapped: list[MappedWeight] = []
    unmapped: list[str] = []
    used: set[str] = set()
    for name, layer in new.items():
        if name not in old or layer.weight.const_value is None:
            continue
        w_before, w_after = old[name].array(), layer.array()
        if w_before.shape == w_after.shape and np.array_equal(w_before, w_after):
            continue
        g_rows, g_new = old[name].to_rows(w_before), layer.to_rows(w_after)
        hints = _source_names(old[name].weight)
        named = [p for p in params if any(h == p or h.endswith("." + p) or p.endswith("." + h) for h in hints)]
        others = [p for p in params
                  if p not in named and params[p].ndim >= 2 and _rows(params[p]).shape == g_rows.shape]
        hit = None
        for pname in named + others:
            p = params[pname]
            if pname in used or p.ndim < 2:
                continue
            r = _ratio(g_rows, _rows(p), p.shape[0])
            if r is not None:
                hit = (pname, r)
                break
        if hit is None:
            unmapped.append(layer.weight.name or name)
            continue
        pname, r = hit
        used.add(pname)
        p = params[pname]
        per_row = np.repeat(r, g_new.shape[0] // p.shape[0])[:, None]
        rows = np.where(per_row != 0, g_new / np.where(per_row != 0, per_row, 1.0), 0.0).astype(p.dtype)
        keep = (g_new != 0).astype(p.dtype)
        mapped.append(MappedWeight(pname, layer.weight.name or name, _unrows(rows * keep, p.shape),
                                   _unrows(keep, p.shape)))
    return mapped, unmapped
