"""Recipe search: a grid of recipe options, each candidate measured, the Pareto front, the best artifact.

```
compress search MODEL --calib c.npz --eval e.npz --max-drop D [--grid YAML] [-o OUT] [--ray]
```

Each candidate is a recipe: ``fold-constants``, ``fold-batchnorm``, then
``prune-magnitude {sparsity}`` when the sparsity is above 0, then ``quantize {calibrator,
smoothquant: {alpha}}``. The grid (:data:`DEFAULT_GRID`, or ``--grid``) gives the values of
``calibrator``, ``alpha`` (``null``: no SmoothQuant) and ``sparsity``; every combination is a
candidate and one task of the executor (:mod:`compressor.executor`).

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
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compressor.errors import UsageError
from compressor.executor import Executor, InProcessExecutor
from compressor.flow.artifact import TOOL
from compressor.flow.evaluation import collect_outputs, compare, measure_latency
from compressor.model_io import ir_bytes, ir_from_bytes
from compressor.progress import Progress, no_progress
from compressor.strict_json import write_json

__all__ = ["DEFAULT_GRID", "Candidate", "SearchResult", "search", "format_search_table", "pareto_front"]

logger = logging.getLogger(__name__)

#: calibrator x SmoothQuant alpha (None: off) x prune-magnitude sparsity (0: no pruning).
DEFAULT_GRID: dict[str, list[Any]] = {"calibrator": ["minmax", "percentile"], "alpha": [None],
                                      "sparsity": [0.0, 0.2, 0.5]}
SEARCH_FILES = ("search.csv", "search.json")


@dataclasses.dataclass
class Candidate:
    """One point of the grid and what it measured (``rejected``: why it stopped early)."""

    index: int
    options: dict[str, Any]
    metric: float | None = None
    drop: float | None = None
    latency_ms: float | None = None
    weight_bytes: int | None = None
    rejected: str | None = None
    cache_hits: int = 0
    on_front: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SearchResult:
    """Every candidate, the front, and the best within budget (``None``: none)."""

    metric: str
    baseline: float
    max_drop: float
    candidates: list[Candidate]
    best: Candidate | None
    files: dict[str, Path]


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

    name = "search-" + "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    return parse_recipe({"name": name, "description": f"compress search candidate {dict(options)}",
                         "passes": [{n: o} for n, o in _steps(options)], "calibration": {"samples": samples}},
                        f"search candidate {dict(options)}")


def _run_candidate(item: tuple[int, list[tuple[str, dict[str, Any]]], bool],
                   shared: Mapping[str, Any]) -> dict[str, Any]:
    """One executor task: ``steps`` from the captured model, through the pass-result cache.

    Args:
        item: ``(index, steps, evaluate)``. A prefix task (``evaluate`` false) runs the steps
            a group of candidates shares and checks the drop after each lossy one (early
            rejection); a candidate task runs all its steps (the prefix from the cache) and
            is lowered and evaluated.
        shared: ``model`` (bytes), ``target``, ``calib``, ``eval``, ``ref``, ``metric``,
            ``max_drop``, ``pass_cache`` and ``stats_cache``.

    Returns:
        ``cache`` (the pass results this task computed), ``cache_hits``, and ``rejected``
        or the candidate's ``metric``, ``drop``, ``weight_bytes`` and lowered ``files``.
    """
    from compressor.pass_manager import PassManager
    from compressor.pipeline import PassContext, build_pass

    index, steps, evaluate = item
    tgt, data, budget = shared["target"], shared["eval"], shared["max_drop"]
    ctx = PassContext(target=tgt, calibration=shared["calib"], properties={"captured"}, cache=shared["stats_cache"])
    model_data, done, hits, computed = shared["model"], [], 0, {}
    with tempfile.TemporaryDirectory(prefix=f"compressor-candidate-{index}-") as work:
        for i, (name, opts) in enumerate(steps):
            step = build_pass(name, opts)
            key = (hashlib.sha256(model_data).hexdigest(), name, json.dumps(step.options_dict(), sort_keys=True),
                   shared["calib"].sha256 if getattr(step, "needs_calibration", False) else "")
            if key in shared["pass_cache"]:
                model_data, provides = shared["pass_cache"][key]
                ctx.properties |= set(provides)
                hits += 1
            else:
                out = PassManager([step], verify=False).run(ir_from_bytes(model_data), ctx, already_run=done)
                model_data = ir_bytes(out.model)
                computed[key] = shared["pass_cache"][key] = (model_data, sorted(step.provides))
            done.append(name)
            if not evaluate and step.lossy:  # early rejection: the drop so far, on the target's float path
                run = tgt.reference_runner(ir_from_bytes(model_data), Path(work) / f"after-{i}")
                drop = compare(shared["ref"], collect_outputs(run, data), data, shared["metric"]).drop
                if drop > budget + 1e-12:
                    return {"rejected": f"drop {drop:.4f} after {name}", "cache": computed, "cache_hits": hits}
        if not evaluate:
            return {"rejected": None, "cache": computed, "cache_hits": hits}
        files = tgt.lower(ir_from_bytes(model_data), Path(work) / "lowered")
        run = tgt.runner(files)
        ev = compare(shared["ref"], collect_outputs(run, data), data, shared["metric"])
        del run
        lowered = {str(f.relative_to(Path(work) / "lowered")): f.read_bytes() for f in files}
    metric = ev.compressed["top1"] if ev.metric == "top1" else ev.compressed["cosine_mean"]
    return {"metric": metric, "drop": ev.drop, "weight_bytes": sum(len(b) for b in lowered.values()),
            "files": lowered, "cache": computed, "cache_hits": hits}


def _latency(c: Candidate) -> float:
    return 0.0 if c.latency_ms is None else c.latency_ms  # not timed (latency_runs=0): the metric decides


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Measured candidates no other one beats on both latency (lower) and metric (higher)."""
    measured = [c for c in candidates if c.rejected is None and c.metric is not None]
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
    keys = list(DEFAULT_GRID)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def search(model_path: str | Path, *, calib: str | Path, eval_data: str | Path, max_drop: float,
           outdir: str | Path, target: str = "onnx", grid: Mapping[str, Sequence[Any]] | None = None,
           latency_runs: int = 10, executor: Executor | None = None,
           progress: Progress | None = None) -> SearchResult:
    """Run every candidate of ``grid`` and keep the best within ``max_drop`` (module docstring).

    Args:
        executor: Where the prefixes and candidates run (default: in this process).
        progress: Factory of progress bars ``(desc, total, unit)``: one for the prefixes, one
            for the candidates.

    Raises:
        UsageError: a bad grid, budget, data or output folder (before any work).
    """
    from compressor.capture import capture
    from compressor.data import read_npz
    from compressor.flow.artifact import check_destination
    from compressor.flow.compress import compress
    from compressor.inputs import check_tensor_io, model_input_specs
    from compressor.recipe import check_budget
    from compressor.targets import get_target

    points = _grid(grid)
    recipes = [candidate_recipe(p) for p in points]  # validates every option now
    check_budget(max_drop)
    outdir = Path(outdir)
    _check_destination(outdir)
    check_destination(outdir / "best")
    tgt = get_target(target)
    raw_calib, raw_eval = read_npz(calib, what="calib"), read_npz(eval_data, what="eval")
    model = capture(Path(model_path)).model
    check_tensor_io(model)
    specs = model_input_specs(model)
    calib_set, eval_set = raw_calib.validate(specs), raw_eval.validate(specs)
    calib_set = calib_set.subset(0, min(len(calib_set), recipes[0].calibration.samples))
    executor = executor or InProcessExecutor()
    progress = progress or no_progress
    feed = next(eval_set.batches())
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
            firsts = executor.map(_run_candidate, [(i, json.loads(k), False) for i, k in enumerate(prefixes)],
                                  shared=shared, labels=[f"prefix {k}" for k in prefixes], progress=bar.update)
        for first in firsts:
            shared["pass_cache"].update(first["cache"])
        rejected = {k: first["rejected"] for k, first in zip(prefixes, firsts)}
        # 2. The candidates whose prefix is within budget.
        todo = [i for i, p in enumerate(points) if rejected[json.dumps(_steps(p)[:-1])] is None]
        with progress("search candidates", len(todo), "candidate") as bar:
            done = executor.map(_run_candidate, [(i, _steps(points[i]), True) for i in todo], shared=shared,
                                labels=[f"candidate {points[i]}" for i in todo], progress=bar.update)
        outs = [{"rejected": rejected[json.dumps(_steps(p)[:-1])], "cache_hits": 0} for p in points]
        for i, out in zip(todo, done):
            outs[i] = out
        candidates = []
        for index, (point, out) in enumerate(zip(points, outs)):
            cand = Candidate(index, point, out.get("metric"), out.get("drop"), None, out.get("weight_bytes"),
                             out.get("rejected"), out["cache_hits"])
            if cand.rejected is None and latency_runs > 0:  # timed here, one after the other
                folder = Path(work) / f"candidate-{index}"
                files = []
                for name, data in out["files"].items():
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_bytes(data)
                    files.append(folder / name)
                cand.latency_ms = measure_latency(tgt.runner(files), feed, repeats=latency_runs)
            candidates.append(cand)
            logger.info("candidate %d %s: %s", index, point, cand.rejected or f"drop {cand.drop:.4f}")
    for cand in pareto_front(candidates):
        cand.on_front = True
    within = [c for c in candidates if c.on_front and c.drop is not None and c.drop <= max_drop + 1e-12]
    best = min(within, key=lambda c: (_latency(c), -c.metric, c.index)) if within else None
    base_value = base.baseline["top1"] if base.metric == "top1" else 1.0
    result = SearchResult(base.metric, base_value, max_drop, candidates, best, {})
    result.files = _write(result, outdir)
    if best is not None:
        compress(model_path, recipe=recipes[best.index], outdir=outdir / "best", target=target, calib=calib,
                 eval_data=eval_data, max_drop=max_drop, latency_runs=max(latency_runs, 1))
        result.files["best"] = outdir / "best"
    return result


