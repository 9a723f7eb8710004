"""Capture of PyTorch files: torch.export programs, TorchScript, pickled modules and state_dicts.

What the file holds decides the route (the suffix only says "torch"):

* a ``.pt2`` archive (``torch.export.save``): ``torch.export.load``, then the
  torch.export-based ONNX exporter; dynamic shapes stay as exported.
* a TorchScript archive (``torch.jit.save``): ``torch.jit.load``, then the TorchScript-based
  exporter (``dynamo=False``: the torch.export-based one refuses ScriptModules).
* anything else ``torch.save`` wrote: a pickled module or a state_dict, loaded by
  :func:`compressor.capture.torch_load.load_module` (the user's classes, checkpoints, ``--model-class``),
  then exported like a ``.pt2``.

Input shapes. TorchScript and modules record none: each forward argument's example is the
``--input`` shape (``?`` axes dynamic; random values) or else the first two samples of the
data (``example_inputs``, first axis = samples = the model's batch axis, which stays dynamic
where the model allows: ``Dim.AUTO``; floating arrays take the dtype of the module's
parameters). The first axis as the batch axis is an assumption: a model that takes
unbatched tensors needs ``--input``. An argument frozen by ``--freeze`` (and not named by
``--input``) takes its frozen value as the example, whether or not the data has a column for
it: a scalar for one value, 1-D for several, of the data column's dtype if there is one,
else int64 for whole numbers and the parameters' float dtype otherwise; no axis of it is dynamic.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import re
import types
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from compressor.capture.common import (
    _DYNAMIC_EXAMPLE,
    _OPTIMIZED,
    _SAVE_PT2,
    _WHAT_TO_SAVE,
    TORCHSCRIPT_OPSET,
    Captured,
    Overrides,
    _export,
    _name_outputs,
    _optimize,
    _quiet,
    _summary,
)
from compressor.capture.torch_load import load_module
from compressor.errors import CaptureError, UsageError

__all__ = ["capture_torch_file"]

logger = logging.getLogger(__name__)


# -- the routes -----------------------------------------------------------------------------------

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


def capture_torch_file(path: Path, overrides: Overrides, *, trust_pickle: bool = False,
                       example_inputs: Mapping[str, np.ndarray] | None = None,
                       imported: Sequence[types.ModuleType] = (), model_class: str | None = None,
                       model_kwargs: Mapping[str, Any] | None = None,
                       frozen: Mapping[str, Sequence[float]] | None = None) -> Captured:
    """Export the torch file at ``path`` to ONNX; call inside :func:`compressor.capture.torch_load.user_code`.

    Args:
        path: A ``.pt2``/``.pt``/``.pth`` file.
        overrides: Parsed ``--input`` flags.
        trust_pickle: Allow unpickling full modules (``weights_only=False``).
        example_inputs: Arrays keyed by forward argument, first axis = samples; the shapes
            of arguments without an ``--input``.
        imported: The ``--import`` modules (where ``__main__`` classes are looked up).
        model_class: ``MODULE:NAME`` building the module a state_dict loads into.
        model_kwargs: Keyword arguments of ``NAME``.
        frozen: Parsed ``--freeze`` flags: the example inputs of those arguments (module docstring).

    Raises:
        CaptureError: the file cannot be read, loaded or exported.
        UsageError: ``model_class`` for a file that holds its own graph.
    """
    kind = _archive_kind(path)
    if model_class and kind:
        what = "a torch.export program" if kind == "pt2" else "a TorchScript archive"
        raise UsageError(f"--model-class applies to a state_dict file; {path.name} is {what}, which holds its own "
                         "graph: leave --model-class out")
    if kind == "torchscript":
        return _capture_torchscript(path, overrides, example_inputs, frozen)
    if kind != "pt2" and path.suffix.lower() == ".pt2":
        raise CaptureError(f"{path}: not a torch.export program (the file is not a .pt2 archive; truncated, "
                           f"or not written by torch.export.save); {_SAVE_PT2}")
    if kind == "pt2":
        return _capture_pt2(path)
    return _capture_saved(path, overrides, example_inputs, trust_pickle, imported, model_class, model_kwargs, frozen)


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


def _capture_torchscript(path: Path, overrides: Overrides, data: Mapping[str, np.ndarray] | None,
                         frozen: Mapping[str, Sequence[float]] | None = None) -> Captured:
    import torch

    with _quiet():
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            logger.debug("torch.jit.load failed", exc_info=True)
            raise CaptureError(f"{path}: not a readable TorchScript archive ({_summary(err)}); "
                               "check the file is complete and was written by torch.jit.save") from None
    arguments = module.eval().forward.schema.arguments[1:]  # [0] is self
    failure: CaptureError | None = None
    for frozen_rows in _frozen_choices(frozen, data):
        example, dynamic, from_data = _example_inputs(
            path, "TorchScript module", [a.name for a in arguments],
            [a.name for a in arguments if not a.has_default_value()], overrides, data, _float_dtype(module), frozen,
            frozen_rows)
        buffer = io.BytesIO()
        with _quiet():
            try:
                torch.onnx.export(module, tuple(example.values()), buffer, dynamo=False, verbose=False,
                                  input_names=list(example), opset_version=TORCHSCRIPT_OPSET, do_constant_folding=True,
                                  dynamic_axes={n: {a: f"{n}_dim{a}" for a in axes}
                                                for n, axes in dynamic.items() if axes})
                model = ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))
            except Exception as err:
                logger.debug("TorchScript export failed", exc_info=True)
                failure = failure or CaptureError(
                    f"{path}: the TorchScript exporter failed ({_summary(err)}); check the input shapes match the "
                    f"module, or {_SAVE_PT2}{_data_hint(example, from_data)}")
                continue
            _optimize(model)
            break
    else:
        raise failure
    _name_outputs(model)
    return Captured(model, "torchscript", [
        "TorchScript exported with torch.onnx's TorchScript-based exporter (dynamo=False; the torch.export-based "
        f"exporter refuses ScriptModules), opset {TORCHSCRIPT_OPSET}", _OPTIMIZED,
        *_data_notes(example, from_data, _from_freeze(example, overrides, frozen, from_data))])


def _capture_saved(path: Path, overrides: Overrides, data: Mapping[str, np.ndarray] | None, trust_pickle: bool,
                   imported: Sequence[types.ModuleType], model_class: str | None,
                   model_kwargs: Mapping[str, Any] | None, frozen: Mapping[str, Sequence[float]] | None) -> Captured:
    """``torch.save`` output: a pickled module, or a state_dict loaded into ``model_class``."""
    module, source_format, notes = load_module(path, trust_pickle=trust_pickle, imported=imported,
                                               model_class=model_class, model_kwargs=model_kwargs)
    what = f"pickled {type(module).__name__}" if source_format == "pickle" else type(module).__name__
    return _export_module(path, module, what, source_format, overrides, data, notes, frozen=frozen)


# -- example inputs -------------------------------------------------------------------------------

def _float_dtype(module: Any) -> Any:
    """The dtype of the module's first floating parameter (None without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _export_module(path: Path, module: Any, what: str, source_format: str, overrides: Overrides,
                   data: Mapping[str, np.ndarray] | None, notes: list[str], *,
                   frozen: Mapping[str, Sequence[float]] | None = None) -> Captured:
    """Export an ``nn.Module`` with example inputs from ``--input``, ``--freeze`` or the data."""
    import torch

    module = module.eval()
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]
    failure: CaptureError | None = None
    for frozen_rows in _frozen_choices(frozen, data):
        example, dynamic, from_data = _example_inputs(path, what, [p.name for p in params],
                                                      [p.name for p in params if p.default is p.empty], overrides,
                                                      data, _float_dtype(module), frozen, frozen_rows)
        hint = {n: torch.export.Dim.AUTO if n in from_data else torch.export.Dim.DYNAMIC for n in example}
        dynamic_shapes = {n: ({a: hint[n] for a in dynamic[n]} or None) for n in example}
        try:
            model = _export(path, module, kwargs=example, dynamic_shapes=dynamic_shapes)
            break
        except CaptureError as err:
            failure = failure or CaptureError(f"{err}{_data_hint(example, from_data)}")
    else:
        raise failure
    for value in model.graph.inputs:
        if value.name in from_data and value.shape is not None and isinstance(value.shape[0], int):
            logger.warning("%s: the model fixes the first axis of %r to %d (torch.export specialised it); pass "
                           "--input %s=... to choose its size", path, value.name, value.shape[0], value.name)
    frozen_examples = _from_freeze(example, overrides, frozen, from_data)
    return Captured(model, source_format, [*notes, _OPTIMIZED, *_data_notes(example, from_data, frozen_examples)])


