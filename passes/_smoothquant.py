"""SmoothQuant-style outlier migration for the ``quantize`` pass.

For an activation ``X`` (channels ``k`` on its last axis) read by linear layers with
constant weights ``W_j`` (rows ``k`` = input channels):

    s_k = max|X_k|^a / max_j max|W_j[k, :]|^(1-a)
    X W_j = (X / s) (diag(s) W_j)

Case 1: ``X / s`` is folded exactly into the LayerNormalization that produces ``X``
(``gamma' = gamma / s``, ``beta' = beta / s``) when the quantized layers are its only
readers; no op is added. Case 2 (otherwise: a post-LN residual also reads ``X``, or ``X``
comes from GELU): a ``Mul(X, 1/s)`` is inserted on the quantized layers' branch only;
backends fuse it into the following quantize step (OpenVINO folds it into FakeQuantize).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import NameAllocator, add_initializer
from compressor.passes._layers import Layer

from compressor.data import Dataset
from compressor.quant.taps import StatPoint, gather

__all__ = ["SmoothGroup", "SmoothQuantOptions", "plan_smoothing", "smooth_layers"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SmoothQuantOptions:
    """``smoothquant:`` options.

    Attributes:
        alpha: Migration strength, 0 (all difficulty stays on activations) to 1.
        floor_quantile: ``s`` is raised to at least this quantile of its own values (and
            capped at :data:`MAX_SCALE`). Without it a channel whose activations are
            tiny gets ``s << 1`` and ``X / s`` stretches it past the others, e.g. GELU's
            negative lobe in FFN inputs (MiniLM: ``1/s`` up to 14, the range of the
            quantized input from [-0.2, 1.3] to [-0.9, 1.3]). 0 disables the floor.
            NNCF's SmoothQuant uses 0.1 and 100.
    """

    alpha: float = 0.5
    floor_quantile: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"option 'alpha' must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.floor_quantile < 1.0:
            raise ValueError(f"option 'floor_quantile' must be in [0, 1), got {self.floor_quantile}")


#: Largest smoothing factor ``s``.
MAX_SCALE = 100.0


def _row_absmax(layer: Layer) -> np.ndarray:
    """max |W[k, :]| per input channel ``k`` (the max over the output-channel axis)."""
    return np.abs(layer.weight.const_value.numpy()).max(axis=layer.output_axis())


def _scale_rows(layer: Layer, s: np.ndarray, graph: ir.Graph, names: NameAllocator) -> None:
    w = layer.weight.const_value.numpy()
    # input channels on the axis that is not the output-channel one ([N, K]: Gemm transB=1)
    scaled = w * s[None, :] if layer.output_axis() == 0 else w * s.reshape((-1, 1))
    new = add_initializer(graph, names(f"{layer.weight.name}_smoothed"), scaled.astype(w.dtype))
    index = list(layer.node.inputs).index(layer.weight)
    layer.node.replace_input_with(index, new)
    layer.weight = new


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _smoothing(x_absmax: np.ndarray, group: list[Layer], alpha: float, floor_quantile: float) -> np.ndarray:
    """``s`` per input channel (module docstring), floored and capped (:class:`SmoothQuantOptions`)."""
    x_max = np.maximum(np.asarray(x_absmax, dtype=np.float64), 1e-5)
    w_max = np.maximum(np.max([_row_absmax(layer) for layer in group], axis=0).astype(np.float64), 1e-5)
    s = x_max**alpha / w_max ** (1.0 - alpha)
    floor = np.quantile(s, floor_quantile) if floor_quantile > 0 else 1e-5
    return np.clip(s, min(floor, MAX_SCALE), MAX_SCALE).astype(np.float32)


def _reduces_last_axis(layer: Layer) -> bool:
    """A MatMul (2-D weight) or Gemm (``transA=0``): input channels on the activation's last axis."""
    return layer.op in ("MatMul", "Gemm") and layer.activation_axis() in (-1, 1)


@dataclasses.dataclass
class SmoothGroup:
    """One activation to smooth and the weight layers reading it.

    Attributes:
        tensor: The activation's name.
        value: The activation.
        layernorm: The LayerNormalization producing it when ``X / s`` folds into its
            ``gamma``/``beta`` (case 1), else ``None`` (case 2: a ``Mul`` is inserted).
        layers: The layers reading it (their weights' rows get ``* s``).
        scale: ``s`` per input channel.
    """

    tensor: str
    value: ir.Value
    layernorm: ir.Node | None
    layers: list[Layer]
    scale: np.ndarray


