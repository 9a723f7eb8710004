"""``quantize``: static post-training quantization written as QuantizeLinear/DequantizeLinear.

For each compute layer the target quantizes (see :mod:`._placement`):

1. every activation input ``x`` gets ``DQ(Q(x, s, z), s, z)`` with ``s, z`` from the
   calibrated range ``[lo, hi]`` of ``x`` (calibrator ``minmax``, ``mean_minmax``,
   ``percentile`` or ``mse``):
   asymmetric ``s = (hi - lo) / (qmax - qmin)``, ``z = qmin - round(lo / s)``; symmetric
   ``s = max(|lo|, |hi|) / qmax``, ``z = 0``;
2. the constant weight ``W`` is stored quantized, ``Wq = clip(round(W / s_c))`` per output
   channel ``c`` with ``s_c = max|W_c| / 127``, and read through ``DQ(Wq, s_c, 0)``, so the
   artifact's weights are int8 (about 4x smaller than fp32);
3. optionally (``smoothquant: {alpha}``) before 1-2: activation outliers are migrated into
   the weights, ``X' = X / s``, ``W' = diag(s) W`` with ``s_k = max|X_k|^a / max|W_k|^(1-a)``,
   the ``1/s`` folded exactly into the producing LayerNormalization's scale and bias;
4. bias correction (``bias_correction: true``): weight rounding shifts each output
   channel's mean by ``E[x] · (DQ(Wq) − W)``; it is subtracted from the layer's bias,
   ``b' = b − E[x] · (DQ(Wq) − W)``, by the one bias correction of :mod:`._bias_correction`
   (a Conv's input mean per position, so zero padding is exact; a MatMul without a
   following bias ``Add`` gets one), with ``E[x]`` from the calibration statistics;
5. ``float_activations: [attention-keys, ...]`` keeps the activation inputs of the layers
   with those structural roles (:mod:`._attention`) float; a layer with a weight still
   gets it quantized (weight-only: int8 weights, float compute). The key projection is
   the one that needs it (MiniLM on OpenVINO: pooled cosine
   0.9961 -> 0.9977, 1000-query top-1 agreement 0.924 -> 0.949, see docs/design.md):
   softmax cancels an error that is the same for every key, so a query error is damped
   by the keys' common component, while a key error is not and the queries' common
   component ``q̄`` amplifies it (``q̄ · δk_j`` differs per key).

6. ``attention: auto`` (the default): where :mod:`._attention` finds attention blocks
   (``Softmax(f(Q Kᵀ)) V`` by structure, never by name), the options a recipe leaves
   unset take the transformer preset (:mod:`._transformer_preset`, what NNCF's
   ``model_type=TRANSFORMER`` asks for by hand): ``float_activations: [attention-keys,
   attention-context]``, ``smoothquant: {alpha: 0.9}``, and residual joins float unless
   they are a convolution's (``eltwise``). On a target with no float path
   (``Capabilities.fallback == "int16"``) those roles get 16-bit activations instead.
   A model without attention (a CNN) is quantized exactly as with ``attention: off``.

7. a layer whose inputs are all activations (``Q·Kᵀ``) uses the target's
   ``OpQuant.activation_only`` spec when it has one (OpenVINO: signed symmetric, the only
   form its CPU plugin runs as an int8 MatMul).

The result's ``quantization`` (:class:`~compressor.quant.revert.QuantizationRecord`) says,
per quantized layer, which input now reads which Q/DQ pair, the float tensor, range and
spec behind it, the float weight and the bias before correction: accuracy control gives a
layer back by editing the quantized graph with it, never by running this pass again.

The dtype, symmetry and channel axis of each tensor come from the target's
``Capabilities``; this pass never looks at the target's name. Tensors that must stay
float (mask and shape paths, non-finite or sentinel-dominated ranges) are skipped and
listed with the reason in ``stats["skipped_layers"]``/``stats["skipped_tensors"]``. A run
that quantizes nothing says so: a warning and ``stats["nothing_quantized"]`` with every
reason, summarised (nodes left inside ``If``/``Loop`` bodies included). A model that is quantized already (Q/DQ,
``ConvInteger``, ``QLinearConv``...: :func:`compressor.capture.onnx_import.quantized_nodes`) is
refused (exit 2): it is never quantized twice; so is a weight holding NaN/inf (exit 2,
naming the layer and the weight). A model computing in float16/bfloat16 is widened to
float32 first (:mod:`._float32`: exact; its inputs and outputs keep their dtype through
boundary casts): QuantizeLinear at opset 13 takes float32, calibration ranges are
float32, and the CPU targets run the float layers between int8 ones in float32.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from compressor.passes._attention import ROLES
from compressor.passes._bias_correction import correct_bias
from compressor.passes._float32 import HALF, widen_to_float32
from compressor.passes._layers import Layer
from compressor.passes._placement import find_layers, integer_derived, mask_uses
from compressor.passes._smoothquant import SmoothQuantOptions, smooth_layers
from compressor.passes._transformer_preset import (
    attention_blocks,
    float_activation_layers,
    is_transformer_residual,
    with_preset,
)
from compressor.targets.base import Capabilities

from compressor.capture.onnx_import import describe_quantized, quantized_nodes
from compressor.errors import CompressorError, InvalidModel
from compressor.pipeline import Pass, PassContext, PassResult, register_pass
from compressor.quant.math import (
    dequantize_array,
    quant_params,
    quantize_array,
    weight_quant_params,
)
from compressor.quant.revert import (
    ActivationInput,
    ConstantInput,
    QuantizationRecord,
    QuantizedLayer,
    widened,
)
from compressor.quant.qdq import QdqWriter
from compressor.quant.spec import QuantSpec
from compressor.quant.taps import StatPoint, gather
from compressor.scope import Scope

__all__ = ["Quantize", "QuantizeOptions", "activation_spec"]

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """Options of ``quantize``.

    Attributes:
        activations: Activation width; the target picks signedness and symmetry.
        weights: Per-output-channel or per-tensor symmetric int8 weights.
        calibrator: How a tensor's range is chosen from its statistics.
        percentile: Kept fraction of |x| for ``percentile`` (in percent).
        ops: Quantize only these op types (empty: every op the target quantizes).
        scope: Which layers (names or ``re:`` patterns, on node or weight names).
        activation_matmuls: Also quantize MatMuls whose two inputs are activations.
        eltwise: Also quantize the inputs of joins of activations the target runs in int8
            (residual ``Add``/``Sum``: OpenVINO then keeps the residual path in uint8).
            Unset: yes, except, in a model with attention, joins with no input straight
            from a convolution (a transformer's residual adds).
        smoothquant: Migrate activation outliers into weights before quantizing. Unset:
            none, or the preset's in a model with attention.
        bias_correction: Remove the output mean shift that weight rounding causes.
        float_activations: Layers with these structural roles keep float activation
            inputs; their weights, if any, are still quantized (weight-only). Unset: none,
            or the preset's in a model with attention.
        attention: ``auto``: attention blocks found by structure give the unset options
            the transformer preset; ``off``: every model is treated alike.
    """

    activations: Literal["int8", "int16"] = "int8"
    weights: Literal["int8-per-channel", "int8-per-tensor"] = "int8-per-channel"
    calibrator: Literal["minmax", "mean_minmax", "percentile", "mse"] = "percentile"
    percentile: float = 99.99
    ops: tuple[str, ...] = ()
    scope: Scope = Scope()
    activation_matmuls: bool = True
    eltwise: bool | None = None
    smoothquant: SmoothQuantOptions | None = None
    bias_correction: bool = False
    float_activations: tuple[Literal[ROLES], ...] | None = None
    attention: Literal["auto", "off"] = "auto"

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"option 'percentile' must be in (50, 100], got {self.percentile}")


def activation_spec(spec: QuantSpec, bits: int) -> QuantSpec:
    """The target's 8-bit activation spec widened to ``bits``."""
    return widened(spec) if bits == 16 else spec


def _bits(spec: QuantSpec) -> int:
    return 16 if "16" in spec.dtype else 8


class _QdqWriter:
    """Quantize's use of the Q/DQ writer: one pair per (tensor, spec), weight errors and sizes."""

    def __init__(self, graph: ir.Graph):
        self.qdq = QdqWriter(graph)
        self.names = self.qdq.names
        self._act: dict[tuple[int, QuantSpec], ir.Value] = {}
        self._w: dict[tuple[int, QuantSpec], ir.Value] = {}
        self.weight_bytes = [0, 0]
        self.errors: dict[int, np.ndarray] = {}  # id(weight value) -> DQ(Wq) - W

    def activation(self, value: ir.Value, spec: QuantSpec, lo: float, hi: float) -> ir.Value:
        key = (id(value), spec)
        if key not in self._act:
            self._act[key] = self.qdq.pair(value, *quant_params(lo, hi, spec))
        return self._act[key]

    def weight(self, value: ir.Value, spec: QuantSpec) -> ir.Value:
        key = (id(value), spec)
        if key not in self._w:
            w = value.const_value.numpy().astype(np.float32)
            scale, zp = weight_quant_params(w, spec)
            wq = quantize_array(w, scale, zp, spec)
            self.errors[id(value)] = dequantize_array(wq, scale, zp, spec).astype(np.float64) - w
            self.weight_bytes[0] += w.nbytes
            self.weight_bytes[1] += wq.nbytes
            self._w[key] = self.qdq.constant(value.name, wq, scale, zp, spec.axis, value.type, value.shape)
        return self._w[key]

    def replace_weight(self, layer: Layer, spec: QuantSpec) -> None:
        """Make ``layer`` read its weight through :meth:`weight`."""
        index = list(layer.node.inputs).index(layer.weight)
        layer.node.replace_input_with(index, self.weight(layer.weight, spec))


def _weight_spec(layer: Layer, per_channel: bool) -> QuantSpec:
    spec = layer.quant.weights or QuantSpec("int8", True, None)
    axis = layer.output_axis() if per_channel and spec.axis is not None else None
    return dataclasses.replace(spec, axis=axis)


@register_pass
class Quantize(Pass):
    """Static INT8 (or W8A16) quantization as Q/DQ pairs, calibrated on real samples."""

    name = "quantize"
    lossy = True
    description = "static post-training quantization as QuantizeLinear/DequantizeLinear pairs"
    Options = QuantizeOptions
    requires = frozenset({"constants-folded"})
    provides = frozenset({"quantized"})
    min_opset = 13
    needs_calibration = True

    def check_input(self, model: ir.Model) -> None:
        """Refuse an already-quantized model: a second rounding on the first, Q/DQ around integer ops."""
        found = quantized_nodes(model)
        if found:
            raise InvalidModel(f"the model is already quantized ({describe_quantized(found)}); compress the "
                               "float model it was made from, or use a recipe without 'quantize' (e.g. fold)")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts: QuantizeOptions = self.options
        self.check_input(model)  # also when run without a manager
        if ctx.calibration is None:
            raise CompressorError("quantize needs calibration data: pass --calib samples.npz")
        caps: Capabilities = ctx.target.capabilities if ctx.target is not None else Capabilities()
        if not caps.quantizable:
            raise CompressorError(f"target {getattr(ctx.target, 'name', None)!r} declares no quantizable ops")
        graph = model.graph
        blocks = attention_blocks(graph) if opts.attention == "auto" else 0
        opts, preset = with_preset(opts, blocks)
        if preset:
            logger.info("quantize: %d attention block(s) found by structure: transformer preset for %s",
                        blocks, ", ".join(preset))

        def layers_to_quantize() -> tuple[list[Layer], dict[str, str]]:
            found, why = find_layers(graph, caps, ops=opts.ops, scope=opts.scope,
                                     activation_matmuls=opts.activation_matmuls, eltwise=opts.eltwise)
            if "eltwise" in preset:  # case 6: a transformer's residual adds stay float, a convolution's join not
                for layer in [la for la in found if is_transformer_residual(la)]:
                    found.remove(layer)
                    why[layer.name] = "residual join in a model with attention (attention: auto)"
            return found, why

        layers, skipped = layers_to_quantize()
        half = _half_precision(layers)
        to_fp32 = 0
        if half:  # Q/DQ and ranges are float32; the model's inputs and outputs keep their dtype
            to_fp32 = widen_to_float32(model)
            said = ctx.cache.setdefault("quantize.widened_said", [])  # once, not on each re-run of the pass
            log = logger.debug if said else logger.warning
            log("quantize: %d layer(s) compute in float16/bfloat16 (e.g. %s: %s); the model is quantized in float32 "
                "(%d values widened; its inputs and outputs keep their dtype)", len(half), half[0][0], half[0][1],
                to_fp32)
            said.append(True)
            layers, skipped = layers_to_quantize()
        nonfinite = _nonfinite_weights(layers)
        if nonfinite:
            raise InvalidModel(f"weights hold NaN/inf and cannot be quantized: {'; '.join(nonfinite[:5])}"
                               f"{f' (+{len(nonfinite) - 5} more)' if len(nonfinite) > 5 else ''}; fix the model's "
                               "weights, or keep those layers float with quantize: {scope: {exclude: [NAME]}}")
        wide: set[str] = set()
        bits = 16 if opts.activations == "int16" else 8
        derived, used_as_mask = integer_derived(graph), mask_uses(graph)
        tensor_skips: dict[str, str] = {}
        for layer in layers:
            for _, value in layer.activations:
                if value.name in derived and value.name in used_as_mask:
                    tensor_skips[value.name] = (f"derived only from integer input {derived[value.name]!r} and used as "
                                                f"a mask/shape path ({used_as_mask[value.name]})")
        smoothed = 0
        if opts.smoothquant is not None:
            # Smooth every candidate layer (the transform is exact in float): a layer accuracy
            # control gives back reads its smoothed float weight and input, which compute what
            # the unsmoothed layer did; then find the layers to quantize again.
            candidates, _ = layers_to_quantize()
            smoothed = smooth_layers(model, candidates, ctx.calibration, opts.smoothquant, skip=set(tensor_skips),
                                     cache=ctx.cache)
            layers, skipped = layers_to_quantize()
        float_acts = float_activation_layers(graph, opts.float_activations)
        widened: list[str] = []
        if "float_activations" in preset and caps.fallback == "int16":
            # No float path on the target: the preset's roles get 16-bit activations instead.
            widened = sorted(name for name in float_acts if name not in wide)
            wide |= set(float_acts)
            float_acts = {}
        full = [layer for layer in layers if layer.name not in float_acts]
        names = sorted({v.name for layer in full for _, v in layer.activations} - set(tensor_skips))
        # Statistics depend only on the model before Q/DQ and the data: the runner caches
        # them per (model, data), so accuracy control's re-runs calibrate nothing. Ranges and
        # bias correction's input means (per position for a Conv: padding-exact) come in one run.
        points = {n: StatPoint(n) for n in names}
        mean_points = {v.name: StatPoint(v.name, "moments", axis) for layer in full
                       if layer.weight is not None and opts.bias_correction
                       for index, v in layer.activations[:1]
                       if index == 0 and v.name in points and (axis := layer.activation_axis()) is not None}
        found = gather(model, ctx.calibration, [*points.values(), *mean_points.values()], ctx.cache, bar=ctx.progress)
        stats = {n: found[p] for n, p in points.items()}
        means = {n: found[p] for n, p in mean_points.items()}
        ranges: dict[str, tuple[float, float]] = {}
        for name in names:
            problem = stats[name].problem()
            if problem:
                tensor_skips[name] = problem
                continue
            kwargs = {"percentile": opts.percentile} if opts.calibrator == "percentile" else {}
            if opts.calibrator == "mse":
                kwargs["num_bits"] = bits
            ranges[name] = stats[name].range(opts.calibrator, **kwargs)
        # recover: {qat: true}: the ranges learned in training replace the calibrated ones (compressor.quant.learned)
        learned, unlearned = ({}, {}) if ctx.learned_ranges is None else ctx.learned_ranges.match(
            full, lambda la: activation_spec(la.quant.activations, 16 if la.name in wide else bits))
        learned = {name: rng for name, rng in learned.items() if name in ranges}
        ranges.update(learned)
        if unlearned:
            logger.warning("quantize: %d range(s) learned in training not used, calibrated instead (e.g. the input "
                           "of %r: %s; all in stats['ranges_not_from_training'])", len(unlearned), *min(unlearned.items()))

        writer = _QdqWriter(graph)
        quantized: list[str] = []
        record: list[QuantizedLayer] = []
        corrected = 0
        weight_only_done: dict[str, str] = {}
        per_channel = opts.weights == "int8-per-channel"
        for layer in layers:
            if layer.name in float_acts:
                if layer.weight is not None:
                    # The full int8 range: with a float input the weight is dequantized, no
                    # integer kernel can saturate (the reason for 7-bit weights without VNNI).
                    writer.replace_weight(layer, dataclasses.replace(_weight_spec(layer, per_channel), bits=None))
                    weight_only_done[layer.name] = float_acts[layer.name]
                else:
                    skipped[layer.name] = float_acts[layer.name]
                continue
            acts = [(i, v) for i, v in layer.activations if v.name in ranges]
            if len(acts) < len(layer.activations):
                why = "; ".join(tensor_skips[v.name] for _, v in layer.activations if v.name in tensor_skips)
                skipped[layer.name] = f"activation kept float: {why}"
                continue
            layer_bits = 16 if layer.name in wide else bits
            key = layer.node.outputs[0].name
            edits: list[ActivationInput] = []
            constants: list[ConstantInput] = []
            for index, value in acts:
                pair = layer.quant.activation_only if layer.weight is None and layer.quant.weights is not None else None
                spec = activation_spec(pair or layer.quant.activations, layer_bits)
                layer.node.replace_input_with(index, writer.activation(value, spec, *ranges[value.name]))
                edits.append(ActivationInput(key, index, value.name, *map(float, ranges[value.name]), spec))
            if layer.weight is not None:
                constants.append(ConstantInput(key, list(layer.node.inputs).index(layer.weight), layer.weight.name,
                                               layer.weight.const_value.numpy().copy()))
                writer.replace_weight(layer, _weight_spec(layer, per_channel))
                x = layer.activations[0][1].name if layer.activations[0][0] == 0 else None
                if x in means:  # case 4: W - DQ(Wq) = -error
                    before = _bias_inputs(layer.node)
                    how = correct_bias(graph, layer, -writer.errors[id(layer.weight)], means[x], writer.names)
                    corrected += not how.startswith("skipped")
                    constants += _changed_bias(before, _bias_inputs(layer.node))
                    if how == "new add":  # the Add took over the output's name: re-key, zero its bias on give-back
                        edits, constants = _rekey_new_add(layer.node, key, edits, constants)
            quantized.append(layer.name)
            record.append(QuantizedLayer(layer.name, tuple(edits), tuple(constants)))
        model = writer.qdq.finish(model)  # 16-bit Q/DQ: the model is converted to opset 21
        for name, why in sorted(skipped.items()):
            logger.info("kept float: %s: %s", name, why)
        for name, why in sorted(weight_only_done.items()):
            logger.info("weight only: %s: %s", name, why)
        nothing = None if quantized or weight_only_done else _nothing_quantized(model, skipped, caps)
        if nothing:
            logger.warning("quantize: nothing was quantized: %s", nothing)
        return PassResult(model, bool(quantized or weight_only_done) or smoothed > 0 or to_fp32 > 0, {
            **({"nothing_quantized": nothing} if nothing else {}),
            "layers_quantized": len(quantized),
            "layers_float": len(skipped),
            "layers_weight_only": len(weight_only_done),
            "attention_blocks": blocks,
            "attention_preset": list(preset),
            "layers_widened_by_preset": widened,
            "tensors_float": len(tensor_skips),
            "smoothquant_groups": smoothed,
            "bias_corrected": corrected,
            "weight_mb_fp32": round(writer.weight_bytes[0] / 1e6, 3),
            "weight_mb_int8": round(writer.weight_bytes[1] / 1e6, 3),
            "layers": quantized,
            "skipped_layers": dict(sorted(skipped.items())),
            "skipped_tensors": dict(sorted(tensor_skips.items())),
            "weight_only_layers": dict(sorted(weight_only_done.items())),
            **({"float16_widened_to_float32": to_fp32} if to_fp32 else {}),
            **({"ranges_from_training": len(learned), "ranges_not_from_training": dict(sorted(unlearned.items()))}
               if ctx.learned_ranges is not None else {}),
        }, quantization=QuantizationRecord(tuple(record)))


def _bias_inputs(node: ir.Node) -> dict[tuple[str, int], tuple[ir.Value | None, Any]]:
    """The inputs bias correction may replace, with their tensors: the layer's own, and those
    of the nodes reading its output (a bias is corrected by a new value, or in place by a
    new tensor on the same value)."""
    readers = [node, *(use.node for use in node.outputs[0].uses())]
    return {(n.outputs[0].name, i): (v, None if v is None else v.const_value) for n in readers
            for i, v in enumerate(n.inputs)} | {(n.outputs[0].name, len(n.inputs)): (None, None) for n in readers}


def _changed_bias(before: dict[tuple[str, int], tuple[ir.Value | None, Any]],
                  after: dict[tuple[str, int], tuple[ir.Value | None, Any]]) -> list[ConstantInput]:
    """The biases bias correction replaced, as they were (to give the layer back exactly)."""
    out = []
    for (node, index), (old, tensor) in before.items():
        now = after.get((node, index), (None, None))
        if now[0] is old and now[1] is tensor:
            continue
        if old is None:  # no bias before: giving back drops the added input
            out.append(ConstantInput(node, index, "", None))
        elif tensor is not None:
            out.append(ConstantInput(node, index, old.name, tensor.numpy().copy()))
    return out


def _rekey_new_add(node: ir.Node, key: str, edits: list[ActivationInput],
                   constants: list[ConstantInput]) -> tuple[list[ActivationInput], list[ConstantInput]]:
    """Edits keyed by the layer's new output name, plus the added bias's zeroing.

    Bias correction of a layer without a bias appends ``Add(y, b)`` that takes over ``y``'s
    name (:func:`~compressor.passes._graph.append_add`); the layer's records name its node by
    its output, so they follow the rename, and giving the layer back sets ``b`` to 0
    (``y + 0 = y`` exactly).
    """
    out = node.outputs[0]
    add = next(use.node for use in out.uses() if use.node.op_type == "Add" and use.node.outputs[0].name == key)
    bias = add.inputs[1]
    edits = [dataclasses.replace(e, node=out.name) if e.node == key else e for e in edits]
    constants = [dataclasses.replace(c, node=out.name) if c.node == key else c for c in constants]
    constants.append(ConstantInput(key, 1, bias.name, np.zeros_like(bias.const_value.numpy())))
    return edits, constants


def _half_precision(layers: list[Layer]) -> list[tuple[str, str]]:
    """``(layer, why)`` for the layers whose activations or weight are float16/bfloat16."""
    out = []
    for layer in layers:
        values = [v for _, v in layer.activations] + ([layer.weight] if layer.weight is not None else [])
        half = next((v for v in values if v.dtype in HALF), None)
        if half is not None:
            out.append((layer.name, f"input {half.name!r} is {half.dtype.name.lower()}"))
    return out


def _nonfinite_weights(layers: list[Layer]) -> list[str]:
    """``layer: weight 'w' holds 3 NaN/inf value(s)`` for each layer whose constant weight is not finite."""
    out = []
    for layer in layers:
        if layer.weight is None or layer.weight.const_value is None:
            continue
        w = layer.weight.const_value.numpy()
        if w.dtype.kind == "f" and not np.isfinite(w).all():
            out.append(f"{layer.name}: weight {layer.weight.name!r} holds {int((~np.isfinite(w)).sum())} NaN/inf "
                       "value(s)")
    return out


def _nothing_quantized(model: ir.Model, skipped: dict[str, str], caps: Capabilities, shown: int = 3) -> str:
    """Why no layer was quantized: each distinct reason with how many layers it kept float,
    or that the quantizable ops are absent, or only inside ``If``/``Loop``/``Scan`` bodies."""
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
