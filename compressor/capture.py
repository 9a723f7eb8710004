"""Capture: read a model file and turn it into one ONNX graph held as ``onnx_ir.Model``.

Formats, recognised by what the file holds (the suffix only picks ONNX or torch):

* ``.onnx``: read as is (:func:`compressor.model_io.load_onnx`).
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

import contextlib
import dataclasses
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
    if path.is_dir():
        captured = _capture_hf(path, overrides)
    elif path.suffix.lower() == ".onnx":
        captured = Captured(model_io.load_onnx(path), "onnx")
    elif path.suffix.lower() in (".pt2", ".pt", ".pth"):
        captured = _capture_torch_file(path, overrides, trust_pickle)
    else:
        raise CaptureError(f"{path}: unknown model format {path.suffix or '(no extension)'!r}; "
                           f"supported: {SUPPORTED_FORMATS}")
    if overrides:
        apply_input_overrides(captured.model, overrides)
    graph = captured.model.graph
    logger.info("captured %s (%s): inputs %s, outputs %s, %d nodes", path, captured.source_format,
                ", ".join(v.name for v in graph.inputs), ", ".join(v.name for v in graph.outputs), len(graph))
    for note in captured.notes:
        logger.info("capture: %s", note)
    return captured


# -- torch files ----------------------------------------------------------------------------------

def _archive_kind(path: Path) -> str | None:
    """``pt2``, ``torchscript``, ``torch.save`` or ``zip`` for a zip archive, else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    inner = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in inner or any(n.startswith("models/") for n in inner):
        return "pt2"
    if any(n.startswith("code/") for n in inner):
        return "torchscript"
    return "torch.save" if "data.pkl" in inner else "zip"


def _capture_torch_file(path: Path, overrides: Overrides, trust_pickle: bool) -> Captured:
    kind = _archive_kind(path)
    if kind == "pt2":
        return _capture_pt2(path)
    if kind == "torchscript":
        return _capture_torchscript(path, overrides)
    if path.suffix.lower() == ".pt2":
        raise CaptureError(f"{path}: not a torch.export program (the file is not a .pt2 archive; truncated, "
                           f"or not written by torch.export.save); {_SAVE_PT2}")
    return _capture_pickle(path, overrides, trust_pickle)


def _capture_pt2(path: Path) -> Captured:
    import torch

    with _quiet():
        try:
            program = torch.export.load(str(path))
        except Exception as err:
            logger.debug("torch.export.load failed", exc_info=True)
            raise CaptureError(f"{path}: not a readable torch.export program ({_summary(err)}); "
                               f"check the file is complete, or {_SAVE_PT2}") from None
    model = _export(path, program)
    return Captured(model, "pt2", [_optimizer_note()])


def _capture_torchscript(path: Path, overrides: Overrides) -> Captured:
    import torch

    with _quiet():
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            logger.debug("torch.jit.load failed", exc_info=True)
            raise CaptureError(f"{path}: not a readable TorchScript archive ({_summary(err)}); "
                               "check the file is complete and was written by torch.jit.save") from None
    module.eval()
    arguments = module.forward.schema.arguments[1:]  # [0] is self
    names = [a.name for a in arguments]
    required = [a.name for a in arguments if not a.has_default_value()]
    example, dynamic = _example_inputs(path, "TorchScript module", names, required, overrides)
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
        f"exporter refuses ScriptModules), opset {TORCHSCRIPT_OPSET}", _optimizer_note()])