def _data_shapes(example: Mapping[str, Any], from_data: set[str]) -> str:
    return ", ".join(f"{n} {'x'.join(map(str, example[n].shape))} {str(example[n].dtype).removeprefix('torch.')}"
                     for n in example if n in from_data)


def _from_freeze(example: Mapping[str, Any], overrides: Overrides, frozen: Mapping[str, Any] | None,
                 from_data: set[str]) -> set[str]:
    """The arguments whose example is their ``--freeze`` value (:func:`_example_inputs`)."""
    return {n for n in example if n in (frozen or {}) and n not in overrides and n not in from_data}


def _data_notes(example: Mapping[str, Any], from_data: set[str], from_freeze: set[str] = frozenset()) -> list[str]:
    notes = [f"example input of {n}: its --freeze value {example[n].tolist()} "
             f"({str(example[n].dtype).removeprefix('torch.')}), a constant of the model" for n in example if n in from_freeze]
    if not from_data:
        return notes
    return [f"input shapes from the first samples of the data ({_data_shapes(example, from_data)}), "
            "the first axis dynamic", *notes]


def _data_hint(example: Mapping[str, Any], from_data: set[str]) -> str:
    """What to add to an export error when the data gave the example inputs."""
    if not from_data:
        return ""
    return (f"; the example inputs were the data's first samples ({_data_shapes(example, from_data)}), their first "
            "axis taken as the batch axis: if the model takes them otherwise, pass --input NAME=SHAPE")


