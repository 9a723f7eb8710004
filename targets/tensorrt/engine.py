"""TensorRT engine build and runners (the ``tensorrt`` target's GPU half).

Engine build (:func:`build_engine`, GPU and the ``tensorrt`` package only): ONNX parser
(its errors name the ONNX node), builder config with INT8 (+FP16 for the layers left
float) when the model holds Q/DQ, SPARSE_WEIGHTS when the weights are 2:4, a timing cache
persisted between builds (:func:`timing_cache_path`), one optimization profile from the
input shapes (``--input`` fixes them; :func:`profile_shapes`), and detailed profiling
verbosity so the engine inspector reports per layer whether it picked an int8 and a
sparse kernel (``build_log.json``). The artifact holds ``model.engine``, the QDQ
``model.onnx`` and ``build_log.json``.

The helpers (settings, profiles, parser/builder message mapping, inspector summaries) are
pure Python and unit-tested without TensorRT; :func:`build_engine` and
:class:`TensorRtRunner` need a CUDA device and the ``tensorrt`` package.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from compressor.targets.base import Runner
from compressor.targets.tensorrt.qdq import _QDQ, nm_sparse_layers

from compressor.errors import CompressorError, DataError, UnsupportedByTarget
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


def parser_offenders(errors: Sequence[Any], node_names: Sequence[str], node_ops: Sequence[str] = ()
                     ) -> list[tuple[str, str]]:
    """``(ONNX node, reason)`` from TensorRT ONNX parser errors (``parser.get_error(i)``).

    Uses the error's ``node_name()``/``node_operator()`` where the TensorRT version has them,
    else its ``node()`` index into the graph's node list.
    """
    out = []
    for err in errors:
        name = _call(err, "node_name") or ""
        op = _call(err, "node_operator") or ""
        index = _call(err, "node")
        if not name and isinstance(index, int) and 0 <= index < len(node_names):
            name = node_names[index]
            op = op or (node_ops[index] if index < len(node_ops) else "")
        desc = str(_call(err, "desc") or err).strip()
        label = name or (f"node #{index}" if isinstance(index, int) and index >= 0 else "model")
        out.append((label, f"TensorRT's ONNX parser: {op + ': ' if op else ''}{desc}"))
    return out


def _call(obj: Any, attr: str) -> Any:
    fn = getattr(obj, attr, None)
    try:
        return fn() if callable(fn) else fn
    except Exception:  # an accessor this TensorRT version does not implement
        return None


def builder_offenders(messages: Sequence[str], node_names: Sequence[str]) -> list[tuple[str, str]]:
    """``(ONNX node, reason)`` from the builder's error log: each message naming a node is given to it.

    TensorRT names layers after the ONNX nodes they come from (``/layer1/conv/Conv``,
    often with a suffix); the longest node name found in a message wins.
    """
    names = sorted((n for n in node_names if n), key=len, reverse=True)
    out = []
    for message in messages:
        text = message.strip()
        hit = next((n for n in names if n in text), None)
        out.append((hit or "model", f"TensorRT builder: {text[:400]}"))
    return out or [("model", "TensorRT builder returned no engine and logged no error")]


_SPARSE_PICKED = re.compile(r"picks sparse implementation for layers?:?\s*(.*)", re.I)
_COMPUTE_LAYER = re.compile(r"conv|gemm|matmul|matrixmultiply|fullyconnected|deconv", re.I)


def summarize_engine_layers(info: str | Mapping[str, Any], log: Sequence[str] = ()) -> dict[str, Any]:
    """Per engine layer: type, tactic, whether it picked an int8 and a sparse kernel.

    Args:
        info: ``inspector.get_engine_information(LayerInformationFormat.JSON)`` (built
            with ``ProfilingVerbosity.DETAILED``).
        log: The builder's log lines; ``(Sparsity) TRT inference plan picks sparse
            implementation for layers: a, b`` names the layers given sparse kernels.
    """
    data = json.loads(info) if isinstance(info, str) else dict(info)
    sparse_named: set[str] = set()
    for line in log:
        match = _SPARSE_PICKED.search(line)
        if match:
            sparse_named.update(n.strip() for n in match.group(1).split(",") if n.strip())
    layers = []
    for layer in data.get("Layers", []):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity
            layer = {"Name": layer}
        name = str(layer.get("Name", ""))
        kind = str(layer.get("LayerType", layer.get("ParameterType", "")))
        tactic = str(layer.get("TacticName", layer.get("Tactic", "")))
        formats = " ".join(str(t.get("Format/Datatype", "")) for t in (*layer.get("Inputs", []),
                                                                        *layer.get("Outputs", []))
                           if isinstance(t, Mapping))
        int8 = "int8" in formats.lower() or bool(re.search(r"i8i8|int8", tactic, re.I))
        fp8 = "fp8" in formats.lower() or "e4m3" in tactic.lower()
        sparse = "sparse" in tactic.lower() or name in sparse_named
        layers.append({"name": name, "type": kind, "tactic": tactic, "int8": int8, "fp8": fp8, "sparse": sparse,
                       "compute": bool(_COMPUTE_LAYER.search(kind + " " + str(layer.get("ParameterType", ""))))})
    compute = [layer for layer in layers if layer["compute"]]
    return {
        "layers": len(layers),
        "compute_layers": len(compute),
        "int8": sum(layer["int8"] for layer in compute),
        "fp8": sum(layer["fp8"] for layer in compute),
        "sparse": sum(layer["sparse"] for layer in layers),
        "float_compute_layers": [layer["name"] for layer in compute if not (layer["int8"] or layer["fp8"])],
        "sparse_layers": sorted({layer["name"] for layer in layers if layer["sparse"]} | sparse_named),
        "per_layer": layers,
    }


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
# Engine build and runner (GPU + tensorrt only)


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


def capturing_logger(trt: Any, lines: list[str], errors: list[str]) -> Any:
    """A ``trt.ILogger`` keeping INFO-and-worse messages in ``lines``, errors also in ``errors``."""
    class _Recorder(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR=0 < ERROR < WARNING < INFO < VERBOSE
            if level <= int(trt.ILogger.Severity.INFO):
                lines.append(f"[{getattr(severity, 'name', level)}] {msg}")
            if level <= int(trt.ILogger.Severity.ERROR):
                errors.append(msg)
                logger.debug("tensorrt: %s", msg)

    return _Recorder()


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


class TensorRtRunner(Runner):
    """Runs a serialized engine with torch CUDA tensors as buffers (one execution context).

    Args:
        engine_path: The serialized engine.
        build_log: What the lowering recorded of the build (``build_log.json``), for the report.
    """

    def __init__(self, engine_path: Path, build_log: Mapping[str, Any] | None = None):
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self.path = engine_path
        self.build_log = dict(build_log or {})
        lines: list[str] = []
        self._logger = capturing_logger(trt, lines, [])
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise CompressorError(f"tensorrt: cannot deserialize {engine_path} ({'; '.join(lines[-3:])})")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.stream = torch.cuda.Stream()

    def _torch_dtype(self, name: str) -> Any:
        np_dtype = np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))
        return self._torch.from_numpy(np.zeros(0, np_dtype)).dtype

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        torch = self._torch
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DataError(f"no data for engine input(s) {', '.join(missing)}; inputs: {', '.join(self.input_names)}")
        keep = []
        for name in self.input_names:
            array = np.asarray(feeds[name], order="C")
            tensor = torch.from_numpy(array).to("cuda", dtype=self._torch_dtype(name), non_blocking=False)
            if not self.context.set_input_shape(name, tuple(array.shape)):
                lo, opt, hi = self.engine.get_tensor_profile_shape(name, 0)
                raise DataError(f"tensorrt: input {name} of shape {array.shape} is outside the engine's profile "
                                f"(min {tuple(lo)}, max {tuple(hi)}); rebuild with other BuildSettings")
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outs = []
        for name in self.output_names:
            tensor = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._torch_dtype(name),
                                 device="cuda")
            self.context.set_tensor_address(name, tensor.data_ptr())
            outs.append(tensor)
        return keep + outs

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        buffers = self._bind(feeds)
        with self._torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise CompressorError(f"tensorrt: execution of {self.path.name} failed")
        self.stream.synchronize()
        return [t.cpu().numpy() for t in buffers[len(self.input_names):]]

    def device_latency_ms(self, feeds: Mapping[str, np.ndarray], repeats: int = 50, warmup: int = 10) -> float:
        """Median GPU time of one execution (CUDA events; inputs already on the device)."""
        torch = self._torch
        buffers = self._bind(feeds)  # kept alive: the context holds their addresses during the loop
        times = []
        for i in range(warmup + repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.context.execute_async_v3(self.stream.cuda_stream)
            stop.record(self.stream)
            stop.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(stop))
        del buffers
        return float(np.median(times))


class QdqReferenceRunner(Runner):
    """The QDQ ONNX on ONNX Runtime CPU with Q/DQ executed as written (no host int8 kernels).

    Graph optimizations stop at the basic level: ONNX Runtime's QDQ fusions (extended
    level) would swap in the host CPU's int8 kernels, whose arithmetic is not TensorRT's
    (and saturates on x86 without VNNI); executed as written, ``DQ(Q(x))`` then float
    Conv/MatMul is what TensorRT's int8 kernels compute, up to float rounding.

    Args:
        path: The QDQ ONNX model.
        build_log: What the lowering recorded (``build_log.json``), for the report.
    """

    def __init__(self, path: Path, build_log: Mapping[str, Any] | None = None):
        import onnxruntime as ort

        self.build_log = dict(build_log or {})
        ort.set_default_logger_severity(3)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
