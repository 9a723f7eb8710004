"""A finer activation scheme, tried where the target's first one breaks the accuracy budget.

A target may quantize activations in a scheme that runs faster but rounds coarser than
another it supports: OpenVINO on AMX CPUs, int8 symmetric activations without zero points,
against uint8 with them (``OpenVinoTarget.scheme_fallback``; a skewed range, a SiLU's or a
hardswish's, gets a step up to twice as coarse). Where the first artifact's drop (after its
precision fallback) breaks the budget, the passes run again from the same model for the
target :meth:`~compressor.targets.base.Target.scheme_fallback` returns, that artifact is
lowered into the run's work folder and judged the same way, and the flow keeps whichever
drop is lower; accuracy control then starts from it. Recorded in the manifest as
``scheme_fallback`` (both schemes and drops, which was kept, whether the budget holds).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compressor.flow.evaluation import Evaluation, drop_order
from compressor.flow.precision_fallback import try_precision_fallback
from compressor.pass_manager import PipelineResult

__all__ = ["SchemeTry", "try_scheme_fallback"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SchemeTry:
    """The fallback scheme's artifact, lowered into ``folder``, and how it did."""

    target: Any
    result: PipelineResult
    folder: Path
    files: list[Path]
    run: Any
    evaluation: Evaluation
    outputs: list[Any]
    precision_fallback: dict[str, Any] | None
    pin: str | None
    record: dict[str, Any]

    @property
    def kept(self) -> bool:
        return bool(self.record["kept"])


def try_scheme_fallback(tgt: Any, alt: Any, first: Evaluation, first_pin: str | None, budget: float,
                        run_passes: Callable[[], PipelineResult], score: Callable[..., Evaluation],
                        last_outputs: Callable[[], list[Any]], folder: Path) -> SchemeTry:
    """The passes again for ``alt`` (``tgt.scheme_fallback()``), lowered into ``folder`` and judged
    (module docstring); called where ``first`` broke the budget.

    Args:
        tgt: The target of the first artifact.
        alt: The same target with the finer scheme.
        first: The first artifact's evaluation (after its precision fallback).
        first_pin: The float precision pinned in the first artifact (``None``: none).
        budget: The largest drop allowed.
        run_passes: Runs the recipe's passes for ``alt``, from the model the first run started from.
        score: Evaluates a runner (``score(run, desc)``).
        last_outputs: The outputs of the last evaluation ``score`` made.
        folder: Where the fallback's artifact is lowered (in the run's work folder).
    """
    result = run_passes()
    files = alt.lower(result.model, folder)
    run = alt.runner(files)
    evaluation = score(run, "evaluate (scheme fallback)")
    outputs = last_outputs()
    files, run, evaluation, precision, pin = try_precision_fallback(alt, result.model, folder, files, run, score,
                                                                    evaluation, budget)
    kept = drop_order(evaluation.drop) < drop_order(first.drop)
    record = {"scheme": tgt.describe().get("activations"), "drop": first.drop, "pinned": first_pin,
              "fallback": alt.describe().get("activations"), "fallback_drop": evaluation.drop, "fallback_pinned": pin,
              "kept": kept, "budget_holds": bool(evaluation.drop <= budget)}
    logger.warning("accuracy drop %.6f > max_drop %g with activations %s; with %s: %.6f%s", first.drop, budget,
                   record["scheme"], record["fallback"], evaluation.drop, ": kept" if kept else ": not kept")
    return SchemeTry(alt, result, folder, files, run, evaluation, outputs, precision, pin, record)
