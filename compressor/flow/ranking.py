"""Accuracy control's ranking: which quantized layers to give back first.

For each quantized layer ``L``, the model with only ``L`` given back
(:func:`build_candidate`) is run on the ranking subset against the baseline (in ONNX
Runtime by default, else on the target; see ``AccuracyConfig.ranking_backend``):
``sensitivity(L) = err(all quantized) − err(all but L)``, ``err = 1 − mean cosine``.
The subset is the ``ranking_samples`` evaluation samples on which the fully quantized
model errs most (:func:`worst_samples`; NNCF's ``_select_subset`` picks its ranking subset
the same way): where quantization hurts is where giving a layer back shows.

Measuring every layer on every ranking sample costs one session per layer over the
whole subset, so the ranking runs in two stages when there are more layers than
``confirm_layers`` (:func:`rank_layers`, ``AccuracyConfig``): every layer is *screened* on
the ``screen_samples`` samples with the largest error (a subset of the ranking subset),
then the ``confirm_layers`` most sensitive by that screen are ranked again on the whole
ranking subset. The ranking is those confirmed layers in their measured order, followed
by the other layers in their screened order (marked ``"screened": true``). An
approximation, stated: a layer the screen puts below the first ``confirm_layers`` is
never measured on every ranking sample; where the true most sensitive layers are among
the confirmed ones, the greedy give-back tries the same layers in the same order as a
full ranking would (docs/design.md has the figures). ``screen_samples: 0`` ranks every
layer on all ranking samples.

Each candidate is one task of an executor (:mod:`compressor.executor`: in this process,
or on Ray): :func:`candidate_error` edits its copy of the quantized model from what every
task shares (that model, the record of what ``quantize`` changed, the passes after it,
the ranking data and the baseline's outputs), sent once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor.data import Dataset
from compressor.errors import first_line
from compressor.executor import Executor, InProcessExecutor
from compressor.flow.evaluation import collect_outputs, cosine_error, mask_padding, output_rows, row_cosines, sample_errors
from compressor.flow.ranking_stage import (
    THREADS,
    SampleCosines,
    joined,
    one_sample_per_call,
    outputs_by_sample,
    stage_errors,
)
from compressor.model_io import clone_model, ir_from_bytes, model_bytes
from compressor.pass_manager import PassManager
from compressor.progress import Progress
from compressor.quant.revert import give_back
from compressor.targets.onnx import OrtRunner, SharedInitializers

__all__ = ["build_candidate", "candidate_error", "candidate_errors", "rank_layers", "ranking_fields", "ranking_tasks",
           "release_decoded", "run_ranking", "worst_samples"]

logger = logging.getLogger(__name__)

RunFn = Callable[[Any], list[np.ndarray]]


def output_error(ref: list[np.ndarray], run: RunFn, data: Dataset) -> float:
    """``1 − mean cosine`` of ``run``'s outputs on ``data`` against ``ref`` (padding masked; a NaN
    cosine counts as −1: :func:`~compressor.flow.evaluation.cosine_error`)."""
    return cosine_error(row_cosines(output_rows(mask_padding(ref, data)), mask_padding(collect_outputs(run, data), data)))


def worst_samples(errors: np.ndarray, count: int) -> list[int]:
    """Indices of the ``count`` largest ``errors`` (ties: the earlier sample), in sample order."""
    order = sorted(range(len(errors)), key=lambda i: (-float(errors[i]), i))
    return sorted(order[:count])


#: The model :func:`build_candidate` last decoded from ``shared["quantized"]``, with those
#: bytes and, once an ONNX Runtime candidate asked for them, its initializers held for
#: ONNX Runtime (:class:`~compressor.targets.onnx.SharedInitializers`): the next candidate
#: of the same ranking clones it (tensors shared, never written by
#: :func:`~compressor.quant.revert.give_back`) instead of parsing the bytes again, and its
#: session reads the unchanged initializers from there instead of from serialized bytes.
_decoded: dict[str, Any] = {}


def _quantized_copy(data: bytes) -> ir.Model:
    """A fresh copy of the model serialized as ``data`` (see ``_decoded``)."""
    held = _decoded.get("bytes")
    if held is None or not (held is data or held == data):  # Ray hands each task its own bytes
        _decoded.clear()
        _decoded.update(bytes=data, model=ir_from_bytes(data))
    return clone_model(_decoded["model"])


def _shared_initializers(shared: Mapping[str, Any]) -> SharedInitializers:
    """The initializers of the model :func:`_quantized_copy` last decoded, for ONNX Runtime
    (sessions that run Q/DQ as written where the target says so: ``Capabilities.simulate_as_written``)."""
    target = getattr(shared.get("context"), "target", None)
    as_written = target is not None and target.capabilities.simulate_as_written
    held = _decoded.get("initializers")
    if held is None or held.as_written != as_written:
        _decoded["initializers"] = held = SharedInitializers(_decoded["model"], as_written=as_written)
    return held


def release_decoded() -> None:
    """Drop what :func:`build_candidate` keeps between candidates (the ranking is done)."""
    _decoded.clear()


def build_candidate(given: frozenset[str], shared: Mapping[str, Any]) -> ir.Model:
    """The quantized model with the ``given`` layers given back, then the passes after ``quantize``.

    Args:
        given: Layer names given back (empty: the fully quantized model).
        shared: ``quantized`` (the model ``quantize`` returned, :func:`~compressor.model_io.ir_bytes`),
            ``record`` (its :class:`~compressor.quant.revert.QuantizationRecord`), ``mode``
            (``float`` or ``int16``: the target's ``Capabilities.fallback``), ``post`` (the
            passes after ``quantize``, e.g. ``qnn-legalize``; their statistics are in the
            cache of ``context``; one that ``runs_on_target`` only when ``runtime`` is
            ``target``) and ``context`` (the ``PassContext`` they run with).
    """
    model = give_back(_quantized_copy(shared["quantized"]), shared["record"], sorted(given), shared["mode"])
    # A pass that measures on the device (Pass.runs_on_target) runs only where the candidate does.
    post = [p for p in shared["post"] if shared.get("runtime") == "target" or not p.runs_on_target]
    if post:
        base = shared["context"]
        ctx = dataclasses.replace(base, properties=set(base.properties))
        model = PassManager(post, verify=False).run(model, ctx).model
    return model


def candidate_error(given: frozenset[str], shared: Mapping[str, Any]) -> float:
    """Executor task: the output error of the model with the ``given`` layers given back.

    Args:
        given: Layer names given back (empty: the fully quantized model).
        shared: What :func:`build_candidate` reads, and ``runtime`` (``onnxruntime``: ONNX
            Runtime CPU; ``target``: lowered and run on the context's target), ``data``
            (the ranking subset), ``ref`` (the baseline's outputs on it, from the same
            runtime) and ``pin`` (the float precision pinned in the artifact, or ``None``).
    """
    model = build_candidate(given, shared)
    if shared["runtime"] == "onnxruntime":  # one thread, as in process (ranking_stage): the same errors
        return output_error(shared["ref"], OrtRunner(model, threads=THREADS, shared=_shared_initializers(shared)),
                            shared["data"])
    target = shared["context"].target
    with tempfile.TemporaryDirectory(prefix="compressor-candidate-") as work:
        run = target.runner(target.lower_pinned(model, Path(work), shared.get("pin")))
        err = output_error(shared["ref"], run, shared["data"])
        del run
    return err


def candidate_errors(candidates: Sequence[frozenset[str]], shared: Mapping[str, Any]) -> list[float]:
    """:func:`candidate_error` of each of ``candidates``, in ONNX Runtime, from sessions running them side by side.

    The candidates are built as :func:`candidate_error` builds them and run by
    :func:`~compressor.flow.ranking_stage.stage_errors` (side by side, no node merged
    across them, in a session per group on every CPU), so each error is the one its own
    session gives. ``shared`` may add ``by_sample`` (a
    :class:`~compressor.flow.ranking_stage.SampleCosines` kept across the stages) and
    ``samples`` (the evaluation-set index of each sample of ``data``).
    """
    models = [build_candidate(given, shared) for given in candidates]
    return stage_errors(models, candidates, _shared_initializers(shared), shared["data"], shared["ref"],
                        shared.get("by_sample"), shared.get("samples"))


def _measured(layers: Sequence[str], errors: Sequence[float]) -> list[dict[str, Any]]:
    """Ranking entries, most sensitive first, from the errors of ``[all quantized, *layers given back]``."""
    ranking = [{"layer": name, "sensitivity": errors[0] - err, "error_without": err}
               for name, err in zip(layers, errors[1:])]
    ranking.sort(key=lambda r: (-r["sensitivity"], r["layer"]))
    return ranking


def ranking_tasks(layers: int, confirm: int | None) -> int:
    """How many candidates :func:`rank_layers` evaluates (for a progress bar's total)."""
    return layers + 1 + (confirm + 1 if confirm is not None and confirm < layers else 0)


def rank_layers(layers: Sequence[str], error_of: Callable[[frozenset[str], Mapping[str, Any]], float],
                shared: Mapping[str, Any], *, executor: Executor | None = None,
                progress: Callable[[int], Any] | None = None, screen: Mapping[str, Any] | None = None,
                confirm: int | None = None,
                errors_of: Callable[[Sequence[frozenset[str]], Mapping[str, Any]], list[float]] | None = None,
                ) -> list[dict[str, Any]]:
    """Sensitivity of each layer (see the module docstring), most sensitive first.

    Args:
        layers: Names of the quantized layers.
        error_of: The error of a candidate, ``(given, shared) -> float`` (a task of
            ``executor``: module-level, such as :func:`candidate_error`, to run on Ray).
        shared: What every candidate reads.
        executor: Where the candidates run (default: in this process).
        progress: Called with ``1`` per candidate done (the fully quantized model first).
        screen: What the candidates read in the screening stage (``shared`` with a smaller
            ``data`` and its ``ref``); with ``confirm``, ranking is two-stage (module docstring).
        confirm: How many of the layers the screen ranks first are ranked again on ``shared``.
        errors_of: The errors of a stage's candidates at once, in this process (such as
            :func:`candidate_errors`), instead of ``error_of`` on ``executor``.
    """
    executor = executor or InProcessExecutor()

    def measure(names: Sequence[str], on: Mapping[str, Any]) -> list[dict[str, Any]]:
        candidates = [frozenset(), *(frozenset({name}) for name in names)]
        if errors_of is not None:
            errors = errors_of(candidates, on)
            if progress is not None:
                progress(len(candidates))
            return _measured(names, errors)
        return _measured(names, executor.map(error_of, candidates, shared=on, labels=["all quantized", *names],
                                             progress=progress))

    if screen is None or confirm is None or confirm >= len(layers):
        return measure(layers, shared)
    screened = measure(layers, screen)
    confirmed = measure([r["layer"] for r in screened[:confirm]], shared)
    logger.info("accuracy control: %d layers screened, the %d most sensitive ranked on every ranking sample",
                len(layers), len(confirmed))
    return confirmed + [{**r, "screened": True} for r in screened[confirm:]]


def whole_batches(eval_set: Dataset, count: int) -> int:
    """``count`` samples of ``eval_set`` (at most all), rounded up to whole batches on a static batch axis."""
    count = min(count, len(eval_set))
    if count and eval_set.subset(0, count).usable() < count:
        count = min(-(-count // eval_set.batch_size()) * eval_set.batch_size(), len(eval_set))
    return count


def per_sample_errors(ref: list[np.ndarray], outputs: list[np.ndarray], eval_set: Dataset) -> np.ndarray:
    """``1 − cosine`` per eval sample.

    Where each call runs one sample (a static batch of 1, such as ddddocr's recogniser with
    its time-first ``[T, 1, C]`` output), each row is one sample
    (:func:`~compressor.flow.evaluation.collect_outputs`). Otherwise, when the rows are calls
    of several samples (outputs that do not all have the samples first), every sample gets
    the same error (the ranking subset is then the first samples), with a warning.
    """
    samples = eval_set.usable()
    if all(len(o) == samples for o in outputs):
        return sample_errors(ref, outputs, eval_set)
    logger.warning("accuracy control: the outputs' first axes (%s) are not one row per sample (%d samples): "
                   "ranking on the first samples, not the worst", ", ".join(str(len(o)) for o in outputs), samples)
    return np.zeros(samples)


#: Bumped when what a ranking measures changes within one compressor version, so a cached
#: ranking from before is not reused: 2, rows per call for outputs that are not batch-first
#: and qnn-legalize's attention rule (2026-11-30); 3, padding masked for stacked
#: ``N x B x S`` attention masks too (``evaluation.padding_keep``); 4, NaN/inf computed alike
#: on both sides count as equal and huge float64 rows are scaled (``cosine.cosines``),
#: OpenVINO's preset keeps the key projections int8 with VNNI (``preset_float_roles``).
RANKING_FORMAT = 4


def ranking_fields(recipe: Mapping[str, Any], tgt: Any, baseline: ir.Model, calib: Dataset | None,
                   eval_set: Dataset, version: str) -> dict[str, Any]:
    """What the ranking depends on (:mod:`compressor.flow.ranking_cache`): not the budget.

    Args:
        recipe: The resolved recipe, as JSON data.
        tgt: The target.
        baseline: The captured model.
        calib: The calibration data.
        eval_set: The evaluation data.
        version: The compressor's version.
    """
    resolved = dict(recipe)
    resolved["accuracy"] = {k: v for k, v in resolved.get("accuracy", {}).items()
                            if k not in ("max_drop", "max_fallback")}
    return {"model": hashlib.sha256(model_bytes(baseline)).hexdigest(), "recipe": resolved,
            "calibration": None if calib is None else calib.sha256, "eval": eval_set.sha256,
            "target": tgt.describe(), "compressor": version, "format": RANKING_FORMAT}


def run_ranking(shared: Mapping[str, Any], accuracy: Any, errors: np.ndarray, eval_set: Dataset,
                baseline: ir.Model, run_baseline: RunFn, executor: Executor | None, progress: Progress,
                note: str, max_steps: int, layers: Sequence[str] | None = None,
                aside: str = "") -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """Rank ``layers``, by default ``shared["record"]``'s (module docstring).

    Args:
        shared: What every candidate reads (:func:`candidate_error`) but the ranking data.
        accuracy: The recipe's ``AccuracyConfig``.
        errors: The fully quantized model's error per eval sample (:func:`per_sample_errors`).
        eval_set: The evaluation data.
        baseline: The fp32 model (run in ONNX Runtime for the ranking's reference).
        run_baseline: The fp32 model on the target.
        executor: Where the candidates run.
        progress: Progress bar factory.
        note: What the warning that starts the ranking says first (the drop and budget).
        max_steps: How many layers may be given back (for that warning).
        layers: The layers to rank (accuracy control leaves out those a give-back leaves as they are).
        aside: What that warning adds at its end (the layers left out).

    Returns:
        The ranking, the runtime it was measured in (``onnxruntime`` or ``target``), and
        what the cache keeps beside it (the ranking and screening samples).
    """
    layers = list(shared["record"].names if layers is None else layers)
    chosen = worst_samples(errors, whole_batches(eval_set, accuracy.ranking_samples))
    ranking_data = eval_set.take(chosen, f"{len(chosen)} largest errors")
    # One call per sample: the reference is made per sample, and the screen's is the ranking's (ranking_stage).
    per_sample = one_sample_per_call(eval_set)

    def reference(run: RunFn) -> tuple[list[np.ndarray], dict[int, list[np.ndarray]] | None]:
        if not per_sample:
            return collect_outputs(run, ranking_data), None
        by_sample = outputs_by_sample(run, eval_set, chosen)
        return joined(by_sample, chosen), by_sample

    runtime, ranking_run = "target", run_baseline
    if accuracy.ranking_backend == "onnxruntime":
        try:
            ranking_run = OrtRunner(baseline)
            ranking_ref, ref_by_sample = reference(ranking_run)
            runtime = "onnxruntime"
        except Exception as exc:  # e.g. a target-specific op ONNX Runtime's CPU has no kernel for
            logger.warning("accuracy control: ONNX Runtime cannot run this model (%s); ranking on the target",
                           first_line(exc))
            ranking_run = run_baseline
    if runtime == "target":
        ranking_ref, ref_by_sample = reference(run_baseline)
    # In this process, a stage's candidates run side by side in ONNX Runtime sessions (ranking_stage).
    together = runtime == "onnxruntime" and (executor is None or type(executor) is InProcessExecutor)
    on_all = {**shared, "runtime": runtime, "data": ranking_data, "ref": ranking_ref}
    if together and ref_by_sample is not None:
        on_all.update(by_sample=SampleCosines(eval_set, ref_by_sample), samples=chosen)
    # Staged ranking (module docstring): the screen is the worst of the worst.
    screened = worst_samples(errors, whole_batches(eval_set, accuracy.screen_samples))
    confirm = accuracy.confirm_layers if 0 < len(screened) < len(chosen) and \
        accuracy.confirm_layers < len(layers) else None
    screen = None
    if confirm is not None:
        screen_data = eval_set.take(screened, f"{len(screened)} largest errors")
        screen_ref = (collect_outputs(ranking_run, screen_data) if ref_by_sample is None
                      else joined(ref_by_sample, screened))
        screen = {**on_all, "data": screen_data, "ref": screen_ref, "samples": screened}
    logger.warning("%s: ranking %d quantized layers by sensitivity on the %d samples with the largest error%s "
                   "(at most %d may be given back%s)", note, len(layers), len(chosen),
                   "" if confirm is None else f", screened on the {len(screened)} largest", max_steps, aside)
    with progress("rank layers", ranking_tasks(len(layers), confirm), "layer") as bar:
        try:
            ranking = rank_layers(layers, candidate_error, on_all, executor=executor, progress=bar.update,
                                  screen=screen, confirm=confirm, errors_of=candidate_errors if together else None)
        finally:
            release_decoded()
    return ranking, runtime, {"ranking_samples": chosen, "screen_samples": screened if confirm is not None else None}