def _check_destination(outdir: Path) -> None:
    """Refuse an ``outdir`` whose ``search.csv``/``search.json`` another program wrote.

    Raises:
        UsageError: ``outdir`` is not a folder, or holds search files that are not ours.
    """
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"-o {outdir}: exists and is not a folder; choose another output folder")
    present = [name for name in SEARCH_FILES if (outdir / name).exists() or (outdir / name).is_symlink()]
    if not present:
        return
    try:
        ours = json.loads((outdir / "search.json").read_text(encoding="utf-8")).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours or any((outdir / name).is_symlink() for name in present):
        raise UsageError(f"-o {outdir}: holds {', '.join(present)} not written by a compressor search; refusing to "
                         "overwrite them: move them elsewhere or choose another output folder")


def _write(result: SearchResult, outdir: Path) -> dict[str, Path]:
    _check_destination(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staged = {name: outdir / f".{name}.{tag}.partial" for name in SEARCH_FILES}  # renamed into place at the end
    try:
        _write_csv(result, staged["search.csv"])
        write_json(staged["search.json"], {"tool": TOOL, "metric": result.metric, "baseline": result.baseline,
                                           "max_drop": result.max_drop,
                                           "best": None if result.best is None else result.best.index,
                                           "candidates": [c.to_json() for c in result.candidates]})
        _check_destination(outdir)  # again: the folder may have changed during the search
        for name, path in staged.items():
            os.replace(path, outdir / name)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return {"csv": outdir / "search.csv", "json": outdir / "search.json"}


def _write_csv(result: SearchResult, path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["candidate", "calibrator", "alpha", "sparsity", result.metric, "drop", "latency_ms",
                         "weight_bytes", "on_front", "rejected", "cache_hits"])
        for c in result.candidates:
            writer.writerow([c.index, c.options["calibrator"], "" if c.options["alpha"] is None else c.options["alpha"],
                             c.options["sparsity"], "" if c.metric is None else c.metric,
                             "" if c.drop is None else c.drop, "" if c.latency_ms is None else c.latency_ms,
                             "" if c.weight_bytes is None else c.weight_bytes, c.on_front, c.rejected or "",
                             c.cache_hits])


def format_search_table(result: SearchResult) -> str:
    """The candidates as a text table; ``*`` marks the front, ``best`` the artifact written."""
    header = ["#", "calibrator", "alpha", "sparsity", result.metric, "drop", "latency ms", "KB", "front", "note"]
    rows = [[str(c.index), c.options["calibrator"], "-" if c.options["alpha"] is None else str(c.options["alpha"]),
             f"{c.options['sparsity']:g}", "-" if c.metric is None else f"{c.metric:.4f}",
             "-" if c.drop is None else f"{c.drop:.4f}", "-" if c.latency_ms is None else f"{c.latency_ms:.3f}",
             "-" if c.weight_bytes is None else f"{c.weight_bytes / 1e3:.1f}", "*" if c.on_front else "",
             "best" if c is result.best else (c.rejected or "")] for c in result.candidates]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
