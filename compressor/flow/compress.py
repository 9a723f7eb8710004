"""The one-call flow behind ``compress``: capture → passes → lower → evaluate → artifact.

```python
from compressor.flow.compress import compress
result = compress("model.pt2", recipe="int8", target="openvino", calib="c.npz",
                  eval_data="e.npz", outdir="out/", max_drop=0.01)
```
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx_ir as ir

from compressor import __version__
from compressor.capture import capture
from compressor.data import Dataset, RawData, example_inputs, random_dataset, read_npz
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
from compressor.flow.artifact import ArtifactWriter, check_destination, file_entries
from compressor.flow.evaluation import (
    Evaluation,
    collect_outputs,
    compare,
    measure_latency,
)
from compressor.inputs import (
    InputSpec,
    check_tensor_io,
    model_input_specs,
    parse_input_overrides,
)
from compressor.model_io import clone_model
from compressor.pass_manager import PassManager, PassReport
from compressor.pipeline import PassContext
from compressor.progress import Progress, no_progress
from compressor.recipe import Recipe, load_recipe
from compressor.recover.stage import check_recover_inputs, recover_stage
from compressor.targets import get_target

__all__ = ["compress", "CompressResult", "Progress", "package_versions"]

logger = logging.getLogger(__name__)

#: ``evaluation.source`` when no --calib/--eval data was given.
UNVERIFIED = "random (unverified)"
#: ``gate.reason`` then: the gate is not evaluated (recipe budget) or fails (explicit --max-drop).
UNVERIFIED_GATE = "accuracy unverified: no --calib or --eval data (random inputs say nothing about accuracy)"

RANDOM_SAMPLES = 32


@dataclasses.dataclass
class CompressResult:
    """What one run produced."""

    outdir: Path
    manifest: dict[str, Any]
    evaluation: Evaluation | None
    reports: list[PassReport]
    gate_passed: bool | None


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the artifact."""
    out = {"python": platform.python_version(), "compressor": __version__}
    for name in ("onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "torch", "openvino", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _pick_eval(recipe: Recipe, calib: Dataset | None, eval_data: Dataset | None,
               specs: list[InputSpec]) -> tuple[Dataset | None, Dataset, str]:
    """Decide the calibration and evaluation sets (see DESIGN: Data the CLI takes)."""
    if eval_data is not None:
        return calib, eval_data, "eval file"
    if calib is not None and len(calib) >= 2:
        held = max(1, int(round(len(calib) * recipe.calibration.holdout)))
        held = min(held, len(calib) - 1)
        logger.warning("no --eval given: evaluating on the last %d of %d calibration samples (held out from "
                       "calibration)", held, len(calib))
        return calib.subset(0, len(calib) - held), calib.subset(len(calib) - held, len(calib)), "calibration holdout"
    logger.warning("NO DATA GIVEN: calibrating and evaluating on random inputs; the accuracy figures are NOT "
                   "verified. Pass --calib and --eval with real samples.")
    rand = random_dataset(specs, RANDOM_SAMPLES, recipe.calibration.seed)
    return (calib if calib is not None else rand), rand, UNVERIFIED


