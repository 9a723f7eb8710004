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
)
from compressor.executor import Executor
from compressor.flow.accuracy import (
    EXCLUDE_KEY,
    WIDE_KEY,
    ControlResult,
    candidate_error,
    control_accuracy,
    rank_layers,
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
from compressor.model_io import ir_bytes, model_bytes
from compressor.pass_manager import PassManager, PassReport
from compressor.pipeline import PassContext
from compressor.progress import Progress, no_progress
from compressor.recipe import Recipe, load_recipe
from compressor.targets import get_target
from compressor.targets.onnx import OrtRunner

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


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


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


def _first_line(err: BaseException) -> str:
    """The first line of a backend error, without ONNX Runtime's status prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split("] : ", 1)[-1] if text.startswith("[ONNXRuntimeError]") else text
    text = text.removeprefix("1 : FAIL : ")
    return text if len(text) <= 300 else text[:297] + "..."


def _quantized_layers(reports: list[PassReport]) -> list[str]:
    return [name for r in reports for name in r.stats.get("layers", [])]


def _control(tgt: Any, snapshot: ir.Model, tail_passes: list[Any], ctx: PassContext, layers: list[str],
             score: Callable[[Any], Evaluation], first: Evaluation, accuracy: Any, eval_set: Dataset,
             run_baseline: Any, work_dir: Path, progress: Progress,
             executor: Executor | None = None) -> tuple[Any, ControlResult]:
    """Re-run the tail of the pipeline giving layers back until the budget holds (ranking on ``executor``)."""
    key = WIDE_KEY if tgt.capabilities.fallback == "int16" else EXCLUDE_KEY
    built: dict[frozenset[str], Any] = {}

    def rebuild(given: frozenset[str]) -> Any:
        ctx.options[key] = tuple(sorted(given))
        return PassManager(tail_passes, verify=False).run(_clone(snapshot), ctx)

    def build(given: frozenset[str]) -> Any:
        folder = work_dir / f"control-{len(built)}"
        built[given] = rebuild(given)
        return tgt.runner(tgt.lower(built[given].model, folder))

    ranking_data = eval_set.subset(0, min(len(eval_set), accuracy.ranking_samples))
    runtime, ranking_ref = "target", None
    if accuracy.ranking_backend == "onnxruntime":
        try:
            ranking_ref = collect_outputs(OrtRunner(snapshot), ranking_data)
            runtime = "onnxruntime"
        except Exception as exc:  # e.g. a target-specific op ONNX Runtime's CPU has no kernel for
            logger.warning("accuracy control: ONNX Runtime cannot run this model (%s); ranking on the target",
                           _first_line(exc))
    if ranking_ref is None:
        ranking_ref = collect_outputs(run_baseline, ranking_data)
    max_steps = int(accuracy.max_fallback * len(layers))
    logger.warning("accuracy drop %.6f > max_drop %.6f: ranking %d quantized layers by sensitivity "
                   "(at most %d may be given back)", first.drop, accuracy.max_drop, len(layers), max_steps)
    shared = {"snapshot": ir_bytes(snapshot), "passes": tail_passes, "key": key, "runtime": runtime,
              "context": dataclasses.replace(ctx, progress=no_progress), "data": ranking_data, "ref": ranking_ref}
    with progress("rank layers", len(layers) + 1, "layer") as bar:
        ranking = rank_layers(layers, candidate_error, shared, executor=executor, progress=bar.update)
    outcome = control_accuracy(layers=layers, build=build, evaluate=score, first=first, budget=accuracy.max_drop,
                               max_steps=max_steps, ranking=ranking)
    outcome.ranking_backend = runtime
    final = built.get(frozenset(outcome.given_back)) or rebuild(frozenset(outcome.given_back))
    ctx.options.pop(key, None)
    return final, outcome


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
    passes = recipe_obj.build_passes()
    tgt = get_target(target)
    overrides = parse_input_overrides(inputs)
    raw_calib = read_npz(calib, what="calib") if calib else None
    raw_eval = read_npz(eval_data, what="eval") if eval_data else None
    _check_data_needs(recipe_obj, passes, raw_calib, raw_eval)

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
    baseline = _clone(model)
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
                                f"({eval_set.source}): {_first_line(err)}; check that the data is valid input "
                                "for the model (shapes, dtypes, value ranges) and that the model runs there "
                                "as it is") from None
        timings["baseline_s"] = time.perf_counter() - t

        def score(run: Any, desc: str = "evaluate") -> Evaluation:
            with progress(desc, batches) as bar:
                return compare(ref, collect_outputs(run, eval_set, progress=bar.update), eval_set, metric)

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
                          properties={"captured"}, progress=progress)
        # Passes up to the first that needs calibration run once; that one and the rest are the
        # "tail" that accuracy control re-runs with layers given back.
        split = next((i for i, p in enumerate(passes) if getattr(p, "needs_calibration", False)), len(passes))
        t = time.perf_counter()
        head = PassManager(passes[:split], dump_dir=dump_passes, on_pass=on_pass, after_pass=measure(0)).run(model, ctx)
        snapshot = _clone(head.model) if split < len(passes) else None
        tail = PassManager(passes[split:], on_pass=lambda i, p: on_pass(split + i, p) if on_pass else None,
                           after_pass=measure(split))
        result = tail.run(head.model, ctx, already_run=[p.name for p in passes[:split]]) if split < len(passes) else head
        reports = head.reports + (result.reports if split < len(passes) else [])
        timings["passes_s"] = time.perf_counter() - t

        t = time.perf_counter()
        files = tgt.lower(result.model, writer.path)
        timings["lower_s"] = time.perf_counter() - t
        run_compressed = tgt.runner(files)
        t = time.perf_counter()
        evaluation = score(run_compressed)
        timings["evaluate_s"] = time.perf_counter() - t
        last_lossy = reports[lossy[-1]] if lossy else None
        if last_lossy is not None and verified and last_lossy.modified:
            last_lossy.accuracy_drop = evaluation.drop
        budget = recipe_obj.accuracy.max_drop
        if not verified and budget is not None:
            # Random data says nothing about accuracy: no layer is given back for it, and an
            # explicit --max-drop fails rather than passing on noise.
            logger.warning("accuracy unverified (no --calib or --eval data): the max_drop %g gate is %s", budget,
                           "failed" if max_drop is not None else "not evaluated")
        control: tuple[Any, ControlResult] | None = None
        cause: PassReport | None = None
        quantized_layers = _quantized_layers(reports)
        all_wide = tgt.capabilities.fallback == "int16" and all(
            r.options.get("activations") == "int16" for r in reports if r.name == "quantize")
        over = verified and budget is not None and evaluation.drop > budget
        if over:
            cause = _drop_source(reports, budget, last_lossy)
        if over and cause is not None:
            logger.warning("the drop comes from %s (drop %.6f right after it, budget %g), not quantization: giving "
                           "quantized layers back cannot meet the budget; lower %s's level or recover its loss",
                           cause.name, cause.accuracy_drop, budget, cause.name)
        elif over and all_wide:
            logger.warning("every quantized layer already uses 16-bit activations: accuracy control has nothing to "
                           "promote on target %r", tgt.name)
        elif over and snapshot is not None and quantized_layers:
            t = time.perf_counter()
            control = _control(tgt, snapshot, passes[split:], ctx, quantized_layers, score, evaluation,
                               recipe_obj.accuracy, eval_set, run_baseline, work_dir, progress, executor)
            result = control[0]
            reports = head.reports + result.reports
            evaluation = control[1].evaluation
            timings["accuracy_control_s"] = time.perf_counter() - t
            for old in files:
                old.unlink()
            files = tgt.lower(result.model, writer.path)
            run_compressed = tgt.runner(files)
        feed = next(eval_set.batches())
        latency = {
            "baseline_ms": measure_latency(run_baseline, feed, repeats=latency_runs),
            "compressed_ms": measure_latency(run_compressed, feed, repeats=latency_runs),
            "batch": int(next(iter(feed.values())).shape[0]) if not all(eval_set.stacked.values()) else 1,
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
                      "baseline_bytes": len(model_bytes(baseline)), **captured.describe()},
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
            "latency": latency,
            "timings": timings,
            "versions": package_versions(),
        }
        manifest.update(tgt.report(run_compressed, samples=eval_set.batches()))
        writer.commit(manifest)
    return CompressResult(outdir, manifest, evaluation, reports, gate_passed)