def _capture_pickle(path: Path, overrides: Overrides, trust_pickle: bool) -> Captured:
    import pickle

    import torch

    with _quiet():
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Unsupported global" not in str(err):
                raise CaptureError(f"{path}: not a PyTorch file ({_summary(err)}); " + _WHAT_TO_SAVE) from None
            if not trust_pickle:
                found = re.search(r"GLOBAL (\S+)", str(err))
                what = f" (it refers to {found[1]})" if found else ""
                raise CaptureError(f"{path}: a full pickle{what}, which can run arbitrary code when loaded; pass "
                                   f"--trust-pickle only if you trust its source, or better {_SAVE_PT2}") from None
            obj = _load_trusted_pickle(path)
        except Exception as err:
            logger.debug("torch.load failed", exc_info=True)
            raise CaptureError(f"{path}: not a PyTorch file ({_summary(err)}); " + _WHAT_TO_SAVE) from None
    if isinstance(obj, dict) and _holds_tensors(obj):
        raise CaptureError(f"{path}: a state_dict (weights only, no graph) cannot be compressed on its own; "
                           f"{_SAVE_PT2}, or a TorchScript file with torch.jit.save(torch.jit.script(model), "
                           '"model.pt")')
    if not isinstance(obj, torch.nn.Module):
        raise CaptureError(f"{path}: holds a {type(obj).__name__}, not a model; " + _WHAT_TO_SAVE)
    module = obj.eval()
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]
    names = [p.name for p in params]
    required = [p.name for p in params if p.default is p.empty]
    example, dynamic = _example_inputs(path, f"pickled {type(module).__name__}", names, required, overrides)
    dynamic_shapes = {n: ({a: torch.export.Dim.DYNAMIC for a in dynamic[n]} or None) for n in example}
    model = _export(path, module, kwargs=example, dynamic_shapes=dynamic_shapes)
    return Captured(model, "pickle", [
        f"unpickled a full {type(module).__name__} with --trust-pickle (weights_only=False)", _optimizer_note()])


