"""The one-call flow behind ``compress``: capture → passes → lower → evaluate → artifact.

```python
from compressor.flow.compress import compress
result = compress("model.pt2", recipe="int8", target="openvino", calib="c.npz",
                  eval_data="e.npz", outdir="out/", max_drop=0.01)
```

This module runs the stages in order; the pieces it calls own their concern:
:mod:`compressor.flow.calib_eval` (which samples calibrate and which evaluate),
:mod:`compressor.flow.precision_fallback` (the float precision pinned when the device's
default breaks the budget), :mod:`compressor.flow.scheme_fallback` (a finer activation
scheme where the target's first one breaks it), :mod:`compressor.flow.accuracy` (giving layers back) and
:mod:`compressor.flow.manifest` (latency, the gate and the record ``manifest.json`` holds).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from compressor import __version__
from compressor.data import RawData, example_inputs, read_npz
from compressor.errors import (
    CompressorError,
    DataError,
    UnsupportedByTarget,
    UsageError,
    first_line,
)
from compressor.executor import Executor
from compressor.flow.accuracy import (
    ControlResult,
    QuantizedSnapshot,
    control_on_target,
    given_back_stats,
    ranking_fields,
)
from compressor.flow.artifact import ArtifactWriter, check_destination, copy_lowered
from compressor.flow.calib_eval import (
    RunData,
    capture_with_data,
    check_data_needs,
    choose_sets,
)
from compressor.flow.evaluation import Evaluation, collect_outputs, compare, drop_order, nonfinite_share
from compressor.flow.manifest import (
    build_manifest,
    gate_record,
    latency_record,
    package_versions,
)
from compressor.flow.precision_fallback import try_precision_fallback
from compressor.flow.scheme_fallback import try_scheme_fallback
from compressor.inputs import parse_freeze, parse_input_overrides
from compressor.model_io import clone_model
from compressor.pass_manager import PassManager, PassReport
from compressor.pipeline import PassContext
from compressor.progress import Progress, no_progress
from compressor.recipe import Recipe, load_recipe
from compressor.recover.stage import check_recover_inputs, recover_stage
from compressor.targets import get_target

__all__ = ["compress", "CompressResult", "Progress", "package_versions"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompressResult:
    """What one run produced."""

    outdir: Path
    manifest: dict[str, Any]
    evaluation: Evaluation | None
    reports: list[PassReport]
    gate_passed: bool | None


def _drop_source(reports: list[PassReport], budget: float, last: PassReport | None) -> PassReport | None:
    """The first lossy pass before the ``last`` whose own measured drop already exceeds ``budget``.

    Giving the last pass's (quantization's) layers back cannot undo what an earlier pass lost.
    """
    return next((r for r in reports if r is not last and r.accuracy_drop is not None
                 and drop_order(r.accuracy_drop) > budget + 1e-12), None)


@dataclasses.dataclass
class _Checked:
    """What the checks before any long work established."""

    recipe: Recipe
    tgt: Any
    passes: list[Any]
    overrides: dict[str, Any]
    raw_calib: RawData | None
    raw_eval: RawData | None
    raw_train: RawData | None
    frozen: dict[str, tuple[float, ...]]


def _check_before_work(model_path: Path, outdir: Path, recipe: str | Path | Recipe, target: str,
                       inputs: Sequence[str], calib: str | Path | None, eval_data: str | Path | None,
                       max_drop: float | None, train: str | Path | None, freeze: Sequence[str] = (),
                       target_cpu: str = "host") -> _Checked:
    """Everything that can be checked without the model: the output folder, the recipe, the budget, the data files.

    Raises:
        CompressorError: bad input (2), named, before the model is captured.
    """
    check_destination(outdir)
    recipe_obj = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    recipe_obj = recipe_obj.with_overrides(max_drop=max_drop)
    tgt = get_target(target, target_cpu)
    # One recipe on every target: the target's own passes after quantization (qnn-htp's
    # legalization) are appended here, and the manifest's recipe names them.
    recipe_obj = recipe_obj.for_target(tgt)
    for step in recipe_obj.target_steps:
        logger.info("target %s completes recipe %r: %s %s added after quantization (recipe.target_passes in "
                    "the manifest)", tgt.name, recipe_obj.name, step.name, dict(step.options))
    passes = recipe_obj.build_passes()
    overrides = parse_input_overrides(inputs)
    frozen = parse_freeze(freeze)
    if frozen and recipe_obj.recover is not None:
        raise UsageError(f"--freeze with recipe {recipe_obj.name!r}: its recover: stage trains the module, which "
                         "still has the input; freeze inputs with a recipe without recover:")
    raw_calib = read_npz(calib, what="calib") if calib else None
    raw_eval = read_npz(eval_data, what="eval") if eval_data else None
    check_data_needs(recipe_obj, passes, raw_calib, raw_eval)
    raw_train = read_npz(train, what="train") if train else None
    if recipe_obj.recover is not None:
        raw_train = check_recover_inputs(recipe_obj, model_path, raw_train, raw_calib)
    elif raw_train is not None:
        logger.warning("--train is used by a recipe with a 'recover:' section; recipe %r has none, so %s is not used",
                       recipe_obj.name, train)
    return _Checked(recipe_obj, tgt, passes, overrides, raw_calib, raw_eval, raw_train, frozen)


def _baseline_outputs(tgt: Any, run_baseline: Any, data: RunData, progress: Progress, batches: int) -> list[Any]:
    """The fp32 model's outputs on the evaluation data, in the target's backend.

    Raises:
        DataError: the original model fails there (the data, not a pass, is at fault).
    """
    with progress("baseline", batches) as bar:
        try:
            outputs = collect_outputs(run_baseline, data.eval, progress=bar.update)
        except CompressorError:
            raise
        except Exception as err:  # the backend's own error types; the original model, not a pass, failed
            raise DataError(f"the original model fails in {tgt.name} on the {data.source} data "
                            f"({data.eval.source}): {first_line(err)}; check that the data is valid input "
                            "for the model (shapes, dtypes, value ranges) and that the model runs there "
                            "as it is") from None
    bad, total = nonfinite_share(outputs)
    if bad:
        logger.warning("the original model computes NaN or inf at %d of its %d output values on the evaluation "
                       "data (%s: %s): positions where the artifact computes the same value count as equal, any other "
                       "makes the metrics NaN", bad, total, data.source, data.eval.source)
    return outputs


def compress(
    model_path: str | Path,
    *,
    recipe: str | Path | Recipe,
    outdir: str | Path,
    target: str = "onnx",
    target_cpu: str = "host",
    inputs: Sequence[str] = (),
    freeze: Sequence[str] = (),
    calib: str | Path | None = None,
    eval_data: str | Path | None = None,
    max_drop: float | None = None,
    train: str | Path | None = None,
    trust_pickle: bool = False,
    imports: Sequence[str] = (),
    model_class: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    dump_passes: str | Path | None = None,
    latency_runs: int = 20,
    progress: Progress | None = None,
    on_pass: Callable[[int, Any], None] | None = None,
    executor: Executor | None = None,
) -> CompressResult:
    """Compress one model into an artifact folder; see the module docstring.

    ``target_cpu`` names the x86 CPU the artifact will run on (``host``, ``avx2``, ``vnni``:
    :data:`compressor.targets.TARGET_CPUS`; only for the CPU targets ``onnx`` and ``openvino``),
    which picks their int8 weight grid in place of this host's.
    ``executor`` runs accuracy control's ranking candidates (default: in this process).
    ``train`` is the recovery stage's data (a recipe with ``recover:``; else ignored with a warning).
    ``freeze`` (``NAME=VALUE`` texts) makes inputs constants of the model (:mod:`compressor.inputs`).
    Everything that can be checked without the model (the output folder, the recipe, the
    budget, the data files) is checked before the model is captured. ``trust_pickle``,
    ``imports``, ``model_class`` and ``model_kwargs`` say how a torch file is loaded
    (:func:`compressor.capture.capture`); the data's first samples give the input shapes a
    torch file does not record.

    Raises:
        CompressorError: bad input (2), unsupported by the target (4), or a failed pass.
            A failed accuracy gate does not raise: ``result.gate_passed`` is ``False``.
    """
    progress = progress or no_progress
    started = time.perf_counter()
    timings: dict[str, float] = {}
    outdir = Path(outdir)
    checked = _check_before_work(Path(model_path), outdir, recipe, target, inputs, calib, eval_data, max_drop, train,
                                 freeze, target_cpu)
    recipe_obj, tgt, passes, overrides = checked.recipe, checked.tgt, checked.passes, checked.overrides
    raw_calib, raw_eval = checked.raw_calib, checked.raw_eval

    t = time.perf_counter()
    with progress("capture", 1, "model") as bar:
        prepared = capture_with_data(model_path, overrides, checked.frozen, raw_calib, raw_eval,
                                     {"trust_pickle": trust_pickle, "imports": imports, "model_class": model_class,
                                      "model_kwargs": model_kwargs})
        bar.update(1)
    timings["capture_s"] = time.perf_counter() - t
    captured, specs, calib_set, eval_set = prepared.captured, prepared.specs, prepared.calib, prepared.eval
    raw_calib, raw_eval = prepared.raw_calib, prepared.raw_eval
    model = captured.model
    if calib_set is not None and len(calib_set) > recipe_obj.calibration.samples:
        calib_set = calib_set.subset(0, recipe_obj.calibration.samples)

    for p in passes:  # a model the recipe must not touch (already quantized: exit 2) before what the target lacks
        p.check_input(model)
    offenders = tgt.check(model)
    if offenders:
        raise UnsupportedByTarget(tgt.name, offenders)

    data = choose_sets(recipe_obj, calib_set, eval_set, specs)
    calib_set, eval_set, verified = data.calib, data.eval, data.verified
    # The checked model is the baseline (never changed: a target may reuse what its check
    # prepared to lower it); the passes work on a copy. It stays the dense original when the
    # recovery stage fine-tunes the module.
    baseline, model = model, clone_model(model)
    recovery = None
    if recipe_obj.recover is not None:
        t = time.perf_counter()
        recovery = recover_stage(Path(model_path), recipe_obj, captured, checked.raw_train, calib_set, target=tgt,
                                 overrides=overrides, example_inputs=example_inputs(raw_calib, raw_eval),
                                 load={"trust_pickle": trust_pickle, "imports": tuple(imports),
                                       "model_class": model_class, "model_kwargs": model_kwargs}, progress=progress)
        captured, recipe_obj, model = recovery.captured, recovery.recipe, recovery.captured.model
        passes = recipe_obj.build_passes()
        timings["recover_s"] = time.perf_counter() - t
    metric = recipe_obj.accuracy.metric
    batches = sum(1 for _ in eval_set.batches())

    with ArtifactWriter(outdir) as writer, tempfile.TemporaryDirectory(prefix="compressor-") as work:
        work_dir = Path(work)
        run_baseline = tgt.reference_runner(baseline, work_dir / "baseline")
        t = time.perf_counter()
        ref = _baseline_outputs(tgt, run_baseline, data, progress, batches)
        timings["baseline_s"] = time.perf_counter() - t
        compare(ref, ref, eval_set, metric)  # what the metric refuses (top-1 on rows of calls): before the passes

        seen: dict[str, list[Any]] = {}  # the outputs last scored (accuracy control picks its ranking samples)

        def score(run: Any, desc: str = "evaluate") -> Evaluation:
            with progress(desc, batches) as bar:
                seen["outputs"] = collect_outputs(run, eval_set, progress=bar.update)
                return compare(ref, seen["outputs"], eval_set, metric)

        # The drop after each lossy pass but the last (whose drop is the artifact's), so the
        # report names the pass that lost accuracy (pruning before quantization, say).
        lossy = [i for i, p in enumerate(passes) if p.lossy]
        probe = set(lossy[:-1]) if verified else set()

        def measure(offset: int) -> Callable[[int, Any, ir.Model, PassReport], None]:
            def after(index: int, p: Any, current: ir.Model, report: PassReport) -> None:
                if offset + index in probe and report.modified:
                    runner = tgt.reference_runner(current, work_dir / f"after-{offset + index:02d}-{p.name}")
                    report.accuracy_drop = score(runner, f"after {p.name}").drop
                    logger.info("accuracy drop after %s: %.6f", p.name, report.accuracy_drop)
            return after

        ctx = PassContext(target=tgt, calibration=calib_set, seed=recipe_obj.calibration.seed,
                          properties={"captured"}, progress=progress,
                          learned_ranges=None if recovery is None else recovery.learned_ranges)
        # The pipeline runs once. Accuracy control edits the model the (last) quantizing pass
        # returned, with the record of what it changed per layer, and re-runs only the passes
        # after it (qnn-legalize, on cached statistics).
        budget = recipe_obj.accuracy.max_drop
        quantized: QuantizedSnapshot | None = None
        measure_pass = measure(0)

        def after_pass(index: int, p: Any, current: ir.Model, report: PassReport) -> None:
            nonlocal quantized
            measure_pass(index, p, current, report)
            if report.quantization is not None and report.quantization.layers and verified and budget is not None:
                quantized = QuantizedSnapshot(index, clone_model(current), report.quantization)

        # A target with a finer activation scheme to fall back on runs the passes again from
        # the same model where its first artifact breaks the budget (try_scheme_fallback):
        # the baseline, or a copy of the recovered model. Not after QAT, whose scales were
        # learned for the first scheme.
        alt = tgt.scheme_fallback() if verified and budget is not None else None
        if alt is not None and recovery is not None and recovery.learned_ranges is not None:
            logger.info("activation scheme fallback (%s) skipped: the recovery stage learned its scales for %s",
                        alt.describe().get("activations"), tgt.describe().get("activations"))
            alt = None
        pristine = clone_model(model) if alt is not None and recovery is not None else None
        t = time.perf_counter()
        result = PassManager(passes, dump_dir=dump_passes, on_pass=on_pass, after_pass=after_pass).run(model, ctx)
        reports = result.reports
        timings["passes_s"] = time.perf_counter() - t

        t = time.perf_counter()
        files = tgt.lower(result.model, writer.path)
        timings["lower_s"] = time.perf_counter() - t
        run_compressed = tgt.runner(files)
        t = time.perf_counter()
        evaluation = score(run_compressed)
        first_outputs = seen["outputs"]
        timings["evaluate_s"] = time.perf_counter() - t
        precision_fallback, pin = None, None
        if verified and budget is not None:
            files, run_compressed, evaluation, precision_fallback, pin = try_precision_fallback(
                tgt, result.model, writer.path, files, run_compressed, score, evaluation, budget)
        scheme_fallback: dict[str, Any] | None = None
        if alt is not None and quantized is not None and drop_order(evaluation.drop) > budget:
            t = time.perf_counter()
            first_quantized, quantized = quantized, None  # the fallback's run records its own
            alt_ctx = dataclasses.replace(ctx, target=alt, properties={"captured"})

            def run_passes() -> Any:
                start = pristine if pristine is not None else clone_model(baseline)
                return PassManager(passes, on_pass=on_pass, after_pass=after_pass).run(start, alt_ctx)

            tried = try_scheme_fallback(tgt, alt, evaluation, pin, budget, run_passes, score,
                                        lambda: seen["outputs"], work_dir / "scheme-fallback")
            if tried.kept:
                for old in files:
                    old.unlink()
                files = copy_lowered(tried.files, tried.folder, writer.path)
                tgt, result, reports, evaluation = tried.target, tried.result, tried.result.reports, tried.evaluation
                run_compressed, first_outputs, ctx = tgt.runner(files), tried.outputs, alt_ctx
                precision_fallback, pin = tried.precision_fallback, tried.pin
            else:
                quantized = first_quantized
            scheme_fallback = tried.record
            timings["scheme_fallback_s"] = time.perf_counter() - t
        last_lossy = reports[lossy[-1]] if lossy else None  # the artifact's drop is the last lossy pass's
        if last_lossy is not None and verified and last_lossy.modified:
            last_lossy.accuracy_drop = evaluation.drop
        if not verified and budget is not None:
            # Random data says nothing about accuracy: no layer is given back for it, and an
            # explicit --max-drop fails rather than passing on noise.
            logger.warning("accuracy unverified (no --calib or --eval data): the max_drop %g gate is %s", budget,
                           "failed" if max_drop is not None else "not evaluated")
        control: tuple[Any, ControlResult] | None = None
        cause: PassReport | None = None
        over = verified and budget is not None and drop_order(evaluation.drop) > budget  # NaN too
        if over:  # only a pass before the quantizing one can be the cause (qnn-legalize completes quantize)
            cause = _drop_source(reports[:quantized.index] if quantized is not None else reports, budget, last_lossy)
        if over and cause is not None:
            logger.warning("the drop comes from %s (drop %.6f right after it, budget %g), not quantization: giving "
                           "quantized layers back cannot meet the budget; lower %s's level or recover its loss",
                           cause.name, cause.accuracy_drop, budget, cause.name)
        elif over and quantized is not None:
            t = time.perf_counter()
            control = control_on_target(
                tgt, quantized, passes[quantized.index + 1:], ctx, score, evaluation, first_outputs, ref,
                recipe_obj.accuracy, eval_set, run_baseline, baseline, work_dir, progress, executor,
                ranking_fields(recipe_obj.to_json(), tgt, baseline, calib_set, eval_set, __version__), pin)
            result = control[0]
            given_back_stats(reports[quantized.index], control[1].given_back,
                              "int16" if tgt.capabilities.fallback == "int16" else "float")
            reports = reports[:quantized.index + 1] + result.reports
            evaluation = control[1].evaluation
            if control[1].pin_record is not None:  # judged again after control (precision_fallback's docstring)
                precision_fallback = {**control[1].pin_record, "before_accuracy_control": precision_fallback}
                pin = control[1].pin or pin
            timings["accuracy_control_s"] = time.perf_counter() - t
            files, run_compressed = control[1].artifact(tgt, result.model, writer.path, pin, files, run_compressed)
        latency = latency_record(tgt, baseline, run_baseline, run_compressed, eval_set, work_dir, latency_runs)
        gate = gate_record(budget, verified, evaluation, cause, explicit=max_drop is not None)
        gate_passed = gate["passed"]
        timings["total_s"] = time.perf_counter() - started
        manifest = build_manifest(
            model_path=model_path, captured=captured, baseline_dir=work_dir / "baseline", recipe=recipe_obj, tgt=tgt,
            specs=specs, root=writer.path, files=files, reports=reports, data=data, evaluation=evaluation,
            control=None if control is None else control[1].to_json(tgt.capabilities.fallback), gate=gate,
            precision_fallback=precision_fallback, recovery=None if recovery is None else recovery.record,
            latency=latency, timings=timings)
        if prepared.frozen:
            manifest["frozen_inputs"] = prepared.frozen_json()
        if scheme_fallback is not None:
            manifest["scheme_fallback"] = scheme_fallback
        manifest.update(tgt.report(run_compressed, samples=eval_set.batches()))
        writer.commit(manifest)
    return CompressResult(outdir, manifest, evaluation, reports, gate_passed)
