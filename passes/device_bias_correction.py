"""``device-bias-correction``: remove the device's constant error at the model's outputs.

A backend that is not ONNX Runtime CPU computes the quantized graph with its own integer
arithmetic: the HTP's 16-bit FullyConnected, Softmax and activation x activation MatMuls
are a few of their 16-bit steps off the Q/DQ model as written (docs/design.md, "QNN HTP").
Part of that error is the same on every input: a constant per output channel. On
all-MiniLM-L6-v2 at W8A16 it is 63% of the HTP-vs-simulation error energy at the output,
and taking it away lifts the token cosine to fp32 on HTP from 0.9988 to 0.9993 on held-out
sentences (the pooled embedding 0.9981 to 0.9993). At W8A8 it is 2%, and nothing is gained.

The pass measures it on the device and folds it into the parameter that adds one value per
channel right before each graph output (AIMET's empirical bias correction, on the output
layer, with the device as the measurement):

1. lower the model for the context's target into a temporary folder and run the first
   ``samples`` calibration samples there, and on ONNX Runtime CPU (Q/DQ as written where
   the target says so: ``Capabilities.simulate_as_written``);
2. per graph output, ``delta[c] = mean(device - simulation)`` over every position of
   channel ``c`` (real tokens only when the data has an ``attention_mask``, either layout);
3. subtract ``delta`` from the output's producer, found through the output's own Q/DQ pair:
   a LayerNormalization's beta (normalized over the last axis), a Conv/ConvTranspose bias
   (channel axis 1), a Gemm's ``C`` (divided by its ``beta``), or the constant operand of an
   ``Add`` (one value per channel of the last axis). A parameter stored quantized (an int32
   bias behind a DequantizeLinear, or any integer codes) gets new codes, ``round(q - delta /
   scale)``, clipped to its type; a float one a new value. The shift that really went in
   (after rounding and clipping) is what the stats report, with the channels clipped; an
   output where nothing went in (a shift under half a code step) is left as it is.

The reference is the simulation, not the fp32 model: the pass removes what the device adds
to the graph as written, so it needs nothing but the quantized model, and the model the
artifact holds (``model.onnx``, the encodings) is what the device then runs. On MiniLM the
fp32 reference gains the same to the fourth digit (docs/design.md). An output whose
producer has no such parameter, or that is read by other nodes too (through its Q/DQ pair
or not: a change there would move them as well, and another output's correction measured
before it would be applied twice), is left as it is and named in the stats with the
reason; so is every output when the device computes the graph as written, an output that
is not batch-first (one row per call: no channel axis to average over), and every output
when the calibration data is random (no ``--calib``: a correction measured on noise).

The pass runs on the device, so it costs a lowering and ``samples`` device calls (whole
batches on a static batch axis) per run; accuracy control's ranking on ONNX Runtime leaves
it out (``runs_on_target``), a try it lowers gets its own correction, and a recipe's target
passes (``qnn-legalize``) are inserted before it. It is not ``lossy``: it corrects the device
toward the model as written, so the flow measures no drop of its own after it (the drop of
the pass before it, the last lossy one, is the artifact's, measured on the device).
Measured with the target's plain lowering (an OpenVINO precision pin is not applied here).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import NameAllocator, attr_float, attr_int, label
from compressor.passes._sparsity import replace_constant

from compressor.errors import UsageError
from compressor.flow.evaluation import collect_outputs, padding_keep
from compressor.model_io import clone_model
from compressor.pipeline import Pass, PassContext, PassResult, register_pass

__all__ = ["DeviceBiasCorrection", "DeviceBiasCorrectionOptions", "output_site"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DeviceBiasCorrectionOptions:
    """Options of ``device-bias-correction``.

    Attributes:
        samples: Calibration samples run on the device and in the simulation.
    """

    samples: int = 16

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, not {self.samples}")


@dataclasses.dataclass(frozen=True)
class Site:
    """Where an output's per-channel constant goes: ``node``'s input ``index``, added ``scale`` times
    (a Gemm's ``C`` is multiplied by its ``beta``), along the output's channel ``axis`` (negative:
    counted from the end, so it holds on rows with a leading sample axis too)."""

    node: ir.Node
    index: int
    axis: int
    scale: float = 1.0


def output_site(output: ir.Value) -> Site | str:
    """The parameter that adds one value per channel to ``output``, or why there is none."""
    if list(output.uses()):
        return f"{output.name} is read by other nodes too: a change there would move them as well"
    if output.shape is None:
        return f"the shape of {output.name} is unknown"
    value = output
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":  # the output's own Q/DQ pair
        quant = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        if quant is None or quant.op_type != "QuantizeLinear":
            return f"{label(producer)} dequantizes a constant or an input"
        if len(list(quant.outputs[0].uses())) != 1 or quant.outputs[0].is_graph_output():
            return f"{quant.outputs[0].name} is read by other nodes too: a change there would move them as well"
        value, producer = quant.inputs[0], quant.inputs[0].producer()
        if len(list(value.uses())) != 1 or value.is_graph_output():
            return f"{value.name} is read by other nodes too: a change there would move them as well"
    if producer is None:
        return "the output is a graph input or a constant"
    if value is not producer.outputs[0]:
        return f"{label(producer)}'s output {list(producer.outputs).index(value)} has no bias of its own"
    op, rank = producer.op_type, len(output.shape)
    if op == "LayerNormalization":
        axis = attr_int(producer, "axis", -1)
        if axis not in (-1, rank - 1) or len(producer.inputs) < 3 or producer.inputs[2] is None:
            return f"{label(producer)} normalizes more than the last axis, or has no beta"
        return Site(producer, 2, -1)
    if op in ("Conv", "ConvTranspose"):
        if len(producer.inputs) < 3 or producer.inputs[2] is None:
            return f"{label(producer)} has no bias"
        return Site(producer, 2, 1 - rank)  # axis 1, counted from the end (rows may gain a leading axis)
    if op == "Gemm":
        beta = attr_float(producer, "beta", 1.0)
        if len(producer.inputs) < 3 or producer.inputs[2] is None or beta == 0.0:
            return f"{label(producer)} has no C"
        return Site(producer, 2, -1, 1.0 / beta)
    if op == "Add":
        channels = output.shape[-1] if rank else None
        for index, operand in enumerate(producer.inputs[:2]):
            stored = _stored(operand)
            if stored is not None and isinstance(channels, int) and _per_channel(stored[1].shape, channels):
                return Site(producer, index, -1)
        return f"{label(producer)} adds no constant of one value per channel of the last axis"
    return f"{label(producer)} ({op}) has no per-channel bias"


def _stored(value: ir.Value | None) -> tuple[ir.Node | None, np.ndarray] | None:
    """``(DQ, codes)`` for a parameter stored quantized, ``(None, array)`` for a float constant."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return None, value.const_value.numpy()
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or len(list(value.uses())) != 1:
        return None
    codes = dq.inputs[0]
    if codes is None or codes.const_value is None or codes.is_graph_input():
        return None
    return dq, codes.const_value.numpy()


def _per_channel(shape: tuple[int, ...], channels: int) -> bool:
    """Whether a constant of ``shape`` holds one value per channel of the last axis (or is 1-D)."""
    return len(shape) >= 1 and shape[-1] == channels and all(d == 1 for d in shape[:-1])


def apply_shift(graph: ir.Graph, site: Site, delta: np.ndarray, names: NameAllocator) -> tuple[np.ndarray, int] | str:
    """Subtract ``delta`` (one value per channel) from the site's parameter.

    Returns:
        ``(applied, clipped)``: the shift per channel that went in (after rounding to the
        parameter's codes and clipping to its type) and how many channels were clipped; or
        why nothing was changed.
    """
    param = site.node.inputs[site.index]
    stored = _stored(param)
    shift = delta * site.scale
    if stored is None:
        return f"{param.name} is neither a constant nor integer codes behind a DequantizeLinear only this node reads"
    dq, array = stored
    if not _per_channel(array.shape, delta.size):
        return f"{param.name} has shape {list(array.shape)}, not one value per channel ({delta.size})"
    if dq is None:
        new = array.astype(np.float64) - shift.reshape(array.shape)
        applied = (array.astype(np.float64) - new.astype(array.dtype)).reshape(-1)
        if not np.any(applied):
            return f"the shift is below the precision of {param.name}"
        replace_constant(graph, site.node, site.index, new, names, like=array)
        return applied / site.scale, 0
    scale_value = dq.inputs[1] if len(dq.inputs) > 1 else None
    if scale_value is None or scale_value.const_value is None or array.dtype.kind not in "iu":
        return f"{param.name} is not integer codes dequantized with a constant scale"
    scale = scale_value.const_value.numpy().astype(np.float64).reshape(-1)
    if scale.size not in (1, delta.size):
        return f"{param.name} is dequantized with scales of shape {list(scale_value.const_value.shape)}"
    info = np.iinfo(array.dtype)
    step = scale.reshape(array.shape if scale.size > 1 else ())
    wanted = np.round(array.astype(np.float64) - shift.reshape(array.shape) / step)
    codes = np.clip(wanted, info.min, info.max)
    applied = ((array.astype(np.float64) - codes).reshape(-1) * scale)
    if not np.any(applied):
        return f"the shift is below half a code step of {param.name}, or its codes are at the limit of {array.dtype}"
    replace_constant(graph, dq, 0, codes, names, like=array)
    return applied / site.scale, int(np.count_nonzero(codes != wanted))


def channel_means(diff: np.ndarray, keep: np.ndarray | None, axis: int) -> np.ndarray:
    """Mean of ``diff`` per channel along ``axis``, over the positions ``keep`` marks (all when ``None``)."""
    weight = np.ones(diff.shape, bool) if keep is None else np.broadcast_to(keep, diff.shape)
    diff, weight = np.moveaxis(diff, axis, -1), np.moveaxis(weight, axis, -1)
    count = weight.reshape(-1, diff.shape[-1]).sum(axis=0)
    total = np.where(weight, diff, 0.0).reshape(-1, diff.shape[-1]).sum(axis=0)
    return total / np.maximum(count, 1)


def _rows_of(rows: tuple[int, ...], shape: list[Any]) -> bool:
    """Whether ``rows`` (what :func:`collect_outputs` returned) holds the output's own axes: batch-first
    rows (``N x shape[1:]``) or one whole output per sample (``N x shape``), not a flattened call."""
    def fits(have: tuple[int, ...], want: list[Any]) -> bool:
        return len(have) == len(want) and all(not isinstance(w, int) or h == w for h, w in zip(have, want))

    return fits(rows[1:], shape[1:]) or fits(rows[1:], shape)


@register_pass
class DeviceBiasCorrection(Pass):
    """Fold the device's per-channel constant output error into the output layer's bias (module docstring)."""

    name = "device-bias-correction"
    runs_on_target = True
    needs_calibration = True
    description = "measure the device's constant error per output channel and take it out of the output bias"
    Options = DeviceBiasCorrectionOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if ctx.target is None:
            raise UsageError(f"{self.name} runs the model on the target's device: it needs a --target")
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise UsageError(f"{self.name} needs calibration samples to run on the device: pass --calib")
        from compressor.targets.onnx import OrtRunner  # the targets import the pass registry

        sites: dict[str, Site] = {}
        left: dict[str, str] = {}
        for output in model.graph.outputs:
            if output.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                left[output.name] = f"not a float32/float16 output ({output.dtype})"
                continue
            found = output_site(output)
            if isinstance(found, str):
                left[output.name] = found
            else:
                sites[output.name] = found
        stats: dict[str, Any] = {"outputs_corrected": 0}
        if not sites:
            stats["left_as_is"] = left
            return PassResult(model, False, stats)

        data = ctx.calibration
        if data.source == "random":
            logger.warning("%s: the calibration data is random (no --calib): no correction is measured on noise",
                           self.name)
            stats["left_as_is"] = {**left, **dict.fromkeys(sites, "the calibration data is random (no --calib)")}
            return PassResult(model, False, stats)
        from compressor.flow.ranking import whole_batches
        from compressor.flow.ranking_stage import THREADS

        n = whole_batches(data, self.options.samples)
        used = data.subset(0, n).usable()
        logger.info("%s: running %d calibration sample(s) on %s and in the simulation", self.name, used,
                    ctx.target.name)
        with tempfile.TemporaryDirectory(prefix="compressor-device-bias-") as work:
            run = ctx.target.runner(ctx.target.lower(clone_model(model), Path(work)))
            device = collect_outputs(run, data, limit=n)
            del run
        # one thread, as accuracy control's ranking: the same sums on every host
        sim = OrtRunner(model, threads=THREADS, as_written=ctx.target.capabilities.simulate_as_written)
        simulated = collect_outputs(sim, data, limit=n)
        names = NameAllocator(model.graph)
        index = {o.name: i for i, o in enumerate(model.graph.outputs)}
        corrected: dict[str, Any] = {}
        for name, site in sites.items():
            shape = list(model.graph.outputs[index[name]].shape)
            rows = device[index[name]]
            if not _rows_of(rows.shape, shape):  # per_output flattened each call's output into one row
                left[name] = "the outputs come one row per call (not batch-first): no channel axis to average over"
                continue
            keep = padding_keep(rows, data)
            diff = rows.astype(np.float64) - simulated[index[name]].astype(np.float64)
            delta = channel_means(diff, keep, site.axis)
            if not np.all(np.isfinite(delta)):
                left[name] = "the device or the simulation gave a non-finite value"
                continue
            if not np.any(delta):
                left[name] = "the device computes it as written"
                continue
            done = apply_shift(model.graph, site, delta, names)
            if isinstance(done, str):
                left[name] = done
                continue
            applied, clipped = done
            along = [1] * diff.ndim
            along[site.axis] = applied.size
            constant = np.broadcast_to(applied.reshape(along), diff.shape)
            full, constant = (diff, constant) if keep is None else (np.where(keep, diff, 0.0), np.where(keep, constant, 0.0))
            corrected[name] = {"site": label(site.node), "parameter": site.node.inputs[site.index].name,
                               "channels": int(applied.size), "mean_abs_shift": float(np.abs(applied).mean()),
                               "channels_clipped": clipped,
                               "constant_share": float(1.0 - ((full - constant) ** 2).sum() / max((full ** 2).sum(),
                                                                                                 1e-300))}
            logger.info("%s: output %s: %.0f%% of the device-vs-simulation error energy was a constant per channel; "
                        "taken out of %s%s", self.name, name, 100 * corrected[name]["constant_share"],
                        corrected[name]["parameter"], f" ({clipped} channel(s) clipped)" if clipped else "")
        stats.update(outputs_corrected=len(corrected), samples=used, corrected=corrected)
        if left:
            stats["left_as_is"] = left
        return PassResult(model, bool(corrected), stats)
