"""Block-wise reconstruction: each repeated block of the student fitted alone to the teacher's.

For a module built of a chain of repeated blocks (a transformer's layers: an
``nn.ModuleList`` of one class, each block's output the next one's input), block ``j`` of
the student is trained on its own for ``block_steps`` optimizer steps, before the global
loop (:mod:`.train`):

    min  mean_P [ (1 - cos(B_j(X_j), Y_j)) + |B_j(X_j) - Y_j|² / mean_P |Y_j|² ]

``Y_j``: the teacher's output of block ``j``, computed once per block (the teacher's block
``j`` over the data, from its stored ``Y_{j-1}``); ``X_j``: the student's input of block
``j``, i.e. the output of its blocks ``0..j-1`` already reconstructed (sequential, so a
block also learns to undo what the earlier ones still miss); ``X_0`` is what the student's
own layers before the blocks give. Both are kept per sample at its real positions, two
states per sample whatever the depth, within ``teacher_cache_mb`` (the samples beyond it,
in file order, are left out of the phase with a warning). ``P``: real positions
(``attention_mask``). The loss is :func:`.distill.output_loss`'s ``cosine+mse``: the
global loop's two terms, applied to one block. The other arguments a block takes (the
attention mask in the model's own format) are the ones block 0 gets on the same batch,
read by a pre-hook on a forward that stops there (the embedding layers only); every block
must get the same ones.

A step runs one block forward and backward (about a sixth of a MiniLM step, and no teacher
forward); masks are held by the same :class:`.MaskedParams` as the global loop (every
group of M holds at most N non-zeros after every step). Deterministic for a seed as the
global loop is (data order from the seed, ``torch.manual_seed``, deterministic
algorithms). Design notes and measurements: ``docs/design.md``, "Recovery stage".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from compressor.data import MASK_INPUT, Dataset
from compressor.errors import UsageError
from compressor.flow.evaluation import compare, drop_order
from compressor.progress import Progress, no_progress
from compressor.recover.config import RecoverConfig
from compressor.recover.distill import output_loss
from compressor.recover.schedule import MaskedParam, MaskedParams
from compressor.recover.teacher_cache import pad_rows
from compressor.recover.train import _order, _tensors, deterministic, masked_step

__all__ = ["BlockResult", "find_blocks", "keep_if_better", "reconstruct_blocks", "usable_blocks"]

logger = logging.getLogger(__name__)

BLOCK_LOSS = "cosine+mse"


@dataclasses.dataclass
class BlockResult:
    """What the block phase did (the manifest's ``recovery.blockwise``)."""

    blocks: str
    steps: int  # per block
    losses: list[tuple[float, float]]  # per block: mean loss of its first and last 5 steps
    seconds: float
    holdout_drop: tuple[float, float] | None = None  # before and after the phase (keep_if_better)
    kept: bool = True
    samples: int | None = None  # training samples the phase used (fewer than given when over teacher_cache_mb)

    def record(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "count": len(self.losses), "steps_per_block": self.steps,
                "loss_first_last": [[round(a, 6), round(b, 6)] for a, b in self.losses],
                "seconds": round(self.seconds, 3), "kept": self.kept, "samples": self.samples,
                **({"holdout_drop_before_after": [round(d, 6) for d in self.holdout_drop]}
                   if self.holdout_drop is not None else {})}


def keep_if_better(student: Callable[[Mapping[str, Any]], Any], reference: list[np.ndarray], module: Any,
                   held: list[MaskedParam], holdout: Dataset, batch: int, metric: str,
                   phase: Callable[[], BlockResult]) -> BlockResult:
    """Run the block phase and keep its weights only if the held-out drop fell; else the module,
    its masks and their shadows go back to what they were before it (the global loop's best-step
    snapshot starts after the phase, so nothing else would undo a phase that made things worse).
    ``reference``: the teacher's outputs on ``holdout``."""
    from compressor.recover.train import outputs_on

    def drop() -> float:
        return compare(reference, outputs_on(student, holdout, batch), holdout, metric).drop

    before = drop()
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    shadows = [(mp.dense.detach().clone(), mp.mask.detach().clone()) for mp in held]
    result = phase()
    after = drop()
    result.holdout_drop = (before, after)
    if drop_order(after) > drop_order(before):  # a NaN drop (NaN or inf outputs) is the worst
        import torch

        module.load_state_dict(state)
        with torch.no_grad():
            for mp, (dense, mask) in zip(held, shadows):
                mp.dense.copy_(dense)
                mp.mask = mask
        result.kept = False
        logger.warning("recover: the block phase raised the held-out drop from %.6f to %.6f; its weights are not "
                       "kept (the global loop starts from the one-shot weights)", before, after)
    else:
        logger.info("recover: block phase: held-out drop %.6f -> %.6f", before, after)
    return result


def find_blocks(module: Any, what: str, required: bool = True) -> tuple[str, Any] | None:
    """The longest ``nn.ModuleList`` of ``module`` whose entries (two or more) are one class with parameters.

    Returns:
        ``(name, list)``, or ``None`` when there is none and the block phase is not ``required``.

    Raises:
        UsageError: none and ``required`` (``what`` names the model in the message).
    """
    import torch

    best: tuple[str, Any] | None = None
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.ModuleList) or len(child) < 2:
            continue
        if len({type(b) for b in child}) == 1 and any(True for _ in child[0].parameters()):
            if best is None or len(child) > len(best[1]):
                best = (name, child)
    if best is None and not required:
        return None
    if best is None:
        raise UsageError(f"recover: block_steps: {what} has no stack of repeated blocks to reconstruct one by one "
                         "(an nn.ModuleList of layers of one class, each feeding the next, as in a Hugging Face "
                         "encoder) and steps: 0 leaves nothing else to train; set steps above 0 (the global loop)")
    return best


