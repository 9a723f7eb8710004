"""Statistics stage by stage, on a model that changes between stages (sequential pruning).

:mod:`compressor.quant.taps` runs the whole model once for every point it is asked for.
A sequential algorithm (SparseGPT's sequential variant) asks for the inputs of a *stage*
of layers, changes those layers, then asks for the inputs of the next stage, which must
be computed by the changed layers. Re-running the model from its inputs for each stage
costs one forward pass per stage (24 on a 6-block transformer). :class:`StagedStatistics`
runs every node once instead:

1. The nodes a request needs are the producers of its tensors, and theirs, back to the
   graph inputs, initializers and the tensors already computed (a node's control-flow
   bodies count their outer-scope reads as inputs). Only those run, in graph order, as
   one segment: a model made of those nodes alone (their initializers, the segment's
   inputs and outputs), in one ONNX Runtime session, over every calibration batch.
2. Of everything computed so far, the tensors a node not run yet reads are *held*, per
   batch, for the next segments; the rest is dropped. The model may change between
   requests wherever nothing has run yet (weights, biases, a node added after a layer's
   output); a node that already ran is never run again, so a change to it would not be
   seen (the caller's order of requests must make such changes unnecessary).
3. Each requested tensor is reduced batch by batch as :func:`~compressor.quant.taps.run_points`
   reduces it (padding tokens excluded); a tensor already held or fed is reduced from
   there, without running anything.

Cost: every node of the model runs once over the calibration data across all requests
(plus one session per request on a part of the model); memory: the held tensors of every
calibration batch (on a transformer, the residual stream and the attention mask), only
those the later requests need when the caller names them (``collect(..., later=...)``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from compressor.data import MASK_INPUT
from compressor.model_io import ir_version_for
from compressor.pass_manager import outer_reads
from compressor.quant.points import (
    Collected,
    StatPoint,
    batch_size,
    main_values,
    require_results,
    start_collecting,
)
from compressor.quant.taps import ort_failure, session_options

if TYPE_CHECKING:
    from compressor.data import Dataset

__all__ = ["StagedStatistics"]

logger = logging.getLogger(__name__)


class StagedStatistics:
    """Statistics of a model gathered request by request, each node run once (module docstring).

    Args:
        model: The model; the caller may change it between :meth:`collect` calls where
            nothing has run yet (case 2).
        data: The calibration samples.
    """

    def __init__(self, model: ir.Model, data: Dataset):
        self.model = model
        self.data = data
        self._done: set[int] = set()
        self._held: list[dict[str, np.ndarray]] = []
        self._segments = 0
        self._seconds = 0.0

    def _needed(self, tensors: Collection[ir.Value]) -> list[ir.Node]:
        """Nodes not run yet that the ``tensors`` need, in graph order (case 1)."""
        graph = self.model.graph
        need: set[int] = set()
        stack = list(tensors)
        while stack:
            producer = stack.pop().producer()
            if producer is None or id(producer) in self._done or id(producer) in need:
                continue
            need.add(id(producer))
            stack.extend(outer_reads(producer))
        return [node for node in graph if id(node) in need]

    def _still_read(self, later: Collection[ir.Value] | None) -> set[str]:
        """Names of computed values that a node not run yet reads (case 2): with ``later``,
        only those the tensors of the later requests need (and those tensors, if computed)."""
        graph = self.model.graph
        pending = [node for node in graph if id(node) not in self._done] if later is None else self._needed(later)
        held = {v.name for node in pending for v in outer_reads(node)
                if v.producer() is not None and id(v.producer()) in self._done}
        if later is not None:
            held.update(v.name for v in later if v.producer() is not None and id(v.producer()) in self._done)
        return held

    def _segment(self, nodes: list[ir.Node], outputs: list[ir.Value], known: dict[str, np.ndarray],
                 ) -> tuple[ort.InferenceSession, list[str]]:
        """One session running ``nodes`` alone; returns it and the names it reads (case 1).

        ``known`` (the first batch's fed and held tensors) types an input the graph left untyped.
        """
        made = {id(v) for node in nodes for v in node.outputs}
        reads: dict[str, ir.Value] = {}
        for node in nodes:
            for v in outer_reads(node):
                if id(v) not in made:
                    reads.setdefault(v.name, v)
        proto = onnx.GraphProto(name="segment")
        proto.node.extend(ir.serde.serialize_node(node) for node in nodes)
        inputs = []
        for name, v in reads.items():
            if v.const_value is not None and v.producer() is None:
                tensor = ir.serde.serialize_tensor(v.const_value)
                tensor.name = name
                proto.initializer.append(tensor)
            else:
                inputs.append(name)
                proto.input.append(ir.serde.serialize_value(v) if v.type is not None or name not in known else
                                   onnx.helper.make_tensor_value_info(
                                       name, onnx.helper.np_dtype_to_tensor_dtype(known[name].dtype), None))
        proto.output.extend(ir.serde.serialize_value(v) if v.type is not None else onnx.ValueInfoProto(name=v.name)
                            for v in outputs)
        model = onnx.helper.make_model(proto, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                             for d, v in self.model.opset_imports.items()])
        model.ir_version = ir_version_for(self.model)
        model.functions.extend(ir.serde.serialize_function(f) for f in self.model.functions.values())
        session = ort.InferenceSession(model.SerializeToString(), session_options(),
                                       providers=["CPUExecutionProvider"])
        return session, inputs

    def collect(self, points: Collection[StatPoint], later: Collection[ir.Value] | None = None,
                ) -> dict[StatPoint, Collected]:
        """Run what ``points`` need that has not run yet, and reduce them (cases 1-3).

        ``later``: the tensors the requests after this one will ask for (as the model is
        now), so that only what they need is held between requests; ``None``: everything a
        node not run yet reads is held (an output head's input too, for nothing).

        Raises:
            CompressorError: a point's tensor is not in the main graph, or the data gave no batch.
            DataError: the model fails in ONNX Runtime on the data (exit 2).
        """
        start = time.perf_counter()
        points = list(dict.fromkeys(points))
        graph = self.model.graph
        values = main_values(graph)
        collectors, _, streamed = start_collecting(points, values, graph, 2048)
        nodes = self._needed([values[p.tensor] for p in streamed])
        for node in nodes:
            self._done.add(id(node))
        keep = self._still_read(later)
        made = {v.name for node in nodes for v in node.outputs}
        fetch = list(dict.fromkeys([p.tensor for p in streamed if p.tensor in made]
                                   + sorted(n for n in keep if n in made)))
        first = {**(self._held[0] if self._held else {}), **next(self.data.batches(), {})}
        session, reads = self._segment(nodes, [values[n] for n in fetch], first) if fetch else (None, [])
        held: list[dict[str, np.ndarray]] = []
        for i, feed in enumerate(self.data.batches()):
            known = {**(self._held[i] if i < len(self._held) else {}), **feed}
            batch = batch_size(self.data, feed)
            if session is not None:
                try:
                    known.update(zip(fetch, session.run(fetch, {n: known[n] for n in reads})))
                except Exception as err:  # ONNX Runtime's own error types: the model fails on this data
                    raise ort_failure(err, self.data) from None
            mask = feed.get(MASK_INPUT)
            collectors.feed(known, batch, None if mask is None else np.asarray(mask), streamed)
            held.append({n: known[n] for n in keep if n in known and n not in feed})
        self._held = held
        require_results(collectors)
        seconds = time.perf_counter() - start
        self._segments += 1
        self._seconds += seconds
        logger.debug("staged statistics: %d point(s), %d node(s) run, %d tensor(s) held (%.1f MB), %.2fs",
                     len(points), len(nodes), len(keep), sum(a.nbytes for h in held for a in h.values()) / 2**20,
                     seconds)
        return collectors.results

    @property
    def summary(self) -> str:
        """Requests answered, nodes run and seconds, for a log line."""
        return f"{self._segments} stages, {len(self._done)} nodes run once, {self._seconds:.1f}s"
