"""The trainable module behind a model file, and the capture of it once recovered.

Which module trains, by what the file holds (the same routes as capture):

* a Hugging Face folder: ``AutoModel`` with eager attention, called with
  ``output_hidden_states=True`` (hidden states feed the distillation);
* a ``.pt2``: ``torch.export.load(...).module()``; recovered weights go back into the
  program's state_dict, which is saved and captured as a ``.pt2`` again (dynamic shapes
  kept);
* TorchScript: ``torch.jit.load`` (a frozen script module has no parameters: refused);
* a ``torch.save`` module or a state_dict: :func:`compressor.capture.torch_load.load_module`.

Both student and teacher are loaded from the file (two independent copies) and run in
eval mode: dropout off, BatchNorm on its running statistics (the statistics the deployed
model uses); gradients flow all the same.

An ``.onnx`` file is not trainable here (exit 2 naming what to pass instead; why not
``onnx2torch``: ``docs/design.md``, "Recovery stage").
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compressor.capture import Captured
from compressor.errors import UsageError

__all__ = ["Trainable", "load_trainable", "recapture", "PASS_INSTEAD"]

logger = logging.getLogger(__name__)

PASS_INSTEAD = ("pass the trainable model instead: the .pt2 (torch.export.save), the Hugging Face folder, "
                "or the torch.save file (with --trust-pickle, or a state_dict with --model-class) it was "
                "exported from")


@dataclasses.dataclass
class Trainable:
    """A module to fine-tune (or the frozen teacher) and how to call it.

    Attributes:
        module: The ``torch.nn.Module`` (eval mode).
        kind: ``hf``, ``pt2``, ``torchscript``, ``pickle`` or ``state_dict``.
        program: The ``ExportedProgram`` of a ``.pt2`` (its state_dict takes the recovered weights).
        keyword: Call with keyword arguments (else positionally, in the graph's input order).
    """

    module: Any
    kind: str
    program: Any = None
    keyword: bool = False

    def __call__(self, feed: Mapping[str, Any]) -> Any:
        """Run the module on tensors keyed by the captured graph's input names (in its order)."""
        if self.kind == "hf":
            return self.module(**feed, output_hidden_states=True, return_dict=True)
        if self.keyword:
            return self.module(**feed)
        return self.module(*feed.values())


def _kind(path: Path) -> str:
    from compressor.capture.pytorch import _archive_kind

    if path.is_dir():
        return "hf"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    return _archive_kind(path) or "saved"


def load_trainable(path: Path, *, trust_pickle: bool = False, imports: tuple[str, ...] = (),
                   model_class: str | None = None, model_kwargs: Mapping[str, Any] | None = None) -> Trainable:
    """Load the module of ``path`` for training (see the module docstring).

    Raises:
        UsageError: an ONNX file, or a module without trainable parameters (exit 2, naming
            what to pass instead).
        CaptureError: the file cannot be loaded.
    """
    import torch

    from compressor.capture.torch_load import load_module, user_code

    kind = _kind(path)
    if kind == "onnx":
        raise UsageError(f"recover: {path.name} is an ONNX graph, which cannot be fine-tuned here; {PASS_INSTEAD}")
    if kind == "hf":
        import transformers

        from compressor.capture.hf import _load_hf

        trainable = Trainable(_load_hf(path, transformers), "hf")
    elif kind == "pt2":
        from compressor.capture.pytorch import _import_output_types

        _import_output_types(path)
        with open(path, "rb") as file:
            program = torch.export.load(file)
        trainable = Trainable(program.module(), "pt2", program)
    elif kind == "torchscript":
        trainable = Trainable(torch.jit.load(str(path), map_location="cpu").eval(), "torchscript")
    else:
        with user_code(path, imports) as imported:
            module, fmt, _notes = load_module(path, trust_pickle=trust_pickle, imported=imported,
                                              model_class=model_class, model_kwargs=model_kwargs)
        trainable = Trainable(module.eval(), fmt, keyword=True)
    params = [p for p in trainable.module.parameters() if p.is_floating_point()]
    if not params:
        raise UsageError(f"recover: {path} holds no trainable parameters (a frozen TorchScript module keeps its "
                         f"weights as constants); {PASS_INSTEAD}, or drop 'recover:' from the recipe")
    for p in params:
        p.requires_grad_(True)
    return trainable


def recapture(trainable: Trainable, path: Path, work: Path, capture: Callable[[Path], Captured],
              overrides: Any, example_inputs: Mapping[str, np.ndarray] | None) -> Captured:
    """Capture the recovered ``trainable`` (loaded from ``path``) as capture would the original file.

    ``capture`` captures a file with the run's other options (``--input`` and the data's first
    samples); ``work`` is a scratch folder.
    """
    import torch

    module = trainable.module
    if trainable.kind == "hf":
        folder = work / "recovered-hf"
        module.save_pretrained(str(folder), safe_serialization=True)
        for extra in path.iterdir():  # tokenizer files etc.: the folder stays a complete model folder
            if extra.is_file() and not (folder / extra.name).exists() and extra.suffix in (".json", ".txt", ".model"):
                shutil.copy(extra, folder / extra.name)
        return capture(folder)
    if trainable.kind == "pt2":
        state = trainable.program.state_dict
        with torch.no_grad():
            for name, value in module.state_dict().items():
                if name in state:
                    state[name].copy_(value)
        file = work / "recovered.pt2"
        torch.export.save(trainable.program, str(file))
        return capture(file)
    if trainable.kind == "torchscript":
        file = work / "recovered.pt"
        torch.jit.save(module, str(file))
        return capture(file)
    from compressor.capture.pytorch import _export_module
    from compressor.inputs import apply_input_overrides

    overrides = dict(overrides or {})
    captured = _export_module(path, module, type(module).__name__, trainable.kind, overrides, example_inputs, [])
    if overrides:
        apply_input_overrides(captured.model, overrides)
    return captured