def _frozen_choices(frozen: Mapping[str, Any] | None, data: Mapping[str, np.ndarray] | None) -> list[bool]:
    """Whether a frozen argument's example is its data rows, in the order the export tries them:
    the frozen value first (a module that branches on the flag exports only so), then, when the
    data holds a frozen column, its rows (a module that indexes the argument per sample)."""
    return [False, True] if frozen and data and any(n in data for n in frozen) else [False]


def _example_inputs(path: Path, what: str, names: Sequence[str], required: Sequence[str], overrides: Overrides,
                    data: Mapping[str, np.ndarray] | None, float_dtype: Any,
                    frozen: Mapping[str, Sequence[float]] | None = None, frozen_rows: bool = False
                    ) -> tuple[dict[str, Any], dict[str, list[int]], set[str]]:
    """Example tensors (forward order), their dynamic axes, and which came from the data.

    An argument's ``--input`` wins; then its ``--freeze`` value (module docstring), or with
    ``frozen_rows`` its data rows where the data has them; otherwise its first rows of ``data``.
    """
    import torch

    data, frozen = dict(data or {}), dict(frozen or {})
    listed = ", ".join(names) or "(none)"
    for name in overrides:
        if name not in names:
            raise CaptureError(f"{path}: --input {name}: the {what} takes no argument {name!r}; "
                               f"its forward arguments are {listed}")
    given = [n for n in names if n in overrides or n in frozen or n in data]
    unknown = [k for k in data if k not in names]
    if unknown and (not given or any(n not in overrides for n in given)):
        raise CaptureError(f"{path}: the data holds {unknown[0]!r}, but the {what} takes no argument {unknown[0]!r}; "
                           f"its forward arguments are {listed}: key the .npz arrays by argument name")
    if not given:
        raise CaptureError(f"{path}: a {what} records no input shapes; pass --input NAME=SHAPE for each forward "
                           f"argument ({listed}), e.g. --input {names[0] if names else 'x'}=1x3x224x224 (append "
                           ":int64 for integer inputs), or (compress, sweep) --calib or --eval data keyed by argument "
                           "name")
    missing = [n for n in required if n not in given]
    gaps = [n for n in names[: names.index(given[-1])] if n not in given]
    if missing or gaps:
        raise CaptureError(f"{path}: no --input or data for forward argument(s) {', '.join(missing or gaps)}; "
                           f"pass --input NAME=SHAPE or data for each of {listed}")
    generator, example, dynamic, from_data = torch.Generator().manual_seed(0), {}, {}, set()
    for name in given:
        if name not in overrides and name in frozen and not (frozen_rows and name in data):
            example[name], dynamic[name] = _frozen_example(frozen[name], data.get(name), float_dtype), []
            continue
        if name not in overrides:
            example[name], dynamic[name] = _rows(path, name, data[name], float_dtype), [0]
            from_data.add(name)
            continue
        shape, dtype_name = overrides[name]
        dtype = getattr(torch, dtype_name or "float32", None)
        if not isinstance(dtype, torch.dtype):
            raise CaptureError(f"{path}: --input {name}: dtype {dtype_name!r} has no torch equivalent")
        size = [_DYNAMIC_EXAMPLE if d is None else d for d in shape]
        example[name] = (torch.randn(size, generator=generator, dtype=dtype) if dtype.is_floating_point
                         else torch.zeros(size, dtype=dtype))
        dynamic[name] = [axis for axis, d in enumerate(shape) if d is None]
    return example, dynamic, from_data


