"""Backends, one module per target: capabilities as data, check, lower, runner.

:func:`get_target` builds a target by its CLI name; modules are imported lazily so a
missing optional backend (OpenVINO, TensorRT) only matters when it is asked for.
"""

from __future__ import annotations

import importlib

from compressor.errors import UsageError

__all__ = ["TARGETS", "CPU_TARGETS", "TARGET_CPUS", "check_target_cpu", "get_target"]

#: ``--target-cpu``: the x86 CPU a CPU target's artifact will run on. ``host``: this one
#: (:func:`compressor.targets.base.cpu_has_vnni`); ``avx2``: one without VNNI (7-bit weights
#: where its int8 kernels saturate); ``vnni``: AVX-512 VNNI or AVX-VNNI (the full 8-bit grid);
#: ``amx``: AMX int8 tiles too (Sapphire Rapids on; OpenVINO's activations then go signed:
#: :class:`~compressor.targets.openvino.OpenVinoTarget`).
TARGET_CPUS = ("host", "avx2", "vnni", "amx")

#: CLI name -> "module:class"
TARGETS: dict[str, str] = {
    "onnx": "compressor.targets.onnx:OnnxTarget",
    "openvino": "compressor.targets.openvino:OpenVinoTarget",
    "qnn-htp": "compressor.targets.qnn_htp:QnnHtpTarget",
    "tensorrt": "compressor.targets.tensorrt:TensorRtTarget",
}

#: The targets whose artifact runs int8 on an x86 CPU, so whose scheme depends on the CPU it
#: runs on (``--target-cpu``); qnn-htp and tensorrt run on their own devices.
CPU_TARGETS = ("onnx", "openvino")


def check_target_cpu(name: str, target_cpu: str = "host") -> None:
    """Refuse an unknown target, an unknown ``target_cpu``, or one other than ``host`` for a target
    that is not a CPU one (before any work: the CLI checks it before starting Ray).

    Raises:
        UsageError: which, and what to do.
    """
    if name not in TARGETS:
        raise UsageError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}")
    if target_cpu not in TARGET_CPUS:
        raise UsageError(f"unknown --target-cpu {target_cpu!r}; valid: {', '.join(TARGET_CPUS)}")
    if target_cpu != "host" and name not in CPU_TARGETS:
        raise UsageError(f"--target-cpu {target_cpu} names the x86 CPU an artifact runs on and applies to the "
                         f"targets {' and '.join(CPU_TARGETS)}; {name} runs on its own device: leave --target-cpu out")


def get_target(name: str, target_cpu: str = "host"):
    """The target registered as ``name``, building for the CPU ``target_cpu`` names (:data:`TARGET_CPUS`;
    ``host``: this one).

    Raises:
        UsageError: unknown name (lists the valid ones), unknown ``target_cpu``, or a
            ``target_cpu`` other than ``host`` for a target that is not a CPU one.
    """
    check_target_cpu(name, target_cpu)
    module, cls = TARGETS[name].split(":")
    target = getattr(importlib.import_module(module), cls)
    return target(target_cpu=target_cpu) if name in CPU_TARGETS else target()
