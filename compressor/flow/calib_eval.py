"""Which samples calibrate and which evaluate, in one ``compress`` run.

The rules of DESIGN's "Data the CLI takes": an ``--eval`` file evaluates; without one a
held-out part of ``--calib`` does (the recipe's ``calibration.holdout``); with no data at
all the run calibrates and evaluates on random inputs, loudly, and its accuracy is
unverified. A recipe that calibrates is refused when only ``--eval`` data is given, before
any long work (:func:`check_data_needs`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor.capture import Captured, capture
from compressor.data import Dataset, RawData, example_inputs, random_dataset
from compressor.errors import UnsupportedModel, UsageError
from compressor.inputs import (
    InputSpec,
    check_tensor_io,
    freeze_data,
    freeze_inputs,
    model_input_specs,
)
from compressor.recipe import Recipe

__all__ = ["UNVERIFIED", "RANDOM_SAMPLES", "Prepared", "RunData", "apply_freeze", "capture_with_data",
           "check_data_needs", "pick_eval", "choose_sets"]

logger = logging.getLogger(__name__)

#: ``evaluation.source`` when no --calib/--eval data was given.
UNVERIFIED = "random (unverified)"
#: ``evaluation.source`` when the evaluation samples are split from --calib.
HOLDOUT = "calibration holdout"

RANDOM_SAMPLES = 32


@dataclasses.dataclass
class RunData:
    """The run's calibration and evaluation sets, and where the evaluation set came from.

    Attributes:
        calib: Calibration samples (``None``: none given, and the evaluation set is real).
        eval: Evaluation samples.
        source: ``eval file``, :data:`HOLDOUT` or :data:`UNVERIFIED`.
    """

    calib: Dataset | None
    eval: Dataset
    source: str

    @property
    def verified(self) -> bool:
        """Whether the accuracy figures come from real samples."""
        return self.source != UNVERIFIED


def check_data_needs(recipe: Recipe, passes: list[Any], calib: RawData | None, eval_data: RawData | None) -> None:
    """Refuse, before any long work, a recipe that calibrates when only --eval data is given.

    With no data at all the flow calibrates on random inputs (loudly, accuracy unverified);
    with evaluation data but no calibration data that would quietly calibrate on noise.

    Raises:
        UsageError: names the pass that needs calibration data.
    """
    if calib is not None or eval_data is None:
        return
    needing = [p.name for p in passes if getattr(p, "needs_calibration", False)]
    if needing:
        raise UsageError(f"pass {needing[0]!r} of recipe {recipe.name!r} needs calibration data, and only --eval "
                         "was given: pass --calib X.npz with samples like those the model sees in use (other "
                         "than the --eval samples, or the accuracy figures are optimistic)")


def pick_eval(recipe: Recipe, calib: Dataset | None, eval_data: Dataset | None,
              specs: list[InputSpec]) -> tuple[Dataset | None, Dataset, str]:
    """Decide the calibration and evaluation sets (see DESIGN: Data the CLI takes)."""
    if eval_data is not None:
        return calib, eval_data, "eval file"
    if calib is not None and len(calib) >= 2:
        held = max(1, int(round(len(calib) * recipe.calibration.holdout)))
        held = min(held, len(calib) - 1)
        logger.warning("no --eval given: evaluating on the last %d of %d calibration samples (held out from "
                       "calibration)", held, len(calib))
        return calib.subset(0, len(calib) - held), calib.subset(len(calib) - held, len(calib)), HOLDOUT
    logger.warning("NO DATA GIVEN: calibrating and evaluating on random inputs; the accuracy figures are NOT "
                   "verified. Pass --calib and --eval with real samples.")
    rand = random_dataset(specs, RANDOM_SAMPLES, recipe.calibration.seed)
    return (calib if calib is not None else rand), rand, UNVERIFIED


def choose_sets(recipe: Recipe, calib: Dataset | None, eval_data: Dataset | None,
                specs: list[InputSpec]) -> RunData:
    """:func:`pick_eval`, then check that each set batches the way the model takes it.

    Raises:
        DataError: a set whose samples cannot be batched for the model (the message says
            when the evaluation samples were split from ``--calib``).
    """
    calib, eval_data, source = pick_eval(recipe, calib, eval_data, specs)
    held = " (split from --calib for evaluation; pass --eval with its own samples)" if source == HOLDOUT else ""
    if calib is not None:
        calib.check_batches(f"calibration data{held}")
    eval_data.check_batches(f"evaluation data{held}")
    return RunData(calib, eval_data, source)


def apply_freeze(model: ir.Model, frozen: dict[str, tuple[float, ...]], *raws: RawData | None
                 ) -> tuple[dict[str, np.ndarray], list[RawData | None]]:
    """``--freeze`` on a captured model, in place: the inputs become constants and what depended
    on them alone is folded now (:mod:`compressor.inputs`); the data files' columns for them are
    checked and dropped. Returns the frozen arrays and ``raws`` without those columns.

    Folding here, not in the recipe, so that the baseline and the target's check see the
    folded graph: a target must not be asked to run an ``If`` the frozen value decides (HTP
    has none), and ONNX Runtime 1.32 crashes (SIGSEGV) building a session of silero-vad with
    ``sr`` frozen and static shapes. Folding is exact.

    Raises:
        DataError: as :func:`~compressor.inputs.freeze_inputs` and :func:`~compressor.inputs.freeze_data`.
        UnsupportedModel: an ``If`` on a now-constant condition that folding left (exit 4).
    """
    from compressor.passes._graph import label
    from compressor.pipeline import PassContext, build_pass

    arrays = freeze_inputs(model, frozen)
    if not arrays:
        return arrays, list(raws)
    raws_left = [None if raw is None else dataclasses.replace(raw, arrays=freeze_data(raw.arrays, arrays, raw.where))
                 for raw in raws]
    logger.info("inputs frozen to constants: %s", ", ".join(f"{k}={v.tolist()}" for k, v in arrays.items()))
    build_pass("fold-constants", {}, where="--freeze").run(model, PassContext())
    left = [(label(n), "its condition is a constant once the inputs are frozen, but folding did not inline it")
            for n in model.graph if n.op_type == "If" and n.inputs[0] is not None and n.inputs[0].const_value is not None]
    if left:  # a runtime would be handed it (ONNX Runtime 1.32 crashed on silero-vad's): stop here
        raise UnsupportedModel("--freeze", left)
    return arrays, raws_left


@dataclasses.dataclass
class Prepared:
    """A captured model with its inputs frozen, and the data files validated against it.

    Attributes:
        captured: What capture returned; its model has the ``--input`` shapes, the frozen
            inputs as constants and what they decided folded away.
        frozen: The frozen inputs' arrays (``{}``: none).
        specs: The model's inputs after freezing.
        raw_calib, raw_eval: The data files without the frozen inputs' columns.
        calib, eval: Those files validated against ``specs`` (``None`` where not given).
    """

    captured: Captured
    frozen: dict[str, np.ndarray]
    specs: list[InputSpec]
    raw_calib: RawData | None
    raw_eval: RawData | None
    calib: Dataset | None
    eval: Dataset | None

    def frozen_json(self) -> dict[str, Any]:
        """``frozen_inputs`` as manifests and result files record it: ``{name: value}``."""
        return {name: value.tolist() for name, value in self.frozen.items()}


def capture_with_data(model_path: str | Path, overrides: Mapping[str, Any], frozen: dict[str, tuple[float, ...]],
                      raw_calib: RawData | None, raw_eval: RawData | None, load: Mapping[str, Any]) -> Prepared:
    """Capture the model, freeze its ``--freeze`` inputs (:func:`apply_freeze`), validate the data:
    what ``compress``, ``compress sweep`` and ``compress search`` do alike before their own work.

    Args:
        overrides: Parsed ``--input`` flags (:func:`~compressor.inputs.parse_input_overrides`).
        frozen: Parsed ``--freeze`` flags (:func:`~compressor.inputs.parse_freeze`).
        load: How a torch file is loaded: ``trust_pickle``, ``imports``, ``model_class``,
            ``model_kwargs`` of :func:`compressor.capture.capture`.

    Raises:
        CompressorError: as :func:`~compressor.capture.capture`, :func:`apply_freeze`,
            :func:`~compressor.inputs.check_tensor_io` and :meth:`RawData.validate`.
    """
    captured = capture(Path(model_path), input_overrides=overrides, example_inputs=example_inputs(raw_calib, raw_eval),
                       frozen=frozen, **load)
    arrays, (raw_calib, raw_eval) = apply_freeze(captured.model, frozen, raw_calib, raw_eval)
    check_tensor_io(captured.model)
    specs = model_input_specs(captured.model)
    return Prepared(captured, arrays, specs, raw_calib, raw_eval,
                    raw_calib.validate(specs) if raw_calib is not None else None,
                    raw_eval.validate(specs) if raw_eval is not None else None)
