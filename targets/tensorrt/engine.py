"""TensorRT engine build (the ``tensorrt`` target's GPU half).

Engine build (:func:`build_engine`, GPU and the ``tensorrt`` package only): ONNX parser
(its errors name the ONNX node), builder config with INT8 (+FP16 for the layers left
float) when the model holds Q/DQ, SPARSE_WEIGHTS when the weights are 2:4, a timing cache
persisted between builds (:func:`timing_cache_path`), one optimization profile from the
input shapes (``--input`` fixes them; :func:`profile_shapes`), and detailed profiling
verbosity so the engine inspector reports per layer whether it picked an int8 and a
sparse kernel (``build_log.json``). The artifact holds ``model.engine``, the QDQ
``model.onnx`` and ``build_log.json``.

The helpers (settings, profiles, the timing cache's place) are pure Python and unit-tested
without TensorRT; :func:`build_engine` needs a CUDA device and the ``tensorrt`` package.
What TensorRT's logger, parser, builder and inspector say is read in :mod:`.engine_log`;
the runners are in :mod:`.runtime` (both re-exported here, where older code imports them).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
from compressor.targets.tensorrt.engine_log import (
    builder_offenders,
    capturing_logger,
    parser_offenders,
    summarize_engine_layers,
)
from compressor.targets.tensorrt.qdq import _QDQ, nm_sparse_layers
from compressor.targets.tensorrt.runtime import QdqReferenceRunner, TensorRtRunner

from compressor.errors import CompressorError, UnsupportedByTarget
from compressor.inputs import InputSpec, model_input_specs

__all__ = [
    "TensorRtRunner",
    "QdqReferenceRunner",
    "BuildSettings",
    "EngineBuild",
    "tensorrt_status",
    "profile_shapes",
    "parser_offenders",
    "builder_offenders",
    "summarize_engine_layers",
    "timing_cache_path",
    "build_engine",
    "capturing_logger",
    "qdq_precision",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Availability


@functools.lru_cache(maxsize=1)
def tensorrt_status() -> tuple[bool, str]:
    """``(True, device name)`` when an engine can be built here, else ``(False, why not)``."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "the tensorrt Python package is not installed (pip install tensorrt; needs an NVIDIA GPU)"
    except Exception as err:  # a broken install (missing libnvinfer) raises OSError and friends
        return False, f"the tensorrt package cannot be imported: {err}"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed; the TensorRT runner keeps its buffers in torch CUDA tensors"
    if not torch.cuda.is_available():
        return False, f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return True, f"{torch.cuda.get_device_name(0)}, TensorRT {trt.__version__}"


# --------------------------------------------------------------------------------------
# Engine build helpers (pure Python: unit-tested without TensorRT)


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """How engines are built.

    Attributes:
        batch: ``(min, opt, max)`` of a dynamic batch axis (axis 0) in the optimization profile.
        other: ``(min, opt, max)`` of any other dynamic axis (sequence length...).
        fp16: Allow FP16 kernels (for an int8 model: the layers left float; for an fp32
            model: an FP16 engine).
        workspace_mb: Builder workspace memory pool.
        timing_cache: Where the timing cache persists (``None``: :func:`timing_cache_path`).
    """

    batch: tuple[int, int, int] = (1, 16, 64)
    other: tuple[int, int, int] = (1, 128, 512)
    fp16: bool = True
    workspace_mb: int = 4096
    timing_cache: Path | None = None


