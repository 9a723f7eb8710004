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
   attention-context]``, ``smoothquant: {alpha: 0.9}`` (with 8-bit activations; none with
   ``activations: int16``, where it only costs the weights), and residual joins float unless
   they are a convolution's (``eltwise``). On a target with no float path
   (``Capabilities.fallback == "int16"``) those roles get 16-bit activations instead, and
   at 8-bit activations the scores ``Q·Kᵀ`` too (``qnn-htp``: with ``qnn-legalize``'s
   attention rule, everything but the weight MatMuls' inputs runs at 16 bits there).
   A model without attention (a CNN) is quantized exactly as with ``attention: off``.

7. a layer whose inputs are all activations (``Q·Kᵀ``) uses the target's
   ``OpQuant.activation_only`` spec when it has one (OpenVINO: signed symmetric, the only
   form its CPU plugin runs as an int8 MatMul).

8. where the target gives the op an output spec (``OpQuant.output``: ONNX Runtime, whose
   integer kernels need the node unit closed by a ``Q``), the layer's output, moved past
   the ops the backend folds in (``OpQuant.output_after``: Relu, Clip, a bias Add), is
   read through a pair of its own, calibrated in the same statistics run and shared with
   the next layer's input pair (:mod:`._output_qdq`); a tensor that only selects its
   values (``MaxPool``, ``Transpose``...) is quantized over its range. Other targets
   quantize inputs only.

9. where the target lists ops that only move, select or zero-pad values
   (``Capabilities.input_pair_moves_through``: OpenVINO), an input's pair moves up through
   them towards the op that computed the data, with the same range: exact
   (:mod:`._pair_site`), and the backend then fuses the quantization into that op.

10. a recurrent layer (OpenVINO's LSTM) reads its input ``X`` (input 0 only) through a pair
    and its ``W`` and ``R`` stored int8 per gate row, where the target's
    ``OpQuant.shared_scale_inputs`` makes ``R`` share ``W``'s scales
    ``s_r = max(max|W_r|, max|R_r|) / 127`` (one scale per row for both in the kernel), and
    ``OpQuant.state_range`` widens ``X``'s range to ``[min(lo, -1), max(hi, 1)]`` (the kernel
    rounds the hidden state ``h`` in ``(-1, 1)`` on ``X``'s grid); an LSTM whose initial
    states are computed at run time stays float (``OpQuant.constant_inputs``).

11. a layer with very few channels (``OpQuant.float_weight_below``: OpenVINO's single-channel
    filters) gets its input pair and keeps its float weight: the backend computes it in
    float, faster there than its int8 kernel, and its producer still writes 8 bits.

12. control flow (:mod:`._control_flow`): an ``If`` branch every calibration sample takes
    is quantized by the same steps, its statistics taken on a copy of the model with the
    branch inlined; other bodies stay float, named in ``stats["subgraphs_left_as_is"]``.

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
from typing import Literal

import onnx_ir as ir
from compressor.passes._attention import ROLES
from compressor.passes._control_flow import plan_bodies, quantize_bodies
from compressor.passes._float32 import widen_to_float32
from compressor.passes._layers import Layer
from compressor.passes._output_qdq import LEFT_OPEN, close_node_units, output_tensor
from compressor.passes._output_ranges import carry_ranges, floor_silu_inputs, share_concat_ranges
from compressor.passes._pair_site import Sites, pair_sites
from compressor.passes._placement import FEW_CHANNELS, cover_state_ranges, float_weight
from compressor.passes._quantize_calibration import Calibration, calibrate
from compressor.passes._quantize_record import correct_bias_recorded
from compressor.passes._quantize_selection import (
    half_precision,
    mask_path_tensors,
    nothing_quantized,
    refuse_nonfinite_weights,
    say_nothing_quantized,
    select_layers,
)
from compressor.passes._smoothquant import SmoothQuantOptions, smooth_layers
from compressor.passes._transformer_preset import attention_blocks, float_activation_layers, with_preset
from compressor.targets.base import Capabilities

from compressor.capture.onnx_import import describe_quantized, quantized_nodes
from compressor.errors import CompressorError, InvalidModel
from compressor.pipeline import Pass, PassContext, PassResult, register_pass
from compressor.quant.qdq import QdqWriter
from compressor.quant.revert import (
    ActivationInput,
    ConstantInput,
    QuantizationRecord,
    QuantizedLayer,
    widened,
)
from compressor.quant.spec import QuantSpec
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
            Unset: yes, except, in a model with attention, joins with no input from a
            convolution, straight or through its activation (a transformer's residual adds).
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


def _weight_spec(layer: Layer, per_channel: bool) -> QuantSpec:
    spec = layer.quant.weights or QuantSpec("int8", True, None)
    axis = layer.output_axis() if per_channel and spec.axis is not None else None
    return dataclasses.replace(spec, axis=axis)


def _replace_weight(writer: QdqWriter, layer: Layer, spec: QuantSpec) -> None:
    """Make ``layer`` read its weight stored quantized with ``spec`` (case 2)."""
    layer.node.replace_input_with(list(layer.node.inputs).index(layer.weight), writer.weight(layer.weight, spec).value)


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
    walks_subgraphs = True  # If branches the calibration data takes; the rest named (._control_flow)

    def check_input(self, model: ir.Model) -> None:
        """Refuse an already-quantized model: a second rounding on the first, Q/DQ around integer ops."""
        found = quantized_nodes(model)
        if found:
            raise InvalidModel(f"the model is already quantized ({describe_quantized(found)}); compress the "
                               "float model it was made from, or use a recipe without 'quantize' (e.g. fold)")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Quantize the main graph, then each ``If`` branch the calibration data takes (:mod:`._control_flow`)."""
        self.check_input(model)  # also when run without a manager
        if ctx.calibration is None:
            raise CompressorError("quantize needs calibration data: pass --calib samples.npz")
        caps: Capabilities = ctx.target.capabilities if ctx.target is not None else Capabilities()
        plan = plan_bodies(model, ctx, caps, self.options)
        main = self._quantize_graph(model, ctx, alone=not plan.taken)
        return quantize_bodies(model, ctx, plan, main, self._quantize_graph)

    def _quantize_graph(self, model: ir.Model, ctx: PassContext, alone: bool = True) -> PassResult:
        """Quantize ``model.graph`` (``alone``: no body is quantized after it, so say when nothing was)."""
        caps: Capabilities = ctx.target.capabilities if ctx.target is not None else Capabilities()
        if not caps.quantizable:
            raise CompressorError(f"target {getattr(ctx.target, 'name', None)!r} declares no quantizable ops")
        graph = model.graph
        blocks = attention_blocks(graph) if self.options.attention == "auto" else 0
        opts, preset = with_preset(self.options, blocks, caps.preset_float_roles)  # case 6
        if preset:
            logger.info("quantize: %d attention block(s) found by structure: transformer preset for %s",
                        blocks, ", ".join(preset))
        layers, skipped = select_layers(graph, caps, opts, preset)
        to_fp32 = self._widen_half_precision(model, layers, ctx)
        if to_fp32:
            layers, skipped = select_layers(graph, caps, opts, preset)
        refuse_nonfinite_weights(layers)
        tensor_skips = mask_path_tensors(graph, layers)
        smoothed = 0
        if opts.smoothquant is not None:  # case 3
            # Smooth every candidate layer (the transform is exact in float): a layer accuracy
            # control gives back reads its smoothed float weight and input, which compute what
            # the unsmoothed layer did; then find the layers to quantize again.
            # An input whose range was learned in training (recover: {qat: true}) is not smoothed
            # again: the recovery stage smoothed it in the module already (compressor.recover.smooth).
            learned_inputs = {e.tensor for e in ctx.learned_ranges.entries} if ctx.learned_ranges else set()
            smoothed = smooth_layers(model, layers, ctx.calibration, opts.smoothquant,
                                     skip=set(tensor_skips) | learned_inputs, cache=ctx.cache)
            layers, skipped = select_layers(graph, caps, opts, preset)
        float_acts = float_activation_layers(graph, opts.float_activations)  # case 5
        wide: set[str] = set()
        if "float_activations" in preset and caps.fallback == "int16":
            # No float path on the target: the preset's roles get 16-bit activations instead,
            # and at 8-bit activations the attention scores Q·Kᵀ too (the softmax's input).
            wide, float_acts = set(float_acts), {}
            if opts.activations == "int8":
                wide |= set(float_activation_layers(graph, ("attention-scores",)))
        full = [la for la in layers if la.name not in float_acts]
        layer_nodes = {id(la.node) for la in full}
        outputs = [v.name for la in full if (v := output_tensor(la, layer_nodes)) is not None]  # case 8
        calibration = calibrate(model, ctx, opts, full, tensor_skips, outputs)
        carry_ranges(graph, calibration.ranges, outputs)
        share_concat_ranges(full, calibration.ranges)  # case 8
        floor_silu_inputs(full, calibration.ranges)
        cover_state_ranges(full, calibration.ranges)  # an LSTM's X grid also holds its hidden state
        # recover: {qat: true}: the ranges learned in training replace the calibrated ones (compressor.quant.learned)
        bits = 16 if opts.activations == "int16" else 8
        learned, unlearned = ({}, {}) if ctx.learned_ranges is None else ctx.learned_ranges.match(
            full, lambda la: activation_spec(la.quant.activations, 16 if la.name in wide else bits))
        learned = {name: rng for name, rng in learned.items() if name in calibration.ranges}
        calibration.ranges.update(learned)
        if unlearned:
            logger.warning("quantize: %d range(s) learned in training not used, calibrated instead (e.g. the input "
                           "of %r: %s; all in stats['ranges_not_from_training'])", len(unlearned), *min(unlearned.items()))

        bits_of = {la.name: 16 if la.name in wide or opts.activations == "int16" else 8 for la in layers}
        sites = pair_sites([la for la in layers if la.name not in float_acts  # case 9, before any rewiring
                            and all(v.name in calibration.ranges for _, v in la.activations)],
                           lambda la: _input_spec(la, bits_of[la.name]), calibration.ranges,
                           caps.input_pair_moves_through, fixed=learned)
        writer = QdqWriter(graph)
        record: list[QuantizedLayer] = []
        corrected = 0
        weight_only: dict[str, str] = {}
        for layer in layers:
            if layer.name in float_acts:
                if layer.weight is None:
                    skipped[layer.name] = float_acts[layer.name]
                    continue
                # The full int8 range: with a float input the weight is dequantized, no
                # integer kernel can saturate (the reason for 7-bit weights without VNNI).
                spec = _weight_spec(layer, opts.weights == "int8-per-channel")
                _replace_weight(writer, layer, dataclasses.replace(spec, bits=None))
                weight_only[layer.name] = float_acts[layer.name]
                continue
            kept = [v.name for _, v in layer.activations if v.name not in calibration.ranges]
            if kept:
                why = "; ".join(calibration.tensor_skips[name] for name in kept if name in calibration.tensor_skips)
                skipped[layer.name] = f"activation kept float: {why}"
                continue
            done, fixed = _quantize_layer(graph, writer, layer, bits_of[layer.name], opts.weights == "int8-per-channel",
                                          calibration, sites)
            record.append(done)
            corrected += fixed
        # Layers the recipe keeps float read the float tensor; those the target keeps float
        # (no output pair, too few channels) read the pairs like any other reader.
        asked_float = {name for name, why in skipped.items()
                       if why != LEFT_OPEN and not why.startswith(FEW_CHANNELS)} | set(weight_only)
        record, closed = close_node_units(graph, writer, layers, record, calibration.ranges, asked_float)  # case 8
        model = writer.finish(model)  # 16-bit Q/DQ: the model is converted to opset 21
        quantized = [layer.name for layer in record]
        weight_bytes = (sum(w.float_bytes for w in writer.weights), sum(w.quantized_bytes for w in writer.weights))
        for name, why in sorted(skipped.items()):
            logger.info("kept float: %s: %s", name, why)
        for name, why in sorted(weight_only.items()):
            logger.info("weight only: %s: %s", name, why)
        nothing = None if quantized or weight_only else nothing_quantized(model, skipped, caps)
        if nothing and alone:
            say_nothing_quantized(nothing, caps)
        return PassResult(model, bool(quantized or weight_only) or smoothed > 0 or to_fp32 > 0, {
            **({"nothing_quantized": nothing} if nothing else {}),
            "layers_quantized": len(quantized),
            "layers_float": len(skipped),
            "layers_weight_only": len(weight_only),
            "layer_outputs_quantized": closed,
            "attention_blocks": blocks,
            "attention_preset": list(preset),
            "layers_widened_by_preset": sorted(wide),
            "tensors_float": len(calibration.tensor_skips),
            "smoothquant_groups": smoothed,
            "bias_corrected": corrected,
            "weight_mb_fp32": round(weight_bytes[0] / 1e6, 3),
            "weight_mb_int8": round(weight_bytes[1] / 1e6, 3),
            "layers": quantized,
            "skipped_layers": dict(sorted(skipped.items())),
            "skipped_tensors": dict(sorted(calibration.tensor_skips.items())),
            "weight_only_layers": dict(sorted(weight_only.items())),
            **({"float16_widened_to_float32": to_fp32} if to_fp32 else {}),
            **({"ranges_from_training": len(learned), "ranges_not_from_training": dict(sorted(unlearned.items()))}
               if ctx.learned_ranges is not None else {}),
        }, quantization=QuantizationRecord(tuple(record), weight_bytes))

    @staticmethod
    def _widen_half_precision(model: ir.Model, layers: list[Layer], ctx: PassContext) -> int:
        """Widen a float16/bfloat16 model to float32 (Q/DQ and ranges are float32); values widened."""
        half = half_precision(layers)
        if not half:
            return 0
        to_fp32 = widen_to_float32(model)  # its inputs and outputs keep their dtype
        said = ctx.cache.setdefault("quantize.widened_said", [])  # once, not on each re-run of the pass
        (logger.debug if said else logger.warning)(
            "quantize: %d layer(s) compute in float16/bfloat16 (e.g. %s: %s); the model is quantized in float32 "
            "(%d values widened; its inputs and outputs keep their dtype)", len(half), half[0][0], half[0][1], to_fp32)
        said.append(True)
        return to_fp32


def _input_spec(layer: Layer, bits: int) -> QuantSpec:
    """The spec of ``layer``'s activation inputs (case 1, 7)."""
    pair = layer.quant.activation_only if layer.weight is None and layer.quant.weights is not None else None
    return activation_spec(pair or layer.quant.activations, bits)


def _quantize_layer(graph: ir.Graph, writer: QdqWriter, layer: Layer, bits: int, per_channel: bool,
                    calibration: Calibration, sites: Sites | None = None) -> tuple[QuantizedLayer, bool]:
    """Q/DQ on ``layer``'s activations (case 1, 7, 9), its weight stored quantized (case 2),
    its bias corrected (case 4); returns its record and whether its bias was corrected."""
    key = layer.node.outputs[0].name
    edits: list[ActivationInput] = []
    constants: list[ConstantInput] = []
    for index, value in layer.activations:
        lo, hi = calibration.ranges[value.name]
        spec = _input_spec(layer, bits)
        for node, at, source in (sites or {}).get((id(layer.node), index), [(layer.node, index, value)]):
            node.replace_input_with(at, writer.activation(source, spec, lo, hi))
            edits.append(ActivationInput(node.outputs[0].name, at, source.name, float(lo), float(hi), spec))
    corrected = False
    weight: tuple[str, tuple[int, int]] = ("", (0, 0))
    if layer.weight is not None and not float_weight(layer):  # case 11: else its input pair only
        constants.append(ConstantInput(key, list(layer.node.inputs).index(layer.weight), layer.weight.name,
                                       layer.weight.const_value.numpy().copy()))
        shared = [(i, layer.node.inputs[i]) for i in layer.quant.shared_scale_inputs]  # an LSTM's R with its W
        spec = _weight_spec(layer, per_channel)
        stored = writer.weight(layer.weight, spec, tuple(v for _, v in shared))
        for i, value in shared:
            constants.append(ConstantInput(key, i, value.name, value.const_value.numpy().copy()))
            others = (layer.weight, *(v for _, v in shared if v is not value))
            layer.node.replace_input_with(i, writer.weight(value, spec, others).value)
        layer.node.replace_input_with(constants[0].index, stored.value)
        weight = (layer.weight.name, (stored.float_bytes, stored.quantized_bytes))
        x = layer.activations[0][1].name if layer.activations[0][0] == 0 else None
        if x in calibration.means:  # case 4: W - DQ(Wq) = -error
            corrected, edits, constants = correct_bias_recorded(
                graph, layer, -stored.error, calibration.means[x], writer.names, key, edits, constants)
    return QuantizedLayer(layer.name, tuple(edits), tuple(constants), *weight), corrected
