"""A ranking stage in this process: its candidates side by side in ONNX Runtime sessions on every core.

:func:`stage_errors` gives each candidate model's error, ``1 − mean cosine`` of its outputs
against the reference (padding masked), bit for bit what a session of that model alone
gives (:mod:`compressor.flow.side_by_side`; ``tests/test_side_by_side.py``):

1. **A session per group, the groups at once, one thread each.** The candidates are split
   into contiguous groups (:func:`split_groups`), one side-by-side session each: at least
   one group per CPU this process may use (:func:`~compressor.executor.usable_cpus`), and
   no group whose copies weigh more than :data:`SESSION_BYTES` (each copy in a session
   keeps its own pre-packed weights and activation buffers; a copy is counted at its
   model's initializer bytes, an upper bound: ddddocr's 31 copies held 0.19 GB, counted
   0.81 GB). The groups run at the same time, one Python thread each, and every session
   runs on :data:`THREADS` intra-op thread. ONNX Runtime's intra-op threads meet at every
   node: on a machine shared with other work a thread that waits spins, or sleeps through
   a time slice, at each of the side-by-side graph's thousands of nodes (ddddocr's ranking:
   44 s of CPU with two spinning threads per session, 24 s this way, the same errors to
   the last digit); whole sessions never wait for each other. One thread also makes the
   errors independent of the machine: ONNX Runtime's default, a thread per physical core,
   lets a kernel split a sum across threads (the digits CNN's errors moved in the 7th
   digit between one and two), and :func:`~compressor.flow.ranking.candidate_error`, what a
   Ray task runs, uses one thread too, so both executors rank alike.
2. **Each sample run once** (:class:`SampleCosines`). Where every call of the model is one
   sample (a static batch of 1, or one stacked tensor per sample), a sample's outputs do
   not depend on the other samples a stage runs, so each candidate's row cosines are kept
   per evaluation sample: the confirm stage runs its candidates, all screened already,
   only on the ranking samples the screen did not run, and the screen's reference is the
   ranking reference's rows (:func:`outputs_by_sample`). A candidate's error is the mean
   of its row cosines in sample order: what one pass over the stage's samples computes.
   With several samples per call (MiniLM's batches of 16) a sample's rows may depend on
   the others in its batch, and nothing is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx_ir as ir
from compressor.targets.onnx import SharedInitializers

from compressor.data import Dataset
from compressor.executor import usable_cpus
from compressor.flow.evaluation import collect_outputs, cosine_error, mask_padding, output_rows, row_cosines
from compressor.flow.side_by_side import UNMERGED, side_by_side

__all__ = ["SESSION_BYTES", "THREADS", "SampleCosines", "joined", "one_sample_per_call", "outputs_by_sample",
           "split_groups", "stage_errors"]

logger = logging.getLogger(__name__)

#: The most bytes of model copies one side-by-side session holds (item 1).
SESSION_BYTES = 1 << 30

#: Intra-op threads of every ranking session (item 1).
THREADS = 1


def split_groups(sizes: Sequence[int], parts: int, cap: int) -> list[range]:
    """Contiguous groups of the indices of ``sizes``, as even in count as can be: at least
    ``parts`` of them (at most one per index), and none above ``cap`` bytes unless it holds one index."""
    count = len(sizes)
    if not count:
        return []
    groups = min(count, max(1, parts, -(-sum(sizes) // max(cap, 1))))
    while True:
        bounds = [count * k // groups for k in range(groups + 1)]
        split = [range(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        if groups == count or all(len(g) == 1 or sum(sizes[i] for i in g) <= cap for g in split):
            return split
        groups += 1


def one_sample_per_call(data: Dataset) -> bool:
    """Whether each call of the model on ``data`` runs exactly one sample (item 2)."""
    return data.batch_size() == 1


def outputs_by_sample(run: Any, data: Dataset, indices: Iterable[int]) -> dict[int, list[np.ndarray]]:
    """``run``'s outputs on each of ``data``'s samples at ``indices``, one call each (item 2)."""
    return {i: collect_outputs(run, data.take([i], f"sample {i}")) for i in indices}


def joined(by_sample: Mapping[int, list[np.ndarray]], indices: Iterable[int]) -> list[np.ndarray]:
    """The outputs of the samples at ``indices`` in that order, as one pass over them returns them."""
    parts = [by_sample[i] for i in indices]
    return [np.concatenate(chunks, axis=0) for chunks in zip(*parts)]


class SampleCosines:
    """Each candidate's row cosines per evaluation sample, kept across the stages of one ranking (item 2)."""

    def __init__(self, data: Dataset, reference: Mapping[int, list[np.ndarray]]) -> None:
        """``reference``: the baseline's outputs per sample of ``data`` (:func:`outputs_by_sample`)."""
        self.data = data
        self.reference = {i: output_rows(mask_padding(outs, self.sample(i))) for i, outs in reference.items()}
        self.cosines: dict[tuple[Hashable, int], np.ndarray] = {}

    def sample(self, index: int) -> Dataset:
        """The evaluation sample at ``index``, alone."""
        return self.data.take([index], f"sample {index}")

    def missing(self, key: Hashable, indices: Sequence[int]) -> tuple[int, ...]:
        """The samples of ``indices`` the candidate ``key`` has not run on."""
        return tuple(i for i in indices if (key, i) not in self.cosines)

    def error(self, key: Hashable, indices: Sequence[int]) -> float:
        """:func:`cosine_error` of the candidate's row cosines on ``indices``, in that order."""
        return cosine_error(np.concatenate([self.cosines[key, i] for i in indices]))


