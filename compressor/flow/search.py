"""Recipe search: a grid of recipe options, each candidate measured, the Pareto front, the best artifact.

```
compress search MODEL --calib c.npz --eval e.npz --max-drop D [--grid YAML] [--budget-minutes M] [-o OUT] [--ray]
```

Each candidate is a recipe: ``fold-constants``, ``fold-batchnorm``, then
``prune-magnitude {sparsity}`` when the sparsity is above 0, then ``quantize {calibrator,
smoothquant: {alpha}}``. The grid (:data:`DEFAULT_GRID`, or ``--grid``) gives the values of
``calibrator``, ``alpha`` (``null``: no SmoothQuant), ``sparsity`` and ``accuracy_control``;
every combination is a candidate and one task of the executor (:mod:`compressor.executor`).

* **Accuracy control** (``accuracy_control: true``, the default): a candidate whose drop
  after ``quantize`` is over ``max_drop`` gives back its most sensitive layers, as
  ``compress --max-drop`` does (:func:`compressor.flow.accuracy.control_on_target`, in the
  candidate's task), and is measured as given back; its row lists the layers. A candidate
  within budget pays nothing, and the ranking goes to the ranking cache
  (:mod:`compressor.flow.ranking_cache`) under the key ``compress`` computes, so writing the
  best artifact, or a later search on the same data, does not rank again. ``false`` keeps
  the candidate as ``quantize`` left it (a cheaper search of a large grid).
* **Wall-clock budget** (``budget_minutes``): tasks start in grid order (prefixes, then
  candidates) while the budget lasts; once it is spent no task starts (on Ray: none is
  submitted; a running one finishes), and each candidate left gets the row
  ``not run: budget of M min spent``. The best within ``max_drop`` among those that ran is
  still written. Timing the candidates and writing the best artifact come after the budget.

* **Early rejection**: after each lossy pass but the last the drop is measured; a candidate
  already over the budget stops there (quantization only adds error) and costs no
  calibration.
* **Pass-result cache**: ``(sha256 of the input model, pass, options, calibration sha256)``
  -> the output model and what the pass provides. The search runs in two maps: first each
  distinct prefix (the passes before ``quantize``) once, with early rejection, filling the
  cache; then each candidate whose prefix is within budget, sent the filled cache, so it
  takes its prefix from there (in process and on Ray alike) and runs only ``quantize``.
  Calibration statistics are shared in process (one ``PassContext.cache``); on Ray each
  candidate task collects its own.
* **Output**: the Pareto front of latency vs metric (no other candidate is both faster and
  better), ``search.csv`` and ``search.json`` in ``-o`` (staged, then renamed into place;
  they replace only an earlier search's, whose ``search.json`` says ``"tool":
  "compressor"``; other files there are left alone), and the best candidate within the
  budget (the fastest on the front, ties to the better metric) written to ``-o/best`` by
  :func:`compressor.flow.compress.compress`, its artifact and manifest those of a plain run.
  Latency is timed in the driver, one candidate after the other, as in the sweep.
  The files are written by :mod:`compressor.flow.search_output` (with ``search.png``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from compressor.errors import UsageError
from compressor.executor import Executor, InProcessExecutor
from compressor.flow.evaluation import collect_outputs, compare, drop_order, measure_latency
from compressor.flow.search_output import check_search_destination, format_search_table, write_search_files
from compressor.model_io import ir_bytes, ir_from_bytes
from compressor.progress import Progress, no_progress

__all__ = ["DEFAULT_GRID", "Candidate", "SearchResult", "search", "format_search_table", "pareto_front"]

logger = logging.getLogger(__name__)

#: calibrator x SmoothQuant alpha (None: off) x prune-magnitude sparsity (0: no pruning) x
#: accuracy control of a candidate over the budget (on: it costs nothing to one within it).
DEFAULT_GRID: dict[str, list[Any]] = {"calibrator": ["minmax", "percentile"], "alpha": [None],
                                      "sparsity": [0.0, 0.2, 0.5], "accuracy_control": [True]}
#: The grid keys that are not recipe options.
SEARCH_OPTIONS = ("accuracy_control",)


@dataclasses.dataclass
class Candidate:
    """One point of the grid and what it measured.

    ``rejected``: why it stopped early, or was not run. ``given_back``: the layers accuracy
    control gave back (``None``: it did not run; ``[]``: it ran and gave none back), and
    ``control`` what it did: each try's ``steps`` (layer, drop, kept), ``budget_met``, and
    ``ranking_cached`` (the ranking came from the ranking cache). ``weight_bytes``: the
    lowered artifact's deployed files, as the manifest's size counts them
    (:func:`~compressor.flow.artifact.deployable_bytes`).
    """

    index: int
    options: dict[str, Any]
    metric: float | None = None
    drop: float | None = None
    latency_ms: float | None = None
    weight_bytes: int | None = None
    rejected: str | None = None
    cache_hits: int = 0
    on_front: bool = False
    given_back: list[str] | None = None
    control: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SearchResult:
    """Every candidate, the front, and the best within budget (``None``: none).

    ``ran``/``not_run``: how many candidates were started / left when ``budget_minutes`` was spent.
    """

    metric: str
    baseline: float
    max_drop: float
    candidates: list[Candidate]
    best: Candidate | None
    files: dict[str, Path]
    budget_minutes: float | None = None
    ran: int = 0
    not_run: int = 0
    frozen_inputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # --freeze: {name: value}
    #: why the times are not the device's (the runner's ``latency_note``: the x86 HTP emulator)
    latency_note: str | None = None
    #: the target the candidates were built and measured for (its ``describe()``: name, versions,
    #: ``deployment_cpu`` for a CPU target), recorded even when no candidate fits the budget
    target: dict[str, Any] = dataclasses.field(default_factory=dict)


def _steps(options: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    quantize: dict[str, Any] = {"calibrator": options["calibrator"], "bias_correction": True}
    if options.get("alpha") is not None:
        quantize["smoothquant"] = {"alpha": options["alpha"]}
    steps = [("fold-constants", {}), ("fold-batchnorm", {})]
    if options.get("sparsity"):
        steps.append(("prune-magnitude", {"sparsity": options["sparsity"]}))
    return steps + [("quantize", quantize)]


def candidate_recipe(options: Mapping[str, Any], samples: int = 256) -> Any:
    """The :class:`~compressor.recipe.Recipe` of one grid point."""
    from compressor.recipe import parse_recipe

    recipe_options = {k: v for k, v in sorted(options.items()) if k not in SEARCH_OPTIONS}
    name = "search-" + "-".join(f"{k}{v}" for k, v in recipe_options.items())
    return parse_recipe({"name": name, "description": f"compress search candidate {recipe_options}",
                         "passes": [{n: o} for n, o in _steps(options)], "calibration": {"samples": samples}},
                        f"search candidate {dict(options)}")


def _run_candidate(item: tuple[int, list[tuple[str, dict[str, Any]]], bool, Any],
                   shared: Mapping[str, Any]) -> dict[str, Any]:
    """One executor task: ``steps`` from the captured model, through the pass-result cache.

    Args:
        item: ``(index, steps, evaluate, control)``. A prefix task (``evaluate`` false) runs
            the steps a group of candidates shares and checks the drop after each lossy one
            (early rejection); a candidate task runs all its steps (the prefix from the
            cache) and is lowered and evaluated, then, over budget with ``control`` (the
            candidate's :class:`~compressor.recipe.Recipe`, budget applied), gives layers
            back (:func:`_control`).
        shared: ``model`` (bytes), ``target``, ``calib``, ``eval``, ``ref``, ``metric``,
            ``max_drop``, ``pass_cache`` and ``stats_cache``.

    Returns:
        ``cache`` (the pass results this task computed), ``cache_hits``, and ``rejected``
        or the candidate's ``metric``, ``drop``, ``weight_bytes``, lowered ``files`` and
        ``given_back`` (``None``: accuracy control did not run).
    """
    from compressor.pass_manager import PassManager
    from compressor.pipeline import PassContext, build_pass

    index, steps, evaluate, control = item
    tgt, data, budget = shared["target"], shared["eval"], shared["max_drop"]
    ctx = PassContext(target=tgt, calibration=shared["calib"], properties={"captured"}, cache=shared["stats_cache"])
    model_data, done, hits, computed, record = shared["model"], [], 0, {}, None
    quantized: tuple[int, bytes, Any] | None = None  # (step, model, record) right after the quantizing step
    with tempfile.TemporaryDirectory(prefix=f"compressor-candidate-{index}-") as work:
        for i, (name, opts) in enumerate(steps):
            step = build_pass(name, opts)
            key = (hashlib.sha256(model_data).hexdigest(), name, json.dumps(step.options_dict(), sort_keys=True),
                   shared["calib"].sha256 if getattr(step, "needs_calibration", False) else "")
            if key in shared["pass_cache"]:
                model_data, provides, record = shared["pass_cache"][key]
                ctx.properties |= set(provides)
                hits += 1
            else:
                out = PassManager([step], verify=False).run(ir_from_bytes(model_data), ctx, already_run=done)
                model_data, record = ir_bytes(out.model), out.reports[-1].quantization
                computed[key] = (model_data, sorted(step.provides), record)
            if record is not None and quantized is None:
                quantized = (i, model_data, record)
                if not evaluate:  # only prefixes fill the cache: a candidate task sees what it was sent,
                    shared["pass_cache"][key] = computed[key]  # in process as on Ray (same cache_hits)
            done.append(name)
            if not evaluate and step.lossy:  # early rejection: the drop so far, on the target's float path
                run = tgt.reference_runner(ir_from_bytes(model_data), Path(work) / f"after-{i}")
                drop = compare(shared["ref"], collect_outputs(run, data), data, shared["metric"]).drop
                if drop_order(drop) > budget + 1e-12:
                    return {"rejected": f"drop {drop:.4f} after {name}", "cache": computed, "cache_hits": hits}
        if not evaluate:
            return {"rejected": None, "cache": computed, "cache_hits": hits}
        lowered_dir = Path(work) / "lowered"
        files = tgt.lower(ir_from_bytes(model_data), lowered_dir)
        run = tgt.runner(files)
        outputs = collect_outputs(run, data)
        ev = compare(shared["ref"], outputs, data, shared["metric"])
        del run
        given_back = done_control = None
        if control is not None and drop_order(ev.drop) > budget + 1e-12 and quantized is not None and quantized[2].layers:
            q, q_data, q_record = quantized  # the passes after it (a target's, e.g. qnn-legalize) re-run
            post = [build_pass(n, o) for n, o in steps[q + 1:]]
            final, outcome = _control(control, q, q_data, q_record, post, ctx, ev, outputs, shared, Path(work))
            ev, given_back = outcome.evaluation, outcome.given_back
            done_control = {"steps": outcome.steps, "budget_met": outcome.met, "ranking_cached": outcome.ranking_cached}
            for old in files:
                old.unlink()
            files = tgt.lower(final, lowered_dir)
        lowered = {str(f.relative_to(lowered_dir)): f.read_bytes() for f in files}
        # the deployed files' bytes, as the manifest's size counts them (read once, above)
        size = sum(len(lowered[str(f.relative_to(lowered_dir))]) for f in tgt.deployable(files))
    metric = ev.compressed["top1"] if ev.metric == "top1" else ev.compressed["cosine_mean"]
    return {"metric": metric, "drop": ev.drop, "weight_bytes": size,
            "files": lowered, "cache": computed, "cache_hits": hits, "given_back": given_back,
            "control": done_control}


def _control(recipe: Any, index: int, quantized: bytes, record: Any, post: list[Any], ctx: Any, first: Any,
             first_outputs: list[Any], shared: Mapping[str, Any], work: Path) -> tuple[Any, Any]:
    """Accuracy control of one candidate over budget, as ``compress --max-drop`` runs it (in this task).

    The ranking is cached under the key :func:`compressor.flow.compress.compress` computes for
    the same recipe and data, so writing this candidate as the best artifact ranks nothing again.

    Returns:
        The model with the layers given back, and the :class:`~compressor.flow.accuracy.ControlResult`.
    """
    from compressor import __version__
    from compressor.flow.accuracy import QuantizedSnapshot, control_on_target, ranking_fields

    tgt, data, ref = shared["target"], shared["eval"], shared["ref"]
    baseline = ir_from_bytes(shared["model"])
    score = lambda run, desc="evaluate": compare(ref, collect_outputs(run, data), data, shared["metric"])  # noqa: E731
    fields = ranking_fields(recipe.to_json(), tgt, baseline, shared["calib"], data, __version__)
    final, outcome = control_on_target(
        tgt, QuantizedSnapshot(index, ir_from_bytes(quantized), record), post, ctx, score, first, first_outputs, ref,
        recipe.accuracy, data, tgt.reference_runner(baseline, work / "baseline"), baseline, work, no_progress, None,
        fields)
    logger.info("%s: gave back %s -> drop %.6f", recipe.name, ", ".join(outcome.given_back) or "nothing",
                outcome.evaluation.drop)
    return final.model, outcome


def _latency(c: Candidate) -> float:
    return 0.0 if c.latency_ms is None else c.latency_ms  # not timed (latency_runs=0): the metric decides


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Measured candidates no other one beats on both latency (lower) and metric (higher).

    A NaN metric (the candidate computes NaN or inf where the baseline does not) is not a
    measurement to trade off: such a candidate is never on the front (every comparison with
    NaN being false, a fast one used to sit there)."""
    measured = [c for c in candidates if c.rejected is None and c.metric is not None and not math.isnan(c.metric)]
    return [c for c in measured
            if not any(_latency(o) <= _latency(c) and o.metric >= c.metric
                       and (_latency(o) < _latency(c) or o.metric > c.metric) for o in measured)]


def _grid(grid: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    grid = {**DEFAULT_GRID, **(grid or {})}
    unknown = sorted(set(grid) - set(DEFAULT_GRID))
    if unknown:
        raise UsageError(f"search: unknown grid key {unknown[0]!r}; valid keys: {', '.join(DEFAULT_GRID)}")
    if any(not isinstance(v, list) or not v for v in grid.values()):
        raise UsageError("search: every grid key takes a non-empty list, e.g. '{sparsity: [0, 0.5]}'")
    odd = [v for v in grid["accuracy_control"] if not isinstance(v, bool)]
    if odd:
        raise UsageError(f"search: accuracy_control takes true or false, got {odd[0]!r}; e.g. "
                         "'{accuracy_control: [false, true]}'")
    keys = list(DEFAULT_GRID)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def check_budget_minutes(minutes: float | None) -> float | None:
    """Return ``minutes`` if it is a usable wall-clock budget (``None``: no budget).

    Raises:
        UsageError: a budget that is not a finite number above 0.
    """
    if minutes is not None and (not math.isfinite(minutes) or minutes <= 0):
        raise UsageError(f"--budget-minutes must be a finite number of minutes above 0 (e.g. 30), got {minutes:g}; "
                         "leave it out to run every candidate")
    return minutes


def search(model_path: str | Path, *, calib: str | Path, eval_data: str | Path, max_drop: float,
           outdir: str | Path, target: str = "onnx", target_cpu: str = "host",
           grid: Mapping[str, Sequence[Any]] | None = None, latency_runs: int = 10,
           executor: Executor | None = None, progress: Progress | None = None,
           budget_minutes: float | None = None, clock: Callable[[], float] = time.monotonic,
           inputs: Sequence[str] = (), freeze: Sequence[str] = (), trust_pickle: bool = False,
           imports: Sequence[str] = (), model_class: str | None = None,
           model_kwargs: Mapping[str, Any] | None = None) -> SearchResult:
    """Run every candidate of ``grid`` and keep the best within ``max_drop`` (module docstring).

    Args:
        target_cpu: The x86 CPU the artifacts will run on, as for :func:`compressor.flow.compress.compress`
            (the candidates are built and the best artifact written for it).
        inputs, freeze: ``--input NAME=SHAPE`` and ``--freeze NAME=VALUE`` texts, as for
            :func:`compressor.flow.compress.compress`: the model is captured and frozen once
            as ``compress`` does it (:func:`~compressor.flow.calib_eval.capture_with_data`),
            and the best candidate's artifact is written with them.
        trust_pickle, imports, model_class, model_kwargs: How a torch file is loaded, as
            for :func:`compressor.flow.compress.compress` (the best artifact is written with
            them too).
        executor: Where the prefixes and candidates run (default: in this process).
        progress: Factory of progress bars ``(desc, total, unit)``: one for the prefixes, one
            for the candidates.
        budget_minutes: Wall-clock minutes for the prefixes and candidates, from the call
            (``None``: no limit); no task starts once they are spent.
        clock: Seconds, monotonic (:func:`time.monotonic`; a test gives its own). Read once
            at the start and once before each task starts.

    Raises:
        UsageError: a bad grid, budget, data or output folder (before any work).
    """
    from compressor.data import read_npz
    from compressor.flow.artifact import check_destination
    from compressor.flow.calib_eval import capture_with_data
    from compressor.flow.compress import compress
    from compressor.inputs import parse_freeze, parse_input_overrides
    from compressor.recipe import check_budget
    from compressor.targets import get_target

    started = clock()
    points = _grid(grid)
    recipes = [candidate_recipe(p) for p in points]  # validates every option now
    check_budget(max_drop)
    check_budget_minutes(budget_minutes)
    outdir = Path(outdir)
    check_search_destination(outdir)
    check_destination(outdir / "best")
    tgt = get_target(target, target_cpu)
    recipes = [r.for_target(tgt) for r in recipes]  # the target's own passes after quantize (qnn-legalize)
    steps = [[(s.name, dict(s.options)) for s in r.passes] for r in recipes]
    overrides, frozen = parse_input_overrides(inputs), parse_freeze(freeze)
    raw_calib, raw_eval = read_npz(calib, what="calib"), read_npz(eval_data, what="eval")
    source = {"trust_pickle": trust_pickle, "imports": tuple(imports), "model_class": model_class,
              "model_kwargs": model_kwargs}
    prepared = capture_with_data(model_path, overrides, frozen, raw_calib, raw_eval, source)  # as compress
    model, calib_set, eval_set = prepared.captured.model, prepared.calib, prepared.eval
    calib_set = calib_set.subset(0, min(len(calib_set), recipes[0].calibration.samples))
    executor = executor or InProcessExecutor()
    progress = progress or no_progress
    feed = next(eval_set.batches())
    spent = None if budget_minutes is None else (lambda: clock() - started >= budget_minutes * 60)
    not_run = f"not run: budget of {budget_minutes:g} min spent" if budget_minutes is not None else ""
    latency_note = None
    with tempfile.TemporaryDirectory(prefix="compressor-search-") as work:
        run_baseline = tgt.reference_runner(model, Path(work) / "baseline")
        ref = collect_outputs(run_baseline, eval_set)
        base = compare(ref, ref, eval_set, "auto")
        shared = {"model": ir_bytes(model), "target": tgt, "calib": calib_set, "eval": eval_set, "ref": ref,
                  "metric": base.metric, "max_drop": max_drop, "pass_cache": {}, "stats_cache": {}}
        # 1. Each prefix (the passes before quantize) once, with early rejection; its results
        #    fill the pass cache the candidates are sent, so on Ray too no candidate redoes one.
        prefixes = list(dict.fromkeys(json.dumps(_steps(p)[:-1]) for p in points))
        with progress("search prefixes", len(prefixes), "prefix") as bar:
            firsts = executor.map(_run_candidate, [(i, json.loads(k), False, None) for i, k in enumerate(prefixes)],
                                  shared=shared, labels=[f"prefix {k}" for k in prefixes], progress=bar.update,
                                  stop=spent)
        for first in firsts:
            shared["pass_cache"].update(first["cache"])
        rejected = {k: first["rejected"] for k, first in zip(prefixes, firsts)}
        rejected.update((k, not_run) for k in prefixes[len(firsts):])  # the budget ran out before them
        # 2. The candidates whose prefix is within budget.
        todo = [i for i, p in enumerate(points) if rejected[json.dumps(_steps(p)[:-1])] is None]
        control = [recipes[i].with_overrides(max_drop=max_drop) if points[i]["accuracy_control"] else None
                   for i in range(len(points))]
        with progress("search candidates", len(todo), "candidate") as bar:
            done = executor.map(_run_candidate, [(i, steps[i], True, control[i]) for i in todo],
                                shared=shared, labels=[f"candidate {points[i]}" for i in todo], progress=bar.update,
                                stop=spent)
        outs = [{"rejected": rejected[json.dumps(_steps(p)[:-1])], "cache_hits": 0} for p in points]
        for i in todo:
            outs[i] = {"rejected": not_run, "cache_hits": 0}
        for i, out in zip(todo, done):
            outs[i] = out
        candidates = []
        for index, (point, out) in enumerate(zip(points, outs)):
            cand = Candidate(index, point, out.get("metric"), out.get("drop"), None, out.get("weight_bytes"),
                             out.get("rejected"), out["cache_hits"], given_back=out.get("given_back"),
                             control=out.get("control"))
            if cand.rejected is None and latency_runs > 0:  # timed here, one after the other
                folder = Path(work) / f"candidate-{index}"
                files = []
                for name, data in out["files"].items():
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_bytes(data)
                    files.append(folder / name)
                runner = tgt.runner(files)
                cand.latency_ms = measure_latency(runner, feed, repeats=latency_runs)
                latency_note = latency_note or getattr(runner, "latency_note", None)
            candidates.append(cand)
            logger.info("candidate %d %s: %s", index, point, cand.rejected or f"drop {cand.drop:.4f}")
    for cand in pareto_front(candidates):
        cand.on_front = True
    within = [c for c in candidates if c.on_front and c.drop is not None and c.drop <= max_drop + 1e-12]
    best = min(within, key=lambda c: (_latency(c), -c.metric, c.index)) if within else None
    base_value = base.baseline["top1"] if base.metric == "top1" else 1.0
    skipped = sum(c.rejected == not_run for c in candidates) if budget_minutes is not None else 0
    if latency_note:
        logger.warning("search: candidate latencies are %s; the front and the best are ordered by them", latency_note)
    if skipped:
        logger.warning("search: the budget of %g min was spent: %d of %d candidates not run", budget_minutes, skipped,
                       len(candidates))
    result = SearchResult(base.metric, base_value, max_drop, candidates, best, {}, budget_minutes,
                          len(candidates) - skipped, skipped, prepared.frozen_json(), latency_note, tgt.describe())
    result.files = write_search_files(result, outdir)
    if best is not None:
        compress(model_path, recipe=recipes[best.index], outdir=outdir / "best", target=target,
                 target_cpu=target_cpu, inputs=inputs, freeze=freeze, calib=calib, eval_data=eval_data,
                 max_drop=max_drop, latency_runs=max(latency_runs, 1), **source)
        result.files["best"] = outdir / "best"
    return result
