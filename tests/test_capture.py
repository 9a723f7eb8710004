"""Capture of every supported format, checked against torch through ONNX Runtime; failure paths."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from compressor import model_io
from compressor.capture import Captured, capture
from compressor.corpus import stdlib_sentences
from compressor.errors import CaptureError, DataError
from compressor.inputs import parse_input_overrides

# torch 2.13 deprecates torch.jit.script/trace; the tests still write TorchScript files users have.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


class TinyConvNet(torch.nn.Module):
    """Conv + BatchNorm + ReLU + pooling + Linear: a classifier in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(images))).mean((2, 3)))


class SignBranch(torch.nn.Module):
    """Data-dependent control flow (scripted into an ONNX If)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            return self.fc(x) + y
        return self.fc(x) - y


def _net() -> TinyConvNet:
    torch.manual_seed(0)
    net = TinyConvNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Check the model, then run it in ONNX Runtime."""
    onnx.checker.check_model(model_io.to_proto(model))
    session = ort.InferenceSession(model_io.model_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _images(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)


def _reference(module: torch.nn.Module, *arrays: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(a) for a in arrays)).numpy()


def _input_shape(model: ir.Model, index: int = 0) -> list:
    return [d if isinstance(d, int) else None for d in model.graph.inputs[index].shape]


# -- formats --------------------------------------------------------------------------------------

def test_onnx_file_is_read_as_is(tmp_path):
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }""")
    onnx.save(proto, tmp_path / "relu.onnx")
    captured = capture(tmp_path / "relu.onnx")
    assert isinstance(captured, Captured) and captured.source_format == "onnx"
    x = np.array([[-1, 0, 2, -3]], dtype=np.float32)
    np.testing.assert_array_equal(_run(captured.model, {"x": x})[0], np.maximum(x, 0))


def test_pt2_matches_torch_and_keeps_dynamic_batch(tmp_path, capfd):
    net = _net()
    program = torch.export.export(net, (torch.randn(2, 3, 16, 16),),
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    torch.export.save(program, tmp_path / "net.pt2")
    captured = capture(tmp_path / "net.pt2")
    assert captured.source_format == "pt2"
    assert [v.name for v in captured.model.graph.inputs] == ["images"]
    assert [v.name for v in captured.model.graph.outputs] == ["linear"]  # the exporter names outputs after ops
    assert _input_shape(captured.model) == [None, 3, 16, 16]
    # The exporter's optimizer fuses BatchNorm into the Conv.
    assert "BatchNormalization" not in {n.op_type for n in captured.model.graph}
    for batch in (1, 3):
        np.testing.assert_allclose(_run(captured.model, {"images": _images(batch)})[0],
                                   _reference(net, _images(batch)), rtol=1e-4, atol=1e-5)
    assert capfd.readouterr().out == ""  # torch's chatter stays off stdout


def test_pt2_input_override_fixes_batch(tmp_path):
    program = torch.export.export(_net(), (torch.randn(2, 3, 16, 16),),
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    torch.export.save(program, tmp_path / "net.pt2")
    captured = capture(tmp_path / "net.pt2", input_overrides=parse_input_overrides(["images=4x3x16x16"]))
    assert _input_shape(captured.model) == [4, 3, 16, 16]
    with pytest.raises(DataError, match="axis 1 is fixed to 3 in the model, not 5"):
        capture(tmp_path / "net.pt2", input_overrides=parse_input_overrides(["images=4x5x16x16"]))


def test_pt2_with_dict_output_names_outputs_after_keys(tmp_path):
    class TwoHeads(torch.nn.Module):
        def forward(self, x):
            return {"logits": x * 2, "probs": torch.softmax(x, -1)}

    torch.export.save(torch.export.export(TwoHeads(), (torch.randn(2, 3),)), tmp_path / "heads.pt2")
    captured = capture(tmp_path / "heads.pt2")
    assert [v.name for v in captured.model.graph.outputs] == ["logits", "probs"]


def test_pt2_folded_linear_weights_keep_their_parameter_names(tmp_path):
    """Linear on [N, S, C] exports as MatMul(x, Transpose(W)); the exporter folds the
    transpose into ``val_<n>``. The weight gets its parameter's name back, so a recipe
    scope on weight names (``re:.*classifier.*``) finds it."""
    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Linear(8, 16)
            self.classifier = torch.nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.relu(self.encoder(x)))

    module = Tagger().eval()
    torch.export.save(torch.export.export(module, (torch.randn(2, 5, 8),)), tmp_path / "tagger.pt2")
    model = capture(tmp_path / "tagger.pt2").model
    weights = {n.inputs[1].name for n in model.graph if n.op_type == "MatMul"}
    assert weights == {"encoder.weight", "classifier.weight"}
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(model, {"x": x})[0], _reference(module, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_matches_torch(tmp_path, how):
    net = _net()
    scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, (torch.randn(2, 3, 16, 16),))
    scripted.save(str(tmp_path / "net.pt"))
    captured = capture(tmp_path / "net.pt", input_overrides=parse_input_overrides(["images=?x3x16x16"]))
    assert captured.source_format == "torchscript"
    assert [v.name for v in captured.model.graph.inputs] == ["images"]
    assert [v.name for v in captured.model.graph.outputs] == ["output"]
    assert _input_shape(captured.model) == [None, 3, 16, 16]
    for batch in (1, 3):
        np.testing.assert_allclose(_run(captured.model, {"images": _images(batch)})[0],
                                   _reference(net, _images(batch)), rtol=1e-4, atol=1e-5)


class ScaledBySampleRate(torch.nn.Module):
    """silero-vad's signature in miniature: audio ``x`` and a 0-d int64 sample rate ``sr``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (sr.to(x.dtype) / 16000.0)


