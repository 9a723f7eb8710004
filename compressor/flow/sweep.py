"""Sparsity sweeps: one pass at several levels, the metric per level, the essential-sparsity knee.

```
compress sweep MODEL --pass prune-magnitude --levels 0.1,0.2,...,0.9 --eval e.npz [--max-drop D]
```

The model is captured once and run through ``fold-constants`` and ``fold-batchnorm`` once;
then for each level the pass runs on a copy of that model, the target lowers it, and it
is evaluated against the fp32 baseline in the same backend (:mod:`compressor.flow.evaluation`:
top-1 with labels, else cosine fidelity). Levels per pass:

* ``prune-magnitude``: target sparsity, ``0.5`` -> ``{sparsity: 0.5}``;
* ``sparsify-nm``: pattern ``N:M``, ``2:4`` -> ``{n: 2, m: 4}`` (sparsity ``1 - N/M``);
* ``prune-channels``: fraction of output channels removed, ``0.25`` -> ``{ratio: 0.25}``.

The *knee* (essential sparsity, Chen et al. 2023) is the largest sparsity whose drop
stays within ``max_drop``. Written to the output folder: ``sweep.csv`` and ``sweep.json``
always, and ``sweep.png`` (metric vs sparsity) when matplotlib is installed.

Each level is one task of an executor (:mod:`compressor.executor`): in this process by
default, or on Ray with ``--ray``. A task gets the folded model (as bytes), the target, the
data and the baseline's outputs through ``shared`` (on Ray: put in the object store once)
and returns the level's stats and evaluation, and the lowered files when latency is
measured: latency is timed here, in the driver, one level after the other, so tasks running
side by side do not time each other and the rows are the same wherever the levels ran
(only the ``latency_ms`` column is a timing).

The files are written by :mod:`compressor.flow.sweep_output`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from compressor.errors import UsageError
from compressor.executor import Executor, InProcessExecutor
from compressor.flow.artifact import TOOL
from compressor.flow.evaluation import (
    Evaluation,
    collect_outputs,
    compare,
    measure_latency,
)
from compressor.flow.sweep_output import (
    SWEEP_FILES,
    check_sweep_destination,
    format_table,
)
from compressor.flow.sweep_output import write_sweep_files as _write
from compressor.model_io import clone_model, ir_bytes, ir_from_bytes
from compressor.progress import Progress, no_progress

__all__ = ["SWEEPABLE", "SWEEP_FILES", "SweepLevel", "SweepResult", "parse_levels", "sweep", "format_table",
           "check_sweep_destination"]

logger = logging.getLogger(__name__)

#: Pass name -> the option a level sets, and how a level is written.
SWEEPABLE = {
    "prune-magnitude": "sparsity (0..1)",
    "sparsify-nm": "N:M pattern (e.g. 2:4)",
    "prune-channels": "ratio of channels removed (0..1)",
}
HEAD = ("fold-constants", "fold-batchnorm")


@dataclasses.dataclass
class SweepLevel:
    """One level of a sweep and what it measured.

    Attributes:
        level: The level as written (``0.5``, ``2:4``).
        options: The pass options it ran with.
        sparsity: Fraction of weights (or of channels, for ``prune-channels``) removed.
        metric: The metric's value (top-1 or mean cosine).
        drop: Baseline metric minus this one.
        within_budget: ``drop <= max_drop`` (``None`` without a budget).
        stats: The pass's numeric stats.
        latency_ms: Median latency of one eval batch in the target (``None``: not measured).
        evaluation: The full comparison.
    """

    level: str
    options: dict[str, Any]
    sparsity: float
    metric: float
    drop: float
    within_budget: bool | None
    stats: dict[str, Any]
    latency_ms: float | None
    evaluation: Evaluation

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["evaluation"] = self.evaluation.to_json()
        return data


@dataclasses.dataclass
class SweepResult:
    """Everything a sweep measured."""

    model: str
    pass_name: str
    target: str
    metric: str
    baseline: float
    baseline_latency_ms: float | None
    max_drop: float | None
    levels: list[SweepLevel]
    knee: SweepLevel | None
    files: dict[str, Path]
    recovered: list[SweepLevel] = dataclasses.field(default_factory=list)  # --recover: the same levels, recovered
    recovered_knee: SweepLevel | None = None
    frozen_inputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # --freeze: {name: value}
    deployment_cpu: str = "host"  # --target-cpu

    def to_json(self) -> dict[str, Any]:
        extra = {"recovered_knee": None if self.recovered_knee is None else self.recovered_knee.level,
                 "recovered": [lv.to_json() for lv in self.recovered]} if self.recovered else {}
        if self.frozen_inputs:
            extra["frozen_inputs"] = self.frozen_inputs
        if self.deployment_cpu != "host":
            extra["deployment_cpu"] = self.deployment_cpu
        return {**extra,
            "tool": TOOL, "model": self.model, "pass": self.pass_name, "target": self.target, "metric": self.metric,
            "baseline": self.baseline, "baseline_latency_ms": self.baseline_latency_ms, "max_drop": self.max_drop,
            "knee": None if self.knee is None else self.knee.level,
            "levels": [lv.to_json() for lv in self.levels],
        }


def parse_levels(pass_name: str, text: str | Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(level text, pass options)`` for each comma-separated level of ``pass_name``.

    Raises:
        UsageError: an unknown pass or a level that does not parse.
    """
    if pass_name not in SWEEPABLE:
        raise UsageError(f"sweep: pass {pass_name!r} cannot be swept; choose one of "
                         + ", ".join(f"{k} (levels: {v})" for k, v in SWEEPABLE.items()))
    items = [str(t).strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    if not items:
        raise UsageError("sweep: --levels is empty; give comma-separated levels, e.g. 0.1,0.5,0.9")
    out = []
    for item in items:
        try:
            if pass_name == "sparsify-nm":
                n, m = (int(x) for x in item.split(":"))
                out.append((item, {"n": n, "m": m}))
            else:
                key = "sparsity" if pass_name == "prune-magnitude" else "ratio"
                out.append((item, {key: float(item)}))
        except ValueError:
            raise UsageError(f"sweep: level {item!r} of {pass_name} is not a {SWEEPABLE[pass_name]}") from None
    return out


def _sparsity_of(pass_name: str, options: Mapping[str, Any], stats: Mapping[str, Any]) -> float:
    if pass_name == "prune-channels":
        before = stats.get("channels_before") or 0
        return round(stats.get("channels_removed", 0) / before, 4) if before else 0.0
    if "sparsity" in stats:
        return float(stats["sparsity"])
    return 1.0 - options["n"] / options["m"] if pass_name == "sparsify-nm" else float(options.get("sparsity", 0.0))


def _value(ev: Evaluation) -> float:
    return ev.compressed["top1"] if ev.metric == "top1" else ev.compressed["cosine_mean"]


def _knee(levels: Sequence[SweepLevel]) -> SweepLevel | None:
    passing = [lv for lv in levels if lv.within_budget]
    return max(passing, key=lambda lv: (lv.sparsity, -lv.drop)) if passing else None


def _run_level(item: tuple[int, str, dict[str, Any]], shared: Mapping[str, Any]) -> dict[str, Any]:
    """One level, as an executor task: the pass on the folded model, lowered, evaluated.

    Args:
        item: ``(index, level text, pass options)``.
        shared: ``model`` (the folded model, :func:`~compressor.model_io.ir_bytes`),
            ``target``, ``pass``, ``properties``, ``cache`` (a ``PassContext.cache``),
            ``calib``, ``eval``, ``ref`` (the baseline's outputs on ``eval``), ``metric``
            and ``keep_files`` (return the lowered files' bytes, for latency).

    Returns:
        ``stats`` (the pass's numeric stats), ``evaluation`` and ``files``
        (``{name: bytes}``, empty unless ``keep_files``).
    """
    from compressor.pass_manager import PassManager
    from compressor.pipeline import PassContext, build_pass

    index, text, options = item
    tgt = shared["target"]
    step = build_pass(shared["pass"], options, where=f"sweep level {text!r}")
    ctx = PassContext(target=tgt, calibration=shared["calib"], properties=set(shared["properties"]),
                      cache=shared["cache"])
    result = PassManager([step]).run(ir_from_bytes(shared["model"]), ctx, already_run=list(HEAD))
    stats = {k: v for k, v in result.reports[0].stats.items() if not isinstance(v, (dict, list))}
    with tempfile.TemporaryDirectory(prefix=f"compressor-level-{index}-") as work:
        files = tgt.lower(result.model, Path(work))
        run = tgt.runner(files)
        ev = compare(shared["ref"], collect_outputs(run, shared["eval"]), shared["eval"], shared["metric"])
        del run
        lowered = {str(f.relative_to(work)): f.read_bytes() for f in files} if shared["keep_files"] else {}
    return {"stats": stats, "evaluation": ev, "files": lowered}


def sweep(
    model_path: str | Path,
    *,
    pass_name: str,
    levels: str | Sequence[str],
    eval_data: str | Path,
    outdir: str | Path,
    calib: str | Path | None = None,
    target: str = "onnx",
    target_cpu: str = "host",
    max_drop: float | None = None,
    options: Mapping[str, Any] | None = None,
    inputs: Sequence[str] = (),
    freeze: Sequence[str] = (),
    metric: str = "auto",
    trust_pickle: bool = False,
    imports: Sequence[str] = (),
    model_class: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    latency_runs: int = 10,
    on_level: Callable[[int, str], None] | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
    recover: Any = None,
    train: str | Path | None = None,
) -> SweepResult:
    """Run ``pass_name`` at each of ``levels`` and measure each (see the module docstring).

    Args:
        target_cpu: The x86 CPU the levels are built for, as for :func:`compressor.flow.compress.compress`.
        options: Further options of the pass, the same at every level (``{mask: wanda}``).
        trust_pickle, imports, model_class, model_kwargs: How a torch file is loaded
            (:func:`compressor.capture.capture`).
        latency_runs: Timed runs per level in the target (0: no latency).
        on_level: Called with ``(index, level)`` as each level is handed to the executor.
        progress: Factory of progress bars ``(desc, total)``; one bar counts the levels.
        executor: Where the levels run (default: in this process, one after the other).
        recover: A :class:`~compressor.recover.config.RecoverConfig`: each level again, recovered
            (:mod:`compressor.recover.sweep_levels`), trained on ``train`` (else ``calib``).

    Raises:
        UsageError: bad levels or options; CompressorError: as :func:`compressor.flow.compress.compress`.
    """
    from compressor.data import example_inputs, read_npz
    from compressor.flow.calib_eval import capture_with_data
    from compressor.inputs import parse_freeze, parse_input_overrides
    from compressor.pass_manager import PassManager
    from compressor.pipeline import PassContext, build_pass
    from compressor.recipe import check_budget
    from compressor.targets import get_target

    progress = progress or no_progress
    parsed = parse_levels(pass_name, levels)
    extra = dict(options or {})
    clash = sorted(set(extra) & {k for _, o in parsed for k in o})
    if clash:
        raise UsageError(f"sweep: option {clash[0]!r} is what --levels sets; leave it out of --options")
    steps = [build_pass(pass_name, {**extra, **opts}, where=f"sweep level {text!r}") for text, opts in parsed]
    if max_drop is not None:
        check_budget(max_drop)
    tgt = get_target(target, target_cpu)
    outdir = Path(outdir)
    check_sweep_destination(outdir)
    overrides = parse_input_overrides(inputs)
    frozen = parse_freeze(freeze)
    if frozen and recover is not None:
        raise UsageError("sweep --recover with --freeze: the recovery stage trains the module, which still has the "
                         "input; sweep without --recover, or without --freeze")
    raw_eval = read_npz(eval_data, what="eval")  # data errors before the (slow) capture
    raw_calib = read_npz(calib, what="calib") if calib else None
    if raw_calib is None and any(getattr(p, "needs_calibration", False) for p in steps):
        raise UsageError(f"sweep: {pass_name} with options {extra} needs calibration data: pass --calib samples.npz")

    raw_train = read_npz(train, what="train") if train else None
    if recover is not None and raw_train is None and raw_calib is None:
        raise UsageError("sweep --recover fine-tunes each level and needs samples: pass --train X.npz (or at least "
                         "--calib X.npz)")
    prepared = capture_with_data(model_path, overrides, frozen, raw_calib, raw_eval,
                                 {"trust_pickle": trust_pickle, "imports": imports, "model_class": model_class,
                                  "model_kwargs": model_kwargs})
    captured, raw_calib, raw_eval = prepared.captured, prepared.raw_calib, prepared.raw_eval
    model, eval_set, calib_set = captured.model, prepared.eval, prepared.calib
    baseline = clone_model(model)
    ctx = PassContext(target=tgt, calibration=calib_set, properties={"captured"})
    head = [build_pass(name, {}) for name in HEAD]
    snapshot = PassManager(head).run(model, ctx).model
    properties = set(ctx.properties)

    feed = next(eval_set.batches())
    executor = executor or InProcessExecutor()
    items = [(index, text, {**extra, **opts}) for index, (text, opts) in enumerate(parsed)]
    results: list[SweepLevel] = []
    with tempfile.TemporaryDirectory(prefix="compressor-sweep-") as work:
        work_dir = Path(work)
        run_baseline = tgt.reference_runner(baseline, work_dir / "baseline")
        with progress("baseline", sum(1 for _ in eval_set.batches())) as bar:
            ref = collect_outputs(run_baseline, eval_set, progress=bar.update)
        base_ev = compare(ref, ref, eval_set, metric)
        base_value = base_ev.baseline["top1"] if base_ev.metric == "top1" else 1.0
        base_latency = measure_latency(run_baseline, feed, repeats=latency_runs) if latency_runs > 0 else None
        shared = {"model": ir_bytes(snapshot), "target": tgt, "pass": pass_name, "properties": sorted(properties),
                  "cache": ctx.cache, "calib": calib_set, "eval": eval_set, "ref": ref, "metric": metric,
                  "keep_files": latency_runs > 0}
        for index, text, _ in items:
            if on_level:
                on_level(index, text)
        with progress(f"sweep {pass_name}", len(items), "level") as bar:
            outs = executor.map(_run_level, items, shared=shared, labels=[f"level {t}" for _, t, _ in items],
                                progress=bar.update)
        for (index, text, opts), out in zip(items, outs):
            ev, stats = out["evaluation"], out["stats"]
            latency = None
            if latency_runs > 0:  # here, level after level: see the module docstring
                folder = work_dir / f"level-{index}"
                files = []
                for name, data in out["files"].items():
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_bytes(data)
                    files.append(folder / name)
                run = tgt.runner(files)
                latency = measure_latency(run, feed, repeats=latency_runs)
                del run
            within = None if max_drop is None else bool(ev.drop <= max_drop + 1e-12)
            results.append(SweepLevel(text, opts, _sparsity_of(pass_name, opts, stats), _value(ev), ev.drop, within,
                                      stats, latency, ev))
            logger.info("level %s: %s %.4f (drop %.4f)", text, ev.metric, _value(ev), ev.drop)
        recovered = []
        if recover is not None:
            from compressor.recover.sweep_levels import recovered_levels

            recovered = recovered_levels(Path(model_path), captured, pass_name, items, recover, raw_train or raw_calib,
                                         calib_set, eval_set, ref, metric, tgt, max_drop, progress=progress,
                                         load={"trust_pickle": trust_pickle, "imports": tuple(imports),
                                               "model_class": model_class, "model_kwargs": model_kwargs},
                                         overrides=overrides, example_inputs=example_inputs(raw_calib, raw_eval))
    outcome = SweepResult(str(model_path), pass_name, tgt.name, base_ev.metric, base_value, base_latency, max_drop,
                          results, _knee(results), {}, recovered, _knee(recovered), prepared.frozen_json(),
                          target_cpu)
    outcome.files = _write(outcome, outdir)
    return outcome
