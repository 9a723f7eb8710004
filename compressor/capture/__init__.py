"""Capture: read a model file and turn it into one ONNX graph held as ``onnx_ir.Model``.

Formats, recognised by what the file holds (the suffix only picks ONNX or torch):

* ``.onnx``: read (:func:`compressor.model_io.load_onnx`), then normalised as
  :mod:`compressor.capture.onnx_import` describes: ``-1``/empty/``?`` dims become dynamic, an opset
  older than the backends' kernels is upgraded (and noted).
* ``.pt2``/``.pt``/``.pth``: :mod:`compressor.capture.pytorch` (torch.export programs,
  TorchScript, pickled modules with ``trust_pickle``, state_dicts with ``model_class``), with
  the working directory and the model's folder on the import path and ``imports`` imported
  (:func:`compressor.capture.torch_load.user_code`). Input shapes the file does not record come
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

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compressor import model_io
from compressor.capture.common import (
    SOURCE_FORMATS,
    SUPPORTED_FORMATS,
    Captured,
    Overrides,
    name_folded_weights,
)
from compressor.capture.onnx_import import declare_missing_shapes, normalize_import
from compressor.errors import CaptureError, UsageError
from compressor.inputs import apply_input_overrides

__all__ = ["Captured", "capture", "name_folded_weights", "SOURCE_FORMATS", "SUPPORTED_FORMATS"]

logger = logging.getLogger(__name__)

def capture(path: str | Path, *, trust_pickle: bool = False, input_overrides: Overrides | None = None,
            example_inputs: Mapping[str, np.ndarray] | None = None, imports: Sequence[str] = (),
            model_class: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
            frozen: Mapping[str, Sequence[float]] | None = None) -> Captured:
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
        frozen: Parsed ``--freeze`` flags (:func:`compressor.inputs.parse_freeze`): a torch
            file's example input for each of those arguments is its frozen value, so the
            data may leave its column out (as for an ONNX model); the freezing itself is
            :func:`compressor.flow.calib_eval.apply_freeze`'s.

    Raises:
        CaptureError: the file cannot be read or exported.
        UsageError: ``model_kwargs`` without ``model_class``, or ``model_class`` for a
            file that holds its own graph.
        DataError: an ``--input`` contradicts the captured model's inputs.
    """
    from compressor.capture.torch_load import (
        user_code,  # imported when asked for: keeps torch out of ONNX-only runs
    )

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
            from compressor.capture.hf import (
                capture_hf,  # imported when asked for: keeps torch out of ONNX-only runs
            )

            captured = capture_hf(path, overrides)
        elif path.suffix.lower() == ".onnx":
            model = model_io.load_onnx(path)
            declared = declare_missing_shapes(model, overrides, example_inputs)
            model, report = normalize_import(model)
            upgrade = (report.opset_from, report.opset_to) if report.opset_from is not None else None
            captured = Captured(model, "onnx", declared + report.notes, upgrade)
        elif path.suffix.lower() in (".pt2", ".pt", ".pth"):
            from compressor.capture.pytorch import (
                capture_torch_file,  # imported when asked for: keeps torch out of ONNX-only runs
            )

            captured = capture_torch_file(path, overrides, trust_pickle=trust_pickle, example_inputs=example_inputs,
                                          imported=imported, model_class=model_class, model_kwargs=model_kwargs,
                                          frozen=frozen)
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
