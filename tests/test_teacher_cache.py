"""The teacher's outputs stored per sample give the loss a live teacher gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.recover.distill import distill_loss
from compressor.recover.teacher_cache import TeacherCache

transformers = pytest.importorskip("transformers")


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


def _call(module):
    return lambda feed: module(**feed, output_hidden_states=True, return_dict=True)


def _feed(ids: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor]:
    width = int(lengths.max())  # a batch cut to its longest real sequence, as the training loop does
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(ids[:, :width] * mask), "attention_mask": torch.from_numpy(mask)}


def test_cached_teacher_gives_the_live_teachers_loss():
    teacher, student = _bert(), _bert()
    with torch.no_grad():  # a student that differs from the teacher, so the loss is not 0
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (12, 12))
    lengths = rng.integers(3, 13, 12)
    cache = TeacherCache(_call(teacher), 1 << 20)
    kwargs = {"kind": "auto", "temperature": 2.0, "hidden_weight": 1.0, "label_weight": 0.0}
    for idx in (np.arange(0, 6), np.arange(6, 12), np.array([11, 0, 5, 7]), np.array([2, 9, 3])):
        feed = _feed(ids[idx], lengths[idx])  # the later batches mix samples stored from other batches
        with torch.no_grad():
            s = _call(student)(feed)
            live = distill_loss(s, _call(teacher)(feed), mask=feed["attention_mask"], **kwargs)
            cached = distill_loss(s, cache(feed, idx), mask=feed["attention_mask"], **kwargs)
        assert float(live) > 0.01
        torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)  # float32 rounding of other batch widths
    assert (cache.hits, cache.misses) == (7, 12)


def test_cache_budget_bounds_memory_and_zero_is_the_live_teacher():
    teacher = _bert()
    ids = np.random.default_rng(1).integers(1, 50, (4, 8))
    feed = _feed(ids, np.full(4, 8))
    small = TeacherCache(_call(teacher), 20_000)  # a sample: 3 hidden states (the last is the output) x 8 x 16 floats
    small(feed, np.arange(4))
    assert small.used == 4 * 3 * 8 * 16 * 4 and len(small._store) == 4
    tiny = TeacherCache(_call(teacher), 2_000)
    out = tiny(feed, np.arange(4))
    assert len(tiny._store) == 1 and out.output.shape == (4, 8, 16)
    off = TeacherCache(_call(teacher), 0)
    assert off(feed, np.arange(4)).last_hidden_state.shape == (4, 8, 16) and not off._store

