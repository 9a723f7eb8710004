"""Block-wise reconstruction before the global loop (``recover: {block_steps: ...}``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressor.data import Dataset
from compressor.inputs import InputSpec
from compressor.recover.blockwise import reconstruct_blocks
from compressor.recover.config import RecoverConfig
from compressor.recover.schedule import MaskedParam, MaskedParams, nm_mask
from tests.cliutil import error_line, run

transformers = pytest.importorskip("transformers")

N, M = 2, 4


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, initializer_range=0.2)
    return transformers.BertModel(config).eval()  # weights large enough that 2:4 pruning changes the output


def _call(module):
    return lambda feed: module(**feed, output_hidden_states=True, return_dict=True)


def _data(count: int = 48, width: int = 12) -> Dataset:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, width + 1, count)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int64)  # padding on the right
    arrays = {"input_ids": rng.integers(1, 60, (count, width)) * mask, "attention_mask": mask,
              "token_type_ids": np.zeros_like(mask)}
    specs = [InputSpec(k, ("N", "S"), "int64") for k in arrays]
    return Dataset(arrays, specs, {k: False for k in arrays}, None, "mem", "")


def _pruned_student(teacher: torch.nn.Module) -> tuple[torch.nn.Module, list[MaskedParam]]:
    """The teacher's copy with every encoder Linear 2:4 by magnitude (the one-shot start)."""
    student = _bert()
    student.load_state_dict(teacher.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    held = []
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("encoder."):
            w = module.weight
            held.append(MaskedParam(f"{name}.weight", w, nm_mask(w, N, M), w.detach().clone(), ("nm", N, M)))
    return student, held


def _blocks(seed: int = 0, steps: int = 12):
    teacher = _bert()
    student, held = _pruned_student(teacher)
    MaskedParams(held, steps)  # the module now holds dense * mask
    data = _data()
    feed = {k: torch.from_numpy(v) for k, v in data.arrays.items()}
    with torch.no_grad():
        before = student(**feed).last_hidden_state
    holes = []
    cfg = RecoverConfig(steps=1, batch=8, seed=seed, block_steps=steps, block_lr=1e-2)
    result = reconstruct_blocks(_call(student), _call(teacher), student, teacher, held, data, cfg, "bert",
                                on_step=lambda step, ms: holes.append(ms.check()))
    with torch.no_grad():
        after, target = student(**feed).last_hidden_state, teacher(**feed).last_hidden_state
    real = feed["attention_mask"].bool()

    def error(x):
        return float(((x - target)[real] ** 2).mean())

    return result, student, holes, error(before), error(after)


def test_each_block_is_trained_with_nm_held_after_every_step_and_gets_closer():
    result, student, holes, before, after = _blocks()
    assert result.blocks == "encoder.layer" and len(result.losses) == 2 and result.steps == 12
    assert len(holes) == 2 * 12 and all(h == [] for h in holes)  # every group of 4 holds at most 2 after every step
    assert all(last < first for first, last in result.losses)
    assert after < 0.5 * before, (before, after)  # the model's output, not only each block's, moved to the teacher's
    for name, p in student.named_parameters():
        if name.startswith("encoder.") and name.endswith(".weight") and p.dim() == 2:
            assert int((p != 0).sum()) * 2 <= p.numel(), name


def test_block_phase_is_deterministic_for_a_seed():
    first, student, _, _, _ = _blocks()
    again, student_again, _, _, _ = _blocks()
    assert first.losses == again.losses
    for a, b in zip(student.parameters(), student_again.parameters()):
        assert torch.equal(a, b)
    other, _, _, _, _ = _blocks(seed=1)
    assert other.losses != first.losses


def test_teacher_states_chained_block_by_block_are_the_teachers_hidden_states():
    from compressor.recover.blockwise import _outputs

    teacher = _bert()
    data = _data()
    with torch.no_grad():
        hf = _call(teacher)({k: torch.from_numpy(v) for k, v in data.arrays.items()}).hidden_states
    states = None
    for j in range(2):  # block j from the stored output of block j - 1, as the phase computes its targets
        states = _outputs(_call(teacher), teacher.encoder.layer, j, states, data, 8)
        assert sorted(states) == list(range(len(data)))
        for i, row in states.items():
            length = int(data.arrays["attention_mask"][i].sum())
            assert row.shape == (length, 16)  # real positions only
            torch.testing.assert_close(row, hf[j + 1][i, :length])


def test_block_phase_over_the_memory_budget_trains_on_the_samples_that_fit(caplog):
    teacher = _bert()
    student, held = _pruned_student(teacher)
    MaskedParams(held, 2)
    data = _data(count=1400)
    per_sample = 2 * data.arrays["attention_mask"].sum(1) * 16 * 4  # two fp32 states of 16 per real token
    fit = int((np.cumsum(per_sample) <= 1 << 20).sum())
    assert 8 < fit < 1400
    cfg = RecoverConfig(steps=1, batch=8, block_steps=2, teacher_cache_mb=1)
    with caplog.at_level("WARNING"):
        result = reconstruct_blocks(_call(student), _call(teacher), student, teacher, held, data, cfg, "bert")
    assert result.samples == fit and result.record()["samples"] == fit
    assert f"the first {fit} of the 1400 samples fit in teacher_cache_mb (1 MB)" in caplog.text


def test_block_outputs_stop_at_the_budget_and_consume_their_inputs():
    from compressor.recover.blockwise import _outputs

    teacher = _bert()
    data = _data()
    per_sample = 2 * data.arrays["attention_mask"].sum(1) * 16 * 4
    first = _outputs(_call(teacher), teacher.encoder.layer, 0, None, data, 8, budget=int(per_sample[:20].sum()),
                     least=8)
    assert sorted(first) == list(range(20))
    assert len(_outputs(_call(teacher), teacher.encoder.layer, 0, None, data, 8, budget=0, least=8)) == 8
    everything = _outputs(_call(teacher), teacher.encoder.layer, 0, None, data, 8)
    _outputs(_call(teacher), teacher.encoder.layer, 1, everything, data, 8)
    assert everything == {}  # each row dropped once read: the two states per sample are the peak


def test_block_steps_must_not_be_negative_and_only_they_allow_no_global_steps():
    with pytest.raises(ValueError, match=r"option 'block_steps' must be >= 0, got -1"):
        RecoverConfig(block_steps=-1)
    with pytest.raises(ValueError, match=r"option 'steps' must be >= 1, got 0"):
        RecoverConfig(steps=0)
    assert RecoverConfig(steps=0, block_steps=5).steps == 0
    with pytest.raises(ValueError, match=r"option 'teacher_cache_mb' must be > 0 with block_steps \(the block phase "
                                         r"keeps its per-sample states there\), got 0"):
        RecoverConfig(block_steps=5, teacher_cache_mb=0)
    assert RecoverConfig(teacher_cache_mb=0).teacher_cache_mb == 0


class Parallel(torch.nn.Module):
    """Repeated blocks that each read the input (a sum of branches, not a chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(b(x) for b in self.blocks)


def test_blocks_that_are_not_a_chain_are_refused():
    from compressor.errors import UsageError

    student, teacher = Parallel(), Parallel()
    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    data = Dataset({"x": x}, [InputSpec("x", ("N", 8), "float32")], {"x": False}, None, "mem", "")
    with pytest.raises(UsageError) as err:
        reconstruct_blocks(lambda f: student(f["x"]), lambda f: teacher(f["x"]), student, teacher, [], data,
                           RecoverConfig(block_steps=2, batch=8), "net.pt2")
    assert err.value.exit_code == 2
    assert str(err.value) == ("recover: block_steps: the blocks of net.pt2 (blocks) do not form a chain (each called "
                              "once per forward, on the previous block's output, with the same other arguments); set "
                              "block_steps: 0 (the global loop alone)")


class Biased(torch.nn.Module):
    """A chain whose blocks get different side arguments (T5: block 0 makes the position bias the
    others read; Swin: each stage its own resolution), or only keyword arguments."""

    def __init__(self, keywords: bool = False) -> None:
        super().__init__()
        self.keywords = keywords
        self.blocks = torch.nn.ModuleList([Shifted(), Shifted(), Shifted()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, block in enumerate(self.blocks):
            x = block(x=x, shift=0.0) if self.keywords else block(x, float(k))
        return x


class Shifted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, shift: float) -> torch.Tensor:
        return self.fc(x) + shift


@pytest.mark.parametrize("keywords", [False, True])
def test_blocks_with_their_own_side_arguments_or_keyword_calls_train_globally(keywords, caplog):
    """The block phase gives every block block 0's other arguments: blocks that get others would be
    trained towards a function they never compute (T5), or fail (Swin). Such a module, or one whose
    blocks take their hidden state by keyword, trains with the global loop alone; with ``steps: 0``
    it is exit 2."""
    from compressor.errors import UsageError
    from compressor.recover.blockwise import usable_blocks

    student = Biased(keywords)
    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    data = Dataset({"x": x}, [InputSpec("x", ("N", 8), "float32")], {"x": False}, None, "mem", "")
    call = lambda f: student(f["x"])  # noqa: E731
    with caplog.at_level("WARNING", logger="compressor.recover.blockwise"):
        assert usable_blocks(call, student, data, 8, "net.pt2", required=False) is False
    assert "do not form a chain" in caplog.text and "the global loop alone" in caplog.text
    with pytest.raises(UsageError) as err:
        usable_blocks(call, student, data, 8, "net.pt2", required=True)
    assert str(err.value).endswith("with the same other arguments), and steps: 0 leaves nothing else to train; set "
                                   "steps above 0 (the global loop)")


# -- through the command line ----------------------------------------------------------------------

class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x)))


def _recipe(folder, recover: str):
    path = folder / "r.yaml"
    path.write_text("name: r\npasses:\n  - fold-constants\n  - sparsify-nm: {n: 2, m: 4}\n"
                    f"recover: {recover}\n")
    return path


def test_a_module_without_repeated_blocks_trains_globally_and_is_refused_with_no_global_steps(tmp_path, capsys):
    """``block_steps`` is a phase for modules built of a stack of blocks (a transformer); a recipe
    carrying it (``int8-nm-recover``) still serves a module without one through the global loop.
    With ``steps: 0`` nothing would train: exit 2 before anything is written."""
    torch.manual_seed(0)
    program = torch.export.export(MLP().eval(), (torch.zeros(2, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "mlp.pt2"))
    np.savez(tmp_path / "train.npz", x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    code, _, err = run([tmp_path / "mlp.pt2", "--recipe", _recipe(tmp_path, "{steps: 0, block_steps: 5}"), "--train",
                        tmp_path / "train.npz", "-o", tmp_path / "o"], capsys)
    assert code == 2
    assert error_line(err) == (
        "error: recover: block_steps: mlp.pt2 has no stack of repeated blocks to reconstruct one by one (an "
        "nn.ModuleList of layers of one class, each feeding the next, as in a Hugging Face encoder) and steps: 0 "
        "leaves nothing else to train; set steps above 0 (the global loop)")
    assert not (tmp_path / "o").exists()
    code, _, err = run([tmp_path / "mlp.pt2", "--recipe", _recipe(tmp_path, "{steps: 5, block_steps: 5}"), "--train",
                        tmp_path / "train.npz", "--eval", tmp_path / "train.npz", "--latency-runs", "1", "--max-drop",
                        "1", "-o", tmp_path / "g"], capsys)
    assert code == 0, err
    recovery = json.loads((tmp_path / "g" / "manifest.json").read_text())["recovery"]
    assert recovery["steps"] == 5 and "blockwise" not in recovery


def test_hf_encoder_recovers_block_wise_then_globally(tmp_path, capsys, monkeypatch):
    import compressor.recover.train as train_mod

    passes = []  # every pass of a model (teacher or student) over the held-out samples
    real = train_mod.outputs_on
    monkeypatch.setattr(train_mod, "outputs_on", lambda *a: passes.append(1) or real(*a))
    model = _bert()
    model.save_pretrained(tmp_path / "bert")
    data = _data(64).arrays
    np.savez(tmp_path / "train.npz", **data)
    np.savez(tmp_path / "calib.npz", **{k: v[:16] for k, v in data.items()})
    records, files = {}, {}
    counts = {}
    for block_steps in (0, 8, "8 again", "8 harmful"):
        passes.clear()
        lr = "0.9" if "harmful" in str(block_steps) else "1.0e-2"  # a rate that wrecks the blocks
        recipe = _recipe(tmp_path, f"{{steps: 4, batch: 8, block_steps: {str(block_steps)[0]}, block_lr: {lr}, "
                                   "holdout: 0.25, eval_every: 2}")
        out = tmp_path / f"o{block_steps}".replace(" ", "-")
        code, _, err = run([tmp_path / "bert", "--recipe", recipe, "--train", tmp_path / "train.npz", "--calib",
                            tmp_path / "calib.npz", "--eval", tmp_path / "calib.npz", "--latency-runs", "1",
                            "--max-drop", "1", "-o", out], capsys)
        assert code == 0, err
        manifest = json.loads((out / "manifest.json").read_text())
        records[block_steps], files[block_steps] = manifest["recovery"], [f["sha256"] for f in manifest["files"]]
        counts[block_steps] = len(passes)
    assert "blockwise" not in records[0]
    blocks = records[8]["blockwise"]
    assert blocks["blocks"] == "encoder.layer" and blocks["count"] == 2 and blocks["steps_per_block"] == 8
    assert records[8]["steps"] == 4
    # the global loop starts from the block-wise weights: its held-out drop before its first step is lower
    assert records[8]["holdout_drop"][0][1] < records[0]["holdout_drop"][0][1], records
    assert files[8] == files["8 again"]  # same seed, byte-identical artifact
    assert blocks["kept"] and blocks["holdout_drop_before_after"][1] < blocks["holdout_drop_before_after"][0]
    # a block phase that raises the held-out drop is undone: weights, masks and their shadows
    # go back, so the global loop gives what it gives without the phase, byte for byte
    harmful = records["8 harmful"]["blockwise"]
    assert not harmful["kept"] and harmful["holdout_drop_before_after"][1] > harmful["holdout_drop_before_after"][0]
    assert files["8 harmful"] == files[0]
    # the teacher's held-out outputs are computed once, and the global loop starts from the
    # drop the phase measured last: teacher 1 + student before and after the phase + 2 evaluations
    assert counts == {0: 4, 8: 5, "8 again": 5, "8 harmful": 5}, counts
    # undone, it starts where the run without blocks starts (that run measured it itself)
    assert records["8 harmful"]["holdout_drop"][0][1] == records[0]["holdout_drop"][0][1]


def test_a_block_phase_that_leaves_nan_outputs_is_undone():
    """A NaN held-out drop is the worst drop (``drop_order``), not one that ``after > before`` lets pass."""
    from compressor.recover.blockwise import BlockResult, keep_if_better
    from compressor.recover.train import outputs_on

    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    data = Dataset({"x": np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)},
                   [InputSpec("x", ("N", 8), "float32")], {"x": False}, None, "mem", "")
    held = [MaskedParam("weight", student.weight, nm_mask(student.weight, N, M), student.weight.detach().clone(),
                        ("nm", N, M))]
    start = student.weight.detach().clone()

    def phase() -> BlockResult:
        with torch.no_grad():
            student.weight.fill_(float("nan"))
        return BlockResult("layers", 1, [(1.0, 1.0)], 0.0)

    call = lambda f: student(f["x"])  # noqa: E731
    result = keep_if_better(call, outputs_on(lambda f: teacher(f["x"]), data, 8), student, held, data, 8, "cosine",
                            phase)
    assert not result.kept and np.isnan(result.holdout_drop[1])
    assert torch.equal(student.weight, start)
