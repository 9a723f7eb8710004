"""Backends, one module per target: capabilities as data, check, lower, runner.

:func:`get_target` builds a target by its CLI name; modules are imported lazily so a
missing optional backend (OpenVINO, TensorRT) only matters when it is asked for.
"""

from __future__ import annotations

import importlib

from compressor.errors import UsageError

__all__ = ["TARGETS", "get_target"]

#: CLI name -> "module:class"
TARGETS: dict[str, str] = {
    "onnx": "compressor.targets.onnx:OnnxTarget",
    "openvino": "compressor.targets.openvino:OpenVinoTarget",
    "qnn-htp": "compressor.targets.qnn_htp:QnnHtpTarget",
    "tensorrt": "compressor.targets.tensorrt:TensorRtTarget",
}


def get_target(name: str):
    """The target registered as ``name``.

    Raises:
        UsageError: unknown name (lists the valid ones).
    """
    if name not in TARGETS:
        raise UsageError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}")
    module, cls = TARGETS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
