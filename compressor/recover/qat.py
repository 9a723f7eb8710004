"""``recover: {qat: true}``: fake quantization during fine-tuning, for the int8 step that follows.

The layers the recipe's ``quantize`` step will quantize (found on the captured dense graph
with that step's options and the target's capabilities, :func:`plan_layers`) are
fake-quantized in the trainable module:

1. **weights**, per output channel (or per tensor where the target's spec has no axis),
   symmetric, with the scale ``quantize`` computes from the weight itself,
   ``s_c = max|W_c| / qmax`` (``qmax`` 127, or 63 for a 7-bit target spec), rounded up
   to float32 as :func:`compressor.quant.math.quant_params` does:
   ``W' = clip(round(W / s_c), −qmax, qmax) · s_c``, with a straight-through gradient.
   The scale is not learned: it is the int8 step's own, so the trained weights are
   quantized after capture exactly as in training. A BatchNorm the exporter fuses into a
   Conv multiplies output channel ``c`` by ``r_c``; ``max|r_c W_c| = |r_c| max|W_c|``, so
   the per-channel integers are the same (per-tensor weights lose that invariance).
   Zeros stay exactly 0, so the N:M masks hold;
2. **activations** (each layer's input), per tensor with the target's activation spec,
   learned scale ``s`` (LSQ, Esser et al. 2020): ``x' = (clip(round(x / s) + z, qmin,
   qmax) − z) · s``; ``round`` passes the gradient straight through, so
   ``∂x'/∂s = round(x/s) − x/s`` inside the range and ``qmin − z`` / ``qmax − z`` where it
   clips; the gradient of ``s`` is scaled by ``g = 1 / sqrt(numel(x) · (qmax − z))``. The
   zero point ``z`` stays as initialised (LSQ+ would learn it too; a ReLU's input range
   starts at 0, where ``z = 0`` belongs). Layers reading one tensor share one quantizer,
   as they share one Q/DQ pair in the graph.

``s`` and ``z`` start where post-training quantization would put them: the step's own
calibrator (:class:`~compressor.quant.statistics.TensorStats`, minmax/percentile/mse) on
the calibration samples, through the module with float weights.

Why not ``torch.ao.quantization``'s ``FakeQuantize``/``_LearnableFakeQuantize``: the
learnable one is private API; both compute ``x · (1/s)`` where ONNX ``QuantizeLinear``
divides, so their forward can differ from the deployed Q/DQ by one step at a rounding
tie; and neither knows the 7-bit weight grid some targets need. The two small autograd
functions here reproduce :func:`compressor.quant.math.quantize_array` bit for bit.

Fake quantization is attached without changing the module's parameters: weights get a
``torch.nn.utils.parametrize`` parametrization (the trained parameter stays the same
object, which the mask schedule holds), inputs a forward pre-hook (``nn.Linear``,
``nn.Conv1d/2d/3d``) or, for a ``.pt2`` program's module, a call inserted into its FX graph
before ``aten.linear``/``aten.conv*``. :meth:`QatModule.remove` takes it all away again
before the module is captured (the float trained weights are exported; the int8 step
quantizes them as above). The learned ranges travel to ``quantize`` as
:class:`~compressor.quant.learned.LearnedRanges`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from compressor.quant.learned import LearnedRange, LearnedRanges
from compressor.quant.math import MIN_SCALE, dtype_bounds, quant_params
from compressor.quant.spec import QuantSpec
from compressor.quant.statistics import TensorStats

__all__ = ["QatLayer", "plan_layers", "QatModule", "WeightFakeQuant", "ActivationFakeQuant"]

logger = logging.getLogger(__name__)

_FX_LAYER_OPS = ("linear", "conv1d", "conv2d", "conv3d")
_HOOKED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class QatLayer:
    """One layer to fake-quantize.

    Attributes:
        param: The module's weight parameter (``path.weight``).
        weight: Its initializer name in the captured graph.
        tensor: The graph name of its activation input.
        activation: The activation spec, or ``None`` (the input stays float in ``quantize``).
        qmax: Largest weight integer (127, or 63 for 7-bit weights).
        per_channel: Weights per output channel (else per tensor).
    """

    param: str
    weight: str
    tensor: str
    activation: QuantSpec | None
    qmax: int
    per_channel: bool


def _param_for(weight: ir.Value, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The parameter a graph weight was exported from: by name (or the optimizer's record), same size."""
    from compressor.recover.masks import _source_names

    size = math.prod(weight.const_value.shape)
    for hint in _source_names(weight):
        for name, shape in shapes.items():
            if (hint == name or hint.endswith("." + name) or name.endswith("." + hint)) and math.prod(shape) == size:
                return name
    return None