def profile_shapes(specs: Sequence[InputSpec], settings: BuildSettings = BuildSettings()
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``{input: (min, opt, max)}`` of one optimization profile; static axes keep their size.

    Raises:
        CompressorError: a ``(min, opt, max)`` setting that is not ordered.
    """
    for what, triple in (("batch", settings.batch), ("other", settings.other)):
        if not 1 <= triple[0] <= triple[1] <= triple[2]:
            raise CompressorError(f"tensorrt: profile range {what}={triple} must satisfy 1 <= min <= opt <= max")
    shapes = {}
    for spec in specs:
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(spec.shape):
            triple = (dim, dim, dim) if isinstance(dim, int) else settings.batch if axis == 0 else settings.other
            lo.append(triple[0])
            opt.append(triple[1])
            hi.append(triple[2])
        shapes[spec.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def timing_cache_path(settings: BuildSettings = BuildSettings()) -> Path:
    """Where the timing cache persists: ``settings.timing_cache``, ``$COMPRESSOR_TRT_TIMING_CACHE``,
    else ``~/.cache/compressor/tensorrt.timing-cache``."""
    if settings.timing_cache is not None:
        return Path(settings.timing_cache)
    env = os.environ.get("COMPRESSOR_TRT_TIMING_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "compressor" / "tensorrt.timing-cache"


def qdq_precision(model: ir.Model) -> str | None:
    """``"int8"``/``"fp8"`` when the model holds Q/DQ, else ``None``."""
    for node in model.graph:
        if node.op_type in _QDQ and len(node.inputs) > 2 and node.inputs[2] is not None:
            return "fp8" if node.inputs[2].dtype == ir.DataType.FLOAT8E4M3FN else "int8"
        if node.op_type in _QDQ:
            return "int8"
    return None


# --------------------------------------------------------------------------------------
# Engine build (GPU + tensorrt only)


@dataclasses.dataclass
class EngineBuild:
    """What :func:`build_engine` produced."""

    engine: Path
    flags: list[str]
    profile: dict[str, Any]
    layers: dict[str, Any]
    log: list[str]
    build_s: float
    timing_cache: str


def build_engine(model: ir.Model, onnx_path: Path, engine_path: Path, *, settings: BuildSettings = BuildSettings(),
                 precision: str = "auto", sparse: bool | None = None) -> EngineBuild:
    """Build ``engine_path`` from the QDQ ONNX at ``onnx_path`` (the file of ``model``).

    Args:
        precision: ``auto`` (INT8/FP8 flags when the model holds Q/DQ, plus FP16 when
            ``settings.fp16``), ``fp32``, ``fp16``.
        sparse: Set SPARSE_WEIGHTS (``None``: when :func:`nm_sparse_layers` finds 2:4 weights).

    Raises:
        UnsupportedByTarget: the parser or the builder refused a node (named).
    """
    import tensorrt as trt

    lines: list[str] = []
    errors: list[str] = []
    trt_logger = capturing_logger(trt, lines, errors)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    nodes = list(model.graph)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        raise UnsupportedByTarget("tensorrt", parser_offenders(errs, [n.name or "" for n in nodes],
                                                               [n.op_type for n in nodes]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    flags = []
    quant = qdq_precision(model)
    if precision == "auto" and quant is not None:
        flags.append("FP8" if quant == "fp8" else "INT8")
    if precision == "fp16" or (precision == "auto" and settings.fp16):
        flags.append("FP16")
    sparse_layers = nm_sparse_layers(model)
    if sparse if sparse is not None else bool(sparse_layers):
        flags.append("SPARSE_WEIGHTS")
    for flag in flags:
        if hasattr(trt.BuilderFlag, flag):  # INT8/FP16 are deprecated (still honoured) in late 10.x
            config.set_flag(getattr(trt.BuilderFlag, flag))
    cache_path = timing_cache_path(settings)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    shapes = profile_shapes(model_input_specs(model), settings)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - start
    if serialized is None:
        raise UnsupportedByTarget("tensorrt", builder_offenders(errors, [n.name or "" for n in nodes]))
    engine_path.write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, cache_path)
    engine = trt.Runtime(trt_logger).deserialize_cuda_engine(bytes(serialized))
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    layers = summarize_engine_layers(info, lines)
    layers["eligible_sparse_onnx_layers"] = sparse_layers
    return EngineBuild(engine_path, flags, {k: [list(s) for s in v] for k, v in shapes.items()}, layers, lines,
                       round(build_s, 3), str(cache_path))
