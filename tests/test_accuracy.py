"""Accuracy control's greedy give-back, on stand-in models whose drops are known exactly.

The builds and evaluations here are plain functions of the set of layers given back, so
the tests state the contract of :func:`compressor.flow.accuracy.control_accuracy` without a
backend: most sensitive first, a try that does not lower the drop is undone, it stops as
soon as the budget holds.
"""

from __future__ import annotations

import numpy as np

from compressor.data import Dataset
from compressor.flow.accuracy import control_accuracy
from compressor.flow.ranking import rank_layers, ranking_tasks
from compressor.flow.evaluation import Evaluation
from compressor.inputs import InputSpec


def _evaluation(drop: float) -> Evaluation:
    return Evaluation("cosine", {"cosine_mean": 1.0}, {"cosine_mean": 1.0 - drop}, drop, 4, "test")


def _data() -> Dataset:
    spec = InputSpec("x", ("N", 2), "float32")
    return Dataset({"x": np.ones((4, 2), np.float32)}, [spec], {"x": False}, None, "test", "0")


def _control(drops: dict[frozenset[str], float], sensitivity: dict[str, float], budget: float, max_steps=None):
    """``drops``: the drop with exactly that set given back; ranking errors from ``sensitivity``."""
    def rank_build(given: frozenset[str]):  # ranking: the output error falls by the layer's sensitivity
        err = 0.5 - sum(sensitivity[name] for name in given)
        return lambda feed: [np.array([[1.0, err]], np.float32).repeat(len(feed["x"]), 0)]

    def build(given: frozenset[str]):  # a "runner" standing for the model with ``given`` given back
        return given

    ref = [np.array([[1.0, 0.0]], np.float32).repeat(4, 0)]
    return control_accuracy(layers=sorted(sensitivity), build=build, evaluate=lambda given: _evaluation(drops[given]),
                            first=_evaluation(drops[frozenset()]), budget=budget, ranking_data=_data(),
                            ranking_ref=ref, max_steps=max_steps, rank_build=rank_build)


def test_a_give_back_that_makes_the_drop_worse_is_undone():
    # "a" ranks first but giving it back makes the drop worse (0.30 -> 0.32); "b" helps.
    drops = {frozenset(): 0.30, frozenset({"a"}): 0.32, frozenset({"b"}): 0.05, frozenset({"a", "b"}): 0.07}
    result = _control(drops, {"a": 0.3, "b": 0.2}, budget=0.1)
    assert [r["layer"] for r in result.ranking] == ["a", "b"]
    assert result.steps == [{"layer": None, "drop": 0.30, "kept": True}, {"layer": "a", "drop": 0.32, "kept": False},
                            {"layer": "b", "drop": 0.05, "kept": True}]
    assert result.given_back == ["b"] and result.met and result.evaluation.drop == 0.05


def test_an_unmet_budget_keeps_the_best_state_not_the_last_try():
    drops = {frozenset(): 0.30, frozenset({"a"}): 0.20, frozenset({"a", "b"}): 0.25}
    result = _control(drops, {"a": 0.3, "b": 0.2}, budget=0.1)
    assert result.given_back == ["a"] and not result.met
    assert result.evaluation.drop == 0.20, "the artifact is the best kept state"
    assert [s["kept"] for s in result.steps] == [True, True, False]


def test_it_stops_as_soon_as_the_budget_holds_and_respects_max_steps():
    drops = {frozenset(): 0.30, frozenset({"a"}): 0.05, frozenset({"a", "b"}): 0.01}
    assert _control(drops, {"a": 0.3, "b": 0.2}, budget=0.1).given_back == ["a"]
    drops = {frozenset(): 0.30, frozenset({"a"}): 0.25, frozenset({"a", "b"}): 0.01}
    capped = _control(drops, {"a": 0.3, "b": 0.2}, budget=0.1, max_steps=1)
    assert capped.given_back == ["a"] and not capped.met and len(capped.steps) == 2


# ------------------------------------------------------------------ two-stage ranking


def _staged(full: dict[str, float], screen: dict[str, float], confirm: int):
    """Rank with errors ``full`` on the ranking subset and ``screen`` on the screen (``""``: all quantized)."""
    calls: list[tuple[str, frozenset[str]]] = []

    def error_of(given: frozenset[str], shared) -> float:
        calls.append((shared["stage"], given))
        (name,) = given or {""}
        return shared["errors"][name]

    ranking = rank_layers(sorted(n for n in full if n), error_of, {"stage": "all", "errors": full},
                          screen={"stage": "screen", "errors": screen}, confirm=confirm)
    return ranking, calls


