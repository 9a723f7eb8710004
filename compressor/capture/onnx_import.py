"""Import of ONNX files as real exporters write them.

What :func:`normalize_import` does to a freshly read ``.onnx`` model, in order:

1. **Dynamic axes, one way.** Exporters mark a dynamic axis in several ways: a negative
   ``dim_value`` (``-1``, older exporters), an empty dim, ``dim_param: "?"``. All become an
   unnamed dynamic axis, so ``--input x=1x3x224x224`` can fix them and data of any size
   is accepted there. Names (``batch``, tf2onnx's ``unk__12``, torch's ``s34``) are kept
   in the model (they say which axes are equal); messages show machine-made names as
   ``N`` (axis 0) or ``?`` (:func:`compressor.inputs.dim_text`).
2. **Old opsets are upgraded.** A model older than :data:`IMPORT_MIN_OPSET` (ONNX
   Runtime has dropped the CPU kernels of some ops' oldest versions: ``Add``-6,
   ``AveragePool``-1...) is converted with ONNX's version converter to
   :data:`IMPORT_OPSET` (what ``quantize`` needs, so an ``int8`` recipe converts once) by
   :func:`compressor.model_io.upgrade_opset`, which also checks the result. The
   conversion is recorded in :attr:`ImportReport.notes` (and the manifest). When the
   converter cannot upgrade an op (``ImageScaler``, an experimental op ONNX removed, which
   ONNX Runtime still runs), the model keeps its opset with a warning and the target's
   check decides; where an upgrade is required (a pass's ``min_opset``) the same failure
   is exit 4 naming the op.

3. **Declared shapes that contradict inference** (a ``value_info`` entry with a wrong
   shape) are dropped and inferred again (noted): passes copy declared shapes onto the
   nodes they insert, and ONNX Runtime would refuse the artifact.

Before these, :func:`declare_missing_shapes` gives a shape to graph inputs and outputs
that declare none (ONNX requires one; some exporters leave it out and ONNX Runtime runs
such files): an input takes its ``--input`` shape, else its data's (samples on axis 0,
which stays dynamic, as for torch modules), else the user is asked for ``--input``; an
output takes the shape inference gives it.

Custom domains (``ai.onnx.ml``, ``com.microsoft``) pass through untouched; the target's
check runs them in its backend or names the node it cannot run.

:func:`quantized_nodes` finds the nodes of an already-quantized model (Q/DQ, ``QLinear*``,
``ConvInteger``, ``MatMulInteger``, ``DynamicQuantize*``...); ``quantize`` refuses such a
model (it must never be quantized twice).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from compressor.errors import DataError, UnsupportedModel
from compressor.inputs import shape_text
from compressor.model_io import default_opset, to_proto, upgrade_opset
from compressor.passes._graph import label

__all__ = ["IMPORT_MIN_OPSET", "IMPORT_OPSET", "ImportReport", "declare_missing_shapes", "normalize_import",
           "normalize_dims", "quantized_nodes", "describe_quantized"]

logger = logging.getLogger(__name__)

#: Models whose ``ai.onnx`` opset is below this are upgraded on import: ONNX Runtime has no
#: CPU kernels for several ops' versions before 7 (``Add``-6, ``Mul``-6, ``PRelu``-6, ...).
IMPORT_MIN_OPSET = 7
#: The opset they are upgraded to: what ``quantize`` needs (``min_opset``), which every
#: target reads.
IMPORT_OPSET = 13

_DYNAMIC_PARAMS = frozenset({"", "?"})

#: Ops that only occur in a quantized model, by domain.
_QUANTIZED_OPS = {
    "": frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                   "ConvInteger", "MatMulInteger"}),
    "com.microsoft": frozenset({"QuantizeLinear", "DequantizeLinear", "QGemm", "QAttention", "QEmbedLayerNormalization",
                                "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat",
                                "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "QOrderedMatMul",
                                "QuantizeBFP", "DequantizeBFP", "FusedMatMulActivation"}),
}


@dataclasses.dataclass
class ImportReport:
    """What import changed, for the log and the manifest.

    Attributes:
        dims_normalized: How many dims written as ``-1``, empty or ``?`` became dynamic.
        opset_from: The model's opset before an upgrade (``None``: not upgraded).
        opset_to: The opset after the upgrade.
        notes: One sentence per decision.
    """

    dims_normalized: int = 0
    opset_from: int | None = None
    opset_to: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def _normalized(shape: ir.Shape) -> tuple[ir.Shape, int]:
    dims, changed = [], 0
    for d in shape:
        if isinstance(d, int) and d < 0:
            dims.append(None)
            changed += 1
        elif not isinstance(d, int) and d.value in _DYNAMIC_PARAMS:
            dims.append(None)
            changed += 1
        else:
            dims.append(d)
    return (ir.Shape(dims) if changed else shape), changed


def normalize_dims(model: ir.Model) -> int:
    """Make every dim written as ``-1``, empty or ``?`` an unnamed dynamic axis; returns how many.

    Covers the graph's inputs and outputs and every value of every (sub)graph.
    """
    values: dict[int, ir.Value] = {id(v): v for v in (*model.graph.inputs, *model.graph.outputs)}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v in (*node.inputs, *node.outputs):
            if v is not None:
                values.setdefault(id(v), v)
        for attr in node.attributes.values():
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for g in graphs:
                for v in (*g.inputs, *g.outputs):
                    values.setdefault(id(v), v)
    total = 0
    for value in values.values():
        if value.shape is None or value.const_value is not None:
            continue
        shape, changed = _normalized(value.shape)
        if changed:
            value.shape = shape
            total += changed
    return total


def declare_missing_shapes(model: ir.Model, overrides: Mapping[str, tuple[tuple[Any, ...], str | None]],
                           examples: Mapping[str, np.ndarray] | None) -> list[str]:
    """Give a shape to every graph input and output that declares none; returns notes.

    An input takes its ``--input`` shape, else the shape of its data (``examples``: first
    axis = samples = the batch axis, left dynamic); an output takes what shape inference
    gives once the inputs have shapes.

    Raises:
        DataError: an input has no shape, no ``--input`` and no data (exit 2).
        UnsupportedModel: shape inference cannot give an output even a rank (exit 4).
    """
    notes: list[str] = []
    for value in model.graph.inputs:
        if value.shape is not None or value.const_value is not None or not isinstance(value.type, ir.TensorType):
            continue
        if value.name in overrides:
            value.shape = ir.Shape(list(overrides[value.name][0]))
            continue
        sample = (examples or {}).get(value.name)
        if sample is None:
            raise DataError(f"the model's input {value.name!r} declares no shape (ONNX requires one; its exporter "
                            f"left it out): give it with --input {value.name}=DIMxDIM... (e.g. "
                            f"{value.name}=1x3x224x224; ? leaves an axis dynamic; {value.name}=scalar for rank 0), "
                            "or pass --calib/--eval data that holds it")
        dims = [None, *sample.shape[1:]] if sample.ndim else []
        value.shape = ir.Shape(dims)
        notes.append(f"input {value.name!r} declares no shape; took {shape_text(dims)} from the data (give --input "
                     "to choose another)")
    missing = [v for v in model.graph.outputs if v.shape is None and isinstance(v.type, ir.TensorType)]
    if missing:
        inferred = onnx.shape_inference.infer_shapes(to_proto(model), data_prop=True)
        shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.output
                  if v.type.tensor_type.HasField("shape")}
        for value in missing:
            if value.name not in shapes:
                raise UnsupportedModel(f"the model's output {value.name!r} declares no shape and shape inference "
                                       "cannot give it one", [(value.name, "output with no shape")])
            value.shape = ir.Shape([d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in shapes[value.name].dim])
        notes.append(f"output(s) {', '.join(repr(v.name) for v in missing)} declare no shape; took the inferred one")
    for note in notes:
        logger.info("%s", note)
    return notes


def normalize_import(model: ir.Model) -> tuple[ir.Model, ImportReport]:
    """Normalise a model read from an ``.onnx`` file (module docstring, steps 1-2).

    Raises:
        UnsupportedModel: the model's opset is too old and cannot be upgraded (exit 4).
    """
    report = ImportReport()
    report.dims_normalized = normalize_dims(model)
    if report.dims_normalized:
        report.notes.append(f"{report.dims_normalized} dimension(s) written as -1, empty or '?' read as dynamic")
    model, dropped = _drop_contradicted_value_info(model)
    if dropped:
        report.notes.append(dropped)
    before = default_opset(model)
    uses_onnx_ops = "" in model.opset_imports or "ai.onnx" in model.opset_imports  # not an ai.onnx.ml-only model
    if uses_onnx_ops and before < IMPORT_MIN_OPSET:
        try:
            model = upgrade_opset(model, IMPORT_OPSET)
        except UnsupportedModel as err:
            # Case 2's exception: some backends still run ops ONNX removed (ONNX Runtime runs
            # ImageScaler-1), so the target's check decides, naming what it cannot run.
            logger.warning("kept the model at opset %d: %s", before, err)
            report.notes.append(f"kept at opset {before}: {err}")
            return model, report
        normalize_dims(model)
        report.opset_from, report.opset_to = before, IMPORT_OPSET
        report.notes.append(f"upgraded from opset {before} to {IMPORT_OPSET} with ONNX's version converter "
                            f"(backends have no kernels for some ops before opset {IMPORT_MIN_OPSET}); the baseline "
                            "is the upgraded model")
    return model, report


def _drop_contradicted_value_info(model: ir.Model) -> tuple[ir.Model, str | None]:
    """Re-infer intermediate shapes when the file's ``value_info`` contradicts shape inference.

    Passes copy an input's declared shape onto what they insert (a Q/DQ output), so a wrong
    declaration would end up in the artifact, which ONNX Runtime then refuses to load.
    """
    proto = to_proto(model)
    if not proto.graph.value_info:
        return model, None
    try:
        onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=False)
        return model, None
    except Exception as err:  # InferenceError, ValidationError...
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=True, data_prop=False)
    except Exception:
        return model, None  # inconsistent without the declarations too: the pass manager verifies laxly
    note = (f"the file's intermediate shapes (value_info) contradict shape inference ({why[:200]}); "
            "they were dropped and inferred again")
    logger.warning("%s", note)
    return ir.serde.deserialize_model(inferred), note


def quantized_nodes(model: ir.Model) -> list[tuple[str, str]]:
    """``(node, op)`` for every node that only a quantized model has (subgraphs included)."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = "" if node.domain == "ai.onnx" else node.domain
        ops = _QUANTIZED_OPS.get(domain, frozenset())
        if node.op_type in ops or (domain in _QUANTIZED_OPS and node.op_type.startswith("QLinear")):
            found.append((label(node), node.op_type if not domain else f"{domain}:{node.op_type}"))
    return found


def describe_quantized(found: list[tuple[str, str]]) -> str:
    """``21 ConvInteger, 22 DynamicQuantizeLinear (e.g. Conv_0_quant)``: the ops, most frequent first."""
    counts = collections.Counter(op for _, op in found)
    ops = ", ".join(f"{n} {op}" for op, n in counts.most_common())
    return f"{ops} (e.g. node {found[0][0]!r})"
