"""What every capture route shares: the capture record, source formats, and the export helpers
(``torch.onnx.export`` with the exporter's optimizer, weight naming, quiet torch logs).

Split from :mod:`compressor.capture` so the routes (:mod:`.hf`, :mod:`.pytorch`, :mod:`.torch_load`) import
these without importing the dispatcher that imports them.
"""


from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir

from compressor.errors import CaptureError

__all__ = ["Captured", "SOURCE_FORMATS", "SUPPORTED_FORMATS", "name_folded_weights"]

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("onnx", "pt2", "torchscript", "pickle", "state_dict", "hf")
SUPPORTED_FORMATS = ("an .onnx file, a .pt2 file (torch.export.save), a TorchScript .pt/.pth (torch.jit.save), "
                     "a torch.save .pt/.pth (a module, or a state_dict with --model-class), "
                     "or a Hugging Face model directory (config.json + weights)")
TORCHSCRIPT_OPSET = 20  # the highest opset the TorchScript-based exporter writes; also the dynamo default
HF_DEFAULT_SHAPE = (2, 16)  # batch x sequence of the example text inputs
HF_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_DYNAMIC_EXAMPLE = 2  # example size of a `?` axis (torch.export specialises 0 and 1)
_SAVE_PT2 = 'save a .pt2 with torch.export.save(torch.export.export(model, example_args), "model.pt2")'
_WHAT_TO_SAVE = f"check the file is complete, or {_SAVE_PT2}, or a TorchScript file with torch.jit.save"
_OPTIMIZED = ("optimised by onnxscript.optimizer.optimize_ir as torch.onnx.export does: constants folded, "
              "BatchNormalization fused into the preceding Conv/Gemm")

Overrides = dict[str, tuple[tuple[Any, ...], Any]]


@dataclasses.dataclass
class Captured:
    """A captured model.

    Attributes:
        model: The ONNX graph.
        source_format: One of :data:`SOURCE_FORMATS`.
        notes: What capture decided on the user's behalf, one sentence each.
    """

    model: ir.Model
    source_format: str
    notes: list[str] = dataclasses.field(default_factory=list)
    opset_upgrade: tuple[int, int] | None = None

    def describe(self) -> dict[str, Any]:
        """What the manifest's ``model`` section records of the capture: notes, opset upgrade."""
        out: dict[str, Any] = {"notes": list(self.notes)}
        if self.opset_upgrade is not None:
            out["opset_upgraded"] = {"from": self.opset_upgrade[0], "to": self.opset_upgrade[1]}
        return out


def _export(path: Path, program: Any, *, kwargs: dict | None = None, dynamic_shapes: Any = None,
            output_names: list[str] | None = None) -> ir.Model:
    """``torch.onnx.export(dynamo=True)`` of an ExportedProgram or nn.Module, optimised."""
    import torch

    with _quiet():
        try:
            onnx_program = torch.onnx.export(program, (), kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                                             output_names=output_names, verbose=False, report=False, optimize=True)
        except Exception as err:
            logger.debug("torch.onnx.export failed", exc_info=True)
            raise CaptureError(f"{path}: torch.onnx.export failed ({_summary(err)}); the model uses something the "
                               "torch.export-based ONNX exporter cannot translate") from None
    name_folded_weights(onnx_program.model)
    return onnx_program.model


_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def name_folded_weights(model: ir.Model) -> int:
    """Give folded weights the name of the parameter they were folded from.

    The exporter's optimizer folds ``Transpose(linear.weight)`` (what ``nn.Linear`` becomes
    as a MatMul) into a new initializer named ``val_<n>``; a recipe's ``scope`` matches
    weight names, so ``re:.*classifier.*`` would find nothing. The optimizer records the
    source in the initializer's metadata; a folded tensor with exactly one source whose
    name is free gets that name. Returns how many were renamed.
    """
    graph = model.graph
    taken = {v.name for v in graph.inputs} | set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    renamed = 0
    for value in list(graph.initializers.values()):
        try:
            sources = ast.literal_eval(value.metadata_props.get(_FOLDED_FROM, ""))
        except (ValueError, SyntaxError):
            continue
        if not (isinstance(sources, list) and len(sources) == 1 and isinstance(sources[0], str)):
            continue
        source = sources[0]
        if source in taken or source.startswith("val_") or value.shape is None or len(value.shape) < 2:
            continue  # a shape/index constant, or the parameter is still there under its own name
        taken.discard(value.name)
        value.name = source
        taken.add(source)
        renamed += 1
    return renamed


def _optimize(model: ir.Model) -> None:
    """The optimizer torch.onnx.export runs, for graphs that did not come through it."""
    try:
        import onnxscript.optimizer
        onnxscript.optimizer.optimize_ir(model)
    except Exception:  # optional: an unoptimised graph is still correct
        logger.debug("onnxscript optimizer failed; keeping the graph as exported", exc_info=True)


def _name_outputs(model: ir.Model) -> None:
    """Give numbered outputs (``9``, ``27``: TorchScript exporter) the names ``output``/``output_<i>``."""
    outputs, taken = model.graph.outputs, {v.name for n in model.graph for v in n.outputs}
    for i, value in enumerate(outputs):
        name = "output" if len(outputs) == 1 else f"output_{i}"
        if value.name and value.name.isdigit() and name not in taken:
            value.name = name


def _summary(err: BaseException) -> str:
    """One line from an exception: torch's long reports give their 'Exception summary'."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    text = text.split("WeightsUnpickler error:", 1)[-1]  # torch.load(weights_only=True): the reason comes last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1:]
    first = lines[0] if lines else "no message"
    first = re.sub(r"^<class '([\w.]+)'>: ", r"\1: ", first)
    if len(first) > 240:  # keep the first sentence of a long line
        first = first[: first.find(". ", 20) + 1] if ". " in first[20:] else first
        first = first if len(first) <= 240 else first[:237] + "..."
    return f"{type(err).__name__}: {first}"


class _TorchLogs(logging.Handler):
    """Takes the place of torch's own stderr handlers: records go to this module's debug log."""

    last = ""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        self.last = text.strip().splitlines()[-1] if text.strip() else self.last
        logger.debug("%s: %s", record.name, text)


@contextlib.contextmanager
def _quiet() -> Iterator[_TorchLogs]:
    """Keep torch's exporter chatter (prints, warnings, log lines) off stdout/stderr.

    All of it goes to this module's debug log; the handler yielded keeps torch's last log
    line, which often holds the reason behind a generic error.
    """
    forward = _TorchLogs()
    swapped = [(lg, lg.handlers[:]) for name, lg in list(logging.root.manager.loggerDict.items())
               if isinstance(lg, logging.Logger) and (name == "torch" or name.startswith("torch.")) and lg.handlers]
    for lg, _ in swapped:
        lg.handlers[:] = [forward]
    stdout = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            try:
                yield forward
            finally:
                for warning in caught:
                    logger.debug("%s: %s", warning.category.__name__, str(warning.message).strip().split("\n", 1)[0])
    finally:
        for lg, handlers in swapped:
            lg.handlers[:] = handlers
        if stdout.getvalue().strip():
            logger.debug("exporter output:\n%s", stdout.getvalue().rstrip())