def test_torchscript_rank0_input_from_input_scalar(tmp_path):
    """``--input sr=scalar:int64``: TorchScript records no shapes, the 0-d example comes from the flag."""
    torch.manual_seed(0)
    module = ScaledBySampleRate().eval()
    torch.jit.script(module).save(str(tmp_path / "vad.pt"))
    captured = capture(tmp_path / "vad.pt", input_overrides=parse_input_overrides(["x=2x4", "sr=scalar:int64"]))
    sr = next(v for v in captured.model.graph.inputs if v.name == "sr")
    assert sr.shape is not None and len(sr.shape) == 0 and sr.dtype == ir.DataType.INT64
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x), torch.tensor(8000)).numpy()
    np.testing.assert_allclose(_run(captured.model, {"x": x, "sr": np.array(8000, np.int64)})[0], want,
                               rtol=1e-5, atol=1e-6)


def test_torchscript_control_flow_keeps_both_branches(tmp_path):
    torch.manual_seed(0)
    module = SignBranch().eval()
    torch.jit.script(module).save(str(tmp_path / "branch.pt"))
    captured = capture(tmp_path / "branch.pt", input_overrides=parse_input_overrides(["x=2x4", "y=2x4"]))
    assert "If" in {n.op_type for n in captured.model.graph}
    y = np.ones((2, 4), np.float32)
    for sign in (1.0, -1.0):
        x = sign * np.abs(np.random.default_rng(0).standard_normal((2, 4))).astype(np.float32)
        np.testing.assert_allclose(_run(captured.model, {"x": x, "y": y})[0], _reference(module, x, y),
                                   rtol=1e-5, atol=1e-6)


def test_torchscript_without_input_says_which_arguments(tmp_path):
    torch.jit.script(_net()).save(str(tmp_path / "net.pt"))
    with pytest.raises(CaptureError, match=r"records no input shapes; pass --input NAME=SHAPE for each forward "
                                           r"argument \(images\)"):
        capture(tmp_path / "net.pt")
    with pytest.raises(CaptureError, match=r"--input pixels: the TorchScript module takes no argument 'pixels'; "
                                           r"its forward arguments are images"):
        capture(tmp_path / "net.pt", input_overrides=parse_input_overrides(["pixels=1x3x16x16"]))


def test_full_pickle_needs_trust_then_matches_torch(tmp_path):
    net = _net()
    torch.save(net, tmp_path / "net.pt")
    with pytest.raises(CaptureError, match=r"a full pickle \(it refers to [\w.]*TinyConvNet\), which can run "
                                           r"arbitrary code when loaded; pass --trust-pickle only if you trust"):
        capture(tmp_path / "net.pt", input_overrides=parse_input_overrides(["images=?x3x16x16"]))
    with pytest.raises(CaptureError, match=r"records no input shapes; pass --input NAME=SHAPE"):
        capture(tmp_path / "net.pt", trust_pickle=True)
    captured = capture(tmp_path / "net.pt", trust_pickle=True,
                       input_overrides=parse_input_overrides(["images=?x3x16x16"]))
    assert captured.source_format == "pickle"
    assert _input_shape(captured.model) == [None, 3, 16, 16]
    np.testing.assert_allclose(_run(captured.model, {"images": _images(3)})[0], _reference(net, _images(3)),
                               rtol=1e-4, atol=1e-5)


# -- Hugging Face directories ---------------------------------------------------------------------

def _tiny_hf(tmp_path, kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64)
    else:
        config = transformers.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=64)
    model = transformers.AutoModel.from_config(config).eval()
    model.save_pretrained(tmp_path / kind)
    return model, tmp_path / kind