def _runner(models: Sequence[ir.Model], initializers: SharedInitializers) -> Any:
    """``feed -> [each model's outputs]`` of ``models``, in one side-by-side session where they combine."""
    combined = side_by_side(models) if len(models) > 1 else None
    sessions = ([(initializers.session(combined[0], threads=THREADS, spinning=False, disabled=UNMERGED),
                  combined[1])] if combined is not None else
                [(initializers.session(m, threads=THREADS, spinning=False), None) for m in models])

    def run(feed: Mapping[str, np.ndarray]) -> list[list[np.ndarray]]:
        per_model = []
        for session, counts in sessions:
            names = {i.name for i in session.get_inputs()}
            outs = session.run(None, {k: v for k, v in feed.items() if k in names})
            start = 0
            for count in counts or [len(outs)]:
                per_model.append(outs[start:start + count])
                start += count
        return per_model

    return run


def _per_model(run: Any, data: Dataset, models: int) -> list[list[np.ndarray]]:
    """Each model's outputs over every call of ``data`` (as :func:`collect_outputs` joins them)."""
    flat = collect_outputs(lambda feed: [o for outs in run(feed) for o in outs], data)
    per_model, start = [], 0
    width = len(flat) // models
    for _ in range(models):
        per_model.append(flat[start:start + width])
        start += width
    return per_model


def stage_errors(models: Sequence[ir.Model], keys: Sequence[Hashable], initializers: SharedInitializers,
                 data: Dataset, ref: list[np.ndarray], samples: SampleCosines | None = None,
                 indices: Sequence[int] | None = None) -> list[float]:
    """The error of each of ``models`` on ``data`` against ``ref`` (module docstring).

    Args:
        models: The stage's candidates, copies of the model ``initializers`` holds.
        keys: What identifies each candidate across stages (its layers given back).
        initializers: The quantized model's initializers, held once for every session.
        data: The stage's samples.
        ref: The baseline's outputs on ``data``.
        samples: Row cosines kept per sample (item 2; ``None``: none kept).
        indices: With ``samples``: the evaluation-set index of each sample of ``data``.
    """
    cpus = usable_cpus()
    sizes = [sum(v.const_value.nbytes for v in m.graph.initializers.values() if v.const_value is not None)
             for m in models]
    if samples is None or indices is None:
        ref_rows = output_rows(mask_padding(ref, data))  # once, not per candidate
        outputs = _in_groups(list(range(len(models))), sizes, cpus,
                             lambda run, group: _per_model(run, data, len(group)), models, initializers)
        return [cosine_error(row_cosines(ref_rows, mask_padding(out, data))) for out in outputs]
    todo: dict[tuple[int, ...], list[int]] = {}
    for k, key in enumerate(keys):
        todo.setdefault(samples.missing(key, indices), []).append(k)
    for missing, picked in todo.items():
        if not missing:
            continue

        def on_samples(run: Any, group: list[int], missing: tuple[int, ...] = missing) -> list[None]:
            for i in missing:
                sample = samples.sample(i)
                for k, out in zip(group, _per_model(run, sample, len(group))):
                    samples.cosines[keys[k], i] = row_cosines(samples.reference[i], mask_padding(out, sample))
            return [None] * len(group)

        _in_groups(picked, sizes, cpus, on_samples, models, initializers)
    return [samples.error(key, indices) for key in keys]


def _in_groups(picked: list[int], sizes: Sequence[int], cpus: int, work: Any, models: Sequence[ir.Model],
               initializers: SharedInitializers) -> list[Any]:
    """``work(run, group)`` for each group of ``picked`` (item 1), the groups at once; results in ``picked``'s order."""
    groups = [[picked[j] for j in g] for g in split_groups([sizes[k] for k in picked], cpus, SESSION_BYTES)]
    at_once = min(cpus, len(groups))
    logger.debug("ranking stage: %d candidate(s) in %d session(s), %d at once", len(picked), len(groups), at_once)

    def one(group: list[int]) -> list[Any]:
        return work(_runner([models[k] for k in group], initializers), group)

    if at_once == 1:
        results = [one(group) for group in groups]
    else:
        with ThreadPoolExecutor(at_once, thread_name_prefix="ranking") as pool:
            results = list(pool.map(one, groups))
    return [r for group in results for r in group]