def test_two_stage_ranking_confirms_the_screens_top_layers_on_every_sample():
    # The screen orders c > a > b > d; on every sample a is the most sensitive: the confirmed
    # two (c, a) come back in their measured order, the others in the screen's order after them.
    full = {"": 0.5, "a": 0.1, "b": 0.2, "c": 0.3, "d": 0.45}
    screen = {"": 0.6, "a": 0.3, "b": 0.4, "c": 0.2, "d": 0.5}
    ranking, calls = _staged(full, screen, confirm=2)
    assert [r["layer"] for r in ranking] == ["a", "c", "b", "d"]
    assert [r.get("screened", False) for r in ranking] == [False, False, True, True]
    assert ranking[0]["sensitivity"] == 0.5 - 0.1 and ranking[2]["sensitivity"] == 0.6 - 0.4
    assert len(calls) == ranking_tasks(4, 2) == 5 + 3
    assert [given for stage, given in calls if stage == "all"] == [frozenset(), frozenset({"c"}), frozenset({"a"})]


def test_two_stage_ranking_gives_the_full_rankings_top_where_the_screen_keeps_it():
    # Where the true top layers are among the confirmed ones, the head of the ranking is the
    # full ranking's (the greedy loop tries the same layers in the same order).
    rng = np.random.default_rng(0)
    names = [f"l{i}" for i in range(12)]
    full = {"": 1.0, **{n: float(e) for n, e in zip(names, rng.uniform(0.2, 0.9, len(names)))}}
    screen = {"": 1.0, **{n: min(0.99, e + float(rng.normal(0, 0.02))) for n, e in full.items() if n}}
    whole = rank_layers(names, lambda given, shared: full[next(iter(given), "")], {})
    staged, _ = _staged(full, screen, confirm=6)
    top = [r["layer"] for r in whole[:3]]
    assert set(top) <= {r["layer"] for r in staged[:6]}, "the screen keeps the true top three (noise << spread)"
    assert [r["layer"] for r in staged[:3]] == top
    assert [r["sensitivity"] for r in staged[:3]] == [r["sensitivity"] for r in whole[:3]]


def test_no_screen_when_there_are_no_more_layers_than_confirmed():
    full = {"": 0.5, "a": 0.1, "b": 0.2}
    ranking, calls = _staged(full, {"": 0.0, "a": 0.0, "b": 0.0}, confirm=2)
    assert [r["layer"] for r in ranking] == ["a", "b"] and {stage for stage, _ in calls} == {"all"}
    assert ranking_tasks(2, 2) == 3


def test_a_try_that_changes_nothing_is_skipped_and_costs_no_step():
    """``unchanged`` says giving back "a" leaves the model as it is (a 16-bit promotion of a layer
    already at 16 bits): "a" is neither built nor evaluated, its reason is recorded, and with
    one step allowed "b", ranked after it, is still tried."""
    drops = {frozenset(): 0.30, frozenset({"b"}): 0.05}
    built: list[frozenset[str]] = []

    def build(given: frozenset[str]):
        built.append(given)
        return given

    result = control_accuracy(
        layers=["a", "b"], build=build, evaluate=lambda given: _evaluation(drops[given]),
        first=_evaluation(0.30), budget=0.1, max_steps=1,
        ranking=[{"layer": "a", "sensitivity": 0.3}, {"layer": "b", "sensitivity": 0.2}],
        unchanged=lambda candidate, current: candidate - current == {"a"})
    assert built == [frozenset({"b"})]
    assert result.skipped == {"a": "promoting it leaves the model already evaluated as it is"}
    assert result.steps == [{"layer": None, "drop": 0.30, "kept": True}, {"layer": "b", "drop": 0.05, "kept": True}]
    assert result.given_back == ["b"] and result.met


