"""Runs a pipeline of passes: checks their needs, verifies, times, dumps, reports.

After every pass the model is verified (ONNX checker, then shape inference, strict when
the input model passed strict inference), so a pass that breaks the graph is named at
once instead of surfacing as a backend error much later.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from compressor.errors import CompressorError, PipelineError, RecipeError
from compressor.model_io import correct_output_shapes, default_opset, save_model, upgrade_opset, verify_model
from compressor.pipeline import Pass, PassContext, available_passes

__all__ = ["PassReport", "PipelineResult", "PassManager", "check_pipeline", "control_flow_bodies", "node_bodies",
           "outer_reads", "subgraph_bodies"]

logger = logging.getLogger(__name__)

#: ``PassManager.run``'s default ``verify_level``: measure the input model's bar.
_MEASURE = object()


@dataclasses.dataclass
class PassReport:
    """One row of the pipeline report."""

    name: str
    options: dict[str, Any]
    modified: bool
    stats: dict[str, Any]
    seconds: float
    #: Drop of the accuracy metric measured right after this pass (lossy passes only;
    #: ``None`` when not measured).
    accuracy_drop: float | None = None
    #: The pass's :attr:`~compressor.pipeline.PassResult.quantization` (not in the JSON).
    quantization: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(dataclasses.replace(self, quantization=None))
        del out["quantization"]
        return out


@dataclasses.dataclass
class PipelineResult:
    """The model after every pass, and a report per pass."""

    model: ir.Model
    reports: list[PassReport]
    #: The verification bar the run held the passes to (strict ``True``, lax ``False``,
    #: ``None``: not verified); a manager continuing on :attr:`model` takes it over.
    verify_level: bool | None = None

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.reports)


def control_flow_bodies(graph: ir.Graph) -> Iterator[tuple[str, ir.Node, str, ir.Graph]]:
    """Every ``If``/``Loop``/``Scan`` body, nested ones included, outer first.

    Yields:
        ``(label, node, attribute name, body)``, the label as ``"<op> '<node>'.<attribute>"``.
    """
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for name, body in node_bodies(node):
            yield f"{node.op_type} {node.name or '?'!r}.{name}", node, name, body


def node_bodies(node: ir.Node) -> Iterator[tuple[str, ir.Graph]]:
    """``(attribute name, body)`` of each graph attribute of ``node`` (not nested ones)."""
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for body in graphs:
            yield attr.name, body


def outer_reads(node: ir.Node) -> list[ir.Value]:
    """The values ``node`` reads from the graph it is in or further out: its inputs, and what
    its bodies (nested ones included) read from outside them."""
    graphs = [g for _, body in node_bodies(node) for g in (body, *body.subgraphs())]
    inner = {id(g) for g in graphs}
    return [v for v in node.inputs if v is not None] + [
        v for g in graphs for n in g for v in n.inputs if v is not None and id(v.graph) not in inner]


def subgraph_bodies(graph: ir.Graph) -> dict[str, int]:
    """Every ``If``/``Loop``/``Scan`` body, as ``"<op> '<node>'.<attribute>"``, with its node count."""
    return {label: sum(1 for _ in ir.traversal.RecursiveGraphIterator(body))
            for label, _, _, body in control_flow_bodies(graph)}


def check_pipeline(passes: Sequence[Pass], initial: set[str], where: str = "recipe") -> None:
    """Refuse a pipeline in which a pass needs a property no earlier pass provides.

    Raises:
        RecipeError: names the pass, the missing property and the passes providing it.
    """
    have = set(initial)
    for index, p in enumerate(passes):
        missing = sorted(p.requires - have)
        if missing:
            providers = {
                prop: sorted(n for n, cls in available_passes().items() if prop in cls.provides)
                for prop in missing
            }
            hint = "; ".join(
                f"{prop!r} is provided by {', '.join(names) if names else 'no pass'}" for prop, names in providers.items()
            )
            raise RecipeError(f"{where}: passes[{index}] {p.name!r} requires {', '.join(map(repr, missing))}, "
                              f"which no earlier pass provides ({hint}); add it before {p.name!r}")
        have |= p.provides


class PassManager:
    """Runs passes in order on one model.

    Args:
        passes: The pipeline.
        verify: Verify the model after each pass.
        dump_dir: Write ``NN-<pass>.onnx`` after each pass into this folder.
        on_pass: Called with ``(index, pass)`` before each pass (progress display).
        after_pass: Called with ``(index, pass, model, report)`` after each pass (e.g. to
            measure the accuracy after a lossy pass into ``report.accuracy_drop``).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: bool = True,
        dump_dir: str | Path | None = None,
        on_pass: Callable[[int, Pass], None] | None = None,
        after_pass: Callable[[int, Pass, ir.Model, PassReport], None] | None = None,
    ):
        self.passes = list(passes)
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.on_pass = on_pass
        self.after_pass = after_pass

    def run(self, model: ir.Model, ctx: PassContext, *, already_run: Sequence[str] = (),
            verify_level: bool | None | object = _MEASURE) -> PipelineResult:
        """Run every pass on ``model``.

        ``already_run`` names passes an earlier manager ran on this model (for messages);
        ``verify_level`` is that manager's :attr:`PipelineResult.verify_level` (the model
        is then not verified again before the first pass: it met that bar already).

        Raises:
            RecipeError: a pass's needs are unmet (before anything runs).
            CompressorError: a pass refuses the model (:meth:`Pass.check_input`, before anything runs).
            PipelineError: a pass failed or broke the model; names it and those before it.
        """
        check_pipeline(self.passes, ctx.properties)
        for p in self.passes:
            p.check_input(model)
        if not self.verify:
            level = None
        elif verify_level is _MEASURE:
            level = self._verify_level(model)
        else:
            level = verify_level
        reports: list[PassReport] = []
        done: list[str] = list(already_run)
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            save_model(model, self.dump_dir / "00-input.onnx")
        for index, p in enumerate(self.passes):
            if self.on_pass:
                self.on_pass(index, p)
            start = time.perf_counter()
            try:
                if p.min_opset and default_opset(model) < p.min_opset:
                    model = upgrade_opset(model, p.min_opset)
                result = p.run(model, ctx)
                model = result.model
                corrected = self._verify(model, level) if level is not None and result.modified else {}
            except PipelineError:
                raise
            except (CompressorError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError, Exception) as err:
                logger.debug("pass %s failed", p.name, exc_info=True)
                raise PipelineError(p.name, done, err) from err
            seconds = time.perf_counter() - start
            ctx.properties |= p.provides
            stats = dict(result.stats)
            if corrected:
                stats["output_shapes_corrected"] = corrected
            bodies = {} if p.walks_subgraphs else subgraph_bodies(model.graph)
            if bodies:
                # Never a half-rewritten body: a pass that works on the main graph says which
                # bodies it left as they were (they stay float for a quantizing pass).
                stats["subgraphs_left_as_is"] = {name: f"{count} nodes; {p.name} works on the main graph only"
                                                 for name, count in bodies.items()}
                logger.warning("%s left %d control-flow bod%s as %s (%s): it works on the main graph only",
                               p.name, len(bodies), "y" if len(bodies) == 1 else "ies",
                               "float" if p.lossy else "they were", ", ".join(list(bodies)[:3])
                               + (f" +{len(bodies) - 3} more" if len(bodies) > 3 else ""))
            reports.append(PassReport(p.name, p.options_dict(), result.modified, stats, seconds,
                                       quantization=result.quantization))
            done.append(p.name)
            logger.info("pass %-24s %s %s (%.2fs)", p.name, "modified" if result.modified else "unchanged",
                        _brief(result.stats), seconds)
            logger.debug("pass %s stats: %s", p.name, result.stats)
            if self.dump_dir:
                save_model(model, self.dump_dir / f"{index + 1:02d}-{p.name}.onnx")
            if self.after_pass:
                self.after_pass(index, p, model, reports[-1])
        return PipelineResult(model, reports, level)

    @staticmethod
    def _verify(model: ir.Model, strict: bool) -> dict[str, str]:
        """Verify ``model`` after a pass that changed it; correct wrongly declared output shapes.

        Another exporter may declare an output shape the graph does not compute (ddddocr's
        ``common.onnx`` declares ``[1, seqlen]`` and returns ``[T, 1, 8210]``); inference
        cannot see it until a pass makes the shape computation constant, and then strict
        inference refuses the declaration. Such declarations are replaced by the inferred
        shapes (:func:`~compressor.model_io.correct_output_shapes`) and the model verified
        again.

        Returns:
            Output name -> ``"declared [..], inferred [..]"`` for each corrected output.

        Raises:
            onnx.checker.ValidationError, onnx.shape_inference.InferenceError: the model
                is broken in another way.
        """
        try:
            verify_model(model, strict_shapes=strict)
            return {}
        except onnx.shape_inference.InferenceError:
            corrected = correct_output_shapes(model)
            if not corrected:
                raise
        verify_model(model, strict_shapes=strict)
        for name, change in corrected.items():
            logger.warning("output %r: the model declared a shape the graph does not compute (%s); the inferred "
                           "shape replaces it", name, change)
        return corrected

    @staticmethod
    def _verify_level(model: ir.Model) -> bool | None:
        """Hold every pass to the bar the input meets: strict, lax, or (rarely) none."""
        for strict in (True, False):
            try:
                verify_model(model, strict_shapes=strict)
                return strict
            except Exception as err:
                logger.debug("input model fails %s verification: %s", "strict" if strict else "lax", err)
        logger.warning("the input model fails ONNX shape inference; passes are not verified")
        return None


def _brief(stats: dict[str, Any]) -> str:
    """The stats as one short line: scalars as they are, a per-layer mapping or list as its size.

    The full stats go to the debug log and the manifest; on MiniLM the per-layer entries
    alone run to several thousand characters per pass.
    """
    parts = []
    for key, value in stats.items():
        if isinstance(value, (dict, list, tuple, set)):
            parts.append(f"{key}: [{len(value)}]")
        elif isinstance(value, float):
            parts.append(f"{key}: {value:.4g}")
        else:
            parts.append(f"{key}: {value}")
    return "{" + ", ".join(parts) + "}"
