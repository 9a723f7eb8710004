"""Capture: read a model file and turn it into one ONNX graph held as ``onnx_ir.Model``.

Formats, recognised by what the file holds (the suffix only picks ONNX or torch):

* ``.onnx``: read (:func:`compressor.model_io.load_onnx`), then normalised as
  :mod:`compressor.onnx_import` describes: ``-1``/empty/``?`` dims become dynamic, an opset
  older than the backends' kernels is upgraded (and noted).
* ``.pt2``/``.pt``/``.pth``: :mod:`compressor.capture_torch` (torch.export programs,
  TorchScript, pickled modules with ``trust_pickle``, state_dicts with ``model_class``), with
  the working directory and the model's folder on the import path and ``imports`` imported
  (:func:`compressor.torch_load.user_code`). Input shapes the file does not record come
  from ``--input``, else from the data (``example_inputs``).
* A Hugging Face model directory (``config.json`` + weights): ``AutoModel`` with eager
  attention, inputs ``input_ids``/``attention_mask``(/``token_type_ids``) int64 with
  dynamic ``batch`` and ``sequence`` axes, one output ``last_hidden_state`` (the pooler
  output of encoder models is dropped: sentence embeddings pool ``last_hidden_state``).

Torch exports go through the exporter's optimizer (``onnxscript.optimizer.optimize_ir``):
constant folding, BatchNormalization fused into the Conv/Gemm before it, no-op removal.

An ``--input`` axis written ``?`` stays dynamic; the example input uses size 2 there
(torch.export specialises sizes 0 and 1). Every failure is a one-line
:class:`~compressor.errors.CaptureError` that says what was wrong and what to do.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor import model_io
from compressor.errors import CaptureError, UsageError
from compressor.inputs import apply_input_overrides
from compressor.onnx_import import normalize_import

__all__ = ["Captured", "capture", "SOURCE_FORMATS", "SUPPORTED_FORMATS"]

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


def capture(path: str | Path, *, trust_pickle: bool = False, input_overrides: Overrides | None = None,
            example_inputs: Mapping[str, np.ndarray] | None = None, imports: Sequence[str] = (),
            model_class: str | None = None, model_kwargs: Mapping[str, Any] | None = None) -> Captured:
    """Read the model at ``path`` into ONNX.

    Args:
        path: A model file or a Hugging Face model directory.
        trust_pickle: Allow unpickling a full ``nn.Module`` (can run arbitrary code).
        input_overrides: From :func:`compressor.inputs.parse_input_overrides`: fixes input
            shapes, and gives the example inputs TorchScript and pickles need.
        example_inputs: Sample arrays keyed by input name, first axis = samples (the first
            rows of the calibration or eval data): the shapes and dtypes of the inputs a
            TorchScript file or a torch module records none for and ``--input`` does not name.
        imports: Modules to import first (``--import``): they define or register the
            classes a pickle names.
        model_class: ``MODULE:NAME``, the class (or a function returning the module) a
            state_dict file is loaded into.
        model_kwargs: Keyword arguments of ``model_class``.

    Raises:
        CaptureError: the file cannot be read or exported.
        UsageError: ``model_kwargs`` without ``model_class``, or ``model_class`` for a
            file that holds its own graph.
        DataError: an ``--input`` contradicts the captured model's inputs.
    """
    from compressor.torch_load import user_code  # needs this module's helpers

    path = Path(path)
    overrides = dict(input_overrides or {})
    if model_kwargs is not None and not model_class:
        raise UsageError("--model-kwargs needs --model-class (the class or function they are passed to)")
    if not path.exists():
        raise CaptureError(f"{path}: no such file")
    if model_class and (path.is_dir() or path.suffix.lower() == ".onnx"):
        what = "a Hugging Face model directory" if path.is_dir() else "an ONNX model"
        raise UsageError(f"--model-class applies to a state_dict file; {path.name} is {what}, which holds its own "
                         "graph: leave --model-class out")
    if path.is_file() and path.stat().st_size == 0:
        raise CaptureError(f"{path}: the file is empty (0 bytes); check it was written completely")
    with user_code(path, imports) as imported:
        if path.is_dir():
            from compressor.capture_hf import capture_hf  # needs this module's export helpers

            captured = capture_hf(path, overrides)
        elif path.suffix.lower() == ".onnx":
            model, report = normalize_import(model_io.load_onnx(path))
            upgrade = (report.opset_from, report.opset_to) if report.opset_from is not None else None
            captured = Captured(model, "onnx", report.notes, upgrade)
        elif path.suffix.lower() in (".pt2", ".pt", ".pth"):
            from compressor.capture_torch import capture_torch_file  # needs this module's export helpers

            captured = capture_torch_file(path, overrides, trust_pickle=trust_pickle, example_inputs=example_inputs,
                                          imported=imported, model_class=model_class, model_kwargs=model_kwargs)
        else:
            raise CaptureError(f"{path}: unknown model format "
                               f"{repr(path.suffix) if path.suffix else '(no extension)'}; supported: {SUPPORTED_FORMATS}")
    if overrides:
        apply_input_overrides(captured.model, overrides)
    graph = captured.model.graph
    defaults = sum(1 for v in graph.inputs if v.const_value is not None)
    logger.info("captured %s (%s): inputs %s%s, outputs %s, %d nodes", path, captured.source_format,
                ", ".join(v.name for v in graph.inputs if v.const_value is None) or "none",
                f" (+{defaults} initializers listed as inputs)" if defaults else "",
                ", ".join(v.name for v in graph.outputs), len(graph))
    for note in captured.notes:
        logger.info("capture: %s", note)
    return captured


# -- export helpers (the torch and Hugging Face routes) --------------------------------------------

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