def test_a_nan_drop_is_worse_than_any_number_so_the_give_back_that_ends_it_is_kept():
    """With the fully quantized model's drop NaN, ``trial.drop < evaluation.drop`` was never
    true: no give-back was kept. Only "b" ends the NaN; the ranking (a NaN cosine counting as
    -1) puts it first."""
    def rank_build(given: frozenset[str]):
        value = 1.0 if "b" in given else np.nan
        return lambda feed: [np.array([[1.0, value]], np.float32).repeat(len(feed["x"]), 0)]

    nan = float("nan")
    drops = {frozenset(): nan, frozenset({"b"}): 0.0, frozenset({"a"}): nan, frozenset({"a", "b"}): 0.0}
    ref = [np.array([[1.0, 1.0]], np.float32).repeat(4, 0)]
    result = control_accuracy(layers=["a", "b"], build=lambda given: given,
                              evaluate=lambda given: _evaluation(drops[given]), first=_evaluation(nan), budget=0.01,
                              ranking_data=_data(), ranking_ref=ref, rank_build=rank_build)
    assert result.ranking[0]["layer"] == "b" and result.ranking[0]["sensitivity"] > 0
    assert result.given_back == ["b"] and result.met and result.evaluation.drop == 0.0


def _pinned(drops: dict[tuple[frozenset[str], str], float], given: list[str], drop: float, budget: float):
    from compressor.flow.precision_fallback import pin_after_control

    tried = []

    def evaluate(candidate: frozenset[str], precision: str) -> Evaluation:
        tried.append((candidate, precision))
        return _evaluation(drops[candidate, precision])

    return (*pin_after_control(given, _evaluation(drop), budget, "f32", "bf16", evaluate), tried)


def test_a_pin_that_holds_after_control_quantizes_given_back_layers_again_while_it_holds():
    """Control gave back a then b then c and ended over budget in bf16; f32 holds it, and
    with f32 pinned c and a are not needed: quantized again, last given back first."""
    abc, f32 = frozenset("abc"), "f32"
    drops = {(abc, f32): 0.05, (frozenset("ab"), f32): 0.06, (frozenset("a"), f32): 0.12, (frozenset("b"), f32): 0.08}
    given, evaluation, record, tried = _pinned(drops, ["a", "b", "c"], 0.11, budget=0.1)
    assert [t[0] for t in tried] == [abc, frozenset("ab"), frozenset("a"), frozenset("b")], "c, then b, then a"
    assert given == ["b"] and evaluation.drop == 0.08
    assert record["pinned"] and record["budget_holds"] and record["requantized"] == ["c", "a"]
    assert record["drop"] == 0.11 and record["fallback_drop"] == 0.08 and record["after_accuracy_control"]
    assert [(t["layer"], t["kept"]) for t in record["requantize_tries"]] == [("c", True), ("b", False), ("a", True)]


def test_a_pin_that_lowers_the_drop_but_not_enough_is_kept_and_a_worse_one_is_not():
    ab = frozenset("ab")
    given, evaluation, record, tried = _pinned({(ab, "f32"): 0.15}, ["a", "b"], 0.2, budget=0.1)
    assert given == ["a", "b"] and evaluation.drop == 0.15 and len(tried) == 1, "over budget: nothing quantized again"
    assert record["pinned"] and not record["budget_holds"] and record["requantized"] == []
    given, evaluation, record, tried = _pinned({(ab, "f32"): 0.25}, ["a", "b"], 0.2, budget=0.1)
    assert given == ["a", "b"] and evaluation.drop == 0.2 and not record["pinned"]
    assert record["fallback_drop"] == 0.25


def test_an_artifact_pinned_after_control_with_every_layer_quantized_again_is_the_pinned_one(tmp_path):
    """Nothing given back in the end, but f32 pinned after control: the artifact is the
    pinned try's files, not the unpinned ones first lowered (review of pin_after_control)."""
    from compressor.flow.accuracy import ControlResult

    first = tmp_path / "out" / "model.xml"
    first.parent.mkdir()
    first.write_text("unpinned")
    tried = tmp_path / "control-3" / "model.xml"
    tried.parent.mkdir()
    tried.write_text("pinned")

    class Target:
        def runner(self, files):
            return ("runner of", tuple(files))

    result = ControlResult([], [], [], _evaluation(0.0), True, pin="f32", lowered=(tried.parent, [tried], None))
    files, run = result.artifact(Target(), None, first.parent, "f32", [first], "first runner")
    assert files == [first] and first.read_text() == "pinned" and run == ("runner of", (first,))
    unpinned = ControlResult([], [], [], _evaluation(0.0), True)
    assert unpinned.artifact(Target(), None, first.parent, None, [first], "first runner") == ([first], "first runner")