class _Stop(Exception):
    """Raised by the pre-hook on block 0: the rest of the forward is not needed."""


def _block_call(student: Callable[[Mapping[str, Any]], Any], first: Any, feed: Mapping[str, Any]
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of block 0 on ``feed`` (``args[0]``: the student's input of block 0)."""
    import torch

    got: dict[str, Any] = {}

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got["args"], got["kwargs"] = args, kwargs
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            student(feed)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "args" not in got or not got["args"] or not torch.is_tensor(got["args"][0]):
        raise UsageError("recover: block_steps: the model's first block is not called with its hidden state as the "
                         "first argument; set block_steps: 0 (the global loop alone)")
    return got["args"], got["kwargs"]


def _run(block: Any, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    out = block(x, *args[1:], **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _same(a: Any, b: Any) -> bool:
    """Whether two call arguments of two blocks are the same (one object, or equal tensors / values)."""
    import torch

    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # an argument type without a usable ==: not provably the same
        return False


def _check_chain(student: Any, name: str, blocks: Any, feed: Mapping[str, Any], what: str) -> None:
    """Refuse blocks that are not a chain: each called once per forward, with its hidden state first,
    on the previous block's output, and with block 0's other arguments (the block phase gives every
    block block 0's: a T5 layer's relative position bias or a Swin stage's resolution differ)."""
    import torch

    seen: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []
    handles = [b.register_forward_hook(lambda _m, a, k, out: seen.append((a, k, out)), with_kwargs=True)
               for b in blocks]
    try:
        with torch.no_grad():
            student(feed)
    finally:
        for h in handles:
            h.remove()
    ok = len(seen) == len(blocks) and all(args and torch.is_tensor(args[0]) for args, _, _ in seen)
    for (_, _, out), (args, kwargs, _) in zip(seen, seen[1:]) if ok else ():
        first = out[0] if isinstance(out, (tuple, list)) else out
        args0, kwargs0 = seen[0][0], seen[0][1]
        ok = ok and args[0] is first and len(args) == len(args0) and kwargs.keys() == kwargs0.keys() \
            and all(_same(a, b) for a, b in zip(args[1:], args0[1:])) \
            and all(_same(kwargs[k], kwargs0[k]) for k in kwargs)
    if not ok:
        raise UsageError(f"recover: block_steps: the blocks of {what} ({name}) do not form a chain (each "
                         "called once per forward, on the previous block's output, with the same other arguments); "
                         "set block_steps: 0 (the global loop alone)")


def usable_blocks(student: Callable[[Mapping[str, Any]], Any], module: Any, train: Dataset, batch: int, what: str,
                  required: bool) -> bool:
    """Whether the block phase can run on ``module`` (a chain of repeated blocks, :func:`_check_chain`).

    Raises:
        UsageError: it cannot and it is ``required`` (``steps: 0``: nothing else would train).
    """
    found = find_blocks(module, what, required)
    if found is None:
        logger.info("recover: block_steps: %s has no stack of repeated blocks; the global loop alone", what)
        return False
    feed = _tensors(train, np.arange(min(batch, len(train))), trim=True)
    try:
        _check_chain(student, found[0], found[1], feed, what)
    except UsageError as err:
        why = str(err).rsplit("; set block_steps", 1)[0]
        if required:
            raise UsageError(f"{why}, and steps: 0 leaves nothing else to train; set steps above 0 (the global "
                             "loop)") from None
        logger.warning("%s; the global loop alone", why)
        return False
    return True


def reconstruct_blocks(student: Callable[[Mapping[str, Any]], Any], teacher: Callable[[Mapping[str, Any]], Any],
                       student_module: Any, teacher_module: Any, held: list[MaskedParam], train: Dataset,
                       cfg: RecoverConfig, what: str, progress: Progress = no_progress,
                       on_step: Callable[[int, MaskedParams], None] | None = None) -> BlockResult:
    """Train each block of ``student_module`` alone towards the teacher's (module docstring).

    Args:
        student: Calls the student on a feed of tensors.
        teacher: Calls the frozen teacher.
        student_module: The student's ``nn.Module`` (its blocks are found and trained).
        teacher_module: The teacher's (the same blocks, frozen).
        held: Every masked parameter (those of each block are held while it trains).
        train: Training samples.
        cfg: The recipe's ``recover:`` section (``block_steps``, ``block_lr``, ``batch``, ``seed``).
        what: The model's name, for messages.
        progress: Progress-bar factory.
        on_step: Called after every optimizer step with ``(step, masks of the block)``.

    Raises:
        UsageError: no chain of repeated blocks (exit 2).
    """
    import torch

    started = time.perf_counter()
    name, blocks = find_blocks(student_module, what)
    teacher_blocks = dict(teacher_module.named_modules())[name]
    batch = min(cfg.batch, len(train))
    first_feed = _tensors(train, np.arange(batch), trim=True)
    _check_chain(student, name, blocks, first_feed, what)
    budget = cfg.teacher_cache_mb << 20
    with deterministic(cfg.seed):  # the teacher's output of block 0, for the samples whose two states fit
        targets = _outputs(teacher, teacher_blocks, 0, None, train, batch, budget=budget, least=batch)
    if len(targets) < len(train):
        logger.warning("recover: block_steps: the block phase keeps two states per training sample (the student's "
                       "input of a block and the teacher's output of it); the first %d of the %d samples fit in "
                       "teacher_cache_mb (%d MB) and train the blocks; raise it to use them all", len(targets),
                       len(train), cfg.teacher_cache_mb)
        train = train.subset(0, len(targets))
    stored = 2 * sum(t.numel() * t.element_size() for t in targets.values())
    batch = min(batch, len(train))
    inputs: dict[int, Any] = {}  # sample -> the student's input of the current block, real positions only
    losses: list[tuple[float, float]] = []
    total = len(blocks) * cfg.block_steps
    logger.info("recover: block-wise reconstruction of %d blocks (%s) on %d samples (%.0f MB of states), %d steps "
                "of %d each, lr %g", len(blocks), name, len(train), stored / 2**20, cfg.block_steps, batch,
                cfg.block_lr)
    with deterministic(cfg.seed), progress("recover blocks", total, "step") as bar:
        for j, block in enumerate(blocks):
            if j:
                targets = _outputs(teacher, teacher_blocks, j, targets, train, batch)
            mine = {id(p) for p in block.parameters()}
            params = [p for p in block.parameters() if p.requires_grad]
            masks = MaskedParams([mp for mp in held if id(mp.param) in mine], cfg.block_steps, cfg.schedule,
                                 cfg.pgf_decay)
            optimizer = torch.optim.AdamW(params, lr=cfg.block_lr, weight_decay=0.0)
            decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / cfg.block_steps))
            order = _order(len(train), batch, cfg.seed + j)
            block_losses: list[float] = []
            for step in range(cfg.block_steps):
                idx = next(order)
                feed = _tensors(train, idx, trim=True)
                mask = feed.get(MASK_INPUT)
                args, kwargs = _block_call(student, blocks[0], feed)
                x = args[0] if j == 0 else _assemble(inputs, idx, mask)
                loss = output_loss(_run(block, x, args, kwargs), _assemble(targets, idx, mask), BLOCK_LOSS,
                                   cfg.temperature, mask)
                block_losses.append(masked_step(loss, optimizer, decay, masks, step, on_step))
                bar.update(1)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(block=j, loss=f"{block_losses[-1]:.4g}", refresh=False)
            losses.append((float(np.mean(block_losses[:5])), float(np.mean(block_losses[-5:]))))
            logger.info("recover: block %d: loss %.5g -> %.5g", j, *losses[-1])
            if j + 1 < len(blocks):
                inputs = _outputs(student, blocks, j, inputs if j else None, train, batch)
    return BlockResult(name, cfg.block_steps, losses, time.perf_counter() - started, samples=len(train))


def _assemble(inputs: dict[int, Any], idx: np.ndarray, mask: Any | None) -> Any:
    import torch

    rows = [inputs[int(i)] for i in idx]
    return pad_rows(rows, mask.shape[1]) if mask is not None else torch.stack(rows)


def _outputs(call: Callable[[Mapping[str, Any]], Any], blocks: Any, j: int, inputs: dict[int, Any] | None,
             train: Dataset, batch: int, budget: int | None = None, least: int = 0) -> dict[int, Any]:
    """Block ``j`` of a model (student or teacher) on every sample, per sample at its real positions.

    ``inputs``: each sample's input of block ``j`` (the model's output of block ``j - 1``),
    consumed (a row is dropped once used, so the two dicts never both hold every sample);
    ``None`` for block 0, whose input is what the model's own layers before the blocks give.
    ``budget``: stop after the samples, in order, whose two states (this output and the other
    model's of the same size) fit in that many bytes, ``least`` of them at any rate.
    """
    import torch

    out_rows: dict[int, Any] = {}
    used = 0
    with torch.no_grad():
        for start in range(0, len(train), batch):
            idx = np.arange(start, min(start + batch, len(train)))
            feed = _tensors(train, idx, trim=True)
            mask = feed.get(MASK_INPUT)
            args, kwargs = _block_call(call, blocks[0], feed)
            x = args[0] if inputs is None else _assemble(inputs, idx, mask)
            if inputs is not None:
                for i in idx.tolist():
                    del inputs[i]
            out = _run(blocks[j], x, args, kwargs)
            for r, i in enumerate(idx.tolist()):
                length = None if mask is None else int(mask[r].sum())  # padding is on the right
                row = (out[r, :length] if mask is not None else out[r]).clone()
                if budget is not None:
                    used += 2 * row.numel() * row.element_size()
                    if used > budget and i >= least:
                        return out_rows
                out_rows[i] = row
    return out_rows
