"""Runners of the ``tensorrt`` target: the engine on the GPU, the QDQ ONNX on ONNX Runtime CPU.

:class:`TensorRtRunner` runs a serialized engine (a CUDA device, the ``tensorrt`` package
and CUDA-enabled torch, whose tensors are the engine's buffers); :class:`QdqReferenceRunner`
runs the TensorRT-ready QDQ ONNX where no engine can be built, with Q/DQ executed as written.
Both carry the lowering's ``build_log.json`` for the target's report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from compressor.targets.base import Runner
from compressor.targets.tensorrt.engine_log import capturing_logger

from compressor.errors import CompressorError, DataError

__all__ = ["TensorRtRunner", "QdqReferenceRunner"]


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