@pytest.mark.parametrize("kind, names", [("bert", ["input_ids", "attention_mask", "token_type_ids"]),
                                         ("distilbert", ["input_ids", "attention_mask"])])
def test_hf_directory_matches_torch(tmp_path, kind, names):
    model, directory = _tiny_hf(tmp_path, kind)
    captured = capture(directory)
    assert captured.source_format == "hf"
    graph = captured.model.graph
    assert [v.name for v in graph.inputs] == names
    assert [v.name for v in graph.outputs] == ["last_hidden_state"]
    assert all(str(v.shape[0]) == "batch" and str(v.shape[1]) == "sequence" for v in graph.inputs)
    assert not any("pooler" in name for name in graph.initializers)
    assert any(name.startswith("embeddings.") for name in graph.initializers)  # the HF parameter names
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 120, (3, 9)), "attention_mask": np.ones((3, 9), np.int64),
             "token_type_ids": np.zeros((3, 9), np.int64)}
    feeds["attention_mask"][0, 5:] = 0  # a padded row
    feeds = {n: feeds[n].astype(np.int64) for n in names}
    with torch.no_grad():
        expected = model(**{n: torch.from_numpy(a) for n, a in feeds.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(_run(captured.model, feeds)[0], expected, rtol=1e-4, atol=1e-5)


def test_hf_input_override_fixes_every_text_input(tmp_path):
    _model, directory = _tiny_hf(tmp_path, "bert")
    captured = capture(directory, input_overrides=parse_input_overrides(["input_ids=1x8"]))
    assert [_input_shape(captured.model, i) for i in range(3)] == [[1, 8]] * 3
    with pytest.raises(CaptureError, match=r"--input images: BertModel takes no input 'images'; its inputs are "
                                           r"input_ids, attention_mask, token_type_ids"):
        capture(directory, input_overrides=parse_input_overrides(["images=1x3x8x8"]))


# -- failures -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(CaptureError, match=r"model\.pt2: no such file$"):
        capture(tmp_path / "model.pt2")


def test_truncated_onnx(tmp_path):
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 64] x) => (float[1, 64] y) { y = Add(x, w) }""")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((1, 64), np.float32), "w"))
    data = proto.SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptureError, match=r"cut\.onnx: not a readable ONNX model .*check that the file is complete"):
        capture(tmp_path / "cut.onnx")


def test_random_bytes_named_pt(tmp_path):
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CaptureError, match=r"noise\.pt: not a PyTorch file \("):
        capture(tmp_path / "noise.pt")


@pytest.mark.parametrize("name", ["model.pt", "model.pt2"])
def test_truncated_torch_archives(tmp_path, name):
    torch.jit.script(_net()).save(str(tmp_path / "full.pt"))
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    expected = "not a PyTorch file" if name.endswith(".pt") else "not a torch.export program"
    with pytest.raises(CaptureError, match=expected):
        capture(tmp_path / name)


def test_state_dict(tmp_path):
    torch.save(_net().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CaptureError, match=r"weights\.pt: a state_dict \(weights only, no graph\); pass --model-class "
                                           r"MODULE:CLASS .*; or save a \.pt2 with torch\.export\.save"):
        capture(tmp_path / "weights.pt")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CaptureError, match=r"a directory without config\.json, so not a Hugging Face model directory"):
        capture(tmp_path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CaptureError, match=r"config\.json but no weights \(model\.safetensors or pytorch_model\.bin\)"):
        capture(tmp_path)


def test_unknown_extension_and_empty_file(tmp_path):
    (tmp_path / "model.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CaptureError, match=r"unknown model format '\.h5'; supported: an \.onnx file, a \.pt2 file"):
        capture(tmp_path / "model.h5")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CaptureError, match=r"empty\.pt: the file is empty"):
        capture(tmp_path / "empty.pt")


def test_errors_are_one_line(tmp_path):
    torch.save(_net(), tmp_path / "net.pt")
    (tmp_path / "noise.pt").write_bytes(b"\x80\x02garbage" * 50)
    for path in (tmp_path / "net.pt", tmp_path / "noise.pt", tmp_path / "nothing.onnx"):
        with pytest.raises(CaptureError) as info:
            capture(path)
        assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


# -- corpus ---------------------------------------------------------------------------------------

def test_stdlib_sentences_are_deterministic_english():
    first = stdlib_sentences(40)
    assert first == stdlib_sentences(40) and len(set(first)) == 40
    assert stdlib_sentences(10, offset=30) == first[30:40]
    assert all(s[0].isupper() and len(s.split()) >= 6 and ">>>" not in s for s in first)
    with pytest.raises(DataError, match="only"):
        stdlib_sentences(10**6)
