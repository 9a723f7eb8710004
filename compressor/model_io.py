"""Moving models between ``onnx_ir`` (where passes work) and ONNX protos/files.

ONNX Runtime reads IR versions up to a bound that lags behind what the ``onnx`` package
writes by default (onnx 1.23 writes IR 14, onnxruntime 1.31 reads at most 13), so every
model we write gets an IR version chosen on purpose: the lowest one that supports the
model's opsets, and never below :data:`MIN_IR_VERSION`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from onnx import version_converter

from compressor.errors import CaptureError, UnsupportedModel
from compressor.passes._graph import label

__all__ = [
    "MIN_IR_VERSION",
    "MAX_IR_VERSION",
    "ir_version_for",
    "ir_bytes",
    "ir_from_bytes",
    "clone_model",
    "to_proto",
    "model_bytes",
    "save_model",
    "load_onnx",
    "default_opset",
    "upgrade_opset",
    "verify_model",
    "correct_output_shapes",
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


def clone_model(model: ir.Model) -> ir.Model:
    """An independent copy of ``model``'s graph, without serialising it (``ir.Model.clone``).

    Graphs, nodes and values are new objects; tensors (initializers, constant attributes)
    are shared, which is safe because passes replace a tensor (``value.const_value = ...``)
    and never write into one's array. The copy serialises to the same bytes as ``model``.
    """
    return model.clone()


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
        fixed = _sorted_if_only_unsorted(proto, err)
        proto = fixed if fixed is not None else _valid_but_shapeless_io(proto, err)
        if proto is None:
            first = str(err).strip().splitlines()[0]
            raise CaptureError(f"{path}: the ONNX model is invalid: {first}") from None
        if fixed is not None:
            logger.warning("%s: the nodes were not in topological order (ONNX requires it; ONNX Runtime's "
                           "float16 converter writes such files); sorted them", path)
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as err:  # a proto the checker accepts but onnx_ir cannot represent
        raise CaptureError(f"{path}: the ONNX model cannot be read into onnx_ir ({type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'})") from None


def _sorted_if_only_unsorted(proto: onnx.ModelProto, err: Exception) -> onnx.ModelProto | None:
    """``proto`` with its nodes sorted, when the checker's only complaint was their order; else None."""
    if "topologically sorted" not in str(err):
        return None
    try:
        model = ir.serde.deserialize_model(proto)
        ir.passes.common.TopologicalSortPass()(model)
        ordered = ir.serde.serialize_model(model)
        onnx.checker.check_model(ordered)
    except Exception:  # a cycle, or another problem behind the order: report the original error
        logger.debug("sorting the nodes did not make the model valid", exc_info=True)
        return None
    return ordered


#: The checker's complaint about a graph input or output that declares no shape at all.
_SHAPELESS = "Field 'shape' of 'type' is required but missing"


