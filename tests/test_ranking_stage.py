"""A ranking stage in this process (:mod:`compressor.flow.ranking_stage`): sessions per group on every CPU,
capped by bytes, and each sample run once across the stages, with the errors of a session per candidate.

The tiny CNN and its quantization are those of ``tests/test_accuracy_control.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from compressor.targets.onnx import SharedInitializers, ort_session

import compressor.flow.ranking as ranking
import compressor.flow.ranking_stage as stage
from compressor.data import load_npz
from compressor.flow.evaluation import collect_outputs
from compressor.inputs import model_input_specs
from compressor.model_io import ir_bytes
from tests.test_accuracy_control import _quantize, _run, cnn, write_files

GIVEN = [[], ["conv1"], ["conv2"], ["fc1"], ["fc2"], ["fc1", "conv2"]]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_files(tmp_path_factory.mktemp("acctl"))


def _shared(files: dict[str, Path], data=None) -> dict:
    quantized = _quantize(files)
    data = data if data is not None else load_npz(files["eval"], model_input_specs(cnn()))
    return {"quantized": ir_bytes(quantized.model), "record": quantized.quantization, "mode": "float", "post": [],
            "runtime": "onnxruntime", "data": data, "ref": [_run(cnn(), data.arrays["x"])]}


def _sessions(monkeypatch) -> list:
    """Record each session a stage builds, with the options it was built with."""
    built = []
    real = SharedInitializers.session
    monkeypatch.setattr(SharedInitializers, "session",
                        lambda self, *a, **k: built.append(real(self, *a, **k)) or built[-1])
    return built


def test_groups_are_contiguous_even_at_least_one_per_cpu_and_capped_by_bytes():
    assert stage.split_groups([10] * 6, 2, 100) == [range(0, 3), range(3, 6)]
    assert stage.split_groups([10] * 6, 1, 25) == [range(0, 2), range(2, 4), range(4, 6)], "at most 25 bytes each"
    assert stage.split_groups([50, 5], 1, 10) == [range(0, 1), range(1, 2)], "a copy above the cap is alone"
    assert stage.split_groups([1, 1], 4, 100) == [range(0, 1), range(1, 2)], "never more groups than copies"
    assert stage.split_groups([], 2, 100) == []


def test_a_stage_runs_a_session_per_cpu_on_one_thread_without_spinning(files, monkeypatch):
    """Two CPUs: two sessions at once, one intra-op thread each, idle threads asleep; the errors are
    those of a session per candidate, bit for bit."""
    shared = _shared(files)
    candidates = [frozenset(given) for given in GIVEN]
    real_session = SharedInitializers.session
    try:
        alone = [ranking.candidate_error(given, shared) for given in candidates]
        monkeypatch.setattr(stage, "usable_cpus", lambda: 2)
        built = _sessions(monkeypatch)
        assert ranking.candidate_errors(candidates, shared) == alone
    finally:
        ranking.release_decoded()
    assert len(built) == 2
    monkeypatch.setattr(SharedInitializers, "session", real_session)
    alone_built = _sessions(monkeypatch)
    try:  # a candidate alone (what a Ray task runs) is on one thread too: both executors rank alike
        ranking.candidate_error(candidates[1], shared)
    finally:
        ranking.release_decoded()
    assert [s.get_session_options().intra_op_num_threads for s in alone_built] == [1]
    for session in built:
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_one_cpu_and_a_byte_cap_split_the_stage_into_sessions_that_give_the_same_errors(files, monkeypatch):
    shared = _shared(files)
    candidates = [frozenset(given) for given in GIVEN]
    try:
        alone = [ranking.candidate_error(given, shared) for given in candidates]
        monkeypatch.setattr(stage, "usable_cpus", lambda: 1)
        monkeypatch.setattr(stage, "SESSION_BYTES", 1)  # every copy is over it: a session each
        built = _sessions(monkeypatch)
        assert ranking.candidate_errors(candidates, shared) == alone
    finally:
        ranking.release_decoded()
    assert len(built) == len(GIVEN)
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in built)


def test_with_one_sample_per_call_the_confirm_stage_runs_only_the_samples_the_screen_did_not(files, monkeypatch):
    """A static batch of 1: the screen's samples are not run again, and every error equals a
    whole pass's (and a session per candidate's), bit for bit."""
    specs = [dataclasses.replace(spec, shape=(1, *spec.shape[1:])) for spec in model_input_specs(cnn())]
    data = load_npz(files["eval"], specs)
    assert stage.one_sample_per_call(data)
    assert not stage.one_sample_per_call(load_npz(files["eval"], model_input_specs(cnn())))
    screened, chosen = [1, 4, 6], [0, 1, 2, 4, 5, 6, 9]
    session = ort_session(cnn())
    run = lambda feed: session.run(None, feed)  # noqa: E731
    by_sample = stage.outputs_by_sample(run, data, range(len(data)))
    for indices in (screened, chosen):  # the screen's reference is the ranking reference's rows
        whole = collect_outputs(run, data.take(indices, "some"))
        assert all(np.array_equal(a, b) for a, b in zip(stage.joined(by_sample, indices), whole, strict=True))
    shared = _shared(files, data)
    kept = stage.SampleCosines(data, by_sample)
    screen = {**shared, "data": data.take(screened, "screen"), "ref": stage.joined(by_sample, screened),
              "by_sample": kept, "samples": screened}
    confirm = {**shared, "data": data.take(chosen, "ranking"), "ref": stage.joined(by_sample, chosen),
               "by_sample": kept, "samples": chosen}
    whole = {**confirm, "by_sample": None, "samples": None}
    candidates = [frozenset(given) for given in GIVEN]
    confirmed = candidates[:3]
    monkeypatch.setattr(stage, "usable_cpus", lambda: 1)
    ran: list[int] = []
    real = stage._per_model
    monkeypatch.setattr(stage, "_per_model", lambda run, d, n: ran.append(len(d)) or real(run, d, n))
    try:
        screen_errors = ranking.candidate_errors(candidates, screen)
        assert ran == [1] * len(screened), "one call per sample"
        ran.clear()
        confirm_errors = ranking.candidate_errors(confirmed, confirm)
        assert ran == [1] * (len(chosen) - len(screened)), "only the ranking samples the screen did not run"
        assert screen_errors == [ranking.candidate_error(given, {**screen, "by_sample": None}) for given in candidates]
        assert confirm_errors == ranking.candidate_errors(confirmed, whole)
        assert confirm_errors == [ranking.candidate_error(given, whole) for given in confirmed]
    finally:
        ranking.release_decoded()
