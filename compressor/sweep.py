"""Sparsity sweeps: one pass at several levels, the metric per level, the essential-sparsity knee.

```
compress sweep MODEL --pass prune-magnitude --levels 0.1,0.2,...,0.9 --eval e.npz [--max-drop D]
```

The model is captured once and run through ``fold-constants`` and ``fold-batchnorm`` once;
then for each level the pass runs on a copy of that model, the target lowers it, and it
is evaluated against the fp32 baseline in the same backend (:mod:`compressor.evaluation`:
top-1 with labels, else cosine fidelity). Levels per pass:

* ``prune-magnitude``: target sparsity, ``0.5`` -> ``{sparsity: 0.5}``;
* ``sparsify-nm``: pattern ``N:M``, ``2:4`` -> ``{n: 2, m: 4}`` (sparsity ``1 - N/M``);
* ``prune-channels``: fraction of output channels removed, ``0.25`` -> ``{ratio: 0.25}``.

The *knee* (essential sparsity, Chen et al. 2023) is the largest sparsity whose drop
stays within ``max_drop``. Written to the output folder: ``sweep.csv`` and ``sweep.json``
always, and ``sweep.png`` (metric vs sparsity) when matplotlib is installed.

The output folder may hold other files; they are never touched. The three files replace
only those of an earlier sweep (its ``sweep.json`` says ``"tool": "compressor"``, or has a
sweep's keys as versions before that marker wrote it); a ``sweep.*`` of anyone else is
refused with exit 2, checked before the work and again before writing. Each file is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from compressor.artifact import TOOL
from compressor.errors import UsageError
from compressor.evaluation import Evaluation, collect_outputs, compare, measure_latency
from compressor.progress import Progress, no_progress
from compressor.strict_json import write_json

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
#: What a sweep writes into its output folder; nothing else there is touched.
SWEEP_FILES = ("sweep.csv", "sweep.json", "sweep.png")
#: The keys of a ``sweep.json`` written before the ``tool`` marker.
_EARLIER_KEYS = {"model", "pass", "target", "metric", "baseline", "knee", "levels"}


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

    def to_json(self) -> dict[str, Any]:
        return {
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


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def sweep(
    model_path: str | Path,
    *,
    pass_name: str,
    levels: str | Sequence[str],
    eval_data: str | Path,
    outdir: str | Path,
    calib: str | Path | None = None,
    target: str = "onnx",
    max_drop: float | None = None,
    options: Mapping[str, Any] | None = None,
    inputs: Sequence[str] = (),
    metric: str = "auto",
    trust_pickle: bool = False,
    imports: Sequence[str] = (),
    model_class: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    latency_runs: int = 10,
    on_level: Callable[[int, str], None] | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Run ``pass_name`` at each of ``levels`` and measure each (see the module docstring).

    Args:
        options: Further options of the pass, the same at every level (``{mask: wanda}``).
        trust_pickle, imports, model_class, model_kwargs: How a torch file is loaded
            (:func:`compressor.capture.capture`).
        latency_runs: Timed runs per level in the target (0: no latency).
        on_level: Called with ``(index, level)`` before each level (progress display).
        progress: Factory of progress bars ``(desc, total)``; one bar counts the levels.

    Raises:
        UsageError: bad levels or options; CompressorError: as :func:`compressor.api.compress`.
    """
    from compressor.capture import capture
    from compressor.data import example_inputs, read_npz
    from compressor.recipe import check_budget
    from compressor.inputs import check_tensor_io, model_input_specs, parse_input_overrides
    from compressor.pass_manager import PassManager
    from compressor.pipeline import PassContext, build_pass
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
    tgt = get_target(target)
    outdir = Path(outdir)
    check_sweep_destination(outdir)
    overrides = parse_input_overrides(inputs)
    raw_eval = read_npz(eval_data, what="eval")  # data errors before the (slow) capture
    raw_calib = read_npz(calib, what="calib") if calib else None
    if raw_calib is None and any(getattr(p, "needs_calibration", False) for p in steps):
        raise UsageError(f"sweep: {pass_name} with options {extra} needs calibration data: pass --calib samples.npz")

    model = capture(Path(model_path), trust_pickle=trust_pickle, input_overrides=overrides,
                    example_inputs=example_inputs(raw_calib, raw_eval), imports=imports, model_class=model_class,
                    model_kwargs=model_kwargs).model
    check_tensor_io(model)
    specs = model_input_specs(model)
    eval_set = raw_eval.validate(specs)
    calib_set = raw_calib.validate(specs) if raw_calib is not None else None
    baseline = _clone(model)
    ctx = PassContext(target=tgt, calibration=calib_set, properties={"captured"})
    head = [build_pass(name, {}) for name in HEAD]
    snapshot = PassManager(head).run(model, ctx).model
    properties = set(ctx.properties)

    feed = next(eval_set.batches())
    results: list[SweepLevel] = []
    with tempfile.TemporaryDirectory(prefix="compressor-sweep-") as work:
        work_dir = Path(work)
        run_baseline = tgt.reference_runner(baseline, work_dir / "baseline")
        with progress("baseline", sum(1 for _ in eval_set.batches())) as bar:
            ref = collect_outputs(run_baseline, eval_set, progress=bar.update)
        base_ev = compare(ref, ref, eval_set, metric)
        base_value = base_ev.baseline["top1"] if base_ev.metric == "top1" else 1.0
        base_latency = measure_latency(run_baseline, feed, repeats=latency_runs) if latency_runs > 0 else None
        levels_bar = progress(f"sweep {pass_name}", len(parsed), "level")
        for index, ((text, opts), step) in enumerate(zip(parsed, steps)):
            if on_level:
                on_level(index, text)
            ctx.properties = set(properties)
            result = PassManager([step]).run(_clone(snapshot), ctx, already_run=list(HEAD))
            stats = {k: v for k, v in result.reports[0].stats.items() if not isinstance(v, (dict, list))}
            files = tgt.lower(result.model, work_dir / f"level-{index}")
            run = tgt.runner(files)
            ev = compare(ref, collect_outputs(run, eval_set), eval_set, metric)
            latency = measure_latency(run, feed, repeats=latency_runs) if latency_runs > 0 else None
            within = None if max_drop is None else bool(ev.drop <= max_drop + 1e-12)
            results.append(SweepLevel(text, {**extra, **opts}, _sparsity_of(pass_name, opts, stats), _value(ev),
                                      ev.drop, within, stats, latency, ev))
            logger.info("level %s: %s %.4f (drop %.4f)", text, ev.metric, _value(ev), ev.drop)
            levels_bar.update(1)
            del run
        levels_bar.close()
    passing = [lv for lv in results if lv.within_budget]
    knee = max(passing, key=lambda lv: (lv.sparsity, -lv.drop)) if passing else None
    outcome = SweepResult(str(model_path), pass_name, tgt.name, base_ev.metric, base_value, base_latency, max_drop,
                          results, knee, {})
    outcome.files = _write(outcome, outdir)
    return outcome