def plan_smoothing(model: ir.Model, layers: list[Layer], data: Dataset, options: SmoothQuantOptions,
                   skip: set[str], cache: dict | None = None) -> list[SmoothGroup]:
    """The groups :func:`smooth_layers` smooths, with their ``s``; the model is not changed.

    The recovery stage applies case 1 to a torch module's parameters with it
    (:mod:`compressor.recover.smooth`).
    """
    by_tensor: dict[str, list[Layer]] = {}
    for layer in layers:
        for index, value in layer.activations:
            if index == 0 and layer.weight is not None and value.name not in skip and _reduces_last_axis(layer):
                by_tensor.setdefault(value.name, []).append(layer)
    groups = []
    for name, group in by_tensor.items():
        value = group[0].activations[0][1]
        # Its channels are the readers' weight rows (a MatMul's or a Gemm's input: the last
        # axis), so an unknown shape is no reason to skip it: shape inference stops at a
        # Reshape to a computed shape (PP-OCRv4's neck with its batch left dynamic: 9
        # tensors were left unsmoothed). A known rank under 2 is a vector: nothing to smooth.
        if value.shape is not None and len(value.shape) < 2:
            continue
        ln = value.producer()
        readers = {id(u.node) for u in value.uses()}
        foldable = (ln is not None and ln.op_type == "LayerNormalization" and _constant(ln.inputs[1]) is not None
                    and readers == {id(layer.node) for layer in group} and not value.is_graph_output())
        groups.append((name, value, ln if foldable else None, group))
    if not groups:
        return []
    points = {g[0]: StatPoint(g[0], "range", -1) for g in groups}
    found = gather(model, data, points.values(), {} if cache is None else cache)
    stats = {name: found[p] for name, p in points.items()}
    # A tensor holding sentinels or NaN/inf stays float (and so unsmoothed): 1/s would
    # turn -3.4e38 into -inf.
    return [SmoothGroup(name, value, ln, group,
                        _smoothing(stats[name].channel_absmax, group, options.alpha, options.floor_quantile))
            for name, value, ln, group in groups if stats[name].problem() is None]


def smooth_layers(model: ir.Model, layers: list[Layer], data: Dataset, options: SmoothQuantOptions,
                  skip: set[str], cache: dict | None = None) -> int:
    """Smooth every activation read only through weight layers; returns how many groups.

    ``cache`` (a ``PassContext.cache``) keeps the statistics of this very model for re-runs.
    """
    graph = model.graph
    groups = plan_smoothing(model, layers, data, options, skip, cache)
    names = NameAllocator(graph)
    for g in groups:
        name, value, ln, group, s = g.tensor, g.value, g.layernorm, g.layers, g.scale
        if ln is not None:  # case 1
            gamma = _constant(ln.inputs[1])
            new_gamma = add_initializer(graph, names(f"{ln.inputs[1].name}_smoothed"), (gamma / s).astype(gamma.dtype))
            ln.replace_input_with(1, new_gamma)
            beta = _constant(ln.inputs[2]) if len(ln.inputs) > 2 else None
            if beta is not None:
                new_beta = add_initializer(graph, names(f"{ln.inputs[2].name}_smoothed"), (beta / s).astype(beta.dtype))
                ln.replace_input_with(2, new_beta)
        else:  # case 2
            inv = add_initializer(graph, names(f"{name}_smooth_scale"), (1.0 / s).astype(np.float32))
            mul = ir.node("Mul", [value, inv], name=names(f"{name}_SmoothQuant"))
            mul.outputs[0].name = names(f"{name}_smoothed")
            mul.outputs[0].type, mul.outputs[0].shape = value.type, value.shape
            producer = value.producer()
            if producer is not None:
                graph.insert_after(producer, mul)
            else:
                graph.insert_before(graph.node(0), mul)
            for layer in group:
                for i, (index, act) in enumerate(layer.activations):
                    if act is value:
                        layer.node.replace_input_with(index, mul.outputs[0])
                        layer.activations[i] = (index, mul.outputs[0])
        for layer in group:
            _scale_rows(layer, s, graph, names)
        logger.debug("smoothquant: %s (%d layers), scale range %.3g..%.3g", name, len(group), s.min(), s.max())
    return len(groups)
