"""The float precision an OpenVINO artifact runs in where it is deployed, and pinning f32 in it.

A user compiles the artifact with no config, so the CPU plugin picks the float precision
of the layers int8 does not cover: f32 on most CPUs, bf16 on CPUs with AVX512-BF16 (and
AMX), read here as the plugin's default ``INFERENCE_PRECISION_HINT``
(:func:`device_precision`). The accuracy gate judges the artifact in that precision; where
it breaks the budget and f32 holds it, the target pins f32 in the artifact:

1. the pin is written where OpenVINO keeps a model's runtime options, the ``.xml``'s
   ``rt_info/runtime_options/INFERENCE_PRECISION_HINT`` (:data:`RT_PRECISION`). It is data
   on the artifact, not state on the target: the target's runner reads it back
   (:func:`pinned_precision`) and compiles the artifact in that precision, whichever
   target object (a fresh one, a copy in a Ray task) runs it;
2. whether the CPU plugin applies that key when the saved model is compiled with no
   config is probed, not assumed (:func:`plugin_reads_rt_option`): an invalid value fails
   the compile of a key the plugin reads and is ignored for one it does not. OpenVINO
   2026.4's CPU plugin reads ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` (and the KV-cache keys)
   from there, not ``INFERENCE_PRECISION_HINT``, so the manifest then says the pin holds
   only with the compile config it names (:func:`pin_report`).

On a device whose default is f32 nothing is pinned and the artifact is byte-identical to
one lowered without this module.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

try:
    import openvino as ov
except ImportError:  # the target refuses to start without it
    ov = None

__all__ = ["RT_PRECISION", "device_precision", "pin_in_rt_info", "pin_report", "pinned_precision",
           "plugin_reads_rt_option"]

logger = logging.getLogger(__name__)

#: Where a pinned inference precision is written in the model's ``rt_info`` (1).
RT_PRECISION = ("runtime_options", "INFERENCE_PRECISION_HINT")


def device_precision(core: Any = None) -> str:
    """The CPU plugin's default float precision here (``f32``, ``bf16`` or ``f16``): what a model
    compiled with no ``INFERENCE_PRECISION_HINT`` runs its float layers in."""
    return (core or ov.Core()).get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def pin_in_rt_info(ov_model: Any, precision: str) -> None:
    """Write ``precision`` as the model's runtime inference precision (1), before it is saved."""
    ov_model.set_rt_info(precision, list(RT_PRECISION))


def pinned_precision(ov_model: Any) -> str | None:
    """The precision pinned in a (read or converted) model's ``rt_info`` (1), ``None`` when none is."""
    path = list(RT_PRECISION)
    return ov_model.get_rt_info(path).astype(str) if ov_model.has_rt_info(path) else None


@functools.cache
def plugin_reads_rt_option(key: str = RT_PRECISION[1]) -> bool:
    """Whether the CPU plugin applies ``rt_info/runtime_options/<key>`` of a model compiled with no config (2).

    A one-MatMul model carrying an invalid value for ``key`` is compiled: the plugin fails
    on a key it reads and ignores one it does not.
    """
    from openvino import opset13 as ops

    x = ops.parameter([1, 2], np.float32, name="x")
    model = ov.Model([ops.matmul(x, ops.constant(np.eye(2, dtype=np.float32)), False, False)], [x], "probe")
    model.set_rt_info("not-a-value", ["runtime_options", key])
    try:
        ov.Core().compile_model(model, "CPU")
    except Exception:  # the value was read and refused
        return True
    return False


def pin_report(pinned: str | None) -> dict[str, Any] | None:
    """What the manifest says of a pin: where it is written, whether the plugin reads it there,
    and the compile config that holds it where it does not (2)."""
    if pinned is None:
        return None
    read = plugin_reads_rt_option()
    report: dict[str, Any] = {"precision": pinned, "rt_info": "/".join(RT_PRECISION), "read_by_plugin": read}
    if not read:
        report["compile_config"] = {"INFERENCE_PRECISION_HINT": pinned}
        report["note"] = (f"OpenVINO {ov.get_version()}'s CPU plugin does not apply the rt_info key; compile with "
                          f"INFERENCE_PRECISION_HINT={pinned} to run the artifact as it was evaluated")
    return report
