"""Input specifications: names, shapes and dtypes of a model's inputs.

``--input NAME=1x3x224x224`` (optionally ``:int64``) fixes an input's shape; a dimension
is an integer, and ``?`` leaves it dynamic. A rank-0 (scalar) input, such as silero-vad's
``sr``, is ``NAME=scalar`` (``sr=scalar:int64``): a word, since an empty shape (``sr=``)
reads as a flag left unfinished and no dimension list can spell rank 0. It is the word
messages use for such an input too (:func:`shape_text`).

``--freeze NAME=VALUE`` (a number, or comma-separated numbers for a 1-D input) makes an
input a constant of the model, as OpenVINO's converter freezes an input to a value: the
artifact no longer has that input, and what depended on it alone folds away (silero-vad's
``If`` on its sample rate ``sr``, which no NPU runs). Calibration and evaluation data may
keep the input's column: every sample must hold the frozen value (:func:`freeze_data`).

Messages show a dynamic axis one readable way (:func:`dim_text`): the name its exporter
or author gave it (``batch``, ``sequence``), or ``N`` on axis 0 and ``?`` elsewhere when the
name is machine-made (tf2onnx's ``unk__12``, torch.export's ``s34``, the TorchScript
exporter's ``AddstateN_dim_0``, paddle2onnx's ``p2o.DynamicDimension.0``), a formula
(ultralytics writes output dims as ``floor(height/2 - 1/2)...`` expressions, hundreds of
characters long) or missing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor.errors import DataError, UsageError

__all__ = ["InputSpec", "dim_text", "shape_text", "override_text", "parse_input_overrides", "model_input_specs",
           "apply_input_overrides", "check_tensor_io", "parse_freeze", "freeze_inputs", "freeze_data"]

Dim = int | str | None

#: Dim names exporters make up: tf2onnx/onnx shape inference ``unk__12``, torch.export
#: ``s34``/``u0``, torch.onnx (TorchScript) ``Add_dim_0``/``x_dim0``, paddle2onnx
#: ``p2o.DynamicDimension.0``.
_MACHINE_DIM = re.compile(r"^(?:unk__\d+|[su]\d+|\w+_dim_?\d+|(?:\w+\.)*DynamicDimension\.\d+|\?|-?\d+)?$")
#: A dim "name" that is a formula (ultralytics' exports: ``floor(height/2 - 1/2) + 1``...):
#: anything but a word, dots and dashes. Shown as ``N``/``?``, not printed whole.
_FORMULA_DIM = re.compile(r"[^\w.\-]")


def dim_text(dim: Dim, axis: int) -> str:
    """One dimension as messages show it: ``3``, ``batch``, or ``N`` (axis 0) / ``?`` (other axes)."""
    if isinstance(dim, int) and dim >= 0:
        return str(dim)
    if isinstance(dim, str) and not _MACHINE_DIM.match(dim) and not _FORMULA_DIM.search(dim):
        return dim
    return "N" if axis == 0 else "?"


def shape_text(shape: Sequence[Dim]) -> str:
    """``Nx3x224x224``, ``batchxsequence``, ``scalar`` (see :func:`dim_text`)."""
    return "x".join(dim_text(d, axis) for axis, d in enumerate(shape)) or "scalar"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        name: The graph input's name.
        shape: One entry per axis: an int, or a str/None for a dynamic axis.
        dtype: A numpy dtype name (``"float32"``, ``"int64"``...).
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def shape_text(self) -> str:
        return shape_text(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


_OVERRIDE = re.compile(r"^(?P<name>[^=]+)=(?P<shape>[0-9?]+(?:x[0-9?]+)*|scalar)(?::(?P<dtype>[a-z0-9]+))?$")


def override_text(shape: Sequence[Dim]) -> str:
    """A parsed ``--input`` shape as the user spelled it: ``1x?x224``, or ``scalar`` for rank 0."""
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def parse_input_overrides(texts: Sequence[str]) -> dict[str, tuple[tuple[Dim, ...], str | None]]:
    """Parse ``NAME=1x3x224x224[:dtype]`` and ``NAME=scalar[:dtype]`` flags.

    Raises:
        UsageError: a flag that does not have that form.
    """
    out: dict[str, tuple[tuple[Dim, ...], str | None]] = {}
    for text in texts:
        m = _OVERRIDE.match(text.strip())
        if not m:
            raise UsageError(f"--input {text!r}: expected NAME=DIMxDIMx... (e.g. input=1x3x224x224, "
                             "optionally :dtype such as :int64), or NAME=scalar for a rank-0 input "
                             "(e.g. sr=scalar:int64)")
        shape: tuple[Dim, ...] = () if m["shape"] == "scalar" else tuple(
            None if d == "?" else int(d) for d in m["shape"].split("x"))
        dtype = m["dtype"]
        if dtype is not None:
            try:
                dtype = np.dtype(dtype).name
            except TypeError:
                raise UsageError(f"--input {text!r}: unknown dtype {dtype!r}") from None
        out[m["name"]] = (shape, dtype)
    return out


def _dtype_name(value: ir.Value) -> str:
    if value.dtype is None:
        return "float32"
    try:
        return value.dtype.numpy().name
    except Exception:
        return str(value.dtype)


def model_input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs that are real inputs (not initializers)."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        shape: tuple[Dim, ...] = ()
        if value.shape is not None:
            shape = tuple(d if isinstance(d, int) else (d.value if d.value is not None else None) for d in value.shape)
        specs.append(InputSpec(value.name, shape, _dtype_name(value)))
    return specs


def _type_text(value: ir.Value) -> str:
    """``tensor(float)``, ``seq(tensor(float))``, ``optional(...)``: the ONNX type notation."""
    def text(t: object) -> str:
        if isinstance(t, ir.TensorType):
            return f"tensor({t.dtype.name.lower()})"
        if isinstance(t, ir.SequenceType):
            return f"seq({text(t.elem_type)})"
        if isinstance(t, ir.OptionalType):
            return f"optional({text(t.elem_type)})"
        if isinstance(t, ir.SparseTensorType):
            return f"sparse_tensor({t.dtype.name.lower()})"
        return str(t)

    return text(value.type)


def check_tensor_io(model: ir.Model) -> None:
    """Refuse a model whose real inputs or outputs are not numeric tensors.

    Data files (``.npz``) hold one numeric array per input, and evaluation compares
    numeric outputs, so sequences, optionals, maps, sparse tensors and strings can be
    neither fed nor measured.

    Raises:
        DataError: names every such input and output with its type.
    """
    bad = []
    for kind, values in (("input", [v for v in model.graph.inputs if v.const_value is None]),
                         ("output", list(model.graph.outputs))):
        for value in values:
            if value.type is None:
                continue
            if not isinstance(value.type, ir.TensorType) or value.type.dtype == ir.DataType.STRING:
                bad.append(f"{kind} {value.name!r} is {_type_text(value)}")
    if bad:
        raise DataError(f"the model's {'; '.join(bad)}: compressor feeds inputs from .npz arrays and measures "
                        "outputs as numbers, so every input and output must be a numeric tensor; keep the "
                        "sequence/optional/string handling outside the model you compress")


def apply_input_overrides(model: ir.Model, overrides: dict[str, tuple[tuple[Dim, ...], str | None]]) -> None:
    """Fix the shapes named by ``--input`` on the model's inputs, in place.

    Raises:
        DataError: an unknown input name, or a shape that contradicts the model's
            (other rank, or a different size on a static axis).
    """
    by_name = {v.name: v for v in model.graph.inputs}
    for name, (shape, dtype) in overrides.items():
        if name not in by_name:
            raise DataError(f"--input {name}: the model has no input {name!r}; its inputs are "
                            f"{', '.join(s.name for s in model_input_specs(model))}")
        value = by_name[name]
        if value.shape is not None:
            if len(value.shape) != len(shape):
                model_shape = InputSpec(name, tuple(_plain(d) for d in value.shape), "").shape_text()
                if not shape:
                    raise DataError(f"--input {name}=scalar: the model's input {name!r} has rank {len(value.shape)} "
                                    f"({model_shape}), not 0; NAME=scalar is for a rank-0 input only: give "
                                    f"{name} a DIMxDIM... shape")
                raise DataError(f"--input {name}: shape {override_text(shape)} has rank {len(shape)}, "
                                f"but the model's input {name!r} has rank {len(value.shape)} ({model_shape})"
                                + (f"; a rank-0 input is --input {name}=scalar" if not value.shape else ""))
            for axis, (old, new) in enumerate(zip(value.shape, shape)):
                if isinstance(old, int) and new is not None and old != new:
                    raise DataError(f"--input {name}: axis {axis} is fixed to {old} in the model, not {new}")
        if dtype is not None and _dtype_name(value) != dtype:
            raise DataError(f"--input {name}: the model's input is {_dtype_name(value)}, not {dtype}")
        merged = [new if new is not None else (_plain(old) if value.shape is not None else None)
                  for new, old in zip(shape, value.shape or [None] * len(shape))]
        value.shape = ir.Shape(merged)


def _plain(d: Any) -> Dim:
    if isinstance(d, int):
        return d
    return getattr(d, "value", None)


_FREEZE = re.compile(r"^(?P<name>[^=]+)=(?P<values>[^,=]+(?:,[^,=]+)*)$")


def parse_freeze(texts: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """Parse ``--freeze NAME=VALUE[,VALUE...]`` flags (``true``/``false`` read as 1/0).

    Raises:
        UsageError: a flag that does not have that form, a value that is not a number, or
            one input frozen twice.
    """
    out: dict[str, tuple[float, ...]] = {}
    words = {"true": 1.0, "false": 0.0}
    for text in texts:
        m = _FREEZE.match(text.strip())
        try:
            values = tuple(words[v.strip().lower()] if v.strip().lower() in words else float(v)
                           for v in m["values"].split(",")) if m else None
        except ValueError:
            values = None
        if m is None or values is None:
            raise UsageError(f"--freeze {text!r}: expected NAME=VALUE, a number (e.g. sr=16000), or "
                             "NAME=V1,V2,... for a 1-D input")
        if m["name"] in out:
            raise UsageError(f"--freeze {m['name']} is given twice; give each input one value")
        out[m["name"]] = values
    return out


def _freeze_problem(numbers: tuple[float, ...], dtype: np.dtype) -> str | None:
    """Why ``numbers`` cannot be values of ``dtype`` (``None``: they can)."""
    array = np.array(numbers, np.float64)
    if dtype.kind == "b":
        return None if np.isin(array, (0.0, 1.0)).all() else "is bool; give 0 or 1 (false or true)"
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not np.array_equal(array, np.round(array)):
            return f"is {dtype.name}; give whole numbers"
        if array.min() < info.min or array.max() > info.max:
            return f"is {dtype.name}; give values in [{info.min}, {info.max}]"
        return None
    if dtype.kind == "f":
        return None if np.isfinite(array).all() else f"is {dtype.name}; give finite numbers"
    return f"is {dtype.name}; --freeze takes numeric and bool inputs"


def freeze_inputs(model: ir.Model, frozen: dict[str, tuple[float, ...]]) -> dict[str, np.ndarray]:
    """Make each ``--freeze`` input a constant (an initializer of the same name), in place; the arrays.

    Raises:
        DataError: an unknown input, an input of rank above 1, a value count that is not
            the input's size, a value the input's dtype cannot hold (a fraction or an
            out-of-range number for an integer, anything but 0/1 for a bool, inf/nan), a
            non-numeric input, or every input frozen.
    """
    by_name = {v.name: v for v in model.graph.inputs}
    arrays: dict[str, np.ndarray] = {}
    for name, numbers in frozen.items():
        flag = f"--freeze {name}={','.join(f'{n:g}' for n in numbers)}"
        if name not in by_name:
            raise DataError(f"{flag}: the model has no input {name!r}; its inputs are "
                            f"{', '.join(s.name for s in model_input_specs(model))}")
        value = by_name[name]
        dtype = np.dtype(_dtype_name(value)) if _dtype_name(value) != "bool" else np.dtype(bool)
        rank = None if value.shape is None else len(value.shape)
        if rank is not None and rank > 1:
            raise DataError(f"{flag}: the input {name!r} has rank {rank}; --freeze takes a scalar or 1-D input")
        size = _plain(value.shape[0]) if rank == 1 else None
        if rank == 0 and len(numbers) != 1:
            raise DataError(f"{flag}: the input {name!r} is a scalar: give one value")
        if isinstance(size, int) and size != len(numbers):
            raise DataError(f"{flag}: the input {name!r} holds {size} values, not {len(numbers)}")
        problem = _freeze_problem(numbers, dtype)
        if problem:
            raise DataError(f"{flag}: the input {name!r} {problem}")
        array = np.array(numbers[0] if rank == 0 or (rank is None and len(numbers) == 1) else numbers).astype(dtype)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(array, name=name)
        value.shape = ir.Shape(array.shape)
        model.graph.register_initializer(value)
        arrays[name] = array
    if frozen and not model.graph.inputs:
        raise DataError(f"--freeze {', '.join(frozen)}: that is every input of the model, which would compute one "
                        "constant; leave at least one input unfrozen")
    return arrays


def freeze_data(arrays: dict[str, np.ndarray], frozen: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """``arrays`` (a data file's, first axis the samples) without the frozen inputs' columns.

    Raises:
        DataError: a sample whose value differs from the frozen one (the frozen model
            computes that value only: data taken at another would be scored against it).
    """
    out = dict(arrays)
    for name, value in frozen.items():
        column = out.pop(name, None)
        if column is None:
            continue
        rows = column.reshape(len(column), -1) if column.ndim else column.reshape(1, 1)
        if rows.shape[1] != value.size:
            raise DataError(f"{where}: {name!r} holds {rows.shape[1]} values per sample, but --freeze {name} gives "
                            f"{value.size}; give the input's values, or leave {name!r} out of the data")
        differ = np.flatnonzero(~(rows == value.reshape(1, -1)).all(axis=1))
        if differ.size:
            i = int(differ[0])
            shown = rows[i] if rows.shape[1] > 1 else rows[i, 0]
            raise DataError(f"{where}: sample {i} has {name}={shown}, but --freeze {name} makes the model compute "
                            f"{name}={value.tolist()} only ({differ.size} of {len(rows)} samples differ); give data "
                            "taken at that value, or freeze the value the data has")
    return out