def _frozen_example(values: Sequence[float], column: np.ndarray | None, float_dtype: Any) -> Any:
    """The ``--freeze`` value of an argument as its example tensor (module docstring)."""
    import torch

    array = np.asarray(values[0] if len(values) == 1 else values)
    if column is not None:
        dtype = np.asarray(column).dtype
    elif np.array_equal(array, np.round(array)):
        dtype = np.dtype(np.int64)
    else:
        dtype = np.dtype(np.float32)
    tensor = torch.as_tensor(array.astype(dtype))  # not ascontiguousarray: it makes a scalar 1-D
    return tensor.to(float_dtype) if tensor.is_floating_point() and float_dtype is not None else tensor


def _rows(path: Path, name: str, array: np.ndarray, float_dtype: Any) -> Any:
    """The first samples of ``array`` as a tensor of :data:`_DYNAMIC_EXAMPLE` rows (torch.export specialises 1)."""
    import torch

    array = np.asarray(array)
    if array.ndim == 0 or array.shape[0] == 0:
        raise CaptureError(f"{path}: the data's {name!r} has shape {array.shape}: it needs a first axis of samples "
                           "(at least one)")
    rows = array[:_DYNAMIC_EXAMPLE]
    rows = np.concatenate([rows] * _DYNAMIC_EXAMPLE)[:_DYNAMIC_EXAMPLE] if len(rows) < _DYNAMIC_EXAMPLE else rows
    try:
        tensor = torch.from_numpy(np.ascontiguousarray(rows))
    except TypeError as err:
        raise CaptureError(f"{path}: the data's {name!r} is {array.dtype}, which torch cannot take ({err})") from None
    return tensor.to(float_dtype) if tensor.is_floating_point() and float_dtype is not None else tensor
