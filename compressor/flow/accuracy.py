"""Accuracy control: give back the most sensitive quantized layers until the budget holds.

A layer is given back by editing the quantized model (:func:`compressor.quant.revert.give_back`:
its Q/DQ pairs dropped and its float weight restored, or its activations widened to 16 bits
on targets with no float path), never by running the passes again.

1. Rank: for each quantized layer ``L``, build the model with only ``L`` given back and
   measure the output error on the ranking subset against the baseline (in ONNX Runtime by
   default, else on the target; see ``AccuracyConfig.ranking_backend``):
   ``sensitivity(L) = err(all quantized) − err(all but L)``, ``err = 1 − mean cosine``.
   The subset is the ``ranking_samples`` evaluation samples on which the fully quantized
   model errs most (:func:`worst_samples`; NNCF's ``_select_subset`` picks its ranking
   subset the same way): where quantization hurts is where giving a layer back shows.
   The ranking is recorded in the manifest and cached on disk
   (:mod:`compressor.flow.ranking_cache`). Each candidate is one task of an executor
   (:mod:`compressor.executor`: in this process, or on Ray): :func:`candidate_error` edits
   its copy of the quantized model from what every task shares (that model, the record of
   what ``quantize`` changed, the passes after it, the ranking data and the baseline's
   outputs), sent once.
2. Greedy: try giving back layers in decreasing sensitivity, one at a time, re-evaluating
   the metric on the whole eval set after each try, until ``drop <= max_drop`` or the step
   limit is reached. A try that does not lower the drop is undone (the layer stays
   quantized: giving it back bought nothing). Every try (layer, drop, kept) is recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor.data import Dataset
from compressor.executor import Executor, InProcessExecutor
from compressor.flow.evaluation import (
    Evaluation,
    collect_outputs,
    fidelity,
    mask_padding,
)
from compressor.quant.revert import give_back

__all__ = ["ControlResult", "rank_layers", "candidate_error", "control_accuracy", "worst_samples", "build_candidate"]

logger = logging.getLogger(__name__)

RunFn = Callable[[Any], list[np.ndarray]]


@dataclasses.dataclass
class ControlResult:
    """What accuracy control did."""

    given_back: list[str]
    steps: list[dict[str, Any]]
    ranking: list[dict[str, Any]]
    evaluation: Evaluation
    met: bool
    ranking_backend: str = "target"
    ranking_cached: bool = False

    def to_json(self, action: str) -> dict[str, Any]:
        return {"action": action, "layers": self.given_back, "steps": self.steps, "ranking": self.ranking,
                "ranking_backend": self.ranking_backend, "ranking_cached": self.ranking_cached,
                "budget_met": self.met}


def _no_bar() -> Any:
    from compressor.progress import no_progress

    return no_progress("", None)


def _error(ref: list[np.ndarray], run: RunFn, data: Dataset) -> float:
    return 1.0 - fidelity(mask_padding(ref, data), mask_padding(collect_outputs(run, data), data))["cosine_mean"]


def worst_samples(errors: np.ndarray, count: int) -> list[int]:
    """Indices of the ``count`` largest ``errors`` (ties: the earlier sample), in sample order."""
    order = sorted(range(len(errors)), key=lambda i: (-float(errors[i]), i))
    return sorted(order[:count])


def build_candidate(given: frozenset[str], shared: Mapping[str, Any]) -> ir.Model:
    """The quantized model with the ``given`` layers given back, then the passes after ``quantize``.

    Args:
        given: Layer names given back (empty: the fully quantized model).
        shared: ``quantized`` (the model ``quantize`` returned, :func:`~compressor.model_io.ir_bytes`),
            ``record`` (its :class:`~compressor.quant.revert.QuantizationRecord`), ``mode``
            (``float`` or ``int16``: the target's ``Capabilities.fallback``), ``post`` (the
            passes after ``quantize``, e.g. ``qnn-legalize``; their statistics are in the
            cache of ``context``) and ``context`` (the ``PassContext`` they run with).
    """
    from compressor.model_io import ir_from_bytes
    from compressor.pass_manager import PassManager

    model = give_back(ir_from_bytes(shared["quantized"]), shared["record"], sorted(given), shared["mode"])
    if shared["post"]:
        base = shared["context"]
        ctx = dataclasses.replace(base, properties=set(base.properties))
        model = PassManager(shared["post"], verify=False).run(model, ctx).model
    return model


def candidate_error(given: frozenset[str], shared: Mapping[str, Any]) -> float:
    """Executor task: the output error of the model with the ``given`` layers given back.

    Args:
        given: Layer names given back (empty: the fully quantized model).
        shared: What :func:`build_candidate` reads, and ``runtime`` (``onnxruntime``: ONNX
            Runtime CPU; ``target``: lowered and run on the context's target), ``data``
            (the ranking subset) and ``ref`` (the baseline's outputs on it, from the same
            runtime).
    """
    from compressor.targets.onnx import OrtRunner

    model = build_candidate(given, shared)
    if shared["runtime"] == "onnxruntime":
        return _error(shared["ref"], OrtRunner(model), shared["data"])
    target = shared["context"].target
    with tempfile.TemporaryDirectory(prefix="compressor-candidate-") as work:
        run = target.runner(target.lower(model, Path(work)))
        err = _error(shared["ref"], run, shared["data"])
        del run
    return err


def rank_layers(layers: Sequence[str], error_of: Callable[[frozenset[str], Mapping[str, Any]], float],
                shared: Mapping[str, Any], *, executor: Executor | None = None,
                progress: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
    """Sensitivity of each layer (see the module docstring), most sensitive first.

    Args:
        layers: Names of the quantized layers.
        error_of: The error of a candidate, ``(given, shared) -> float`` (a task of
            ``executor``: module-level, such as :func:`candidate_error`, to run on Ray).
        shared: What every candidate reads.
        executor: Where the candidates run (default: in this process).
        progress: Called with ``1`` per candidate done (the fully quantized model first).
    """
    executor = executor or InProcessExecutor()
    candidates = [frozenset(), *(frozenset({name}) for name in layers)]
    errors = executor.map(error_of, candidates, shared=shared, labels=["all quantized", *layers], progress=progress)
    base_error = errors[0]
    ranking = [{"layer": name, "sensitivity": base_error - err, "error_without": err}
               for name, err in zip(layers, errors[1:])]
    ranking.sort(key=lambda r: (-r["sensitivity"], r["layer"]))
    return ranking


def control_accuracy(*, layers: Sequence[str], build: Callable[[frozenset[str]], RunFn],
                     evaluate: Callable[[RunFn], Evaluation], first: Evaluation, budget: float,
                     ranking_data: Dataset | None = None, ranking_ref: list[np.ndarray] | None = None,
                     max_steps: int | None = None, progress: Callable[[str, int], Any] | None = None,
                     rank_build: Callable[[frozenset[str]], RunFn] | None = None,
                     ranking: list[dict[str, Any]] | None = None) -> ControlResult:
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
        ranking: The ranking, already computed by :func:`rank_layers` (then
            ``ranking_data``, ``ranking_ref`` and ``rank_build`` are not used).
    """
    if ranking is None:  # ranked here, in this process, with runners built by closures
        rank_build = rank_build or build
        data, ref = ranking_data, ranking_ref
        if data is None or ref is None:
            raise ValueError("control_accuracy: give ranking_data and ranking_ref, or a ranking")
        error_of = lambda given, _: _error(ref, rank_build(given), data)  # noqa: E731
        with (progress("rank layers", len(layers) + 1, "layer") if progress else _no_bar()) as bar:
            ranking = rank_layers(layers, error_of, {}, progress=bar.update)
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
