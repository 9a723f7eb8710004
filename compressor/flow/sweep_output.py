"""What a sweep writes and prints: ``sweep.csv``, ``sweep.json``, ``sweep.png`` and the table.

The output folder may hold other files; they are never touched. The three files replace
only those of an earlier sweep (its ``sweep.json`` says ``"tool": "compressor"``, or has a
sweep's keys as versions before that marker wrote it); a ``sweep.*`` of anyone else is
refused with exit 2, checked before the work and again before writing. Each file is
written under a temporary name and renamed into place
(:func:`compressor.flow.output_files.write_staged`, shared with the search).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor.errors import UsageError
from compressor.flow.artifact import TOOL
from compressor.flow.output_files import load_pyplot, write_staged
from compressor.strict_json import write_json

if TYPE_CHECKING:
    from compressor.flow.sweep import SweepResult

__all__ = ["SWEEP_FILES", "check_sweep_destination", "write_sweep_files", "format_table"]

logger = logging.getLogger(__name__)

#: What a sweep writes into its output folder; nothing else there is touched.
SWEEP_FILES = ("sweep.csv", "sweep.json", "sweep.png")
#: The keys of a ``sweep.json`` written before the ``tool`` marker.
_EARLIER_KEYS = {"model", "pass", "target", "metric", "baseline", "knee", "levels"}


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


def write_sweep_files(result: SweepResult, outdir: Path) -> dict[str, Path]:
    """``sweep.csv``, ``sweep.json`` and (with matplotlib) ``sweep.png`` in ``outdir`` (module docstring)."""
    check_sweep_destination(outdir)
    return write_staged(outdir, {"sweep.csv": lambda path: _write_csv(result, path),
                                 "sweep.json": lambda path: write_json(path, result.to_json()),
                                 "sweep.png": lambda path: _plot(result, path)}, check_sweep_destination)


def _write_csv(result: SweepResult, path: Path) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["level", "sparsity", result.metric, "drop", "within_budget", "latency_ms", "mflops",
                         "weight_mb_zlib"])
        writer.writerow(["dense", 0.0, result.baseline, 0.0, True if result.max_drop is not None else "",
                         result.baseline_latency_ms if result.baseline_latency_ms is not None else "",
                         _first_stat(result, "mflops_before"), _first_stat(result, "weight_mb_zlib_before")])
        for lv in [*result.levels, *_renamed(result.recovered)]:
            writer.writerow([lv.level, lv.sparsity, lv.metric, lv.drop,
                             "" if lv.within_budget is None else lv.within_budget,
                             "" if lv.latency_ms is None else lv.latency_ms, lv.stats.get("mflops", ""),
                             lv.stats.get("weight_mb_zlib", "")])
    return path


def _renamed(levels: list) -> list:
    """Recovered levels as rows: ``2:4 recovered``."""
    return [dataclasses.replace(lv, level=f"{lv.level} recovered") for lv in levels]


def _first_stat(result: SweepResult, key: str) -> Any:
    return next((lv.stats[key] for lv in result.levels if key in lv.stats), "")


def _plot(result: SweepResult, path: Path) -> Path | None:
    plt = load_pyplot(path.parent / "sweep.csv")
    if plt is None:
        return None
    xs = [0.0] + [lv.sparsity for lv in result.levels]
    ys = [result.baseline] + [lv.metric for lv in result.levels]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o",
            label=f"{result.pass_name}, one-shot" if result.recovered else result.pass_name)
    for x, y, text in zip(xs[1:], ys[1:], (lv.level for lv in result.levels)):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if result.recovered:
        rx = [0.0] + [lv.sparsity for lv in result.recovered]
        ry = [result.baseline] + [lv.metric for lv in result.recovered]
        order = sorted(range(len(rx)), key=lambda i: rx[i])
        ax.plot([rx[i] for i in order], [ry[i] for i in order], marker="s", label=f"{result.pass_name}, recovered")
        if result.recovered_knee is not None:
            ax.axvline(result.recovered_knee.sparsity, color="tab:orange", linestyle=":", linewidth=1.5,
                       label=f"knee recovered: {result.recovered_knee.level}")
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
    for lv in [*result.levels, *_renamed(result.recovered)]:
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
