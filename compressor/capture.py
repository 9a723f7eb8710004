"""Capture: read a model file and turn it into one ONNX graph held as ``onnx_ir.Model``.

Formats, recognised by what the file holds (the suffix only picks ONNX or torch):

* ``.onnx``: read (:func:`compressor.model_io.load_onnx`), then normalised as
  :mod:`compressor.onnx_import` describes: ``-1``/empty/``?`` dims become dynamic, an opset
  older than the backends' kernels is upgraded (and noted).
* ``.pt2`` (``torch.export.save``): ``torch.export.load``, then the torch.export-based
  ONNX exporter. Dynamic shapes stay as exported (axes are named ``s0``, ``s34``...).
* TorchScript ``.pt`` (a zip with ``code/``): ``torch.jit.load``, then the TorchScript-based
  exporter (``dynamo=False``): the torch.export-based one refuses ScriptModules.
  TorchScript records no input shapes, so ``--input NAME=SHAPE`` is required.
* A pickled ``nn.Module`` ``.pt``: refused unless ``trust_pickle`` (unpickling can run
  code); then exported like a ``.pt2`` with example inputs from ``--input``.
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
import importlib
import inspect
import io
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from compressor import model_io
from compressor.errors import CaptureError
from compressor.inputs import apply_input_overrides
from compressor.onnx_import import normalize_import

__all__ = ["Captured", "capture", "SOURCE_FORMATS", "SUPPORTED_FORMATS"]

logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("onnx", "pt2", "torchscript", "pickle", "hf")
SUPPORTED_FORMATS = ("an .onnx file, a .pt2 file (torch.export.save), a TorchScript .pt/.pth (torch.jit.save), "
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


def capture(path: str | Path, *, trust_pickle: bool = False, input_overrides: Overrides | None = None) -> Captured:
    """Read the model at ``path`` into ONNX.

    Args:
        path: A model file or a Hugging Face model directory.
        trust_pickle: Allow unpickling a full ``nn.Module`` (can run arbitrary code).
        input_overrides: From :func:`compressor.inputs.parse_input_overrides`: fixes input
            shapes, and gives the example inputs TorchScript and pickles need.

    Raises:
        CaptureError: the file cannot be read or exported.
        DataError: an ``--input`` contradicts the captured model's inputs.
    """
    path = Path(path)
    overrides = dict(input_overrides or {})
    if not path.exists():
        raise CaptureError(f"{path}: no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise CaptureError(f"{path}: the file is empty (0 bytes); check it was written completely")
    if path.is_dir():
        from compressor.capture_hf import capture_hf  # needs this module's export helpers

        captured = capture_hf(path, overrides)
    elif path.suffix.lower() == ".onnx":
        model, report = normalize_import(model_io.load_onnx(path))
        upgrade = (report.opset_from, report.opset_to) if report.opset_from is not None else None
        captured = Captured(model, "onnx", report.notes, upgrade)
    elif path.suffix.lower() in (".pt2", ".pt", ".pth"):
        captured = _capture_torch_file(path, overrides, trust_pickle)
    else:
        raise CaptureError(f"{path}: unknown model format {repr(path.suffix) if path.suffix else '(no extension)'}; "
                           f"supported: {SUPPORTED_FORMATS}")
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


# -- torch files ----------------------------------------------------------------------------------

def _archive_kind(path: Path) -> str | None:
    """``pt2`` or ``torchscript`` for those zip archives (names under one top folder), else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            inner = {name.partition("/")[2] for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if "archive_format" in inner or any(n.startswith("models/") for n in inner):
        return "pt2"
    return "torchscript" if any(n.startswith("code/") for n in inner) else None


def _capture_torch_file(path: Path, overrides: Overrides, trust_pickle: bool) -> Captured:
    kind = _archive_kind(path)
    if kind == "torchscript":
        return _capture_torchscript(path, overrides)
    if kind != "pt2" and path.suffix.lower() == ".pt2":
        raise CaptureError(f"{path}: not a torch.export program (the file is not a .pt2 archive; truncated, "
                           f"or not written by torch.export.save); {_SAVE_PT2}")
    return _capture_pt2(path) if kind == "pt2" else _capture_pickle(path, overrides, trust_pickle)


def _capture_pt2(path: Path) -> Captured:
    import torch

    _import_output_types(path)
    with _quiet() as torch_logs, open(path, "rb") as file:  # a buffer: .load refuses names not ending in .pt2
        try:
            program = torch.export.load(file)
        except Exception as err:
            logger.debug("torch.export.load failed", exc_info=True)
            why = f"{_summary(err)}; {torch_logs.last}" if torch_logs.last else _summary(err)
            raise CaptureError(f"{path}: not a readable torch.export program ({why}); {_WHAT_TO_SAVE}") from None
    return Captured(_export(path, program, output_names=_output_names(program)), "pt2", [_OPTIMIZED])


def _output_names(program: Any) -> list[str] | None:
    """Names from the keys of a dict/ModelOutput result; None keeps the exporter's (``linear``...)."""
    import torch.utils._pytree as pytree

    try:
        spec = program.call_spec.out_spec
        if spec is None or spec.is_leaf():
            return None
        paths, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))
        names = [re.sub(r"\W+", "_", pytree.keystr(key_path)).strip("_") for key_path, _ in paths]
    except Exception:
        logger.debug("cannot read the program's output structure", exc_info=True)
        return None
    if len(set(names)) != len(names) or not any(re.search(r"[A-Za-z]", n) for n in names):
        return None
    return names


