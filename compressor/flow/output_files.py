"""What the sweep and the search share to write their result files: staging and the plot backend.

A command that writes a few result files beside other files of the user's (``sweep.csv``,
``sweep.json``, ``sweep.png``; ``search.csv``...) writes each one under a temporary name in
the same folder (``.sweep-1a2b3c4d.partial.csv``), checks the folder again, then renames
them into place: an interrupted run leaves no half-written file under a real name, and the
temporary ones are removed whatever happens. matplotlib is optional: without it the plot is
skipped with a warning, and an earlier run's plot, which no longer shows these results, is
removed.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_pyplot", "write_staged"]

logger = logging.getLogger(__name__)


def load_pyplot(instead: Path) -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` without matplotlib.

    Args:
        instead: The file that holds the plotted numbers, named in the warning.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot, the numbers are in %s (pip install matplotlib for "
                       "the plot)", instead)
        return None
    return plt


def write_staged(outdir: Path, writers: Mapping[str, Callable[[Path], Path | None]],
                 recheck: Callable[[Path], Sequence[str]]) -> dict[str, Path]:
    """Write each file of ``writers`` under a temporary name in ``outdir``, then rename them all into place.

    Args:
        outdir: The output folder (created if missing).
        writers: Final file name (``sweep.png``) -> a function writing that file to the path
            it is given; one that returns ``None`` wrote nothing (a plot without matplotlib).
        recheck: Called on ``outdir`` after writing, before renaming: raises if the folder
            now holds files this tool may not replace; returns the names of the earlier
            run's files it may replace.

    Returns:
        The suffix of each file written (``csv``, ``json``, ``png``) -> its path. A file
        whose writer wrote nothing is removed if the earlier run left one (it shows another
        run), and is not in the result.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staged = {name: outdir / f".{Path(name).stem}-{tag}.partial{Path(name).suffix}" for name in writers}
    try:
        written = {name: path for name, path in staged.items() if writers[name](path) is not None}
        earlier = recheck(outdir)  # again: the folder may have changed while the work ran
        files = {}
        for name, path in written.items():
            os.replace(path, outdir / name)
            files[Path(name).suffix.lstrip(".")] = outdir / name
        for name in set(writers) - set(written):
            if name in earlier:
                (outdir / name).unlink()
                logger.info("removed the earlier run's %s: it does not show this one", name)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return files
