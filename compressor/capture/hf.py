"""Capture of Hugging Face transformers model folders (``config.json`` + weights).

The model is loaded with ``attn_implementation="eager"`` (a plain MatMul/Softmax graph;
the SDPA path adds IsNaN/Where chains), given example text inputs (``input_ids``,
``attention_mask``, ``token_type_ids`` when it takes them) of the ``--input`` shape or
batch 2 x sequence 16, and exported with dynamic batch and sequence axes (the sequence
bounded by ``max_position_embeddings``). Only ``last_hidden_state`` is kept.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from compressor.capture.common import (
    _OPTIMIZED,
    _SAVE_PT2,
    HF_DEFAULT_SHAPE,
    HF_TEXT_INPUTS,
    SUPPORTED_FORMATS,
    Captured,
    Overrides,
    _export,
    _quiet,
    _summary,
)
from compressor.errors import CaptureError

__all__ = ["capture_hf"]

logger = logging.getLogger(__name__)

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def capture_hf(path: Path, overrides: Overrides) -> Captured:
    """Export a Hugging Face text model folder (config.json + weights) to ONNX."""
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
    model = _load_hf(path, transformers)
    kind = type(model).__name__
    params = inspect.signature(model.forward).parameters
    names = [n for n in HF_TEXT_INPUTS if n in params]
    if "input_ids" not in names:
        raise CaptureError(f"{path}: {kind} takes no input_ids; only text models are captured from a directory, "
                           f"for others {_SAVE_PT2}")
    batch, seq = HF_DEFAULT_SHAPE
    for name, (shape, _dtype) in overrides.items():
        if name not in names:
            raise CaptureError(f"{path}: --input {name}: {kind} takes no input {name!r}; its inputs are "
                               f"{', '.join(names)}")
        if len(shape) != 2:
            raise CaptureError(f"{path}: --input {name}: text inputs are batch x sequence, not rank {len(shape)}")
        # torch.export specialises sizes 0 and 1: the example keeps the defaults then
        batch, seq = (shape[0] if (shape[0] or 0) >= 2 else batch), (shape[1] if (shape[1] or 0) >= 2 else seq)
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    example = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)),
               "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
               "token_type_ids": torch.zeros(batch, seq, dtype=torch.int64)}
    example["attention_mask"][-1, seq // 2:] = 0  # padding in the example: the mask path stays in the graph
    example = {n: example[n].to(getattr(torch, overrides.get(n, ((), None))[1] or "int64")) for n in names}
    wrapper = _last_hidden_state_module()(model, use_cache="use_cache" in params).eval()
    with torch.no_grad(), _quiet():
        try:
            wrapper(**example)
        except Exception as err:
            raise CaptureError(f"{path}: {kind} fails on example text inputs ({_summary(err)}); {_SAVE_PT2}") from None
    max_len = getattr(model.config, "max_position_embeddings", None)  # position embeddings bound the sequence
    max_len = max_len if isinstance(max_len, int) and max_len >= seq else None
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=max_len)}
    onnx_model = _export(path, wrapper, kwargs=example, dynamic_shapes={n: dims for n in example},
                         output_names=["last_hidden_state"])
    for value in list(onnx_model.graph.initializers.values()):  # drop the wrapper's prefix: the HF names
        if value.name.startswith("model.") and value.name[6:] not in onnx_model.graph.initializers:
            value.name = value.name[6:]
    if overrides:  # text inputs share batch x sequence: one --input fixes them all
        shape = next(iter(overrides.values()))[0]
        overrides.update({n: (shape, None) for n in example if n not in overrides})
    return Captured(onnx_model, "hf", [
        f"Hugging Face {kind} (attention {getattr(model.config, '_attn_implementation', None)}); inputs "
        f"{', '.join(example)} with dynamic batch and sequence axes; output last_hidden_state only "
        "(any pooler output dropped)", _OPTIMIZED])


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

