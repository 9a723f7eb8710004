"""Accuracy control: give back the most sensitive quantized layers until the budget holds.

A layer is given back by editing the quantized model (:func:`compressor.quant.revert.give_back`:
its Q/DQ pairs dropped and its float weight restored, or its activations widened to 16 bits
on targets with no float path), never by running the passes again.

1. Rank (:mod:`compressor.flow.ranking`): each quantized layer's sensitivity, measured by
   giving it back alone, on the evaluation samples where the fully quantized model errs
   most. The ranking is recorded in the manifest and cached on disk
   (:mod:`compressor.flow.ranking_cache`).
2. Greedy: try giving back layers in decreasing sensitivity, one at a time, re-evaluating
   the metric on the whole eval set after each try, until ``drop <= max_drop`` or the step
   limit is reached. A try that does not lower the drop is undone (the layer stays
   quantized: giving it back bought nothing). Every try (layer, drop, kept) is recorded.
3. Skip what changes nothing (``fallback: int16``, where a layer is promoted to 16-bit
   activations): a layer whose activations ``quantize`` already put at 16 bits
   (:func:`~compressor.quant.revert.already_wide`: the transformer preset's keys, scores
   ``Q·Kᵀ`` and ``probs · V`` on ``qnn-htp``) is neither ranked nor tried; and before a try is lowered
   and evaluated, the candidate (after the passes that follow ``quantize``) is compared
   with the model already evaluated by :func:`~compressor.model_digest.model_digest`:
   equal, the try is skipped. Skipped layers are recorded (``skipped_already_16bit``) and
   count no step: ``max_fallback``'s share (of all quantized layers) limits real tries.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor.data import Dataset
from compressor.executor import Executor
from compressor.flow.artifact import copy_lowered
from compressor.flow.evaluation import Evaluation, drop_order
from compressor.flow.precision_fallback import pin_after_control
from compressor.flow.ranking import (
    build_candidate,
    output_error,
    per_sample_errors,
    rank_layers,
    ranking_fields,
    release_decoded,
    run_ranking,
)
from compressor.flow.ranking_cache import load_ranking, ranking_key, store_ranking
from compressor.model_digest import model_digest
from compressor.model_io import clone_model, ir_bytes
from compressor.pass_manager import PassManager, PassReport, PipelineResult
from compressor.pipeline import PassContext
from compressor.progress import Progress, no_progress
from compressor.quant.revert import QuantizationRecord, already_wide

__all__ = ["ControlResult", "QuantizedSnapshot", "control_accuracy", "control_on_target", "given_back_stats",
           "ranking_fields"]

logger = logging.getLogger(__name__)

RunFn = Callable[[Any], list[np.ndarray]]

#: Why a layer was not tried (``ControlResult.skipped``, module docstring case 3).
ALREADY_WIDE = "its activations are 16-bit already (quantize)"
SAME_MODEL = "promoting it leaves the model already evaluated as it is"


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
    #: Layers not tried because promoting them changes nothing, with why (module docstring, case 3).
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The final model's lowered files, from the give-back try that built it, and that
    #: try's runner when it was the last one (:meth:`artifact`).
    lowered: tuple[Path, list[Path], Any] | None = None
    #: The float precision pinned after control (:func:`pin_after_control`), and what was tried.
    pin: str | None = None
    pin_record: dict[str, Any] | None = None

    def artifact(self, tgt: Any, model: ir.Model, outdir: Path, pin: str | None, files: list[Path],
                 run: Any) -> tuple[list[Path], Any]:
        """The artifact's files in ``outdir`` and their runner, after accuracy control.

        Nothing given back and nothing pinned after control: ``files`` and ``run`` (the
        artifact as first lowered) stay. Else
        the final try's files are copied into ``outdir`` in place of ``files`` (lowered from
        the same model with the same ``pin``: what lowering it again would write) and its
        runner is reused; ``model`` is lowered again only when no try lowered it. Copied, not
        moved: the reused runner may read its own files again (``qnn-htp``'s report runs the
        QDQ model it was lowered with on the CPU for the simulation gap); the try's folder
        lives in the run's work folder until the run ends.
        """
        if not self.given_back and self.pin is None:
            return files, run
        for old in files:
            old.unlink()
        if self.lowered is None:
            files = tgt.lower_pinned(model, outdir, pin)
            return files, tgt.runner(files)
        folder, tried, runner = self.lowered
        moved = copy_lowered(tried, folder, outdir)
        return moved, runner if runner is not None else tgt.runner(moved)

    def to_json(self, action: str) -> dict[str, Any]:
        skipped = {"skipped_already_16bit": len(self.skipped), "skipped_already_16bit_layers": self.skipped}
        return {"action": action, "layers": self.given_back, "steps": self.steps, "ranking": self.ranking,
                "ranking_backend": self.ranking_backend, "ranking_cached": self.ranking_cached,
                "budget_met": self.met, **(skipped if action == "int16" else {})}


def _no_bar() -> Any:
    return no_progress("", None)


def control_accuracy(*, layers: Sequence[str], build: Callable[[frozenset[str]], RunFn],
                     evaluate: Callable[[RunFn], Evaluation], first: Evaluation, budget: float,
                     ranking_data: Dataset | None = None, ranking_ref: list[np.ndarray] | None = None,
                     max_steps: int | None = None, progress: Callable[[str, int], Any] | None = None,
                     rank_build: Callable[[frozenset[str]], RunFn] | None = None,
                     ranking: list[dict[str, Any]] | None = None,
                     unchanged: Callable[[frozenset[str], frozenset[str]], bool] | None = None) -> ControlResult:
    """Give back layers until ``evaluate(...).drop <= budget`` (see the module docstring).

    Args:
        layers: Names of the quantized layers.
        build: Runner of the model with the given layers given back.
        evaluate: Scores a runner on the whole eval set.
        first: The evaluation of the fully quantized model.
        budget: The largest allowed drop.
        ranking_data: Small subset used for ranking.
        ranking_ref: Baseline outputs on ``ranking_data``.
        max_steps: Try at most this many layers (default: all); a skipped one is no try.
        progress: Factory of progress bars ``(desc, total)``.
        rank_build: Runner used for ranking only (default ``build``); ``ranking_ref``
            must come from the same runtime.
        ranking: The ranking, already computed by :func:`rank_layers` (then
            ``ranking_data``, ``ranking_ref`` and ``rank_build`` are not used).
        unchanged: Whether the model with the first set of layers given back is the one
            with the second (the try is then skipped: not built into a runner, not
            evaluated, no step; module docstring, case 3).
    """
    if ranking is None:  # ranked here, in this process, with runners built by closures
        rank_build = rank_build or build
        data, ref = ranking_data, ranking_ref
        if data is None or ref is None:
            raise ValueError("control_accuracy: give ranking_data and ranking_ref, or a ranking")
        error_of = lambda given, _: output_error(ref, rank_build(given), data)  # noqa: E731
        with (progress("rank layers", len(layers) + 1, "layer") if progress else _no_bar()) as bar:
            ranking = rank_layers(layers, error_of, {}, progress=bar.update)
    logger.info("most sensitive layers: %s", ", ".join(f"{r['layer']} ({r['sensitivity']:.4g})" for r in ranking[:5]))
    given: list[str] = []
    skipped: dict[str, str] = {}
    steps: list[dict[str, Any]] = [{"layer": None, "drop": first.drop, "kept": True}]
    evaluation = first
    limit = len(ranking) if max_steps is None else min(max_steps, len(ranking))
    for entry in ranking:
        if len(steps) > limit:
            break
        candidate = frozenset([*given, entry["layer"]])
        if unchanged is not None and unchanged(candidate, frozenset(given)):
            skipped[entry["layer"]] = SAME_MODEL
            logger.info("accuracy control: giving back %s changes nothing (the model is the one evaluated): "
                        "skipped, not tried", entry["layer"])
            continue
        trial = evaluate(build(candidate))
        kept = drop_order(trial.drop) < drop_order(evaluation.drop)
        steps.append({"layer": entry["layer"], "drop": trial.drop, "kept": kept})
        logger.info("accuracy control: giving back %s -> drop %.6f (budget %.6f)%s", entry["layer"], trial.drop,
                    budget, "" if kept else f": no better than {evaluation.drop:.6f}, undone")
        if kept:
            given.append(entry["layer"])
            evaluation = trial
        if evaluation.drop <= budget:
            break
    return ControlResult(given, steps, ranking, evaluation, evaluation.drop <= budget, skipped=skipped)


@dataclasses.dataclass
class QuantizedSnapshot:
    """A copy of the model ``quantize`` returned, its record, and where it sits in the pipeline.

    The copy is serialized only when accuracy control runs (its candidates are rebuilt from
    the bytes, in this process or on Ray): a run within budget pays nothing for it.
    """

    index: int
    model: ir.Model
    record: QuantizationRecord


def control_on_target(tgt: Any, quantized: QuantizedSnapshot, post_passes: list[Any], ctx: PassContext,
             score: Callable[[Any], Evaluation], first: Evaluation, first_outputs: list[Any], ref: list[Any],
             accuracy: Any, eval_set: Dataset, run_baseline: Any, baseline: ir.Model, work_dir: Path,
             progress: Progress, executor: Executor | None, cache_fields: dict[str, Any], pin: str | None = None,
             ) -> tuple[PipelineResult, ControlResult]:
    """Give layers back, by editing the quantized model, until the budget holds (ranking on ``executor``).

    ``pin`` is the float precision pinned in the artifact (:meth:`Target.lower_pinned`), so
    every candidate is lowered as the artifact is, on this process's target or a Ray task's copy.

    Returns:
        The final model with the reports of the passes after ``quantize`` run on it, and
        what accuracy control did.
    """
    mode = "int16" if tgt.capabilities.fallback == "int16" else "float"
    # Case 3: a layer quantize gave 16-bit activations is left as it is by a promotion.
    skipped = dict.fromkeys(already_wide(quantized.record) if mode == "int16" else [], ALREADY_WIDE)
    layers = [name for name in quantized.record.names if name not in skipped]
    shared: dict[str, Any] = {"quantized": ir_bytes(quantized.model), "record": quantized.record, "mode": mode,
                              "post": post_passes, "context": dataclasses.replace(ctx, progress=no_progress),
                              "pin": pin}
    built: dict[frozenset[str], Any] = {}
    digests: dict[frozenset[str], str] = {}
    lowered: dict[tuple[frozenset[str], str | None], tuple[Path, list[Path]]] = {}
    last: dict[str, Any] = {}  # the last try's set, pin and runner (the artifact's, when that try is kept)

    # The passes after quantize in two parts: those on the host, then from the first that
    # measures on the device (device-bias-correction) on, which run only for a try lowered.
    split = next((i for i, p in enumerate(post_passes) if p.runs_on_target), len(post_passes))
    host_passes, device_passes = post_passes[:split], post_passes[split:]
    hosted: dict[frozenset[str], PipelineResult] = {}

    def on_host(given: frozenset[str]) -> PipelineResult:
        if given not in hosted:
            edited = build_candidate(given, {**shared, "post": []})
            hosted[given] = (PassManager(host_passes, verify=False).run(edited, ctx) if host_passes
                             else PipelineResult(edited, []))
        return hosted[given]

    def model_of(given: frozenset[str]) -> PipelineResult:
        if given not in built:
            first = on_host(given)
            if device_passes:
                rest = PassManager(device_passes, verify=False).run(clone_model(first.model), ctx)
                first = PipelineResult(rest.model, first.reports + rest.reports)
                if given in digests:  # its digest is taken: the host model is not needed again
                    hosted.pop(given)
            built[given] = first
        return built[given]

    def unchanged(candidate: frozenset[str], current: frozenset[str]) -> bool:  # case 3, by effect
        for which in (candidate, current):  # on the host: a device pass changes nothing a promotion does
            if which not in digests:
                digests[which] = model_digest(on_host(which).model)
                if device_passes and which in built:  # built already: the host model is not needed again
                    hosted.pop(which)
        return digests[candidate] == digests[current]

    def build(given: frozenset[str], precision: str | None = pin) -> Any:
        folder = work_dir / f"control-{len(lowered)}"
        lowered[given, precision] = (folder, tgt.lower_pinned(model_of(given).model, folder, precision))
        last.clear()
        last.update(key=(given, precision), run=tgt.runner(lowered[given, precision][1]))
        return last["run"]

    # The share is of every quantized layer; only real tries count against it (case 3).
    max_steps = int(accuracy.max_fallback * len(quantized.record.names))
    wide = "" if not skipped else (f"; {len(skipped)} layer(s) already at 16 bits, neither ranked nor tried: "
                                   f"{_names(list(skipped))}")
    if not layers:
        logger.warning("accuracy drop %.6f > max_drop %.6f: every quantized layer already uses 16-bit activations: "
                       "accuracy control has nothing to promote on target %r", first.drop, accuracy.max_drop, tgt.name)
        try:
            final = model_of(frozenset())
        finally:
            release_decoded()
        return final, ControlResult([], [{"layer": None, "drop": first.drop, "kept": True}], [], first, False,
                                    skipped=skipped)
    key = ranking_key({**cache_fields, "layers": layers})
    cached = load_ranking(key, layers)
    if cached is not None:
        ranking, runtime = cached["ranking"], cached["ranking_backend"]
        logger.warning("accuracy drop %.6f > max_drop %.6f: ranking reused from cache (%s; %d layers, at most %d "
                       "may be given back%s)", first.drop, accuracy.max_drop, key[:12], len(layers), max_steps, wide)
    else:
        # The samples the fully quantized model gets most wrong (module docstring of ranking).
        errors = per_sample_errors(ref, first_outputs, eval_set)
        ranking, runtime, samples = run_ranking(
            shared, accuracy, errors, eval_set, baseline, run_baseline, executor, progress,
            f"accuracy drop {first.drop:.6f} > max_drop {accuracy.max_drop:.6f}", max_steps, layers, wide)
        store_ranking(key, {"fields": cache_fields, "ranking": ranking, "ranking_backend": runtime, **samples})
    try:
        outcome = control_accuracy(layers=layers, build=build, evaluate=score, first=first,
                                   budget=accuracy.max_drop, max_steps=max_steps, ranking=ranking,
                                   unchanged=unchanged if mode == "int16" else None)
        fallback = tgt.precision_fallback() if pin is None else None
        if not outcome.met and outcome.given_back and fallback is not None:
            outcome.given_back, outcome.evaluation, outcome.pin_record = pin_after_control(
                outcome.given_back, outcome.evaluation, accuracy.max_drop, fallback,
                getattr(last.get("run"), "inference_precision", None), lambda given, p: score(build(given, p)))
            if outcome.pin_record["pinned"]:
                pin = outcome.pin = fallback
                outcome.met = outcome.pin_record["budget_holds"]
        final = model_of(frozenset(outcome.given_back))
    finally:
        release_decoded()
    outcome.ranking_backend, outcome.ranking_cached = runtime, cached is not None
    outcome.skipped = {**skipped, **outcome.skipped}
    if outcome.skipped:
        logger.info("accuracy control: %d layer(s) not tried, promoting them changes nothing: %s",
                    len(outcome.skipped), ", ".join(f"{name} ({why})" for name, why in outcome.skipped.items()))
    final_key = (frozenset(outcome.given_back), pin)
    if final_key in lowered:
        outcome.lowered = (*lowered[final_key], last.get("run") if last.get("key") == final_key else None)
    return final, outcome


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def given_back_stats(report: PassReport, given: list[str], mode: str) -> None:
    """Make the quantize report say what the artifact holds after accuracy control: the layers
    given back float (or promoted to 16 bits), and the size of the weights still stored int8."""
    stats = report.stats
    if not given:
        return
    if mode == "int16":
        stats["layers_promoted_to_int16"] = sorted(given)
        return
    stats["layers"] = [name for name in stats.get("layers", []) if name not in given]
    stats["layers_quantized"] = len(stats["layers"])
    stats["skipped_layers"] = dict(sorted({**stats.get("skipped_layers", {}),
                                           **{name: "reverted by accuracy control" for name in given}}.items()))
    stats["layers_float"] = len(stats["skipped_layers"])
    if report.quantization is not None and "weight_mb_int8" in stats:  # a weight given back is float again
        fp32, int8 = report.quantization.weight_sizes(given)
        stats["weight_mb_fp32"], stats["weight_mb_int8"] = round(fp32 / 1e6, 3), round(int8 / 1e6, 3)
