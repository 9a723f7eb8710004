"""Moving models between ``onnx_ir`` (where passes work) and ONNX protos/files.

ONNX Runtime reads IR versions up to a bound that lags behind what the ``onnx`` package
writes by default (onnx 1.23 writes IR 14, onnxruntime 1.31 reads at most 13), so every
model we write gets an IR version chosen on purpose: the lowest one that supports the
model's opsets, and never below :data:`MIN_IR_VERSION`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import version_converter

from compressor.errors import CaptureError, CompressorError

__all__ = [
    "MIN_IR_VERSION",
    "MAX_IR_VERSION",
    "ir_version_for",
    "ir_bytes",
    "ir_from_bytes",
    "to_proto",
    "model_bytes",
    "save_model",
    "load_onnx",
    "default_opset",
    "upgrade_opset",
    "verify_model",
]

logger = logging.getLogger(__name__)

MIN_IR_VERSION = 8
MAX_IR_VERSION = 10


def _ir_for_opset(opset: int) -> int:
    for _release, ir_version, ai_onnx, _ml, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return ir_version
    return onnx.helper.VERSION_TABLE[-1][1]


def default_opset(model: ir.Model) -> int:
    """The model's ``ai.onnx`` opset version."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def ir_version_for(model: ir.Model) -> int:
    """The IR version to write: enough for the opset, within what ONNX Runtime reads."""
    needed = _ir_for_opset(default_opset(model))
    return max(MIN_IR_VERSION, min(needed, MAX_IR_VERSION) if needed <= MAX_IR_VERSION else needed)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialise ``model`` with its IR version set for ONNX Runtime (``model`` is left as is)."""
    proto = ir.serde.serialize_model(model)
    proto.ir_version = ir_version_for(model)
    return proto


def model_bytes(model: ir.Model) -> bytes:
    """Deterministic bytes of ``model`` (all weights inline)."""
    return to_proto(model).SerializeToString(deterministic=True)


def ir_bytes(model: ir.Model) -> bytes:
    """``model`` as it is in memory (IR version untouched), for shipping to another process."""
    return ir.serde.serialize_model(model).SerializeToString(deterministic=True)


def ir_from_bytes(data: bytes) -> ir.Model:
    """The model :func:`ir_bytes` wrote: a copy equal to ``ir.serde`` round-tripping it."""
    return ir.serde.deserialize_model(onnx.ModelProto.FromString(data))


def save_model(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` as one self-contained ``.onnx`` file."""
    path = Path(path)
    path.write_bytes(model_bytes(model))
    return path


def load_onnx(path: str | os.PathLike) -> ir.Model:
    """Read an ``.onnx`` file (external data next to it is followed).

    Raises:
        CaptureError: the file is not a readable ONNX model.
    """
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.load_external_data_for_model(proto, str(path.parent)) if _has_external(proto) else None
    except Exception as err:  # protobuf raises DecodeError and others; all mean unreadable
        raise CaptureError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err}); "
                           "check that the file is complete and was written by an ONNX exporter") from None
    if not proto.graph.node and not proto.graph.output:
        raise CaptureError(f"{path}: not a readable ONNX model (the file parsed to an empty graph); "
                           "check that the file is complete and was written by an ONNX exporter")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise CaptureError(f"{path}: the ONNX model is invalid: {first}") from None
    return ir.serde.deserialize_model(proto)


def _has_external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def upgrade_opset(model: ir.Model, opset: int) -> ir.Model:
    """Convert ``model`` to ``opset`` with ONNX's version converter.

    Raises:
        CompressorError: the converter cannot upgrade one of the model's ops.
    """
    before = default_opset(model)
    try:
        converted = version_converter.convert_version(to_proto(model), opset)
    except Exception as err:
        raise CompressorError(f"cannot upgrade the model from opset {before} to {opset}: {err}") from None
    logger.info("upgraded the model from opset %d to %d", before, opset)
    return ir.serde.deserialize_model(converted)


def verify_model(model: ir.Model, *, strict_shapes: bool) -> None:
    """Run the ONNX checker, and shape inference (strict where the input allowed it).

    Raises:
        onnx.checker.ValidationError, onnx.shape_inference.InferenceError: the model is
            not valid ONNX any more.
    """
    proto = to_proto(model)
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, check_type=strict_shapes, strict_mode=strict_shapes, data_prop=False)