def _bytes_under(folder: Path) -> int:
    """Total size of the files the target wrote for the baseline (what the artifact's files compare to)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check_data_needs(recipe: Recipe, passes: list[Any], calib: RawData | None, eval_data: RawData | None) -> None:
    """Refuse, before any long work, a recipe that calibrates when only --eval data is given.

    With no data at all the flow calibrates on random inputs (loudly, accuracy unverified);
    with evaluation data but no calibration data that would quietly calibrate on noise.

    Raises:
        UsageError: names the pass that needs calibration data.
    """
    if calib is not None or eval_data is None:
        return
    needing = [p.name for p in passes if getattr(p, "needs_calibration", False)]
    if needing:
        raise UsageError(f"pass {needing[0]!r} of recipe {recipe.name!r} needs calibration data, and only --eval "
                         "was given: pass --calib X.npz with samples like those the model sees in use (other "
                         "than the --eval samples, or the accuracy figures are optimistic)")


def _drop_source(reports: list[PassReport], budget: float, last: PassReport | None) -> PassReport | None:
    """The first lossy pass before the ``last`` whose own measured drop already exceeds ``budget``.

    Giving the last pass's (quantization's) layers back cannot undo what an earlier pass lost.
    """
    return next((r for r in reports if r is not last and r.accuracy_drop is not None
                 and r.accuracy_drop > budget + 1e-12), None)


def _precision_fallback(tgt: Any, model: ir.Model, outdir: Path, files: list[Path], run: Any,
                        score: Callable[..., Evaluation], first: Evaluation,
                        budget: float) -> tuple[list[Path], Any, Evaluation, dict[str, Any] | None, str | None]:
    """Pin the target's fallback float precision in the artifact when the one it was evaluated in breaks the budget.

    The artifact is evaluated as it will run: in the device's default float precision (bf16
    on CPUs with AVX512-BF16). Over budget there, it is lowered again with the target's
    :meth:`precision_fallback` (f32) pinned and evaluated; the pin is kept when it lowers
    the drop (then either the budget holds, or accuracy control goes on from the pinned
    artifact, whose float layers no longer add their rounding to the drop), else undone.
    The pin is data the caller passes on (:meth:`Target.lower_pinned` for every later
    lowering, accuracy control's candidates included), never state left on the target.

    Returns:
        The artifact's files, its runner, its evaluation, what was tried (``None``: nothing)
        and the precision pinned in the artifact (``None``: none).
    """
    fallback = tgt.precision_fallback()
    if fallback is None or first.drop <= budget + 1e-12:
        return files, run, first, None, None
    evaluated_in = getattr(run, "inference_precision", None)
    for old in files:
        old.unlink()
    files = tgt.lower_pinned(model, outdir, fallback)
    pinned_run = tgt.runner(files)
    pinned = score(pinned_run, f"evaluate ({fallback})")
    kept = pinned.drop < first.drop
    record = {"evaluated_in": evaluated_in, "drop": first.drop, "fallback": fallback, "fallback_drop": pinned.drop,
              "pinned": kept, "budget_holds": bool(pinned.drop <= budget + 1e-12)}
    if kept:
        logger.warning("accuracy drop %.6f in the device's default float precision (%s) > max_drop %g; %s holds "
                       "%.6f%s: pinned %s in the artifact", first.drop, evaluated_in, budget, fallback, pinned.drop,
                       "" if record["budget_holds"] else " (still over: accuracy control goes on from it)", fallback)
        return files, pinned_run, pinned, record, fallback
    logger.warning("accuracy drop %.6f in %s, %.6f with %s pinned: not pinned", first.drop, evaluated_in,
                   pinned.drop, fallback)
    for old in files:
        old.unlink()
    files = tgt.lower(model, outdir)
    return files, tgt.runner(files), first, record, None


def compress(
    model_path: str | Path,
    *,
    recipe: str | Path | Recipe,
    outdir: str | Path,
    target: str = "onnx",
    inputs: Sequence[str] = (),
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

    ``executor`` runs accuracy control's ranking candidates (default: in this process).
    ``train`` is the recovery stage's data (a recipe with ``recover:``; else ignored with a warning).
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
    check_destination(outdir)
    recipe_obj = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    recipe_obj = recipe_obj.with_overrides(max_drop=max_drop)
    tgt = get_target(target)
    # One recipe on every target: the target's own passes after quantization (qnn-htp's
    # legalization) are appended here, and the manifest's recipe names them.
    recipe_obj = recipe_obj.for_target(tgt)
    for step in recipe_obj.target_steps:
        logger.info("target %s completes recipe %r: %s %s appended after quantization (recipe.target_passes in "
                    "the manifest)", tgt.name, recipe_obj.name, step.name, dict(step.options))
    passes = recipe_obj.build_passes()
    overrides = parse_input_overrides(inputs)
    raw_calib = read_npz(calib, what="calib") if calib else None
    raw_eval = read_npz(eval_data, what="eval") if eval_data else None
    _check_data_needs(recipe_obj, passes, raw_calib, raw_eval)
    raw_train = read_npz(train, what="train") if train else None
    if recipe_obj.recover is not None:
        raw_train = check_recover_inputs(recipe_obj, Path(model_path), raw_train, raw_calib)
    elif raw_train is not None:
        logger.warning("--train is used by a recipe with a 'recover:' section; recipe %r has none, so %s is not used",
                       recipe_obj.name, train)

    t = time.perf_counter()
    with progress("capture", 1, "model") as bar:
        captured = capture(Path(model_path), trust_pickle=trust_pickle, input_overrides=overrides,
                           example_inputs=example_inputs(raw_calib, raw_eval), imports=imports,
                           model_class=model_class, model_kwargs=model_kwargs)
        bar.update(1)
    timings["capture_s"] = time.perf_counter() - t
    model = captured.model
    check_tensor_io(model)
    specs = model_input_specs(model)
    calib_set = raw_calib.validate(specs) if raw_calib is not None else None
    eval_set = raw_eval.validate(specs) if raw_eval is not None else None
    if calib_set is not None and len(calib_set) > recipe_obj.calibration.samples:
        calib_set = calib_set.subset(0, recipe_obj.calibration.samples)

    for p in passes:  # a model the recipe must not touch (already quantized: exit 2) before what the target lacks
        p.check_input(model)
    offenders = tgt.check(model)
    if offenders:
        raise UnsupportedByTarget(tgt.name, offenders)

    calib_set, eval_set, eval_source = _pick_eval(recipe_obj, calib_set, eval_set, specs)
    held = " (split from --calib for evaluation; pass --eval with its own samples)" \
        if eval_source == "calibration holdout" else ""
    if calib_set is not None:
        calib_set.check_batches(f"calibration data{held}")
    eval_set.check_batches(f"evaluation data{held}")
    verified = eval_source != UNVERIFIED
    # The checked model is the baseline (never changed: a target may reuse what its check
    # prepared to lower it); the passes work on a copy. It stays the dense original when the
    # recovery stage fine-tunes the module.
    baseline, model = model, clone_model(model)
    recovery = None
    if recipe_obj.recover is not None:
        t = time.perf_counter()
        recovery = recover_stage(Path(model_path), recipe_obj, captured, raw_train, calib_set, target=tgt,
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
        with progress("baseline", batches) as bar:
            try:
                ref = collect_outputs(run_baseline, eval_set, progress=bar.update)
            except CompressorError:
                raise
            except Exception as err:  # the backend's own error types; the original model, not a pass, failed
                raise DataError(f"the original model fails in {tgt.name} on the {eval_source} data "
                                f"({eval_set.source}): {first_line(err)}; check that the data is valid input "
                                "for the model (shapes, dtypes, value ranges) and that the model runs there "
                                "as it is") from None
        timings["baseline_s"] = time.perf_counter() - t

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
        last_lossy = reports[lossy[-1]] if lossy else None
        if last_lossy is not None and verified and last_lossy.modified:
            last_lossy.accuracy_drop = evaluation.drop
        precision_fallback, pin = None, None
        if verified and budget is not None:
            files, run_compressed, evaluation, precision_fallback, pin = _precision_fallback(
                tgt, result.model, writer.path, files, run_compressed, score, evaluation, budget)
            if last_lossy is not None and last_lossy.modified:
                last_lossy.accuracy_drop = evaluation.drop
        if not verified and budget is not None:
            # Random data says nothing about accuracy: no layer is given back for it, and an
            # explicit --max-drop fails rather than passing on noise.
            logger.warning("accuracy unverified (no --calib or --eval data): the max_drop %g gate is %s", budget,
                           "failed" if max_drop is not None else "not evaluated")
        control: tuple[Any, ControlResult] | None = None
        cause: PassReport | None = None
        all_wide = tgt.capabilities.fallback == "int16" and all(
            r.options.get("activations") == "int16" for r in reports if r.name == "quantize")
        over = verified and budget is not None and evaluation.drop > budget
        if over:  # only a pass before the quantizing one can be the cause (qnn-legalize completes quantize)
            cause = _drop_source(reports[:quantized.index] if quantized is not None else reports, budget, last_lossy)
        if over and cause is not None:
            logger.warning("the drop comes from %s (drop %.6f right after it, budget %g), not quantization: giving "
                           "quantized layers back cannot meet the budget; lower %s's level or recover its loss",
                           cause.name, cause.accuracy_drop, budget, cause.name)
        elif over and all_wide:
            logger.warning("every quantized layer already uses 16-bit activations: accuracy control has nothing to "
                           "promote on target %r", tgt.name)
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
            timings["accuracy_control_s"] = time.perf_counter() - t
            files, run_compressed = control[1].artifact(tgt, result.model, writer.path, pin, files, run_compressed)
        feed = next(eval_set.batches())
        # Against the fp32 baseline in f32 and in the device's default precision (the gain
        # a user on a bf16 CPU sees); the same run where the device's default is f32.
        run_device = tgt.device_reference_runner(baseline, work_dir / "baseline-device")
        baseline_ms = measure_latency(run_baseline, feed, repeats=latency_runs)
        latency = {
            "baseline_ms": baseline_ms,
            "baseline_device_ms": baseline_ms if run_device is None else
            measure_latency(run_device, feed, repeats=latency_runs),
            "compressed_ms": measure_latency(run_compressed, feed, repeats=latency_runs),
            "batch": int(next(iter(feed.values())).shape[0]) if not all(eval_set.stacked.values()) else 1,
            "baseline_precision": getattr(run_baseline, "inference_precision", None),
            "device_precision": getattr(run_device or run_baseline, "inference_precision", None),
            "compressed_precision": getattr(run_compressed, "inference_precision", None),
        }
        if budget is None:
            gate = {"max_drop": None, "passed": None}
        elif verified:
            gate = {"max_drop": budget, "passed": bool(evaluation.drop <= budget + 1e-12)}
            if cause is not None:
                gate["reason"] = (f"the drop comes from {cause.name} (drop {cause.accuracy_drop:.6f} right after it), "
                                  "not quantization")
        else:
            gate = {"max_drop": budget, "passed": False if max_drop is not None else None, "reason": UNVERIFIED_GATE}
        gate_passed = gate["passed"]
        timings["total_s"] = time.perf_counter() - started
        manifest = {
            "compressor": __version__,
            "model": {"source": str(model_path), "format": captured.source_format,
                      "baseline_bytes": _bytes_under(work_dir / "baseline"), **captured.describe()},
            "recipe": recipe_obj.to_json(),
            "target": tgt.describe(),
            "input_spec": [s.to_json() for s in specs],
            "files": file_entries(writer.path, files),
            "passes": [r.to_json() for r in reports],
            "calibration": None if calib_set is None else
            {"source": calib_set.source, "sha256": calib_set.sha256, "samples": len(calib_set)},
            "evaluation": {"source": eval_source, "data": eval_set.source, "sha256": eval_set.sha256,
                           "samples": evaluation.samples, "metric": evaluation.metric,
                           "verified": verified},
            "metrics": {"baseline": evaluation.baseline, "compressed": evaluation.compressed},
            "accuracy_drop": evaluation.drop,
            "accuracy_control": None if control is None else control[1].to_json(tgt.capabilities.fallback),
            "gate": gate,
            "precision_fallback": precision_fallback,
            **({"recovery": recovery.record} if recovery is not None else {}),
            "latency": latency,
            "timings": timings,
            "versions": package_versions(),
        }
        manifest.update(tgt.report(run_compressed, samples=eval_set.batches()))
        writer.commit(manifest)
    return CompressResult(outdir, manifest, evaluation, reports, gate_passed)