def plan_layers(graph: ir.Graph, opts: Any, caps: Any, shapes: Mapping[str, tuple[int, ...]]
                ) -> tuple[list[QatLayer], dict[str, str]]:
    """The layers ``quantize`` (options ``opts``, target ``caps``) will quantize that a parameter explains.

    Returns:
        The layers, and the graph layers left out with why.

    A step that smooths its layers (SmoothQuant) has them smoothed in the module before
    training (:mod:`compressor.recover.smooth`); the names planned here are unchanged by it.
    """
    from compressor.passes._placement import find_layers
    from compressor.passes._transformer_preset import float_activation_layers
    from compressor.quant.revert import widened
    from compressor.recover.smooth import smoothing_for

    opts, preset = smoothing_for(opts, graph, caps)
    found, _ = find_layers(graph, caps, ops=opts.ops, scope=opts.scope, activation_matmuls=False, eltwise=False)
    float_acts = float_activation_layers(graph, opts.float_activations)
    wide = set(float_acts) if "float_activations" in preset and caps.fallback == "int16" else set()
    float_acts = {} if wide else float_acts
    bits = 16 if opts.activations == "int16" else 8
    layers, left = [], {}
    for layer in found:
        if layer.weight is None or layer.op not in ("Conv", "Gemm", "MatMul"):
            continue
        param = _param_for(layer.weight, shapes)
        if param is None or not param.endswith(".weight") or len(shapes[param]) < 2:
            left[layer.name] = f"weight {layer.weight.name!r} matches no weight parameter of the module"
            continue
        spec = layer.quant.weights
        narrow = spec.bits if layer.name not in float_acts else None  # weight-only layers: the full grid
        act = None
        if layer.name not in float_acts and layer.activations:
            act = widened(layer.quant.activations) if bits == 16 or layer.name in wide else layer.quant.activations
        layers.append(QatLayer(param, layer.weight.name, layer.activations[0][1].name, act,
                               2 ** ((narrow or 8) - 1) - 1,
                               opts.weights == "int8-per-channel" and spec.axis is not None))
    return layers, left


class _Round(torch.autograd.Function):
    """``round`` (half to even, as ONNX), with the identity gradient (straight through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _GradScale(torch.autograd.Function):
    """The identity, with the gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None


def _float32_at_least(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) as float32, rounded up where the cast rounded down (as ``quant_params``)."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


class WeightFakeQuant(torch.nn.Module):
    """Case 1 of the module docstring, as a parametrization of a torch weight (output channels on axis 0)."""

    def __init__(self, qmax: int, per_channel: bool):
        super().__init__()
        self.qmax, self.per_channel, self.enabled = qmax, per_channel, True

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """``s_c`` (float32), shaped to broadcast against ``w``."""
        a = w.detach().abs()
        amax = a.reshape(a.shape[0], -1).amax(1).reshape(-1, *[1] * (w.dim() - 1)) if self.per_channel else a.amax()
        return _float32_at_least((amax.double() / self.qmax).clamp_min(MIN_SCALE))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        s = self.scale(w)
        return torch.clamp(_Round.apply(w / s), -self.qmax, self.qmax) * s