def _import_output_types(path: Path) -> None:
    """Import the transformers modules named in a .pt2 (only those, by name, from the installed package).

    ``ModelOutput`` classes register with torch's pytree on import; without that
    ``torch.export.load`` cannot rebuild a Hugging Face model's outputs.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            found = {m.decode() for name in archive.namelist() if "/models/" in name and name.endswith(".json")
                     for m in re.findall(rb"transformers(?:\.\w+)+", archive.read(name))}
    except (zipfile.BadZipFile, OSError):
        return
    for module in sorted({m.rsplit(".", 1)[0] for m in found}):
        with contextlib.suppress(Exception):
            importlib.import_module(module)


def _capture_torchscript(path: Path, overrides: Overrides) -> Captured:
    import torch

    with _quiet():
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            logger.debug("torch.jit.load failed", exc_info=True)
            raise CaptureError(f"{path}: not a readable TorchScript archive ({_summary(err)}); "
                               "check the file is complete and was written by torch.jit.save") from None
    arguments = module.eval().forward.schema.arguments[1:]  # [0] is self
    example, dynamic = _example_inputs(path, "TorchScript module", [a.name for a in arguments],
                                       [a.name for a in arguments if not a.has_default_value()], overrides)
    buffer = io.BytesIO()
    with _quiet():
        try:
            torch.onnx.export(module, tuple(example.values()), buffer, dynamo=False, verbose=False,
                              input_names=list(example), opset_version=TORCHSCRIPT_OPSET, do_constant_folding=True,
                              dynamic_axes={n: {a: f"{n}_dim{a}" for a in axes} for n, axes in dynamic.items() if axes})
            model = ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))
        except Exception as err:
            logger.debug("TorchScript export failed", exc_info=True)
            raise CaptureError(f"{path}: the TorchScript exporter failed ({_summary(err)}); "
                               f"check the --input shapes match the module, or {_SAVE_PT2}") from None
        _optimize(model)
    _name_outputs(model)
    return Captured(model, "torchscript", [
        "TorchScript exported with torch.onnx's TorchScript-based exporter (dynamo=False; the torch.export-based "
        f"exporter refuses ScriptModules), opset {TORCHSCRIPT_OPSET}", _OPTIMIZED])


def _capture_pickle(path: Path, overrides: Overrides, trust_pickle: bool) -> Captured:
    import pickle

    import torch

    with _quiet():
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Unsupported global" not in str(err):
                raise CaptureError(f"{path}: not a PyTorch file ({_summary(err)}); {_WHAT_TO_SAVE}") from None
            if not trust_pickle:
                found = re.search(r"GLOBAL (\S+)", str(err))
                what = f" (it refers to {found[1]})" if found else ""
                raise CaptureError(f"{path}: a full pickle{what}, which can run arbitrary code when loaded; pass "
                                   f"--trust-pickle only if you trust its source, or better {_SAVE_PT2}") from None
            obj = _load_trusted_pickle(path)
        except Exception as err:
            logger.debug("torch.load failed", exc_info=True)
            raise CaptureError(f"{path}: not a PyTorch file ({_summary(err)}); {_WHAT_TO_SAVE}") from None
    if isinstance(obj, dict) and _holds_tensors(obj):
        raise CaptureError(f"{path}: a state_dict (weights only, no graph) cannot be compressed on its own; "
                           f"{_SAVE_PT2}, or a TorchScript file with torch.jit.save(torch.jit.script(model), "
                           '"model.pt")')
    if not isinstance(obj, torch.nn.Module):
        raise CaptureError(f"{path}: holds a {type(obj).__name__}, not a model; {_SAVE_PT2}")
    module = obj.eval()
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]
    example, dynamic = _example_inputs(path, f"pickled {type(module).__name__}", [p.name for p in params],
                                       [p.name for p in params if p.default is p.empty], overrides)
    dynamic_shapes = {n: ({a: torch.export.Dim.DYNAMIC for a in dynamic[n]} or None) for n in example}
    return Captured(_export(path, module, kwargs=example, dynamic_shapes=dynamic_shapes), "pickle", [
        f"unpickled a full {type(module).__name__} with --trust-pickle (weights_only=False)", _OPTIMIZED])


def _load_trusted_pickle(path: Path) -> Any:
    import torch
    logger.warning("%s: unpickling with weights_only=False (--trust-pickle): this can run code", path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as err:
        raise CaptureError(f"{path}: the pickle needs a class that cannot be imported here ({_summary(err)}); "
                           f"import the module that defines it first, or {_SAVE_PT2}") from None
    except Exception as err:
        raise CaptureError(f"{path}: not a PyTorch file ({_summary(err)}); {_WHAT_TO_SAVE}") from None


def _holds_tensors(obj: dict) -> bool:
    """A state_dict, or a checkpoint dict holding one."""
    import torch
    return any(isinstance(v, torch.Tensor) or (isinstance(v, dict) and _holds_tensors(v)) for v in obj.values())


def _example_inputs(path: Path, what: str, names: Sequence[str], required: Sequence[str],
                    overrides: Overrides) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Example tensors (forward order) and the dynamic (``?``) axes of each, from ``--input``."""
    import torch

    listed = ", ".join(names) or "(none)"
    if not overrides:
        raise CaptureError(f"{path}: a {what} records no input shapes; pass --input NAME=SHAPE for each forward "
                           f"argument ({listed}), e.g. --input {names[0] if names else 'x'}=1x3x224x224 "
                           "(append :int64 for integer inputs)")
    for name in overrides:
        if name not in names:
            raise CaptureError(f"{path}: --input {name}: the {what} takes no argument {name!r}; "
                               f"its forward arguments are {listed}")
    given = [n for n in names if n in overrides]
    missing = [n for n in required if n not in overrides]
    gaps = [n for n in names[: names.index(given[-1])] if n not in overrides]
    if missing or gaps:
        raise CaptureError(f"{path}: no --input for forward argument(s) {', '.join(missing or gaps)}; "
                           f"pass --input NAME=SHAPE for each of {listed}")
    generator, example, dynamic = torch.Generator().manual_seed(0), {}, {}
    for name in given:
        shape, dtype_name = overrides[name]
        dtype = getattr(torch, dtype_name or "float32", None)
        if not isinstance(dtype, torch.dtype):
            raise CaptureError(f"{path}: --input {name}: dtype {dtype_name!r} has no torch equivalent")
        size = [_DYNAMIC_EXAMPLE if d is None else d for d in shape]
        example[name] = (torch.randn(size, generator=generator, dtype=dtype) if dtype.is_floating_point
                         else torch.zeros(size, dtype=dtype))
        dynamic[name] = [axis for axis, d in enumerate(shape) if d is None]
    return example, dynamic


# -- Hugging Face ---------------------------------------------------------------------------------

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
