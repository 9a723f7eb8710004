"""What a search writes and prints: ``search.csv``, ``search.json``, ``search.png`` and the table.

The three files replace only those of an earlier search (its ``search.json`` says ``"tool":
"compressor"``); a ``search.*`` of anyone else is refused with exit 2, checked before the
work and again before writing; other files in the folder are never touched. Each file is
written under a temporary name and renamed into place
(:func:`compressor.flow.output_files.write_staged`, as the sweep's). ``search.png`` needs
matplotlib; without it the plot is skipped with a warning (and an earlier search's plot
removed), as ``sweep.png`` is.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import UsageError
from compressor.flow.artifact import TOOL
from compressor.flow.output_files import load_pyplot, write_staged
from compressor.strict_json import write_json

if TYPE_CHECKING:
    from compressor.flow.search import Candidate, SearchResult

__all__ = ["SEARCH_FILES", "check_search_destination", "write_search_files", "format_search_table"]

logger = logging.getLogger(__name__)

#: What a search writes into its output folder (besides ``best/``); nothing else there is touched.
SEARCH_FILES = ("search.csv", "search.json", "search.png")


def check_search_destination(outdir: Path) -> list[str]:
    """The files of an earlier search in ``outdir`` that a new one replaces (``[]``: none).

    Raises:
        UsageError: ``outdir`` is not a folder, or holds search files that are not ours.
    """
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"-o {outdir}: exists and is not a folder; choose another output folder")
    present = [name for name in SEARCH_FILES if (outdir / name).exists() or (outdir / name).is_symlink()]
    if not present:
        return []
    try:
        ours = json.loads((outdir / "search.json").read_text(encoding="utf-8")).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours or any((outdir / name).is_symlink() or not (outdir / name).is_file() for name in present):
        raise UsageError(f"-o {outdir}: holds {', '.join(present)} not written by a compressor search; refusing to "
                         "overwrite them: move them elsewhere or choose another output folder")
    return present


def write_search_files(result: SearchResult, outdir: Path) -> dict[str, Path]:
    """``search.csv``, ``search.json`` and (with matplotlib) ``search.png`` in ``outdir`` (module docstring)."""
    check_search_destination(outdir)
    summary = {"tool": TOOL, "target": result.target, "metric": result.metric, "baseline": result.baseline, "max_drop": result.max_drop,
               "budget_minutes": result.budget_minutes, "ran": result.ran, "not_run": result.not_run,
               "best": None if result.best is None else result.best.index,
               "candidates": [c.to_json() for c in result.candidates]}
    if result.frozen_inputs:
        summary["frozen_inputs"] = result.frozen_inputs
    if result.latency_note:
        summary["latency_note"] = result.latency_note
    return write_staged(outdir, {"search.csv": lambda path: _write_csv(result, path),
                                 "search.json": lambda path: write_json(path, summary),
                                 "search.png": lambda path: _plot(result, path)}, check_search_destination)


def _given_back(c: Candidate, sep: str) -> str:
    return "" if c.given_back is None else sep.join(c.given_back)


def _write_csv(result: SearchResult, path: Path) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["candidate", "calibrator", "alpha", "sparsity", "accuracy_control", result.metric, "drop",
                         "latency_ms", "weight_bytes", "on_front", "rejected", "cache_hits", "given_back"])
        for c in result.candidates:
            writer.writerow([c.index, c.options["calibrator"], "" if c.options["alpha"] is None else c.options["alpha"],
                             c.options["sparsity"], c.options["accuracy_control"], "" if c.metric is None else c.metric,
                             "" if c.drop is None else c.drop, "" if c.latency_ms is None else c.latency_ms,
                             "" if c.weight_bytes is None else c.weight_bytes, c.on_front, c.rejected or "",
                             c.cache_hits, _given_back(c, ";")])
    return path


def _plot(result: SearchResult, path: Path) -> Path | None:
    """Latency vs metric: every measured candidate a point, the front joined, the best marked, the budget line."""
    plt = load_pyplot(path.parent / "search.csv")
    if plt is None:
        return None
    measured = [c for c in result.candidates if c.metric is not None]
    timed = all(c.latency_ms is not None for c in measured)
    x = (lambda c: c.latency_ms) if timed else (lambda c: c.index)  # noqa: E731  (not timed: by candidate)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.scatter([x(c) for c in measured], [c.metric for c in measured], color="tab:blue", label="candidate")
    for c in measured:
        ax.annotate(str(c.index), (x(c), c.metric), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((c for c in measured if c.on_front), key=lambda c: (x(c), -c.metric))
    if front:
        ax.plot([x(c) for c in front], [c.metric for c in front], color="tab:orange", marker="o",
                label="Pareto front")
    if result.best is not None:
        ax.scatter([x(result.best)], [result.best.metric], s=220, marker="*", color="tab:red", zorder=3,
                   label=f"best: candidate {result.best.index}")
    ax.axhline(result.baseline - result.max_drop, color="grey", linestyle="--", linewidth=1,
               label=f"baseline - max_drop ({result.max_drop:g})")
    ax.set_xlabel((f"latency (ms; {result.latency_note})" if result.latency_note else "latency (ms)") if timed
                  else "candidate (latency not timed)")
    ax.set_ylabel("top-1 accuracy" if result.metric == "top1" else "mean cosine to fp32")
    left = len(result.candidates) - len(measured)
    ax.set_title(f"search: {len(measured)} candidates measured" + (f", {left} rejected or not run" if left else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _note(c: Candidate, result: SearchResult) -> str:
    if c is result.best:
        return "best"
    if c.rejected is not None:
        return c.rejected
    return "over max drop" if c.drop is not None and c.drop > result.max_drop + 1e-12 else ""


def format_search_table(result: SearchResult) -> str:
    """The candidates as a text table; ``*`` marks the front, ``best`` the artifact written.

    The note says why a candidate is not the best when it is not obvious: rejected early, not
    run (budget), or measured over the max drop (after giving layers back, when it did).
    """
    header = ["#", "calibrator", "alpha", "sparsity", "control", result.metric, "drop", "latency ms", "KB", "front",
              "given back", "note"]
    rows = [[str(c.index), c.options["calibrator"], "-" if c.options["alpha"] is None else str(c.options["alpha"]),
             f"{c.options['sparsity']:g}", "on" if c.options["accuracy_control"] else "off",
             "-" if c.metric is None else f"{c.metric:.4f}", "-" if c.drop is None else f"{c.drop:.4g}",
             "-" if c.latency_ms is None else f"{c.latency_ms:.3f}",
             "-" if c.weight_bytes is None else f"{c.weight_bytes / 1e3:.1f}", "*" if c.on_front else "",
             _given_back(c, ", ") or "-", _note(c, result)] for c in result.candidates]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
