"""SmoothQuant applied to the trainable module before ``recover: {qat: true}`` trains it.

When the recipe's ``quantize`` step smooths its layers (the recipe's ``smoothquant:``, or
the attention preset on a transformer), the smoothing ``X W = (X / s)(diag(s) W)`` must
happen *before* fake-quantized training: done after it, by ``quantize``, it would rescale
the inputs and weights whose quantizers training learned. So the recovery stage plans the
smoothing on the dense captured graph exactly as ``quantize`` would
(:func:`compressor.passes._smoothquant.plan_smoothing`: same layers, same calibration
statistics, same ``s``) and applies case 1, ``X / s`` folded into the LayerNorm that
produces ``X``, to the module's parameters:

    gamma' = gamma / s,  beta' = beta / s,  W_j'[:, k] = W_j[:, k] · s_k  (every reader j)

exact in float (up to rounding), so the student computes what it did and the teacher's
targets are unchanged. The fake quantizers are then attached to the smoothed module and
initialised on its (smoothed) activations; ``quantize`` leaves every input whose range was
learned unsmoothed (it is smoothed already), so the quantizers written are the ones trained.

Case 2 (``X`` not produced by a foldable LayerNorm: a GELU output, a post-LN residual)
would need a ``Mul`` in the module's forward; such a group, and one whose parameters the
module does not name, is not smoothed, and ``quantize`` does not smooth it either (its
input range is learned): it is trained and quantized unsmoothed, reported in the manifest.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from compressor.data import Dataset

__all__ = ["smooth_module", "smoothing_for"]

logger = logging.getLogger(__name__)


def _input_axis(param: torch.Tensor, weight: np.ndarray, layer: Any) -> int | None:
    """The axis of ``param`` holding the layer's input channels (``weight`` is the graph's copy)."""
    graph_in = 1 - layer.output_axis() if weight.ndim == 2 else None
    if graph_in is None or param.dim() != 2:
        return None
    p = param.detach().double().numpy()
    if p.shape != weight.shape and p.shape == weight.shape[::-1]:
        return 1 - graph_in
    if p.shape != weight.shape:
        return None
    if p.shape[0] != p.shape[1]:
        return graph_in
    # square: the orientation whose values line up (masks may have zeroed some since capture)
    same, flipped = abs(float((p * weight).sum())), abs(float((p * weight.T).sum()))
    return graph_in if same >= flipped else 1 - graph_in


def smooth_module(module: torch.nn.Module, dense: Any, opts: Any, preset: Any, caps: Any, calib: Dataset
                  ) -> dict[str, Any]:
    """Fold ``quantize``'s SmoothQuant case 1 into ``module``'s parameters (module docstring).

    Args:
        module: The student, changed in place.
        dense: The dense captured model (an ``ir.Model``; read, not changed).
        opts: ``quantize``'s options with the attention preset applied (``smoothquant`` set).
        preset: The preset's entries (:func:`~compressor.passes._transformer_preset.with_preset`).
        caps: The target's capabilities.
        calib: The calibration samples ``quantize`` will see.

    Returns:
        The manifest's record: groups smoothed, and those left with why.
    """
    from compressor.passes._quantize_selection import mask_path_tensors, select_layers
    from compressor.passes._smoothquant import plan_smoothing
    from compressor.recover.qat import _param_for

    # read only: the statistics runner taps its own copy
    layers, _ = select_layers(dense.graph, caps, opts, preset)
    groups = plan_smoothing(dense, layers, calib, opts.smoothquant, skip=set(mask_path_tensors(dense.graph, layers)))
    params = dict(module.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    done: list[str] = []
    left: dict[str, str] = {}
    for group in groups:
        if group.layernorm is None:
            left[group.tensor] = "not produced by a LayerNorm whose only readers are the smoothed layers"
            continue
        ln = group.layernorm
        gamma = _param_for(ln.inputs[1], shapes)
        beta = _param_for(ln.inputs[2], shapes) if len(ln.inputs) > 2 and ln.inputs[2] is not None else None
        if gamma is None or (len(ln.inputs) > 2 and ln.inputs[2] is not None and beta is None):
            left[group.tensor] = f"LayerNorm {ln.name!r}: its gamma/beta match no parameter of the module"
            continue
        rows: list[tuple[str, int]] = []
        for layer in group.layers:
            name = _param_for(layer.weight, shapes)
            axis = None if name is None else _input_axis(params[name], layer.weight.const_value.numpy(), layer)
            if axis is None or params[name].shape[axis] != group.scale.shape[0]:
                break
            rows.append((name, axis))
        if len(rows) != len(group.layers):
            left[group.tensor] = "a reading layer's weight matches no 2-D parameter of the module"
            continue
        s = torch.from_numpy(group.scale.astype(np.float64))
        with torch.no_grad():
            for name in (gamma, beta):
                if name is not None:
                    params[name].copy_((params[name].double() / s).to(params[name].dtype))
            for name, axis in rows:
                shape = [1, 1]
                shape[axis] = -1
                params[name].copy_((params[name].double() * s.reshape(shape)).to(params[name].dtype))
        done.append(group.tensor)
    for tensor, why in sorted(left.items()):
        logger.warning("recover: qat: the input %r is not smoothed (%s): trained and quantized unsmoothed", tensor, why)
    logger.info("recover: qat: SmoothQuant folded into %d LayerNorm(s) of the module before training", len(done))
    return {"smoothed": sorted(done), "not_smoothed": dict(sorted(left.items()))}


def smoothing_for(step_options: Any, graph: Any, caps: Any) -> tuple[Any, Any]:
    """``quantize``'s options with the attention preset ``graph`` gets on a target of ``caps``, and the
    preset (as ``quantize``)."""
    from compressor.passes._transformer_preset import attention_blocks, with_preset

    blocks = attention_blocks(graph) if step_options.attention == "auto" else 0
    return with_preset(step_options, blocks, caps.preset_float_roles)

