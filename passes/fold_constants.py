"""``fold-constants``: evaluate what does not depend on the inputs, once, ahead of time.

A node whose inputs are all constants computes the same tensor on every run, so it can be
replaced by that tensor stored as an initializer. The steps, in order:

1. Initializers listed as graph inputs. Before IR version 4 the ONNX spec *required*
   every initializer to be listed among the graph inputs, and old exporters kept doing
   it (``keep_initializers_as_inputs``), so such inputs are weights in practice; from
   IR 4 on the spec reads them as overridable defaults. ``initializer_inputs: remove``
   (the default) treats them as the weights they are and drops them from the inputs;
   ``keep`` leaves them overridable (and unfolded); ``auto`` removes them only when the
   file's ``ir_version < 4`` (serialising never changes the model's own version).
   Real inputs (those without an initializer) are never touched.
2. Constant folding, by ``onnxscript.optimizer.fold_constants`` (ONNX reference
   evaluator, plus its partial evaluators for Shape, Reshape, Identity...). Its size
   limits are raised to ``max_folded_mb`` and ``ConstantOfShape`` -- which it keeps by
   default to keep files small -- is folded too, since exporters use it to build weights
   (``light_resnet50.onnx`` builds all 239 weights so). Quantize/DequantizeLinear stay:
   they carry quantization information. The folder's rewrites of ConcatFromSequence and
   SplitToSequence emit opset-13 (Split ``num_outputs``: 18) nodes, so they are withheld
   from older models.
3. ``Constant`` nodes still left become initializers
   (``onnx_ir`` ``LiftConstantsToInitializersPass``).
4. Dead nodes and initializers go (``RemoveUnusedNodesPass``), then the nodes are
   sorted topologically (``TopologicalSortPass``).

Folding is exact up to the evaluator's float arithmetic (IEEE, same as a runtime's
reference kernels). The pass checks its own contract: the graph's input names (less the
initializers of step 1) and output names are the same after it as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Literal

import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    RemoveInitializersFromInputsPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)
from onnxscript.optimizer import _constant_folding, fold_constants

from compressor.errors import CompressorError
from compressor.model_io import default_opset
from compressor.pipeline import Pass, PassContext, PassResult, register_pass

__all__ = ["FoldConstants", "FoldConstantsOptions"]

logger = logging.getLogger(__name__)

_MIB = 1 << 20
# Kept as they are whatever their inputs: they carry quantization information.
_NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# onnxscript's partial evaluators rewrite these sequence ops into Unsqueeze/Split/Squeeze
# nodes in their opset-13 form (axes/split as inputs; Split's num_outputs: opset 18)
# whatever the model's opset, which makes an invalid graph of an older model (onnxscript
# 0.7: ``ConcatFromSequence(new_axis=1)`` at opset 12 becomes ``Unsqueeze(x, axes)``).
# Below these opsets the rewrites are not used; the sequence ops stay as they are.
_REWRITE_MIN_OPSET = {"ConcatFromSequence": 13, "SplitToSequence": 18}


@dataclasses.dataclass(frozen=True)
class FoldConstantsOptions:
    """Options of ``fold-constants``.

    Attributes:
        max_folded_mb: Largest tensor, in MiB, that folding may read or create. A node
            with a larger constant input, or whose result would be larger (counted as
            float32 elements), is left in the graph.
        initializer_inputs: What to do with initializers that are also graph inputs
            (case 1 of the module docstring): ``remove`` drops them from the inputs
            (they become constants), ``keep`` never does, ``auto`` only for IR < 4.
        shape_inference: Run ONNX shape inference node by node while folding, which
            lets shape computations (Shape -> Gather -> Concat) fold.
    """

    max_folded_mb: float = 256.0
    initializer_inputs: Literal["remove", "keep", "auto"] = "remove"
    shape_inference: bool = True

    def __post_init__(self) -> None:
        if not self.max_folded_mb > 0:
            raise ValueError(f"max_folded_mb must be positive, got {self.max_folded_mb}")


def _tensor_bytes(tensor: ir.TensorProtocol) -> int:
    return tensor.size * max(1, tensor.dtype.itemsize)


class _ShouldFold:
    """Size-aware folding rule handed to the folder (step 2)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def __call__(self, node: ir.Node) -> bool | None:
        if node.domain not in ("", "ai.onnx"):
            return None  # the folder's default rules
        if node.op_type in _NEVER_FOLD:
            return False
        for value in node.inputs:
            if value is not None and value.const_value is not None:
                if _tensor_bytes(value.const_value) > self.max_bytes:
                    logger.debug("`%s`: an input is over the folding size limit, not folded", node.name)
                    return False
        if node.op_type == "ConstantOfShape":
            return self._constant_of_shape_fits(node)
        return None  # the folder's default rules, with our raised limits

    def _constant_of_shape_fits(self, node: ir.Node) -> bool:
        shape = node.inputs[0].const_value.numpy() if node.inputs and node.inputs[0] is not None else None
        if shape is None:
            return False
        attr = node.attributes.get("value")
        itemsize = attr.as_tensor().dtype.itemsize if attr is not None and not attr.is_ref() else 4
        nbytes = math.prod(int(d) for d in shape.reshape(-1)) * max(1, itemsize)
        if nbytes > self.max_bytes:
            logger.debug("`%s`: ConstantOfShape would make %.1f MiB, over the limit; not folded",
                         node.name, nbytes / _MIB)
            return False
        return True


