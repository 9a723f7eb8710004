"""Distillation losses: the student (masked, fine-tuned) learns the teacher's (the dense original's) outputs.

Per batch, with ``S``/``T`` the student's/teacher's main output and ``P`` the real
positions (``attention_mask`` when the data has one, else all):

* ``kl`` (logits, last axis = classes): ``T² · KL(softmax(T_out/τ) ‖ softmax(S_out/τ))``
  (Hinton et al. 2015), averaged over samples (and positions in ``P``);
* ``mse``: ``mean_P |S - T|² / mean_P |T|²`` (scale-free, so a loss of 1 means "as far as
  a zero output");
* ``cosine``: ``mean_P (1 - cos(S, T))`` along the last axis;
* ``auto``: ``kl + mse`` for a 2-D output (logits: KL keeps the class distribution, the MSE
  the logits themselves, which a fidelity metric compares; KL alone is blind to a shift of
  all logits and recovered a 2:4 MLP's cosine drop by only 16% where ``kl + mse`` recovered
  most of it), ``cosine`` otherwise (embeddings, token states).

Plus ``hidden_weight · mean_layers mse(S_h, T_h)`` over the hidden states a module exposes
(Hugging Face ``output_hidden_states``), and ``label_weight · CE(S_out, labels)`` when the
training data has labels and the output is logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["TeacherOutput", "main_output", "hidden_states", "output_loss", "distill_loss", "resolve_kind"]

_OUTPUT_KEYS = ("logits", "last_hidden_state")


@dataclasses.dataclass
class TeacherOutput:
    """A module result reassembled from stored tensors (:mod:`compressor.recover.teacher_cache`)."""

    output: Any
    hidden_states: tuple[Any, ...] = ()


def main_output(result: Any) -> Any:
    """The tensor the captured graph outputs first: a tensor, ``[0]`` of a tuple, ``logits``/``last_hidden_state``."""
    if isinstance(result, TeacherOutput):
        return result.output
    if isinstance(result, (tuple, list)):
        return main_output(result[0])
    if isinstance(result, Mapping) or hasattr(result, "keys"):
        for key in _OUTPUT_KEYS:
            if key in result and result[key] is not None:
                return result[key]
        return main_output(next(iter(result.values())))
    return result


def hidden_states(result: Any) -> tuple[Any, ...]:
    """The hidden states a Hugging Face output carries (empty for anything else)."""
    states = getattr(result, "hidden_states", None)
    return tuple(states) if isinstance(states, (tuple, list)) else ()


def resolve_kind(kind: str, output: Any) -> str:
    """``auto`` → ``kl+mse`` for a 2-D output, else ``cosine``."""
    if kind != "auto":
        return kind
    return "kl+mse" if output.dim() == 2 else "cosine"


def _positions(x: Any, mask: Any | None) -> Any:
    """``x`` as ``(real positions, features)``: padding left out when ``mask`` fits."""
    if x.dim() >= 3 and mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
        return x.reshape(-1, *x.shape[2:])[mask.reshape(-1).bool()].reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(-1, 1)


def output_loss(student: Any, teacher: Any, kind: str, temperature: float, mask: Any | None = None) -> Any:
    """One of the losses of the module docstring (``kind`` already resolved)."""
    import torch.nn.functional as F

    if "+" in kind:
        return sum(output_loss(student, teacher, part, temperature, mask) for part in kind.split("+"))
    s, t = _positions(student.float(), mask), _positions(teacher.float(), mask)
    if kind == "kl":
        tau = temperature
        return F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                        reduction="batchmean") * tau * tau
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    return ((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)


def distill_loss(student: Any, teacher: Any, *, kind: str, temperature: float, hidden_weight: float,
                 label_weight: float, labels: Any | None = None, mask: Any | None = None) -> Any:
    """The whole training loss of a batch (module docstring); ``student``/``teacher`` are raw module results."""
    import torch.nn.functional as F

    s_out, t_out = main_output(student), main_output(teacher)
    loss = output_loss(s_out, t_out, resolve_kind(kind, s_out), temperature, mask)
    s_hidden, t_hidden = hidden_states(student), hidden_states(teacher)
    if hidden_weight > 0 and s_hidden and len(s_hidden) == len(t_hidden):
        loss = loss + hidden_weight * sum(output_loss(s, t, "mse", temperature, mask)
                                          for s, t in zip(s_hidden, t_hidden)) / len(s_hidden)
    if labels is not None and label_weight > 0 and s_out.dim() == 2:
        loss = loss + label_weight * F.cross_entropy(s_out.float(), labels)
    return loss
