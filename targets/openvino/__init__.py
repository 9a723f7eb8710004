"""Target ``openvino``: QDQ ONNX converted to OpenVINO IR (``.xml``/``.bin``), run on the CPU plugin.

OpenVINO's ONNX frontend turns each QuantizeLinear/DequantizeLinear pair on an activation
into a ``FakeQuantize`` and each DequantizeLinear on a constant weight into
``Convert -> Multiply`` (int8 constant kept in the ``.bin``); at compile time the CPU
plugin's low-precision transformations move the scales past Convolution / MatMul and run
those layers with int8 kernels. What actually ran is read back from the compiled model's
runtime graph (:meth:`OpenVinoRunner.layer_precisions`).

Float precision is explicit. The CPU plugin's default is not f32 everywhere: on CPUs with
AVX512-BF16 (and AMX) it runs an f32 model in bf16 unless ``INFERENCE_PRECISION_HINT``
says otherwise, so the runner takes a ``precision`` (``f32``, the default, pins it;
``bf16``/``f16`` ask for it; ``None`` leaves the device's choice) and reports what the
compiled model uses (:attr:`OpenVinoRunner.inference_precision`). A request the CPU
cannot honour falls back to f32 (the plugin accepts bf16 on any AVX-512 CPU, f16 only
with AVX512-FP16 or AVX2-VNNI-2). Independently of the precision, on CPUs with VNNI the
plugin quantizes the f32 input of a FullyConnected with int8 weights (a weight-only
layer) to int8 per group of ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` values (default 32; 0
turns it off) and runs it on int8 kernels; :meth:`OpenVinoTarget.report` records the
group size next to the precision.

The model :meth:`OpenVinoTarget.check` converted is kept for the next
:meth:`~OpenVinoTarget.reference_runner` of that same object (the flow's baseline is the
checked, never-changed model), so the fp32 model is converted once per run.

Lowering is deterministic: OpenVINO's auto-numbered node names are renumbered in graph
order before saving (:mod:`compressor.targets.openvino.convert`, which also converts and
reads conversion errors back to the ONNX nodes).

This module is the target side (capabilities: where the Q/DQ goes; check, lower, report);
:mod:`compressor.targets.openvino.runner` the running side (compile config, the runner,
what really ran); :mod:`compressor.targets.openvino.precision` the float precision pin.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from compressor.targets.base import (
    Capabilities,
    Runner,
    Target,
    check_capabilities,
    cpu_has_amx,
    cpu_has_vnni,
    deployment_amx,
    deployment_vnni,
    narrow_weights,
    warn_pessimistic_once,
    weights_beyond,
)
from compressor.targets.openvino.precision import device_precision, pin_in_rt_info, pin_report
from compressor.targets.openvino.runner import (
    CPU_CONFIG,
    PRECISIONS,
    OpenVinoRunner,
    cpu_config,
    cpu_supports_bf16,
    int8_summary,
    require_openvino,
)

from compressor.quant.spec import OpQuant, QuantSpec
from compressor.targets.openvino.convert import canonical_names, conversion_offenders, convert, onnx_names

# oneDNN's primitive cache is process-wide: a model compiled earlier in the process (the fp32
# baseline, which the flow and the benchmarks compile first) hands its kernels to a later model
# with layers of the same shape, so the artifact would be timed with kernels it never gets when
# deployed on its own (basic-pitch's float single-channel filters: 37.5 ms after the baseline vs
# 17.4 ms alone, NNCF's 18.4 either way). Off, unless the user's environment sets it; it must be
# set before the CPU plugin compiles anything, and costs no measurable compile time (MiniLM).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")

try:
    import openvino as ov
except ImportError:  # optional backend: the target refuses to start, the package still imports
    ov = None

__all__ = [
    "OpenVinoTarget",
    "OpenVinoRunner",
    "OPENVINO_CAPABILITIES",
    "CPU_CONFIG",
    "PRECISIONS",
    "cpu_config",
    "cpu_supports_bf16",
    "WEIGHT_QMAX_WITHOUT_VNNI",
    "int8_summary",
    "cpu_has_vnni",
    "saturating_weight_layers",
]

logger = logging.getLogger(__name__)

# Activations: uint8, asymmetric, per-tensor. x86 int8 kernels (AVX2 vpmaddubsw, VNNI
# vpdpbusd, AMX) multiply u8 activations by s8 weights; i8 activations cost oneDNN a +128
# shift and a compensation term (measured: Conv 64x64x3x3 on 56x56, AVX2, u8 1.25 ms vs
# i8-symmetric 1.42 ms vs f32 1.86 ms). Any zero point is accepted (Conv takes it as an
# input zero point; FullyConnected folds zp=128 into i8 exactly); zp=0, which a
# non-negative range (after ReLU) gives, is the cheapest. NNCF's CPU presets: weights
# int8 symmetric per-channel; activations symmetric ("performance") or asymmetric ("mixed").
_ACT = QuantSpec("uint8", symmetric=False)
# With AMX int8 tiles (s8 and u8 sources alike) the zero point is what costs: every u8 kernel
# with one ran 10-40% slower than the i8 kernel of NNCF's symmetric activations, a 3x3
# convolution up to 2x (YOLOv8n 4.78 vs 3.67 ms, crepe full 8.69 vs 6.23; docs/design.md,
# "Activations on AMX"): there activations are int8 symmetric, uint8 from 0 where the range
# is non-negative (QuantSpec.signed_by_range), and the flow falls back to _ACT where that
# breaks the accuracy budget and _ACT does better (OpenVinoTarget.scheme_fallback).
_SIGNED_ACT = QuantSpec("int8", symmetric=True, signed_by_range=True)
_CONVS = frozenset({"Conv", "ConvTranspose"})

#: Ops OpenVINO's CPU plugin runs in int8 from QDQ, with the weight's output-channel axis.
OPENVINO_CAPABILITIES = Capabilities(
    quantizable={
        # W [O, I/g, kH, kW]. A single-channel filter (O = I/g = 1) keeps its weight float and
        # its input pair: the int8 kernel vectorises over channels (basic-pitch's eight
        # decimation filters: 12.3 ms int8, 6.3 ms f32, one thread; docs/design.md).
        "Conv": OpQuant(activations=_ACT, weights=QuantSpec("int8", True, axis=0), float_weight_below=2),
        "ConvTranspose": OpQuant(activations=_ACT, weights=QuantSpec("int8", True, axis=1)),  # W [I, O/g, kH, kW]
        # Gemm: axis 0 for transB=1 (B [N, K], what torch's Linear exports), axis 1 for
        # transB=0; the quantize pass reads transB (passes/_layers.output_channel_axis).
        "Gemm": OpQuant(activations=_ACT, weights=QuantSpec("int8", True, axis=0)),
        # W [K, N]. Q·Kᵀ (two activations): both operands signed symmetric, or the CPU
        # plugin folds the MatMul into its f32 attention Subgraph (a zero point on either
        # operand is enough; where the Q/DQ sits, before or after the head
        # Reshape/Transpose, made no difference: docs/design.md).
        "MatMul": OpQuant(activations=_ACT, weights=QuantSpec("int8", True, axis=1),
                          activation_only=QuantSpec("int8", symmetric=True)),
        # Residual joins of convolutions (both inputs activations, one from a Conv, straight,
        # through its activation, a Resize or another such join: _placement.computed_by): with
        # both inputs quantized the CPU plugin fuses the Add into that convolution and keeps the
        # residual path in uint8, as NNCF's CPU preset does for CNNs (ResNet-50 here:
        # 37.3 -> 29.0 ms, level with NNCF). A transformer's residual adds (after MatMul +
        # bias) stay float: quantizing them took MiniLM's pooled cosine from 0.9915 to 0.9327
        # under the `int8` recipe.
        "Add": OpQuant(activations=_ACT, joins_after=_CONVS),
        "Sum": OpQuant(activations=_ACT, joins_after=_CONVS),
        # An average pool, the one reader of a convolution's output (a ResNet's global pool
        # after its last residual block): with its input quantized, the plugin writes that
        # block's output as u8 (the FakeQuantize folds into the convolution's post-ops) and
        # pools on u8, as NNCF places a FakeQuantize before AvgPool; without it the last
        # block wrote f32 and the pool ran f32 (ResNet-50 on an AMX Xeon, float layers in
        # f32: docs/design.md). A squeeze-excite pool, beside a float Mul, is left alone, and
        # so is an AveragePool that counts padding in its means (the plugin pads u8 with 0,
        # not the zero point: passes/_padding.averages_padding).
        "GlobalAveragePool": OpQuant(activations=_ACT, joins_after=_CONVS, min_activations=1, sole_reader=True),
        "AveragePool": OpQuant(activations=_ACT, joins_after=_CONVS, min_activations=1, sole_reader=True),
        # LSTM: X u8, W and R i8 per gate row (W [dirs, 4H, I], R [dirs, 4H, H]: axis 1) run
        # as the CPU plugin's int8 RNNSeq. Its kernel reads *one* scale per gate row for W
        # and R, so R shares W's scales (separate ones, as NNCF writes, dequantize one of the
        # two with the other's: ddddocr_common's cosine drop 0.0148 vs 0.0031 shared), and it
        # quantizes the hidden state h in (-1, 1) on X's grid, so X's range holds [-1, 1]. With
        # initial states computed at run time (silero-vad's state input) it does not compile
        # ("expects Constant for port 4"): such an LSTM stays float.
        "LSTM": OpQuant(activations=_ACT, weights=QuantSpec("int8", True, axis=1), shared_scale_inputs=(2,),
                        constant_inputs=(5, 6), state_range=(-1.0, 1.0)),
    },
    # A pair moves up through data movement to the op that computed the data (exact:
    # passes/_pair_site), where the CPU plugin folds the FakeQuantize into that op (a
    # convolution's post-ops) and runs the data movement on u8, as NNCF's propagation does.
    input_pair_moves_through=frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity",
                                        "Pad", "Slice", "MaxPool", "Concat", "Resize", "Split"}),
    nm_patterns=(),  # the CPU plugin has no structured-sparsity kernels
    static_shapes=False,
    # 7-bit weights on the first convolutions even with VNNI, as NNCF's default overflow_fix
    # (first_layer_only): exact on a CPU without VNNI where the raw input is widest, and
    # measured ahead on this zoo (docs/design.md, "openvino against NNCF on the zoo").
    narrow_first_layers=_CONVS,
)

#: Without VNNI (AVX2/AVX-512 before Cascade Lake / Zen 4) the CPU's int8 convolutions sum
#: pairs of u8*s8 products into int16 with saturation (vpmaddubsw): 8-bit weights overflow
#: (measured: Conv outputs off by up to 16 where ONNX Runtime is exact); 7-bit weights
#: (|q| <= 63, NNCF's ``overflow_fix``) are exact. FullyConnected (jit_gemm) is not affected.
WEIGHT_QMAX_WITHOUT_VNNI = 63
_SATURATING_OPS = frozenset({"Conv", "ConvTranspose"})


def signed(capabilities: Capabilities) -> Capabilities:
    """``capabilities`` with every uint8 activation spec (:data:`_ACT`) made :data:`_SIGNED_ACT`, but
    the LSTM's (the CPU plugin's int8 RNNSeq reads its input and state as u8: unmeasured with i8)."""
    quantizable = {op: dataclasses.replace(q, activations=_SIGNED_ACT) if q.activations == _ACT and op != "LSTM"
                   else q for op, q in capabilities.quantizable.items()}
    return dataclasses.replace(capabilities, quantizable=quantizable)


def saturating_weight_layers(model: ir.Model) -> list[str]:
    """Conv/ConvTranspose nodes whose int8 weights exceed :data:`WEIGHT_QMAX_WITHOUT_VNNI`."""
    return weights_beyond(model, _SATURATING_OPS, WEIGHT_QMAX_WITHOUT_VNNI)


class OpenVinoTarget(Target):
    """OpenVINO CPU: QDQ ONNX -> OpenVINO IR, int8 Convolution / FullyConnected kernels.

    Args:
        precision: Float precision the artifact is evaluated in (see :func:`cpu_config`):
            ``None`` (the default) for the device's default, which is what a model compiled
            with no config gets, or ``f32``, ``bf16``, ``f16``. The baseline
            (:meth:`reference_runner`) always runs in f32. Where the device's default
            breaks the accuracy budget the flow lowers the artifact with f32 pinned in it
            (:meth:`lower_pinned`, :mod:`compressor.targets.openvino.precision`); the pin
            is on the artifact, and :meth:`runner` reads it from there.
        target_cpu: The CPU the artifact will run on (:data:`~compressor.targets.TARGET_CPUS`):
            without VNNI (``avx2``) Conv/ConvTranspose get 7-bit weights; with it (``vnni``) the
            transformer preset's key projections are int8; with AMX (``amx``) activations are
            signed, without zero points too (``signed_activations``); ``host``: as this CPU.
        signed_activations: Activations int8 symmetric (uint8 from 0 where the range is
            non-negative) instead of uint8 with a zero point; ``None``: where the CPU has AMX.

    Raises:
        UsageError: the ``openvino`` package is not installed, or an unknown ``precision``.
    """

    name = "openvino"
    capabilities = OPENVINO_CAPABILITIES

    def __init__(self, precision: str | None = None, target_cpu: str = "host",
                 signed_activations: bool | None = None) -> None:
        require_openvino()
        cpu_config(precision)  # refuse an unknown precision now, not at the first compile
        self.precision = precision
        self.target_cpu = target_cpu
        self.core = ov.Core()
        #: ``(model, ov.Model)`` of the last :meth:`check`, saved as is when the next
        #: :meth:`reference_runner` gets that same (unchanged) model: the fp32 model is
        #: converted once per run.
        self._checked: tuple[ir.Model, Any] | None = None
        vnni = deployment_vnni(target_cpu, cpu_has_vnni())
        if vnni is False:
            # 7-bit Conv weights: exact on every x86 int8 kernel (see WEIGHT_QMAX_WITHOUT_VNNI).
            self.capabilities = narrow_weights(OPENVINO_CAPABILITIES, _SATURATING_OPS)
        elif vnni:
            # int8 key projections: as faithful as weight-only ones with VNNI kernels, and faster
            # (docs/design.md, "One int8 recipe": MiniLM on an AVX-512 VNNI CPU)
            self.capabilities = dataclasses.replace(OPENVINO_CAPABILITIES, preset_float_roles=("attention-context",))
        if signed_activations is None:
            signed_activations = bool(deployment_amx(target_cpu, cpu_has_amx()))
        #: Whether activations are signed, without zero points (the ``__init__`` argument).
        self.signed_activations = signed_activations
        if signed_activations:
            self.capabilities = signed(self.capabilities)


    def __getstate__(self) -> dict[str, Any]:
        """What a copy in another process (a Ray task) needs: not the ``ov.Core`` nor the
        converted model of the last check, which cannot be pickled; the copy opens its own core."""
        state = dict(self.__dict__)
        state.pop("core", None)
        state["_checked"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.core = ov.Core()

    def check(self, model: ir.Model) -> list[tuple[str, str]]:
        offenders = check_capabilities(model, self.capabilities)
        if offenders:
            return offenders
        self._checked = None
        try:
            self._checked = (model, convert(model))
        except Exception as err:  # OpConversionFailure, RuntimeError...: read the message
            return conversion_offenders(model, str(err))
        return []

    def lower(self, model: ir.Model, outdir: Path) -> list[Path]:
        return self._save(model, convert(model), outdir)

    def lower_pinned(self, model: ir.Model, outdir: Path, precision: str | None) -> list[Path]:
        """:meth:`lower` with ``precision`` pinned in the artifact's ``rt_info`` (``None``: unpinned).

        Raises:
            UsageError: an unknown ``precision``.
        """
        cpu_config(precision)
        return self._save(model, convert(model), outdir, pin=precision)

    def _save(self, model: ir.Model, ov_model: Any, outdir: Path, pin: str | None = None) -> list[Path]:
        """Write ``ov_model`` (converted from ``model``) as ``model.xml``/``.bin`` with canonical names,
        ``pin`` (a float precision) in its ``rt_info`` when given."""
        outdir.mkdir(parents=True, exist_ok=True)
        host_vnni = cpu_has_vnni()  # this host runs the artifact (the evaluation), whatever CPU it is for
        runs_on = deployment_vnni(self.target_cpu, host_vnni)  # the CPU the artifact is for
        pessimistic = warn_pessimistic_once(self, host_vnni, model, _SATURATING_OPS, WEIGHT_QMAX_WITHOUT_VNNI)
        if runs_on is False and not pessimistic and (saturating := saturating_weight_layers(model)):
            logger.warning(
                "openvino: %s has no VNNI, so int8 Conv sums u8*s8 pairs in int16 and saturates: %d "
                "layer(s) have int8 weights beyond +-%d (%s); quantize their weights to 7 bits",
                "this CPU" if self.target_cpu == "host" else f"the CPU named (--target-cpu {self.target_cpu})",
                len(saturating), WEIGHT_QMAX_WITHOUT_VNNI, ", ".join(saturating[:5]))
        renamed = canonical_names(ov_model, onnx_names(model))
        logger.debug("openvino: renumbered %d auto-generated node names", renamed)
        if pin is not None:
            pin_in_rt_info(ov_model, pin)
        xml = outdir / "model.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)  # fp32 stays fp32; int8 comes from QDQ
        return [xml, xml.with_suffix(".bin")]

    def runner(self, files: list[Path]) -> OpenVinoRunner:
        """Runs the artifact in its pinned precision if it has one, else in :attr:`precision`."""
        xml = [f for f in files if f.suffix == ".xml"]
        return OpenVinoRunner(xml[0], core=self.core, precision=self.precision)

    def device_precision(self) -> str:
        """The float precision the CPU plugin runs a model compiled with no config in, here."""
        return device_precision(self.core)

    def scheme_fallback(self) -> OpenVinoTarget | None:
        """The same target with uint8 activations and their zero points, where this one's are
        signed (AMX): finer grids on skewed ranges (a SiLU's, a hardswish's), for a model
        whose signed artifact breaks the budget (PP-OCRv4's recogniser: drop 0.0243 against
        0.0157); ``None`` where they are uint8 already."""
        if not self.signed_activations:
            return None
        return OpenVinoTarget(precision=self.precision, target_cpu=self.target_cpu, signed_activations=False)

    def precision_fallback(self) -> str | None:
        """``f32`` where the artifact is evaluated in a lower float precision (the device's bf16, say)."""
        used = self.precision or self.device_precision()
        return None if used == "f32" else "f32"

    def device_reference_runner(self, model: ir.Model, workdir: Path,
                                baseline: Runner | None = None) -> OpenVinoRunner | None:
        """The fp32 model in the device's default precision, where that is not f32 (else ``None``).

        ``baseline`` (:meth:`reference_runner`'s runner of ``model``) holds the fp32 IR, never
        pinned, which is compiled again with no precision hint: the fp32 model is converted
        once per run on a bf16 device too.
        """
        if self.device_precision() == "f32":
            return None
        if isinstance(baseline, OpenVinoRunner) and baseline.pinned is None:
            return OpenVinoRunner(baseline.xml, core=self.core, precision=None)
        workdir.mkdir(parents=True, exist_ok=True)
        xml = [f for f in self.lower(model, workdir) if f.suffix == ".xml"]
        return OpenVinoRunner(xml[0], core=self.core, precision=None)

    def reference_runner(self, model: ir.Model, workdir: Path) -> OpenVinoRunner:
        """The fp32 baseline, in f32 whatever precision the artifact runs in.

        The accuracy drop is measured against the fp32 model, so whatever a lower
        precision costs is part of the drop the gate judges.
        """
        checked, self._checked = self._checked, None
        ov_model = checked[1] if checked is not None and checked[0] is model else convert(model)
        xml = [f for f in self._save(model, ov_model, workdir) if f.suffix == ".xml"]  # never pinned
        return OpenVinoRunner(xml[0], core=self.core, precision="f32")

    def report(self, runner: OpenVinoRunner, samples: Iterable[Mapping[str, np.ndarray]] = ()) -> dict[str, Any]:
        """How the artifact really ran: per compute layer whether in int8, and the float precision."""
        precisions = runner.layer_precisions()
        return {
            "runtime_layers": {**int8_summary(precisions), "layers": precisions},
            "inference_precision": {
                "requested": runner.precision,  # None: the device's default
                "used": runner.inference_precision,
                "device_default": self.device_precision(),
                "pinned": pin_report(runner.pinned),
                "cpu_bf16": cpu_supports_bf16(self.core),
                "dynamic_quantization_group_size": runner.dynamic_quantization_group_size,
                "int8_vnni": cpu_has_vnni(),
            },
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "openvino_version": ov.get_version(),
            "device": "CPU",
            "device_name": self.core.get_property("CPU", "FULL_DEVICE_NAME"),
            "int8_vnni": cpu_has_vnni(),
            "deployment_cpu": self.target_cpu,
            "activations": "int8 symmetric, uint8 from 0" if self.signed_activations else "uint8 asymmetric",
            "cpu_bf16": cpu_supports_bf16(self.core),
            "precision": self.precision,
            "device_precision": self.device_precision(),
            "config": cpu_config(self.precision),
        }