_WHAT_TO_SAVE = (f"{_SAVE_PT2}, or a TorchScript file with torch.jit.save")


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
    generator = torch.Generator().manual_seed(0)
    example: dict[str, Any] = {}
    dynamic: dict[str, list[int]] = {}
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

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _capture_hf(path: Path, overrides: Overrides) -> Captured:
    if not (path / "config.json").is_file():
        raise CaptureError(f"{path}: a directory without config.json, so not a Hugging Face model directory; "
                           f"pass {SUPPORTED_FORMATS}")
    if not any((path / name).is_file() for name in _HF_WEIGHTS):
        raise CaptureError(f"{path}: config.json but no weights ({' or '.join(_HF_WEIGHTS[::2])}); "
                           "write them with model.save_pretrained(directory)")
    try:
        import torch
        import transformers
    except ImportError:
        raise CaptureError(f"{path}: a Hugging Face model directory needs the transformers package: "
                           "pip install 'compressor[transformers]'") from None
    notes = []
    model = _load_hf(path, transformers)
    attention = getattr(model.config, "_attn_implementation", None)
    params = inspect.signature(model.forward).parameters
    names = [n for n in HF_TEXT_INPUTS if n in params]
    if "input_ids" not in names:
        raise CaptureError(f"{path}: {type(model).__name__} takes no input_ids; only text models are captured from a "
                           f"directory, for others {_SAVE_PT2}")
    for name, (shape, _dtype) in overrides.items():
        if name not in names:
            raise CaptureError(f"{path}: --input {name}: {type(model).__name__} takes no input {name!r}; "
                               f"its inputs are {', '.join(names)}")
        if len(shape) != 2:
            raise CaptureError(f"{path}: --input {name}: text inputs are batch x sequence, not rank {len(shape)}")
    batch, seq = HF_DEFAULT_SHAPE
    for shape, _dtype in overrides.values():  # torch.export specialises sizes 0 and 1: keep the defaults then
        batch, seq = (shape[0] if (shape[0] or 0) >= 2 else batch), (shape[1] if (shape[1] or 0) >= 2 else seq)
    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 1000) or 1000)
    example = {"input_ids": torch.randint(min(vocab - 1, 1000), vocab, (batch, seq), generator=generator)}
    if "attention_mask" in names:
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[-1, seq // 2:] = 0  # padding in the example: the mask path stays in the graph
        example["attention_mask"] = mask
    if "token_type_ids" in names:
        example["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
    for name, (_shape, dtype_name) in overrides.items():
        if dtype_name and dtype_name != "int64":
            example[name] = example[name].to(getattr(torch, dtype_name))
    wrapper = _last_hidden_state_module()(model, use_cache="use_cache" in params).eval()
    with torch.no_grad(), _quiet():
        try:
            wrapper(**example)
        except Exception as err:
            raise CaptureError(f"{path}: {type(model).__name__} fails on example text inputs ({_summary(err)}); "
                               f"{_SAVE_PT2}") from None
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    onnx_model = _export(path, wrapper, kwargs=example, dynamic_shapes={n: dims for n in example},
                         output_names=["last_hidden_state"])
    notes.append(f"Hugging Face {type(model).__name__} (attention {attention}); inputs {', '.join(example)} "
                 "with dynamic batch and sequence axes; output last_hidden_state only (any pooler output dropped)")
    notes.append(_optimizer_note())
    return Captured(onnx_model, "hf", notes)


def _load_hf(path: Path, transformers: Any) -> Any:
    """``AutoModel`` in eval mode, eager attention where the model has it (plain MatMul/Softmax)."""
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with _quiet():
            try:
                model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True,
                                                               attn_implementation="eager")
            except Exception:
                logger.debug("eager attention refused, loading with the default", exc_info=True)
                model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        logger.debug("from_pretrained failed", exc_info=True)
        raise CaptureError(f"{path}: transformers cannot load this model ({_summary(err)}); check config.json and "
                           f"the weights (remote code is never run), or {_SAVE_PT2}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval()


def _last_hidden_state_module() -> type:
    import torch

    class LastHiddenState(torch.nn.Module):
        """Calls a transformers model and returns only ``last_hidden_state``."""

        def __init__(self, model: Any, use_cache: bool):
            super().__init__()
            self.model = model
            self.extra = {"use_cache": False} if use_cache else {}

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            kwargs = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            out = self.model(input_ids=input_ids, return_dict=True, **kwargs, **self.extra)
            return out.last_hidden_state

    return LastHiddenState


# -- export helpers -------------------------------------------------------------------------------

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
    return onnx_program.model


def _optimize(model: ir.Model) -> None:
    """The optimizer torch.onnx.export runs, for graphs that did not come through it."""
    try:
        import onnxscript.optimizer

        onnxscript.optimizer.optimize_ir(model)
    except Exception:  # optional: an unoptimised graph is still correct
        logger.debug("onnxscript optimizer failed; keeping the graph as exported", exc_info=True)


def _optimizer_note() -> str:
    return ("optimised by onnxscript.optimizer.optimize_ir as torch.onnx.export does: constants folded, "
            "BatchNormalization fused into the preceding Conv/Gemm")


def _name_outputs(model: ir.Model) -> None:
    """Give numbered outputs (``9``, ``27``: TorchScript exporter) the names ``output``/``output_<i>``."""
    outputs = model.graph.outputs
    taken = {v.name for v in model.graph.inputs} | {v.name for n in model.graph for v in n.outputs}
    for i, value in enumerate(outputs):
        if value.name and value.name.isdigit():
            name = "output" if len(outputs) == 1 else f"output_{i}"
            if name not in taken:
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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep torch's exporter chatter off stdout/stderr; it goes to this module's debug log.

    torch logs through its own stderr handlers under the ``torch`` logger (level WARNING
    unless TORCH_LOGS changed it); while exporting that level is raised to ERROR.
    """
    torch_logger = logging.getLogger("torch")
    old_level = torch_logger.level
    if old_level in (logging.NOTSET, logging.WARNING):
        torch_logger.setLevel(logging.ERROR)
    stdout = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for warning in caught:
                    logger.debug("%s: %s", warning.category.__name__, str(warning.message).strip().split("\n", 1)[0])
    finally:
        torch_logger.setLevel(old_level)
        if stdout.getvalue().strip():
            logger.debug("exporter output:\n%s", stdout.getvalue().rstrip())
