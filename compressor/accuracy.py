"""Accuracy control: give back the most sensitive quantized layers until the budget holds.

1. Rank: for each quantized layer ``L``, build the model with only ``L`` given back
   (reverted to float, or promoted to 16-bit activations on targets with no float path)
   and measure the output error on a small ranking subset against the baseline (in
   ONNX Runtime by default, else on the target; see ``AccuracyConfig.ranking_backend``):
   ``sensitivity(L) = err(all quantized) − err(all but L)``, ``err = 1 − mean cosine``.
   The ranking is computed once per run and recorded in the manifest.
2. Greedy: try giving back layers in decreasing sensitivity, one at a time, re-evaluating
   the metric on the whole eval set after each try, until ``drop <= max_drop`` or the step
   limit is reached. A try that does not lower the drop is undone (the layer stays
   quantized: giving it back bought nothing). Every try (layer, drop, kept) is recorded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from compressor.data import Dataset
from compressor.evaluation import Evaluation, collect_outputs, fidelity, mask_padding

__all__ = ["ControlResult", "rank_layers", "control_accuracy", "EXCLUDE_KEY", "WIDE_KEY"]

logger = logging.getLogger(__name__)

RunFn = Callable[[Any], list[np.ndarray]]

#: ``PassContext.options`` key: layer names given back to float (read by ``quantize``).
EXCLUDE_KEY = "quantize.exclude"
#: ``PassContext.options`` key: layer names whose activations use 16 bits (mixed precision).
WIDE_KEY = "quantize.wide"


@dataclasses.dataclass
class ControlResult:
    """What accuracy control did."""

    given_back: list[str]
    steps: list[dict[str, Any]]
    ranking: list[dict[str, Any]]
    evaluation: Evaluation
    met: bool
    ranking_backend: str = "target"

    def to_json(self, action: str) -> dict[str, Any]:
        return {"action": action, "layers": self.given_back, "steps": self.steps, "ranking": self.ranking,
                "ranking_backend": self.ranking_backend, "budget_met": self.met}


def _error(ref: list[np.ndarray], run: RunFn, data: Dataset) -> float:
    return 1.0 - fidelity(mask_padding(ref, data), mask_padding(collect_outputs(run, data), data))["cosine_mean"]


def rank_layers(layers: Sequence[str], build: Callable[[frozenset[str]], RunFn], data: Dataset,
                ref: list[np.ndarray], base_error: float,
                progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Sensitivity of each layer (see the module docstring), most sensitive first."""
    ranking = []
    for name in layers:
        err = _error(ref, build(frozenset({name})), data)
        ranking.append({"layer": name, "sensitivity": base_error - err, "error_without": err})
        if progress:
            progress(1)
    ranking.sort(key=lambda r: (-r["sensitivity"], r["layer"]))
    return ranking


def control_accuracy(*, layers: Sequence[str], build: Callable[[frozenset[str]], RunFn],
                     evaluate: Callable[[RunFn], Evaluation], first: Evaluation, budget: float,
                     ranking_data: Dataset, ranking_ref: list[np.ndarray], max_steps: int | None = None,
                     progress: Callable[[str, int], Any] | None = None,
                     rank_build: Callable[[frozenset[str]], RunFn] | None = None) -> ControlResult:
    """Give back layers until ``evaluate(...).drop <= budget`` (see the module docstring).

    Args:
        layers: Names of the quantized layers.
        build: Runner of the model with the given layers given back.
        evaluate: Scores a runner on the whole eval set.
        first: The evaluation of the fully quantized model.
        budget: The largest allowed drop.
        ranking_data: Small subset used for ranking.
        ranking_ref: Baseline outputs on ``ranking_data``.
        max_steps: Give back at most this many layers (default: all).
        progress: Factory of progress bars ``(desc, total)``.
        rank_build: Runner used for ranking only (default ``build``); ``ranking_ref``
            must come from the same runtime.
    """
    rank_build = rank_build or build
    base_error = _error(ranking_ref, rank_build(frozenset()), ranking_data)
    bar = progress("rank layers", len(layers), "layer") if progress else None
    if bar is not None:
        with bar:
            ranking = rank_layers(layers, rank_build, ranking_data, ranking_ref, base_error, bar.update)
    else:
        ranking = rank_layers(layers, rank_build, ranking_data, ranking_ref, base_error)
    logger.info("most sensitive layers: %s", ", ".join(f"{r['layer']} ({r['sensitivity']:.4g})" for r in ranking[:5]))
    given: list[str] = []
    steps: list[dict[str, Any]] = [{"layer": None, "drop": first.drop, "kept": True}]
    evaluation = first
    limit = len(ranking) if max_steps is None else min(max_steps, len(ranking))
    for entry in ranking[:limit]:
        trial = evaluate(build(frozenset([*given, entry["layer"]])))
        kept = trial.drop < evaluation.drop
        steps.append({"layer": entry["layer"], "drop": trial.drop, "kept": kept})
        logger.info("accuracy control: giving back %s -> drop %.6f (budget %.6f)%s", entry["layer"], trial.drop,
                    budget, "" if kept else f": no better than {evaluation.drop:.6f}, undone")
        if kept:
            given.append(entry["layer"])
            evaluation = trial
        if evaluation.drop <= budget:
            break
    return ControlResult(given, steps, ranking, evaluation, evaluation.drop <= budget)
