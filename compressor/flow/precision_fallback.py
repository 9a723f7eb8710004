"""The artifact's float precision, pinned when the device's default one breaks the budget.

The artifact is evaluated as it will run: in the device's default float precision (bf16
on CPUs with AVX512-BF16). Over budget there, it is lowered again with the target's
``precision_fallback()`` (f32) pinned and evaluated; the pin is kept when it lowers the
drop (then either the budget holds, or accuracy control goes on from the pinned artifact,
whose float layers no longer add their rounding to the drop), else undone. The pin is
data the caller passes on (``Target.lower_pinned`` for every later lowering, accuracy
control's candidates included), never state left on the target.

Judged once more after accuracy control (:func:`pin_after_control`): each layer given back
runs float, so in the device's bf16 too, and the float layers' rounding grows with them (on
PP-OCRv4's recogniser the fully quantized model's drop was no lower with f32 pinned, 0.0161
against 0.0157 in bf16, while after seven layers given back it was 0.0079 against 0.0100 and
the gate failed by 0.000016). When control ends over budget with nothing pinned, the final
model is evaluated with the fallback pinned; kept when it lowers the drop, and when it holds
the budget the given-back layers are quantized again, the last given back first, each
kept quantized while the pinned artifact still holds the budget: the pin may make some of
them unnecessary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from compressor.flow.evaluation import Evaluation, drop_order

__all__ = ["pin_after_control", "try_precision_fallback"]

logger = logging.getLogger(__name__)


def _judged(evaluated_in: str | None, first: Evaluation, fallback: str, pinned: Evaluation,
            budget: float) -> dict[str, Any]:
    """The manifest's record of one judgement: both drops, whether the pin is kept (it lowers
    the drop; a NaN drop, an overflow in bf16/f16, is the worst) and whether the budget holds."""
    return {"evaluated_in": evaluated_in, "drop": first.drop, "fallback": fallback, "fallback_drop": pinned.drop,
            "pinned": drop_order(pinned.drop) < drop_order(first.drop),
            "budget_holds": bool(pinned.drop <= budget + 1e-12)}


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
    record = _judged(evaluated_in, first, fallback, pinned, budget)
    kept = record["pinned"]
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


def pin_after_control(given: list[str], evaluation: Evaluation, budget: float, fallback: str,
                      evaluated_in: str | None, evaluate: Callable[[frozenset[str], str], Evaluation],
                      ) -> tuple[list[str], Evaluation, dict[str, Any]]:
    """Accuracy control ended over budget with nothing pinned: ``fallback`` pinned in its final model.

    See the module docstring. ``evaluate(given, precision)`` scores the model with the
    layers ``given`` given back, lowered with ``precision`` pinned.

    Returns:
        The layers given back, the artifact's evaluation and what was tried (the manifest's
        ``precision_fallback`` record; ``pinned``: whether the artifact keeps the pin).
    """
    pinned = evaluate(frozenset(given), fallback)
    record = {**_judged(evaluated_in, evaluation, fallback, pinned, budget), "after_accuracy_control": True,
              "requantized": [], "requantize_tries": []}
    if not record["pinned"]:
        logger.warning("accuracy control ended at drop %.6f in %s, %.6f with %s pinned: not pinned", evaluation.drop,
                       evaluated_in, pinned.drop, fallback)
        return given, evaluation, record
    logger.warning("accuracy control ended at drop %.6f in the device's default float precision (%s) > max_drop %g; "
                   "%s holds %.6f%s: pinned %s in the artifact", evaluation.drop, evaluated_in, budget, fallback,
                   pinned.drop, "" if record["budget_holds"] else " (still over)", fallback)
    if record["budget_holds"]:
        for layer in reversed(list(given)):
            candidate = [name for name in given if name != layer]
            trial = evaluate(frozenset(candidate), fallback)
            ok = trial.drop <= budget + 1e-12
            record["requantize_tries"].append({"layer": layer, "drop": trial.drop, "kept": ok})
            logger.info("precision fallback: %s quantized again -> drop %.6f with %s pinned%s", layer, trial.drop,
                        fallback, "" if ok else f" > max_drop {budget:g}, given back again")
            if ok:
                given, pinned = candidate, trial
                record["requantized"].append(layer)
    record["fallback_drop"] = pinned.drop
    return given, pinned, record