def _earlier_sweep(path: Path) -> str | None:
    """``None`` when ``path`` is a ``sweep.json`` this tool wrote, else why it is not."""
    if path.is_symlink() or not path.is_file():
        return "no sweep.json of this tool beside them"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))  # lenient: earlier versions wrote NaN/Infinity
    except (OSError, UnicodeDecodeError, ValueError):
        return "sweep.json is not valid JSON"
    if not isinstance(data, dict) or not (data.get("tool") == TOOL
                                          or ("tool" not in data and _EARLIER_KEYS <= set(data))):
        return "sweep.json was not written by compressor"
    return None


def check_sweep_destination(outdir: Path) -> list[str]:
    """The files of an earlier sweep in ``outdir`` that a new one replaces (``[]``: none).

    Raises:
        UsageError: ``outdir`` is not a folder, or holds a ``sweep.csv``/``.json``/``.png``
            this tool did not write.
    """
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"-o {outdir}: exists and is not a folder; choose another output folder")
    present = [name for name in SWEEP_FILES if (outdir / name).exists() or (outdir / name).is_symlink()]
    if not present:
        return []
    why = _earlier_sweep(outdir / "sweep.json")
    odd = [name for name in present if (outdir / name).is_symlink() or not (outdir / name).is_file()]
    if why is None and odd:
        why = f"{', '.join(odd)} not a regular file"
    if why is not None:
        raise UsageError(f"-o {outdir}: holds {', '.join(present)} and {why}; refusing to overwrite them: move "
                         "them elsewhere or choose another output folder (other files there are never touched)")
    return present


