"""``compress sweep ... --recover``: each sweep level again, recovered by the recovery stage.

For every level the stage runs as a recipe ``fold-constants, fold-batchnorm, <the pass at
that level>`` with the ``recover:`` section given (default :class:`RecoverConfig`): the
one-shot masks of that level, fine-tuned by distillation, then the pass keeping the zeros;
the result is lowered and evaluated against the same baseline outputs as the one-shot
levels. The levels run one after the other in this process (each trains a model; they do
not go to the sweep's executor). The essential-sparsity curve recovered sits beside the
one-shot one (Chen et al. 2023, "The Essential Sparsity", figure of sparsity vs metric
with and without fine-tuning), each with its knee.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compressor.capture import Captured
from compressor.data import Dataset, RawData
from compressor.flow.evaluation import collect_outputs, compare
from compressor.progress import Progress, no_progress
from compressor.recover.config import RecoverConfig

__all__ = ["recovered_levels", "recover_config"]

logger = logging.getLogger(__name__)


def recovered_levels(model_path: Path, dense: Captured, pass_name: str, items: Sequence[tuple[int, str, dict]],
                     recover: RecoverConfig, train: RawData, calib: Dataset | None, eval_set: Dataset,
                     ref: list[Any], metric: str, target: Any, max_drop: float | None, *, load: Mapping[str, Any],
                     overrides: Any, example_inputs: Any, progress: Progress = no_progress) -> list[Any]:
    """One :class:`~compressor.flow.sweep.SweepLevel` per level, recovered (``stats.recovery_steps``: steps run)."""
    from compressor.pass_manager import PassManager
    from compressor.pipeline import PassContext
    from compressor.recipe import AccuracyConfig, CalibrationConfig, PassStep, Recipe
    from compressor.recover.stage import recover_stage
    from compressor.flow.sweep import SweepLevel, _sparsity_of, _value

    out = []
    with progress(f"sweep {pass_name} recovered", len(items), "level") as bar:
        for index, text, options in items:
            recipe = Recipe(name=f"sweep-{pass_name}-{text}", description="sweep level, recovered",
                            passes=(PassStep("fold-constants", {}), PassStep("fold-batchnorm", {}),
                                    PassStep(pass_name, dict(options))),
                            calibration=CalibrationConfig(), accuracy=AccuracyConfig(metric=metric), source="sweep",
                            recover=recover)
            recovery = recover_stage(model_path, recipe, dense, train, calib, target=target, overrides=overrides,
                                     example_inputs=example_inputs, load=load, progress=progress)
            ctx = PassContext(target=target, calibration=calib, properties={"captured"})
            result = PassManager(recovery.recipe.build_passes()).run(recovery.captured.model, ctx)
            stats = {k: v for k, v in result.reports[-1].stats.items() if not isinstance(v, (dict, list))}
            with tempfile.TemporaryDirectory(prefix=f"compressor-recovered-{index}-") as work:
                run = target.runner(target.lower(result.model, Path(work)))
                ev = compare(ref, collect_outputs(run, eval_set), eval_set, metric)
                del run
            logger.info("level %s recovered: %s drop %.4f", text, ev.metric, ev.drop)
            within = None if max_drop is None else bool(ev.drop <= max_drop + 1e-12)
            stats["recovery_steps"] = recovery.record["steps"]
            out.append(SweepLevel(text, dict(options), _sparsity_of(pass_name, options, stats), _value(ev), ev.drop,
                                  within, stats, None, ev))
            bar.update(1)
    return out


def recover_config(values: Mapping[str, Any] | None) -> RecoverConfig:
    """The ``--recover`` options (a YAML mapping, as a recipe's ``recover:``)."""
    from compressor.errors import UsageError
    from compressor.options import parse_options

    config = parse_options(RecoverConfig, dict(values or {}), "sweep --recover")
    if config.qat:
        raise UsageError("sweep --recover: qat: true fake-quantizes for an int8 step, and sweep levels are not "
                         "quantized; drop 'qat', or compress with a recipe that has 'quantize' after its sparsity pass")
    return config