class ActivationFakeQuant(torch.nn.Module):
    """Case 2 of the module docstring: per-tensor, learned scale; first observes (``mode``)."""

    def __init__(self, spec: QuantSpec, tensor: str):
        super().__init__()
        self.spec, self.tensor = spec, tensor
        self.qmin, self.qmax = dtype_bounds(spec.dtype)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.mode = "observe"  # observe | quantize | off
        self.stats = TensorStats(tensor)
        self.tokens: np.ndarray | None = None  # the batch's attention mask while observing
        self.initial: float | None = None  # the scale it started at

    def start(self, lo: float, hi: float) -> None:
        """Initialise ``s, z`` as ``quant_params`` would for ``[lo, hi]``, and start quantizing."""
        self.spec = self.spec.for_range(lo, hi)  # a dtype that follows the range (OpenVINO on AMX)
        self.qmin, self.qmax = dtype_bounds(self.spec.dtype)
        s, z = quant_params(lo, hi, self.spec)
        self.initial = float(s)
        with torch.no_grad():
            self.scale.fill_(float(s))
            self.zero_point.fill_(float(z))
        self.mode = "quantize"

    def step(self) -> torch.Tensor:
        """The scale in use (positive)."""
        return self.scale.clamp_min(MIN_SCALE)

    def learned(self) -> tuple[float, float]:
        """``(lo, hi)`` that ``quant_params`` turns back into this ``s, z`` (``compressor.quant.learned``)."""
        s, z = float(self.step().detach()), float(self.zero_point)
        if self.spec.symmetric:  # quant_params takes max(|lo|, |hi|) / (qmax - z)
            return -s * (self.qmax - z), s * (self.qmax - z)
        return s * (self.qmin - z), s * (self.qmax - z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.stats.update(x.detach().float().numpy(), x.shape[0] if x.dim() else None, self.tokens)
            return x
        z = self.zero_point
        s = _GradScale.apply(self.step(), 1.0 / math.sqrt(x.numel() * max(self.qmax - float(z), 1.0)))
        return (torch.clamp(_Round.apply(x / s) + z, self.qmin, self.qmax) - z) * s


class QatModule:
    """Fake quantization attached to a trainable module (see the module docstring).

    Args:
        trainable: The :class:`~compressor.recover.module.Trainable` student.
        layers: From :func:`plan_layers`.
    """

    def __init__(self, trainable: Any, layers: list[QatLayer]):
        from torch.nn.utils import parametrize

        self.trainable, self.module = trainable, trainable.module
        self.weights: dict[str, WeightFakeQuant] = {}
        self.quantizers: dict[str, ActivationFakeQuant] = {}
        self.layers: list[QatLayer] = []
        self._hooks: list[Any] = []
        self._fx_nodes: list[Any] = []
        #: SmoothQuant folded into the module before training (:func:`compressor.recover.smooth.smooth_module`).
        self.smoothing: dict[str, Any] | None = None
        for layer in layers:
            owner, _, attr = layer.param.rpartition(".")
            module = self.module.get_submodule(owner)
            if parametrize.is_parametrized(module, attr):
                continue  # a weight shared by two graph layers: once
            self.weights[layer.param] = WeightFakeQuant(layer.qmax, layer.per_channel)
            parametrize.register_parametrization(module, attr, self.weights[layer.param])
            if layer.activation is not None:
                if layer.tensor not in self.quantizers:
                    self.quantizers[layer.tensor] = ActivationFakeQuant(layer.activation, layer.tensor)
                quantizer = self.quantizers[layer.tensor]
                if not self._attach_input(module, layer.param, quantizer):
                    logger.warning("recover: qat: cannot reach the input of %s (%s) to fake-quantize it; its range is "
                                   "calibrated after training", owner, type(module).__name__)
                    layer = dataclasses.replace(layer, activation=None)
            self.layers.append(layer)
        for tensor in [t for t in self.quantizers if not any(la.tensor == t and la.activation for la in self.layers)]:
            del self.quantizers[tensor]

    def _attach_input(self, module: Any, param: str, quantizer: ActivationFakeQuant) -> bool:
        if isinstance(self.module, torch.fx.GraphModule):
            return self._insert_fx(param, quantizer)
        if not isinstance(module, _HOOKED):
            return False
        self._hooks.append(module.register_forward_pre_hook(lambda _m, args: (quantizer(args[0]), *args[1:])))
        return True

    def _insert_fx(self, param: str, quantizer: ActivationFakeQuant) -> bool:
        """Insert ``quantizer`` before every ``aten.linear``/``aten.conv*`` of the program that reads ``param``."""
        gm, done = self.module, False
        name = f"_qat_{len(self._fx_nodes)}"
        for node in list(gm.graph.nodes):
            op = getattr(node.target, "_opname", None)
            weight = node.args[1] if node.op == "call_function" and op in _FX_LAYER_OPS and len(node.args) > 1 else None
            if getattr(weight, "op", None) != "get_attr" or weight.target != param:
                continue
            if not hasattr(gm, name):
                gm.add_submodule(name, quantizer)
            with gm.graph.inserting_before(node):
                fq = gm.graph.call_module(name, (node.args[0],))
            node.replace_input_with(node.args[0], fq)
            self._fx_nodes.append(fq)
            done = True
        if done:
            gm.recompile()
        return done

    def parameters(self) -> list[Any]:
        """The learned scales."""
        return [q.scale for q in self.quantizers.values()]

    def initialise(self, call: Callable[[dict[str, Any]], Any], data: Any, batch: int, opts: Any) -> None:
        """Start every quantizer where ``quantize`` (options ``opts``) would calibrate it, on ``data``.

        The module runs with float weights and no activation quantization, as the graph does
        when ``quantize`` calibrates it.
        """
        from compressor.data import MASK_INPUT
        from compressor.recover.train import outputs_on

        for w in self.weights.values():
            w.enabled = False

        def observed(feed: dict[str, Any]) -> Any:
            mask = feed.get(MASK_INPUT)
            for q in self.quantizers.values():
                q.tokens = None if mask is None else mask.numpy().astype(bool)
            return call(feed)

        outputs_on(observed, data, batch)
        for w in self.weights.values():
            w.enabled = True
        bits = 16 if opts.activations == "int16" else 8
        for q in self.quantizers.values():
            q.tokens = None
            problem = q.stats.problem() if q.stats.count else "no values seen"
            if problem:
                logger.warning("recover: qat: input %r of %s is not fake-quantized: %s", q.tensor,
                               ", ".join(la.param for la in self.layers if la.tensor == q.tensor), problem)
                q.mode = "off"
                continue
            kwargs: dict[str, Any] = {"percentile": opts.percentile} if opts.calibrator == "percentile" else {}
            if opts.calibrator == "mse":
                kwargs["num_bits"] = bits
            q.start(*q.stats.range(opts.calibrator, **kwargs))

    def learned_ranges(self) -> LearnedRanges:
        """The ranges to hand to ``quantize``: one entry per layer whose input was fake-quantized."""
        entries = []
        for layer in self.layers:
            q = self.quantizers.get(layer.tensor)
            # a weight-only layer (activation None) reading a tensor another layer quantizes has no range of its own
            if q is not None and q.mode == "quantize" and layer.activation is not None:
                entries.append(LearnedRange(layer.weight, layer.tensor, *q.learned(), q.spec))
        return LearnedRanges(tuple(entries))

    def record(self) -> dict[str, Any]:
        """The manifest's ``recovery.qat``: what was fake-quantized, each input's scale before and after."""
        live = {t: q for t, q in self.quantizers.items() if q.mode == "quantize"}
        return {
            "layers": len(self.layers),
            "weights": LearnedRanges(()).weights,
            "activation_quantizers": len(live),
            "scales": {t: {"initial": q.initial, "learned": float(q.step().detach()), "zero_point": int(q.zero_point),
                           "dtype": q.spec.dtype} for t, q in sorted(live.items())},
            **({"smoothquant": self.smoothing} if self.smoothing is not None else {}),
        }

    def remove(self) -> None:
        """Take the fake quantization away; the module keeps its trained float weights."""
        from torch.nn.utils import parametrize

        for hook in self._hooks:
            hook.remove()
        if self._fx_nodes:
            gm = self.module
            for node in self._fx_nodes:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            for name in {n.target for n in self._fx_nodes}:
                delattr(gm, name)
            gm.recompile()
        for param in self.weights:
            owner, _, attr = param.rpartition(".")
            parametrize.remove_parametrizations(self.module.get_submodule(owner), attr, leave_parametrized=False)
        self._hooks, self._fx_nodes = [], []