def _write(result: SweepResult, outdir: Path) -> dict[str, Path]:
    """``sweep.csv``, ``sweep.json`` and (with matplotlib) ``sweep.png`` in ``outdir`` (module docstring)."""
    check_sweep_destination(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staged = {"csv": outdir / f".sweep-{tag}.partial.csv", "json": outdir / f".sweep-{tag}.partial.json",
              "png": outdir / f".sweep-{tag}.partial.png"}
    try:
        with staged["csv"].open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["level", "sparsity", result.metric, "drop", "within_budget", "latency_ms", "mflops",
                             "weight_mb_zlib"])
            writer.writerow(["dense", 0.0, result.baseline, 0.0, True if result.max_drop is not None else "",
                             result.baseline_latency_ms if result.baseline_latency_ms is not None else "",
                             _first_stat(result, "mflops_before"), _first_stat(result, "weight_mb_zlib_before")])
            for lv in result.levels:
                writer.writerow([lv.level, lv.sparsity, lv.metric, lv.drop,
                                 "" if lv.within_budget is None else lv.within_budget,
                                 "" if lv.latency_ms is None else lv.latency_ms, lv.stats.get("mflops", ""),
                                 lv.stats.get("weight_mb_zlib", "")])
        write_json(staged["json"], result.to_json())
        if _plot(result, staged["png"]) is None:
            del staged["png"]
        earlier = check_sweep_destination(outdir)  # again: the folder may have changed during the sweep
        files = {}
        for key, path in staged.items():
            files[key] = outdir / f"sweep.{key}"
            os.replace(path, files[key])
        if "png" not in files and "sweep.png" in earlier:
            (outdir / "sweep.png").unlink()
            logger.info("removed the earlier sweep's sweep.png: it does not show this sweep")
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return files


def _first_stat(result: SweepResult, key: str) -> Any:
    return next((lv.stats[key] for lv in result.levels if key in lv.stats), "")


def _plot(result: SweepResult, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot, the curve is in %s (pip install matplotlib for "
                       "sweep.png)", path.parent / "sweep.csv")
        return None
    xs = [0.0] + [lv.sparsity for lv in result.levels]
    ys = [result.baseline] + [lv.metric for lv in result.levels]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=result.pass_name)
    for x, y, text in zip(xs[1:], ys[1:], (lv.level for lv in result.levels)):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if result.max_drop is not None:
        ax.axhline(result.baseline - result.max_drop, color="grey", linestyle="--", linewidth=1,
                   label=f"baseline - max_drop ({result.max_drop:g})")
    if result.knee is not None:
        ax.axvline(result.knee.sparsity, color="tab:green", linestyle=":", linewidth=1.5,
                   label=f"knee: {result.knee.level}")
    what = "channels removed" if result.pass_name == "prune-channels" else "weight sparsity"
    ax.set_xlabel(f"{what} (fraction)")
    ax.set_ylabel("top-1 accuracy" if result.metric == "top1" else "mean cosine to fp32")
    ax.set_title(f"{Path(result.model).name}: {result.pass_name} on {result.target}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(result: SweepResult) -> str:
    """The sweep as a text table, dense baseline first."""
    channels = result.pass_name == "prune-channels"
    header = ["level", "sparsity", result.metric, "drop", "MB zlib"]
    if channels:
        header.insert(4, "MFLOPs")
    if result.baseline_latency_ms is not None:
        header.append("latency ms")
    if result.max_drop is not None:
        header.append("within budget")
    rows = [["dense", "0.000", f"{result.baseline:.4f}", "0.0000", _fmt(_first_stat(result, "weight_mb_zlib_before"))]]
    if channels:
        rows[0].insert(4, _fmt(_first_stat(result, "mflops_before")))
    if result.baseline_latency_ms is not None:
        rows[0].append(f"{result.baseline_latency_ms:.3f}")
    if result.max_drop is not None:
        rows[0].append("")
    for lv in result.levels:
        row = [lv.level, f"{lv.sparsity:.3f}", f"{lv.metric:.4f}", f"{lv.drop:.4f}", _fmt(lv.stats.get("weight_mb_zlib"))]
        if channels:
            row.insert(4, _fmt(lv.stats.get("mflops")))
        if result.baseline_latency_ms is not None:
            row.append("-" if lv.latency_ms is None else f"{lv.latency_ms:.3f}")
        if result.max_drop is not None:
            row.append("yes" if lv.within_budget else "no")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _fmt(value: Any) -> str:
    if value in (None, ""):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
