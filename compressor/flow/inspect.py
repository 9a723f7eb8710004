"""``compress inspect``: what a model is and what the built-in passes would do to it."""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor.capture import capture
from compressor.errors import UsageError
from compressor.inputs import InputSpec, model_input_specs
from compressor.model_io import clone_model, default_opset
from compressor.pipeline import PassContext, available_passes

__all__ = ["inspect_model"]

logger = logging.getLogger(__name__)


def _value_spec(value: ir.Value) -> dict[str, str]:
    shape = "?" if value.shape is None else InputSpec(
        value.name, tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in value.shape), "").shape_text()
    dtype = "?" if value.dtype is None else str(value.dtype.name).lower()
    return {"name": value.name, "shape": shape, "dtype": dtype}


def _parameter_counts(model: ir.Model) -> tuple[int, int]:
    """Weight elements in the graph's initializers, and in ``Constant`` nodes (subgraphs included).

    paddle2onnx writes every weight as a ``Constant`` node and no initializer: counting
    initializers alone read "0 parameters" for a 3.5M-parameter recogniser.
    """
    in_inits = sum(int(np.prod(v.shape.numpy())) if v.shape is not None else 0
                   for v in model.graph.initializers.values())
    in_nodes = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attributes.values():
            if attr.name in ("value", "sparse_value"):
                in_nodes += int(np.prod(attr.value.shape.numpy()))
            elif attr.name in ("value_floats", "value_ints", "value_strings"):
                in_nodes += len(attr.value)
            else:  # value_float, value_int, value_string
                in_nodes += 1
    return in_inits + in_nodes, in_nodes


def _runs_after(p: Any, passes: dict[str, type]) -> str | None:
    """Why ``p`` cannot be tried on its own here: the passes it runs after need calibration data."""
    for prop in sorted(p.requires - {"captured"}):
        providers = [c for c in passes.values() if prop in c.provides]
        if not providers:
            return f"needs {prop!r}, which no pass provides"
        if any(getattr(c(), "needs_calibration", False) for c in providers):
            return f"runs after {' or '.join(c.name for c in providers)} (which needs calibration data)"
    return None


def _would_change(model: ir.Model) -> dict[str, dict[str, Any]]:
    """Run each built-in pass on a copy (after the passes it requires) and report."""
    passes = available_passes()
    out: dict[str, dict[str, Any]] = {}
    for name, cls in passes.items():
        try:
            p = cls()
        except Exception as err:  # a pass whose options have required keys
            out[name] = {"would_change": "?", "detail": f"needs options ({err})"}
            continue
        copy = clone_model(model)
        ctx = PassContext(properties={"captured"})
        try:
            after = _runs_after(p, passes)
            if after:
                out[name] = {"would_change": "?", "detail": after}
                continue
            for prop in sorted(p.requires - ctx.properties):
                provider = next(c for c in passes.values() if prop in c.provides)
                copy = provider().run(copy, ctx).model
                ctx.properties |= provider.provides
            if p.runs_on_target:
                out[name] = {"would_change": "?", "detail": "measures the model on a target's device (compress with "
                                                            "--target and --calib)"}
                continue
            if getattr(p, "needs_calibration", False):
                out[name] = {"would_change": "?", "detail": "needs calibration data"}
                continue
            result = p.run(copy, ctx)
            detail = ", ".join(f"{k}={v}" for k, v in result.stats.items() if not isinstance(v, (dict, list)))
            out[name] = {"would_change": "yes" if result.modified else "no", "detail": detail}
        except UsageError as err:  # the pass does not apply to this model (qnn-cpu-front-end without a Log)
            out[name] = {"would_change": "no", "detail": f"not applicable: {err}"[:200]}
        except Exception as err:
            out[name] = {"would_change": "?", "detail": f"{type(err).__name__}: {err}"[:200]}
    return out


def inspect_model(path: Path, *, trust_pickle: bool = False, input_overrides: dict | None = None,
                  imports: Sequence[str] = (), model_class: str | None = None,
                  model_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Inputs/outputs with shapes, op histogram, parameter count (initializers and ``Constant`` nodes), and
    pass applicability.

    ``trust_pickle``, ``imports``, ``model_class`` and ``model_kwargs`` say how a torch file
    is loaded (:func:`compressor.capture.capture`).
    """
    captured = capture(path, trust_pickle=trust_pickle, input_overrides=input_overrides, imports=imports,
                       model_class=model_class, model_kwargs=model_kwargs)
    model = captured.model
    ops = collections.Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
        for n in ir.traversal.RecursiveGraphIterator(model.graph))
    params, in_constant_nodes = _parameter_counts(model)
    inputs = [_value_spec(v) for v in model.graph.inputs if v.name in {s.name for s in model_input_specs(model)}]
    return {
        "format": captured.source_format,
        "opset": default_opset(model),
        "inputs": inputs,
        "outputs": [_value_spec(v) for v in model.graph.outputs],
        "ops": dict(ops),
        "nodes": sum(ops.values()),
        "parameters": params,
        "parameters_in_constant_nodes": in_constant_nodes,
        "passes": _would_change(model),
        **captured.describe(),  # import notes (dims read as dynamic, an opset upgrade)
    }
