"""The running side of target ``openvino``: compile config, the runner, and what really ran.

* :func:`cpu_config`: the compile properties (latency streams, the float precision hint,
  :data:`PRECISIONS`; the package docstring says why f32 is pinned by default).
* :class:`OpenVinoRunner`: one compiled model, one infer request; it runs an artifact in the
  precision pinned in it (:mod:`compressor.targets.openvino.precision`) or the one asked.
* :meth:`OpenVinoRunner.layer_precisions`: per compute layer of the compiled runtime graph,
  the precision it really ran in (``runtimePrecision`` and the input precisions), which the
  target's report and the tests read instead of assuming.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from compressor.targets.base import Runner
from compressor.targets.openvino.precision import pinned_precision

from compressor.errors import DataError, UsageError

try:
    import openvino as ov
except ImportError:  # optional backend: the runner refuses to start, the package still imports
    ov = None

__all__ = ["COMPUTE_LAYERS", "CPU_CONFIG", "PRECISIONS", "OpenVinoRunner", "cpu_config", "cpu_supports_bf16",
           "int8_summary", "require_openvino"]


#: Float precisions a runner can ask the CPU plugin for (``None``: the device's default).
PRECISIONS = ("f32", "bf16", "f16")


def cpu_config(precision: str | None = "f32") -> dict[str, str]:
    """Compile properties: latency-oriented streams, and ``precision`` as the inference precision hint.

    Args:
        precision: ``f32`` (f32 stays f32: no bf16 on AVX-512/AMX CPUs, no f16), ``bf16``
            or ``f16`` (used where the CPU supports it, f32 otherwise), or ``None`` (no
            hint: the device's default, bf16 on CPUs with AVX512-BF16).

    Raises:
        UsageError: ``precision`` is none of :data:`PRECISIONS` nor ``None``.
    """
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"openvino: unknown precision {precision!r}; valid: {', '.join(PRECISIONS)} "
                         "or None (the device's default)")
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


#: Compile config of the default runner (f32 pinned).
CPU_CONFIG: dict[str, str] = cpu_config("f32")

#: Runtime ``layerType`` values of compute layers (the ones that can run int8).
COMPUTE_LAYERS = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm", "RNNSeq", "RNNCell"})
_INT8 = frozenset({"u8", "i8"})
#: IR op types a fused ``Subgraph`` computes with when it holds one (layer_precisions).
_IR_MATMULS = frozenset({"MatMul", "ScaledDotProductAttention"})


def require_openvino() -> None:
    """Refuse to start without the ``openvino`` package (an optional backend)."""
    if ov is None:
        raise UsageError("target 'openvino' needs the openvino package: pip install 'compressor[openvino]'")

def cpu_supports_bf16(core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin has native bf16 here (AVX512-BF16, as on AMX CPUs, or AVX2-VNNI-2).

    Read from the device's ``OPTIMIZATION_CAPABILITIES``. The plugin also accepts a bf16
    request on plain AVX-512 CPUs (emulated), so ``False`` does not mean bf16 is refused.
    """
    require_openvino()
    return "BF16" in (core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _rt(info: Any, key: str) -> str:
    return info[key].astype(str) if key in info else ""


def int8_summary(precisions: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of compute layers that ran int8 vs float, from :meth:`OpenVinoRunner.layer_precisions`."""
    floats = [p["name"] for p in precisions if not p["int8"]]
    return {"int8": len(precisions) - len(floats), "float": len(floats), "float_layers": floats}


class OpenVinoRunner(Runner):
    """Runs an OpenVINO ``.xml`` on the CPU plugin (compiled once, one infer request).

    Args:
        xml: The ``.xml`` file (its ``.bin`` beside it).
        core: An ``ov.Core`` to reuse (a new one when ``None``).
        config: Extra compile properties, over those of :func:`cpu_config`.
        precision: The inference precision to ask for (see :func:`cpu_config`); ``f32``
            by default. An artifact with a precision pinned in its ``rt_info``
            (:func:`~compressor.targets.openvino.precision.pinned_precision`) runs in that
            one, as it was evaluated, whatever is asked: the pin is the artifact's own.

    Raises:
        UsageError: unknown ``precision``.
    """

    def __init__(self, xml: Path, core: Any = None, config: Mapping[str, str] | None = None,
                 precision: str | None = "f32"):
        require_openvino()
        self.core = core or ov.Core()
        cpu_config(precision)  # an unknown precision is refused whatever the artifact pins
        #: The artifact's ``.xml`` (its ``.bin`` beside it).
        self.xml = Path(xml)
        model = self.core.read_model(str(xml))
        #: The precision pinned in the artifact (``None``: none).
        self.pinned: str | None = pinned_precision(model)
        self.precision = self.pinned or precision
        self.config = {**cpu_config(self.precision), **(config or {})}
        # IR MatMuls (and attention ops, which hold two), to tell a fused Subgraph holding one
        # (layer_precisions) from others
        self._matmuls = frozenset(op.get_friendly_name() for op in model.get_ops() if op.get_type_name() in _IR_MATMULS)
        self.compiled = self.core.compile_model(model, "CPU", self.config)
        del model
        self._request = self.compiled.create_infer_request()
        # A port has every name of its tensor (an input handed on unchanged also carries the
        # output's name, convert.keep_input_names): feeds are matched against all of them.
        self._input_port_names = [port.get_names() for port in self.compiled.inputs]
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]

    @property
    def inference_precision(self) -> str:
        """The float precision the compiled model runs in (``f32``, ``bf16``, ``f16``), as the device reports it."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    @property
    def dynamic_quantization_group_size(self) -> int:
        """Group size of the int8 quantization of weight-only FullyConnected inputs (0: off; VNNI CPUs only)."""
        return int(self.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"))

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        fed = [next((n for n in sorted(names) if n in feeds), None) for names in self._input_port_names]
        missing = [name for name, found in zip(self.input_names, fed) if found is None]
        if missing:
            raise DataError(f"no data for model input(s) {', '.join(missing)}; inputs: {', '.join(self.input_names)}")
        results = self._request.infer([np.asarray(feeds[name], order="C") for name in fed])
        return [np.array(results[port], copy=True) for port in self.compiled.outputs]

    def layer_precisions(self) -> list[dict[str, Any]]:
        """Per compute layer of the compiled graph: what precision it really ran in.

        Returns:
            One dict per layer in execution order: ``name``, ``type`` (runtime
            ``layerType``), ``precision`` (``runtimePrecision``: ``u8``/``i8`` for int8
            kernels, ``f32`` otherwise), ``input_precisions``, ``primitive`` (kernel, e.g.
            ``jit_avx2_I8``), ``original_layers`` (the IR layers fused into it) and ``int8``.

            ``int8`` needs an int8 kernel *and* an int8 activation: a FullyConnected with
            int8 (compressed) weights but an f32 input reports ``runtimePrecision`` i8 yet
            computes in f32 (weight-only). A fused ``Subgraph`` (the CPU plugin's snippets,
            e.g. attention) counts as a compute layer when it holds an IR MatMul or an IR
            ``ScaledDotProductAttention`` (what OpenVINO's conversion makes of a
            MatMul-Softmax-MatMul attention block). Which attention the plugin fuses depends
            on the CPU: an int8 Q·Kᵀ only where it has VNNI or AMX int8 kernels (its
            ``transformation_pipeline.cpp``, ``is_supported_matmul``); without them that
            product runs as its own int8 ``MatMul`` layer, beside a float ``probs · V`` one.
        """
        layers = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = _rt(info, "layerType")
            original = [n for n in _rt(info, "originalLayersNames").split(",") if n]
            if kind not in COMPUTE_LAYERS and not (kind == "Subgraph" and self._matmuls.intersection(original)):
                continue
            inputs = []
            for port in op.inputs():
                source = port.get_source_output()
                # one entry per output, or one for all (a Split's: "u8")
                outs = _rt(source.get_node().get_rt_info(), "outputPrecisions").split(",")
                index = 0 if len(outs) == 1 else source.get_index()
                inputs.append(outs[index] if index < len(outs) else "")
            precision = _rt(info, "runtimePrecision")
            layers.append({
                "name": op.get_friendly_name(),
                "type": kind,
                "precision": precision,
                "input_precisions": inputs,
                "primitive": _rt(info, "primitiveType"),
                "original_layers": original,
                "int8": precision in _INT8 and (not inputs or inputs[0] in _INT8),
            })
        return layers
