"""The artifact's float precision, pinned when the device's default one breaks the budget.

The artifact is evaluated as it will run: in the device's default float precision (bf16
on CPUs with AVX512-BF16). Over budget there, it is lowered again with the target's
``precision_fallback()`` (f32) pinned and evaluated; the pin is kept when it lowers the
drop (then either the budget holds, or accuracy control goes on from the pinned artifact,
whose float layers no longer add their rounding to the drop), else undone. The pin is
data the caller passes on (``Target.lower_pinned`` for every later lowering, accuracy
control's candidates included), never state left on the target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from compressor.flow.evaluation import Evaluation

__all__ = ["try_precision_fallback"]

logger = logging.getLogger(__name__)


def try_precision_fallback(tgt: Any, model: ir.Model, outdir: Path, files: list[Path], run: Any,
                           score: Callable[..., Evaluation], first: Evaluation,
                           budget: float) -> tuple[list[Path], Any, Evaluation, dict[str, Any] | None, str | None]:
    """Pin the target's fallback float precision in the artifact when the one it was evaluated in breaks the budget.

    See the module docstring.

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