@contextlib.contextmanager
def _rewrites_valid_at(opset: int) -> Iterator[None]:
    """Withhold the folder's rewrites that emit nodes newer than ``opset`` (see above)."""
    table = getattr(getattr(_constant_folding, "registry", None), "op_evaluators", None)
    withheld = {}
    if isinstance(table, dict):
        for op_type, min_opset in _REWRITE_MIN_OPSET.items():
            if opset < min_opset and ("", op_type) in table:
                withheld[("", op_type)] = table.pop(("", op_type))
    try:
        yield
    finally:
        if withheld:
            table.update(withheld)


def _io_names(graph: ir.Graph) -> tuple[list[str | None], list[str | None]]:
    real_inputs = [v.name for v in graph.inputs if not v.is_initializer()]
    return real_inputs, [v.name for v in graph.outputs]


@register_pass
class FoldConstants(Pass):
    """Fold constant subgraphs into initializers; lift Constant nodes; drop dead code."""

    name = "fold-constants"
    description = "Fold constant subgraphs (ConstantOfShape included) into initializers and remove dead nodes"
    Options = FoldConstantsOptions
    provides = frozenset({"constants-folded"})
    walks_subgraphs = True  # onnx_ir's constant folder and dead-code removal recurse into bodies

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Fold ``model`` in place.

        Raises:
            CompressorError: the graph's input or output names changed (a bug in a
                folding step; the message names both lists).
        """
        opts: FoldConstantsOptions = self.options
        graph = model.graph
        nodes_before = sum(1 for _ in graph.all_nodes())
        inputs_before, outputs_before = _io_names(graph)
        modified = False

        # Case 1: initializers listed among the graph inputs.
        dropped_inputs = 0
        policy = opts.initializer_inputs
        if policy == "auto":
            policy = "remove" if (model.ir_version or 0) < 4 else "keep"
        overridable = sum(1 for v in graph.inputs if v.is_initializer())
        if policy == "remove" and overridable:
            dropped_inputs = overridable
            modified |= RemoveInitializersFromInputsPass()(model).modified
        elif overridable:
            logger.info("%d initializers are also graph inputs (overridable); they are not folded "
                        "(set initializer_inputs: remove to treat them as constants)", overridable)

        # Case 2: constant folding with raised size limits.
        max_bytes = int(opts.max_folded_mb * _MIB)
        with _rewrites_valid_at(default_opset(model)):
            result = fold_constants(
                model,
                onnx_shape_inference=opts.shape_inference,
                input_size_limit=max_bytes,
                output_size_limit=max_bytes // 4,
                should_fold=_ShouldFold(max_bytes),
            )
        modified |= result.modified

        # Cases 3 and 4: lift Constant nodes, remove dead code, sort.
        for step in (
            LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            RemoveUnusedNodesPass(),
            TopologicalSortPass(),
        ):
            modified |= step(model).modified

        inputs_after, outputs_after = _io_names(graph)
        if inputs_after != inputs_before or outputs_after != outputs_before:
            raise CompressorError(
                f"fold-constants changed the graph signature: inputs {inputs_before} -> {inputs_after}, "
                f"outputs {outputs_before} -> {outputs_after}; this is a bug, please report it with the model"
            )
        nodes_after = sum(1 for _ in graph.all_nodes())
        stats = {
            "nodes_before": nodes_before,
            "nodes_after": nodes_after,
            "initializers": len(graph.initializers),
            "initializer_inputs_removed": dropped_inputs,
        }
        logger.debug("fold-constants: %s", stats)
        return PassResult(model, modified or nodes_after != nodes_before, stats)
