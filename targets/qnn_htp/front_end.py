"""``qnn-cpu-front-end``: a float front end on the CPU, the rest of the model on HTP.

Some models compute their features inside the graph over a range no integer grid holds:
basic-pitch's CQT power enters ``10 log10(|X|^2 + 1e-10)`` over 85 dB, and an N-bit linear
encoding spans ``10 log10(2^N)`` dB of power (24 at 8 bits, 48 at 16; docs/design.md,
"basic_pitch"). HTP has no float32 path (its float ops are fp16 on a device), so such a
front end is deployed where audio and image pipelines put their feature extraction: on the
application CPU, in float32, feeding the quantized network on the NPU.

The pass, placed in a recipe before ``quantize``, marks the front end: every node (of the
main graph) a ``Log`` is computed from, the ``Log`` included (option ``ops``: the op types
whose inputs need the float range). Marked nodes carry the metadata
``compressor.runs_on = cpu``, which the passes after it honour:

* ``quantize`` skips a marked layer ("runs on the CPU front end");
* ``qnn-quantize-tensors`` leaves marked nodes and the tensors only they read float, and
  encodes each tensor the front end hands to the network (the cut) as any other tensor;
* the target's ``lower`` splits the model at the cut: ``front_end.onnx`` (float, ONNX
  Runtime's CPU provider) and the quantized rest, compiled into the QNN context that runs
  wholly on HTP, CPU fallback still disabled. ``model.onnx`` stays the whole model (the
  simulation and the AIMET encodings), and the runner chains the two sessions.

Nothing is marked, and the run fails with exit 2, when the model has no such op: a recipe
that asks for a CPU front end on a model without one is a mistake to report, not to ignore.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from pathlib import Path

import onnx
import onnx.utils
import onnx_ir as ir
from compressor.passes._graph import label
from compressor.targets.base import RUNS_ON, on_cpu

from compressor.errors import UsageError
from compressor.pipeline import Pass, PassContext, PassResult, register_pass

__all__ = ["FRONT_END", "CpuFrontEnd", "CpuFrontEndOptions", "cut_values", "handed_over", "split_front_end"]

logger = logging.getLogger(__name__)

#: Model metadata (key ``RUNS_ON``) saying a CPU front end was marked.
FRONT_END = "cpu front end"


def handed_over(value: ir.Value, graph: ir.Graph) -> bool:
    """Whether ``value`` leaves the CPU front end: an unmarked node or the graph's outputs read it."""
    return value in graph.outputs or any(not on_cpu(user) for user, _ in value.uses())


def cut_values(graph: ir.Graph) -> list[ir.Value]:
    """The tensors the CPU front end hands over (:func:`handed_over`), outputs of marked nodes in graph order."""
    return [out for node in graph if on_cpu(node) for out in node.outputs if handed_over(out, graph)]


@dataclasses.dataclass(frozen=True)
class CpuFrontEndOptions:
    """Options of ``qnn-cpu-front-end``.

    Attributes:
        ops: Op types whose input needs float range; each such node and everything it is
            computed from run on the CPU.
    """

    ops: tuple[str, ...] = ("Log",)

    def __post_init__(self) -> None:
        if not self.ops or not all(isinstance(op, str) and op for op in self.ops):
            raise ValueError("ops must be a non-empty list of op types, e.g. [Log]")
        object.__setattr__(self, "ops", tuple(self.ops))


@register_pass
class CpuFrontEnd(Pass):
    """Mark the float front end that runs on the CPU (module docstring)."""

    name = "qnn-cpu-front-end"
    description = "run the float front end a Log is computed from on the CPU, the rest on QNN HTP"
    Options = CpuFrontEndOptions

    def check_input(self, model: ir.Model) -> None:
        """Mark the front end before the target's check, which then leaves it to the CPU (an
        op HTP lacks, STFT or DFT, may be in it); the model's mistakes are exit 2 here."""
        self._mark(model)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if "quantized" in ctx.properties or any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                                                for n in model.graph):
            raise UsageError(f"{self.name}: the model is quantized already, so the front end would not be float; "
                             "put this step before 'quantize' in the recipe")
        roots, marked, cut = self._mark(model)
        logger.info("%s: %d node(s) run on the CPU in float, handing %s to HTP", self.name, marked,
                    ", ".join(v.name for v in cut))
        return PassResult(model, True, {"cpu_nodes": marked, "cut": [v.name for v in cut],
                                        "roots": [label(n) for n in roots]})

    def _mark(self, model: ir.Model) -> tuple[list[ir.Node], int, list[ir.Value]]:
        """Mark every node the ``ops`` nodes are computed from, and them; the roots, how many, the cut."""
        opts: CpuFrontEndOptions = self.options
        roots = [node for node in model.graph if node.op_type in opts.ops]
        if not roots:
            present = sorted({node.op_type for node in model.graph})
            raise UsageError(f"{self.name}: the model has no {'/'.join(opts.ops)} node, so there is no front end to "
                             f"run on the CPU (its ops: {', '.join(present[:12])}{' ...' if len(present) > 12 else ''}); "
                             "drop the pass from the recipe, or name the op whose input needs float range in its "
                             "'ops' option")
        marked: dict[int, ir.Node] = {}
        todo = deque(roots)
        while todo:
            node = todo.popleft()
            if id(node) in marked:
                continue
            marked[id(node)] = node
            todo.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
        outputs = {id(v): v.name for v in model.graph.outputs}
        given = sorted(outputs[id(v)] for node in marked.values() for v in node.outputs if id(v) in outputs)
        if given:
            raise UsageError(f"{self.name}: the front end computes the model output(s) {', '.join(given)}, which "
                             "this split does not hand back from the CPU; a front end here only feeds the network")
        for node in marked.values():
            node.metadata_props[RUNS_ON] = "cpu"
        cut = cut_values(model.graph)
        if not cut:
            raise UsageError(f"{self.name}: nothing reads the output of {'/'.join(opts.ops)}, so the front end hands "
                             "nothing to HTP")
        model.metadata_props[RUNS_ON] = FRONT_END  # survives what node metadata may not (lower checks it)
        return roots, len(marked), cut


def split_front_end(model: ir.Model, whole: Path, outdir: Path) -> tuple[Path, Path]:
    """Write the CPU front end and the HTP rest of ``model`` (saved as ``whole``), split at :func:`cut_values`.

    Returns:
        ``(front_end.onnx, model_htp.onnx)`` in ``outdir``: the first maps the graph inputs
        it reads to the cut; the second reads the cut (and any graph input an HTP node
        reads) and gives the graph outputs.
    """
    cut = [v.name for v in cut_values(model.graph)]
    readers = {id(v): {on_cpu(user) for user, _ in v.uses()} for v in model.graph.inputs}
    front_inputs = [v.name for v in model.graph.inputs if True in readers[id(v)]]
    back_inputs = [*cut, *(v.name for v in model.graph.inputs if False in readers[id(v)])]
    proto = onnx.load(str(whole))
    extractor = onnx.utils.Extractor(proto)
    front = extractor.extract_model(front_inputs, cut)
    back = extractor.extract_model(back_inputs, [o.name for o in proto.graph.output])
    paths = outdir / "front_end.onnx", outdir / "model_htp.onnx"
    for part, path in zip((front, back), paths):
        part.ir_version = proto.ir_version
        onnx.save(part, str(path))
    return paths
