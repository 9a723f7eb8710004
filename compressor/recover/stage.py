"""The recovery stage's entry points: :func:`check_recover_inputs`, :func:`recover_stage`, :func:`recover`.

```
model file ─► trainable module (student) + the same, frozen (teacher)
          └─► capture ─► recipe passes up to the last sparsity pass (one-shot: SparseGPT...)
                              └─► pruned weights mapped back to parameters (masks.py)
student ◄─ one-shot weights and masks ─► fine-tune (train.py: distill.py loss, schedule.py masks)
        ─► capture of the recovered module ─► the recipe's passes, the sparsity pass keeping
           the zeros (sparsify-nm {mask: keep}; prune-magnitude by magnitude finds the zeros)
```

With ``qat: true`` the student also trains fake-quantized for the recipe's ``quantize``
step (:mod:`.qat`), and :attr:`Recovery.learned_ranges` carries the learned input ranges
to that step (through ``PassContext.learned_ranges``).

:func:`check_recover_inputs` refuses, before any capture, what cannot work (a recipe
without a sparsity pass, an ONNX input, no data); :func:`recover_stage`
is what the compress flow calls; :func:`recover` is the stage itself. Design notes:
``docs/design.md``, "Recovery stage".
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compressor.capture import Captured
from compressor.data import Dataset, RawData
from compressor.errors import RecipeError, UsageError
from compressor.model_io import clone_model
from compressor.progress import Progress, no_progress
from compressor.recover.config import RecoverConfig

if TYPE_CHECKING:
    from compressor.quant.learned import LearnedRanges

__all__ = ["Recovery", "recover", "recover_stage", "check_recover_inputs", "PRUNING_PASSES", "freeze_embeddings"]

logger = logging.getLogger(__name__)

#: Passes whose masks the stage holds during training.
PRUNING_PASSES = ("sparsify-nm", "prune-magnitude")
_SHAPE_CHANGING = ("prune-channels",)
QAT_WITHOUT_STEPS = ("recover: qat: true learns the activation scales in the global loop, and steps: 0 has none "
                     "(the block phase trains the weights only), so the int8 step would get the untrained initial "
                     "scales; set steps above 0, or drop 'qat'")


@dataclasses.dataclass
class Recovery:
    """What the stage hands to the rest of the flow.

    Attributes:
        captured: The recovered module, captured.
        recipe: The recipe to run on it: its sparsity passes keep the recovered zeros.
        record: The manifest's ``recovery`` record.
        learned_ranges: With ``qat: true``, the activation ranges learned for ``quantize``
            (:class:`~compressor.quant.learned.LearnedRanges`, for the pipeline's ``PassContext``).
    """

    captured: Captured
    recipe: Any
    record: dict[str, Any]
    learned_ranges: LearnedRanges | None = None


def check_recover_inputs(recipe: Any, model_path: Path, train: RawData | None, calib: RawData | None) -> RawData:
    """Refuse, before capture, a recovery that cannot run; return the training data.

    Raises:
        RecipeError: no sparsity pass to hold, or one that changes shapes; ``qat: true``
            without a ``quantize`` step after the sparsity pass, or with ``steps: 0``.
        UsageError: no training or calibration data.
    """
    steps = [s.name for s in recipe.passes]
    bad = [s for s in steps if s in _SHAPE_CHANGING]
    if bad:
        raise RecipeError(f"{recipe.source}: recover: {bad[0]} removes channels (shapes change), so its masks "
                          f"cannot be held on the module; use {' or '.join(PRUNING_PASSES)} with recover, or drop 'recover:'")
    if not any(s in PRUNING_PASSES for s in steps):
        raise RecipeError(f"{recipe.source}: recover: the recipe has no sparsity pass ({', '.join(PRUNING_PASSES)}) "
                          "whose masks the fine-tuning holds; add one, or drop 'recover:'")
    last = max(i for i, s in enumerate(steps) if s in PRUNING_PASSES)
    if recipe.recover.qat and "quantize" not in steps[last + 1:]:
        raise RecipeError(f"{recipe.source}: recover: qat: true fake-quantizes the module for the int8 step that "
                          "follows it, and the recipe has no 'quantize' pass after its sparsity pass; add one, or "
                          "drop 'qat'")
    if recipe.recover.qat and recipe.recover.steps == 0:
        raise RecipeError(f"{recipe.source}: {QAT_WITHOUT_STEPS}")
    if model_path.suffix.lower() == ".onnx":
        from compressor.recover.module import PASS_INSTEAD

        raise UsageError(f"recover: {model_path.name} is an ONNX graph, which cannot be fine-tuned here; "
                         f"{PASS_INSTEAD}")
    if train is not None:
        return train
    if calib is None:
        raise UsageError(f"recipe {recipe.name!r} fine-tunes the model (recover:) and needs samples: pass "
                         "--train X.npz (unlabeled samples like the model sees in use, keyed by input name, as for --calib), or at "
                         "least --calib X.npz")
    logger.warning("recover: no --train data: fine-tuning on the --calib samples (%s); pass --train with other, and "
                   "more, samples for a better recovery", calib.source)
    return calib


def _sha256(raw: RawData) -> str:
    return raw.sha256 or hashlib.sha256(b"".join(a.tobytes() for a in raw.arrays.values())).hexdigest()


def _post_recipe(recipe: Any) -> Any:
    """The recipe run on the recovered module: sparsity passes keep the zeros training left."""
    steps = []
    for step in recipe.passes:
        options = dict(step.options)
        if step.name in ("sparsify-nm", "prune-magnitude"):
            options.pop("sequential", None)  # SparseGPT's statistics: no statistics are read any more
        if step.name == "sparsify-nm":
            options["mask"] = "keep"
        elif step.name == "prune-magnitude":
            options["method"] = "magnitude"  # the zeros are the smallest |w|: the same mask
        steps.append(dataclasses.replace(step, options=options))
    return dataclasses.replace(recipe, passes=tuple(steps))


def recover(model_path: Path, recipe: Any, dense: Captured, train_raw: RawData, calib: Dataset | None,
            capture: Callable[[Path], Captured], *, target: Any = None, overrides: Any = None,
            example_inputs: Mapping[str, np.ndarray] | None = None, load: Mapping[str, Any] | None = None,
            work: Path, progress: Progress = no_progress,
            on_step: Callable[[int, Any], None] | None = None) -> Recovery:
    """Run the recovery stage; see the module docstring.

    Args:
        model_path: The model file (or Hugging Face folder).
        recipe: The recipe (with a ``recover:`` section).
        dense: The dense original, captured (its graph gives the one-shot masks).
        train_raw: Training samples (see :func:`check_recover_inputs`).
        calib: Calibration samples for the one-shot passes (SparseGPT, Wanda).
        capture: Captures a file with the run's options (used for the recovered module).
        target: The target (its capabilities for the passes).
        overrides: Parsed ``--input`` flags.
        example_inputs: The data's first samples (input shapes for modules).
        load: ``trust_pickle``, ``imports``, ``model_class``, ``model_kwargs``.
        work: A scratch folder.
        progress: Progress-bar factory.
        on_step: Called after every optimizer step with ``(step, masks)``.
    """
    import torch

    from compressor.inputs import model_input_specs
    from compressor.pass_manager import PassManager
    from compressor.pipeline import PassContext
    from compressor.recover.masks import map_pruned_weights
    from compressor.recover.module import load_trainable, recapture
    from compressor.recover.schedule import MaskedParam, MaskedParams
    from compressor.recover.train import fine_tune, outputs_on

    cfg: RecoverConfig = recipe.recover
    started = time.perf_counter()
    specs = model_input_specs(dense.model)
    train = train_raw.validate(specs)
    load = dict(load or {})
    student = load_trainable(model_path, **load)
    teacher = load_trainable(model_path, **load)
    for p in teacher.module.parameters():
        p.requires_grad_(False)
    by_blocks = False
    if cfg.block_steps:  # before the one-shot passes: with steps: 0 and no chain of blocks nothing would train
        from compressor.recover.blockwise import usable_blocks

        by_blocks = usable_blocks(student, student.module, train, cfg.batch, model_path.name, cfg.steps == 0)

    # one-shot: the recipe's passes up to its last sparsity pass, on the dense graph
    passes = recipe.build_passes()
    if calib is None:  # SparseGPT/Wanda statistics then come from the training samples
        calib = train.subset(0, min(len(train), recipe.calibration.samples))
    first = next(i for i, p in enumerate(passes) if p.name in PRUNING_PASSES)
    last = max(i for i, p in enumerate(passes) if p.name in PRUNING_PASSES)
    ctx = PassContext(target=target, calibration=calib, seed=recipe.calibration.seed, properties={"captured"},
                      progress=progress)
    clone = clone_model(dense.model)
    before = PassManager(passes[:first], verify=False).run(clone, ctx).model
    before_copy = clone_model(before)
    after = PassManager(passes[first:last + 1], verify=False).run(
        before, ctx, already_run=[p.name for p in passes[:first]]).model

    named = dict(student.module.named_parameters())
    arrays = {n: p.detach().float().numpy() for n, p in named.items() if p.dim() >= 2 and p.is_floating_point()}
    mapped, unmapped = map_pruned_weights(before_copy, after, arrays)
    for name in unmapped:
        logger.warning("recover: pruned weight %r matches no parameter of the module; it trains dense and is pruned "
                       "one-shot after recovery", name)
    if not mapped:
        raise UsageError(f"recover: none of the {len(unmapped)} weights the recipe prunes could be traced to a "
                         f"parameter of {model_path.name}; drop 'recover:' from the recipe")
    nm = next(((p.options.n, p.options.m) for p in passes[first:last + 1] if p.name == "sparsify-nm"), None)
    dense_values = {n: p.detach().clone() for n, p in named.items()}
    held = []
    for mw in mapped:
        param = named[mw.param]
        weight = torch.from_numpy(mw.weight).to(param.dtype)
        mask = torch.from_numpy(mw.mask).to(param.dtype)
        # the shadow starts at the one-shot weights where kept, the dense originals where pruned (PGF regrows them)
        shadow = torch.where(mask.bool(), weight, dense_values[mw.param])
        pattern = ("nm", *nm) if nm is not None else ("count", int(mask.sum()))
        held.append(MaskedParam(mw.param, param, mask, shadow, pattern))
    masks = MaskedParams(held, cfg.steps, cfg.schedule, cfg.pgf_decay)
    qat = _attach_qat(student, model_path, dense, passes[last + 1:], target, calib, cfg) if cfg.qat else None
    if not cfg.train_embeddings:
        frozen = freeze_embeddings(student.module, [named[mw.param] for mw in mapped])
        logger.info("recover: %d embedding tables frozen (train_embeddings: false)", frozen)
    trainable = [p for p in student.module.parameters() if p.requires_grad]
    trainable += [p for p in (qat.parameters() if qat else []) if all(p is not q for q in trainable)]

    n_hold = int(round(len(train) * cfg.holdout))
    holdout = train.subset(len(train) - n_hold, len(train)) if n_hold >= 1 and len(train) - n_hold >= 1 else None
    fit = train.subset(0, len(train) - n_hold) if holdout is not None else train
    logger.info("recover: %d masked weights, %d trainable tensors, %d training samples, %d held out; %d steps of %d",
                len(held), len(trainable), len(fit), 0 if holdout is None else len(holdout), cfg.steps, cfg.batch)
    blocks = None
    # the teacher's held-out outputs, once for the block phase's check and the global loop's evaluations
    eval_batch = min(cfg.batch, len(fit))  # the global loop's evaluations run in batches of this size too
    reference = outputs_on(teacher, holdout, eval_batch) if holdout is not None else None
    if by_blocks:
        from compressor.recover.blockwise import keep_if_better, reconstruct_blocks

        def block_phase() -> Any:
            return reconstruct_blocks(student, teacher, student.module, teacher.module, held, fit, cfg,
                                      model_path.name, progress, on_step)
        blocks = block_phase() if holdout is None else keep_if_better(
            student, reference, student.module, held, holdout, eval_batch, recipe.accuracy.metric, block_phase)
    start = None if blocks is None or blocks.holdout_drop is None else \
        blocks.holdout_drop[1 if blocks.kept else 0]  # the student's drop as the phase left it
    result = fine_tune(student, teacher, trainable, masks, fit, holdout, cfg, recipe.accuracy.metric, progress, on_step,
                       reference, start)
    learned = None
    if qat is not None:
        learned, qat_record = qat.learned_ranges(), qat.record()
        qat.remove()  # the float trained weights are captured; quantize writes the learned quantizers
    broken = masks.check()
    if broken:  # the schedule guarantees it; a failure here is a bug in this package
        raise RuntimeError(f"recover: N:M pattern broken after training in {', '.join(broken[:3])}")

    t = time.perf_counter()
    captured = recapture(student, model_path, work, capture, overrides, example_inputs)
    phase = "" if blocks is None or not blocks.kept else \
        f"block by block ({blocks.steps} steps per block of {blocks.blocks}), then "
    captured.notes.append(f"recovered: {len(held)} masked weights fine-tuned {phase}for {result.steps} steps "
                          f"({cfg.schedule} schedule) by distillation from the dense model")
    record = {
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "schedule": cfg.schedule,
        "seed": cfg.seed,
        "loss_curve": result.curve(),
        "holdout_drop": [[s, round(d, 6)] for s, d in result.evaluations],
        "masked_weights": len(held),
        "unmapped_weights": unmapped,
        "data": {"source": train.source, "sha256": _sha256(train_raw), "samples": len(fit),
                 "holdout": 0 if holdout is None else len(holdout)},
        "train_s": round(result.seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "recapture_s": round(time.perf_counter() - t, 3),
        **({"qat": qat_record} if qat is not None else {}),
        **({"blockwise": blocks.record()} if blocks is not None else {}),
    }
    return Recovery(captured, _post_recipe(recipe), record, learned)


def freeze_embeddings(module: Any, masked: list[Any]) -> int:
    """Turn off the gradient of every ``nn.Embedding`` table of ``module`` that is not in ``masked``.

    No gradient at all, so backward skips the tables' dense (mostly zero) gradient and the
    optimizer never sees them; a table tied to a pruned Linear (an LM head) stays trainable.
    Returns how many tables were frozen.
    """
    import torch

    keep = {id(p) for p in masked}
    count = 0
    for table in (m for m in module.modules() if isinstance(m, torch.nn.Embedding)):
        if id(table.weight) not in keep and table.weight.requires_grad:
            table.weight.requires_grad_(False)
            count += 1
    return count


def _attach_qat(student: Any, model_path: Path, dense: Captured, after: list[Any], target: Any, calib: Dataset,
                cfg: RecoverConfig) -> Any:
    """Fake quantization for the ``quantize`` step in ``after`` (:mod:`compressor.recover.qat`), initialised.

    Raises:
        RecipeError: no ``quantize`` step in ``after``, or ``steps: 0`` (nothing would learn the scales).
        UsageError: a TorchScript module (its compiled code cannot be fake-quantized), or
            no layer the step quantizes matches a parameter of the module.
    """
    from compressor.recover.module import PASS_INSTEAD
    from compressor.recover.qat import QatModule, plan_layers
    from compressor.recover.smooth import smooth_module, smoothing_for
    from compressor.targets import get_target

    if student.kind == "torchscript":
        raise UsageError(f"recover: qat: {model_path.name} is TorchScript, whose compiled code cannot be "
                         f"fake-quantized; {PASS_INSTEAD}, or drop 'qat'")
    if cfg.steps == 0:  # as the missing quantize step below: refused before capture too
        raise RecipeError(QAT_WITHOUT_STEPS)
    step = next((p for p in after if p.name == "quantize"), None)
    if step is None:  # check_recover_inputs refuses it before capture; a direct call gets the same reason
        raise RecipeError("recover: qat: true fake-quantizes the module for the int8 step that follows it, and the "
                          "recipe has no 'quantize' pass after its sparsity pass; add one, or drop 'qat'")
    caps = (target if target is not None else get_target("onnx")).capabilities
    shapes = {n: tuple(p.shape) for n, p in student.module.named_parameters()}
    layers, left = plan_layers(dense.model.graph, step.options, caps, shapes)
    for name, why in sorted(left.items()):
        logger.warning("recover: qat: layer %s is not fake-quantized: %s", name, why)
    if not layers:
        raise UsageError(f"recover: qat: none of the layers 'quantize' quantizes in {model_path.name} matches a "
                         "weight parameter of the module; drop 'qat'")
    smoothing = None
    opts, preset = smoothing_for(step.options, dense.model.graph, caps)
    if opts.smoothquant is not None:  # smoothed before training, as quantize would after (compressor.recover.smooth)
        smoothing = smooth_module(student.module, dense.model, opts, preset, caps, calib)
    qat = QatModule(student, layers)
    qat.smoothing = smoothing
    qat.initialise(student, calib, cfg.batch, step.options)
    logger.info("recover: qat: %d layers fake-quantized (%d activation quantizers, initialised by the %s calibrator)",
                len(qat.layers), len(qat.parameters()), step.options.calibrator)
    return qat


def recover_stage(model_path: Path, recipe: Any, dense: Captured, train_raw: RawData, calib: Dataset | None, *,
                  target: Any, overrides: Any, example_inputs: Mapping[str, np.ndarray] | None,
                  load: Mapping[str, Any], progress: Progress = no_progress) -> Recovery:
    """:func:`recover` with the recovered module captured as :func:`compressor.capture.capture` would the file.

    ``load`` holds ``trust_pickle``, ``imports``, ``model_class``, ``model_kwargs`` (how the
    file is loaded); the recovered copy is written to a scratch folder removed afterwards.
    """
    from compressor.capture import capture

    def capture_file(path: Path) -> Captured:
        return capture(path, trust_pickle=bool(load.get("trust_pickle")), input_overrides=overrides,
                       example_inputs=example_inputs, imports=tuple(load.get("imports", ())))

    with tempfile.TemporaryDirectory(prefix="compressor-recover-") as work:
        return recover(model_path, recipe, dense, train_raw, calib, capture_file, target=target, overrides=overrides,
                       example_inputs=example_inputs, load=load, work=Path(work), progress=progress)