def _valid_but_shapeless_io(proto: onnx.ModelProto, err: Exception) -> onnx.ModelProto | None:
    """``proto`` itself when the checker's only complaint is graph inputs/outputs with no shape.

    ONNX requires the main graph's inputs and outputs to declare a shape (of any rank);
    some exporters leave it out and ONNX Runtime runs such files. Import gives them one
    (:func:`compressor.capture.onnx_import.declare_missing_shapes`).
    """
    if _SHAPELESS not in str(err):
        return None
    shapeless = [v for v in (*proto.graph.input, *proto.graph.output)
                 if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")]
    if not shapeless:
        return None
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for v in (*probe.graph.input, *probe.graph.output):
        if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape"):
            v.type.tensor_type.shape.SetInParent()  # rank 0 stands in for "some shape" while checking
    try:
        onnx.checker.check_model(probe)
    except onnx.checker.ValidationError:
        return None  # something else is wrong too: report the original error
    logger.info("the model declares no shape for %s (ONNX requires one; ONNX Runtime runs it anyway)",
                ", ".join(repr(v.name) for v in shapeless))
    return proto


def _has_external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def upgrade_opset(model: ir.Model, opset: int) -> ir.Model:
    """Convert ``model`` to ``opset`` with ONNX's version converter.

    Two things the converter gets wrong are checked for:

    1. ``PRelu`` before opset 7 applies a 1-D slope of size ``C`` per channel (axis 1, as
       Caffe2 and the PyTorch exporters of that time meant it); from opset 7 the slope
       broadcasts numpy-style against the *last* axis. The converter copies the slope as
       is, so a per-channel slope is reshaped to ``[C, 1, ..., 1]`` here.
    2. A converted graph that fails strict shape inference where the original passed it
       (an old semantic the converter did not carry over) is refused, naming the node.

    Raises:
        UnsupportedModel: the converter cannot upgrade one of the model's ops, or the
            converted graph is inconsistent; names the nodes and why (exit 4).
    """
    before = default_opset(model)
    proto = to_proto(model)
    try:
        converted = version_converter.convert_version(proto, opset)
    except Exception as err:  # RuntimeError, onnx's ConvertError: read the message
        raise UnsupportedModel(f"cannot upgrade the model from opset {before} to {opset} with ONNX's version "
                               "converter", _converter_offenders(model, str(err), opset)) from None
    if before < 7:  # PRelu's fix needs the input's rank
        try:
            converted = onnx.shape_inference.infer_shapes(converted)
        except Exception:
            logger.debug("shape inference failed on the converted model", exc_info=True)
    result = ir.serde.deserialize_model(converted)
    _carry_node_metadata(model, result)
    fixed = _per_channel_prelu_slopes(result) if before < 7 else 0
    _check_conversion(proto, result, before, opset)
    logger.info("upgraded the model from opset %d to %d%s", before, opset,
                f" ({fixed} PRelu slope(s) reshaped to per-channel)" if fixed else "")
    return result


def _carry_node_metadata(source: ir.Model, converted: ir.Model) -> None:
    """Node metadata the passes set (``compressor.runs_on``, ``compressor.activation_bits``),
    which ONNX's version converter drops, copied back by each node's first output name
    (unique in SSA form, kept by the converter)."""
    meta = {node.outputs[0].name: dict(node.metadata_props)
            for node in ir.traversal.RecursiveGraphIterator(source.graph) if node.outputs and node.metadata_props}
    if not meta:
        return
    for node in ir.traversal.RecursiveGraphIterator(converted.graph):
        if node.outputs and node.outputs[0].name in meta:
            node.metadata_props.update(meta[node.outputs[0].name])


_ASSERTION = re.compile(r"^.*?(?:Assertion `[^`]*` failed: |\.h:\d+: |\.cc:\d+: )")
_NO_ADAPTER = re.compile(r"No Adapter (?:From|To) Version \$?(\d+) for (\w+)")


def _converter_offenders(model: ir.Model, text: str, opset: int) -> list[tuple[str, str]]:
    """``(nodes, reason)`` from a version converter error: the op it names, else the model."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = _ASSERTION.sub("", lines[0]) if lines else "the converter failed"
    by_op: dict[str, list[str]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        by_op.setdefault(node.op_type, []).append(label(node))
    lowered = text.lower()
    named = [op for op in by_op if re.search(rf"(?<![a-z]){re.escape(op.lower())}(?![a-z])", lowered)
             or f"adapt_{op.lower()}_" in lowered]
    if not named:
        return [("model", f"ONNX's version converter failed: {reason[:300]}")]
    out = []
    for op in named:
        if "has no registered schema" in text:
            why = f"op {op} does not exist in opset {opset} (an experimental op ONNX removed), so it cannot be upgraded"
        elif match := _NO_ADAPTER.search(text):
            why = f"ONNX's version converter has no adapter for {match.group(2)} from/to version {match.group(1)}"
        else:
            why = f"{op}: {reason[:300]}"
        out.append((", ".join(by_op[op]), why))
    return out


def _per_channel_prelu_slopes(model: ir.Model) -> int:
    """Reshape per-channel ``[C]`` PRelu slopes of a converted pre-7 model to ``[C, 1, ...]``."""
    fixed = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "PRelu" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        x, slope = node.inputs[0], node.inputs[1]
        if slope.const_value is None or x is None or x.shape is None or len(x.shape) < 3:
            continue
        array = slope.const_value.numpy()
        channels = x.shape[1]
        if array.ndim != 1 or array.size == 1 or (isinstance(channels, int) and channels != array.size):
            continue
        graph = node.graph or model.graph
        name = f"{slope.name}_per_channel"
        while name in graph.initializers:
            name += "_"
        value = ir.Value(name=name, const_value=ir.tensor(array.reshape(array.size, *[1] * (len(x.shape) - 2))))
        graph.register_initializer(value)
        node.replace_input_with(1, value)
        fixed += 1
    return fixed


_NODE_NAME = re.compile(r"node name: ([^)]*)\)")


def _check_conversion(original: onnx.ModelProto, converted: ir.Model, before: int, opset: int) -> None:
    """Refuse a converted graph that fails strict shape inference where the original passed."""
    try:
        onnx.shape_inference.infer_shapes(original, strict_mode=True)
    except Exception:
        return  # nothing to hold the conversion to
    try:
        onnx.shape_inference.infer_shapes(to_proto(converted), strict_mode=True)
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        named = _NODE_NAME.search(text)
        node = named.group(1) if named else "model"
        raise UnsupportedModel(f"upgrading the model from opset {before} to {opset} with ONNX's version converter "
                               "gives an inconsistent graph", [(node, text[:300])]) from None


def verify_model(model: ir.Model, *, strict_shapes: bool) -> None:
    """Run the ONNX checker, and shape inference (strict where the input allowed it).

    Raises:
        onnx.checker.ValidationError, onnx.shape_inference.InferenceError: the model is
            not valid ONNX any more.
    """
    proto = to_proto(model)
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, check_type=strict_shapes, strict_mode=strict_shapes, data_prop=False)


def _dims(shape: onnx.TensorShapeProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _contradicts(declared: ir.Shape, inferred: list[int | str | None]) -> bool:
    """A different rank, or a fixed size where the other has another fixed size."""
    if len(declared) != len(inferred):
        return True
    return any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(declared, inferred))


def correct_output_shapes(model: ir.Model) -> dict[str, str]:
    """Replace graph-output shapes that contradict shape inference by the inferred ones.

    A declared output shape is only a claim of the exporter that wrote the file; the
    graph's computation is what the backends run. The model is inferred again without the
    declared output shapes; each output whose declaration contradicts the result (another
    rank, another fixed size) gets the inferred shape (none where inference finds none).

    Returns:
        Output name -> ``"declared [..], inferred [..]"``, for each output changed (empty
        when inference fails without the declarations too: the fault is elsewhere).
    """
    proto = to_proto(model)
    for output in proto.graph.output:
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=False)
    except Exception:  # inconsistent without the declarations too
        logger.debug("shape inference fails without the declared output shapes", exc_info=True)
        return {}
    found = {o.name: o.type.tensor_type for o in inferred.graph.output if o.type.HasField("tensor_type")}
    changed: dict[str, str] = {}
    for value in model.graph.outputs:
        if value.shape is None or value.name not in found:
            continue
        tensor_type = found[value.name]
        dims = _dims(tensor_type.shape) if tensor_type.HasField("shape") else None
        if dims is not None and not _contradicts(value.shape, dims):
            continue
        shown = "unknown" if dims is None else "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        declared = "[" + ", ".join(str(d) for d in value.shape) + "]"
        changed[value.name] = f"declared {declared}, inferred {shown}"
        value.shape = None if dims is None else ir.Shape(dims)
    return changed
