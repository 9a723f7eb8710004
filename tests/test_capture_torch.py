"""A PyTorch user's own files: ``torch.save(model)`` pickles and state_dicts, compressed from the CLI.

Each test writes the user's folder (a ``mynet.py`` or a ``train.py``, the saved model, the
data) into a tmp dir and runs there, as ``compress`` would be run: no ``PYTHONPATH``, and
no ``--input`` where the data carries the shapes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressor import model_io
from compressor.capture import capture
from tests.cliutil import error_line, run

MYNET = textwrap.dedent('''
    import torch


    class Net(torch.nn.Module):
        def __init__(self, hidden: int = 16) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(4, hidden)
            self.fc2 = torch.nn.Linear(hidden, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))


    def make(hidden: int = 16) -> Net:
        return Net(hidden)
''')

TRAIN = MYNET + textwrap.dedent('''

    if __name__ == "__main__":
        torch.manual_seed(0)
        torch.save(Net(8), "model.pt")
''')




def fail(argv, capsys, code: int, pattern: str) -> str:
    got, _, err = run(argv, capsys)
    assert got == code, err
    line = error_line(err)
    assert re.search(pattern, line), line
    assert not Path("out").exists()
    return line


@contextlib.contextmanager
def user_module(folder: Path, name: str) -> Iterator[ModuleType]:
    """Import the user's module the way their training script did, then forget it again."""
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)


def samples(n: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def outputs(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def reference(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


@pytest.fixture
def user_dir(tmp_path, monkeypatch) -> Path:
    """A folder with mynet.py and calibration data, as the working directory."""
    (tmp_path / "mynet.py").write_text(MYNET)
    np.savez(tmp_path / "c.npz", x=samples())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def state_dict_of(user_dir) -> torch.nn.Module:
    """A trained-looking Net(hidden=8) whose state_dict the tests save in several wrappings."""
    with user_module(user_dir, "mynet") as mynet:
        torch.manual_seed(0)
        return mynet.Net(8).eval()


@pytest.fixture(scope="module")
def trained_by_script(tmp_path_factory) -> Path:
    """``python train.py`` in a folder: the class Net of the pickle lives in ``__main__``."""
    folder = tmp_path_factory.mktemp("script")
    (folder / "train.py").write_text(TRAIN)
    np.savez(folder / "c.npz", x=samples())
    subprocess.run([sys.executable, "train.py"], cwd=folder, check=True, capture_output=True)
    return folder


@pytest.fixture
def main_pickle(trained_by_script, tmp_path) -> Path:
    """A fresh copy of the script's folder."""
    for name in ("train.py", "model.pt", "c.npz"):
        shutil.copy(trained_by_script / name, tmp_path / name)
    return tmp_path


# -- pickled modules ------------------------------------------------------------------------------

def test_pickle_of_a_module_class_compresses_from_its_folder_without_input(user_dir, capsys):
    with user_module(user_dir, "mynet") as mynet:
        torch.manual_seed(0)
        net = mynet.Net()
        torch.save(net, user_dir / "model.pt")
    path = list(sys.path)
    code, _, err = run(["model.pt", "--trust-pickle", "--recipe", "fold", "--calib", "c.npz", "-o", "out",
                        "--latency-runs", "1"], capsys)
    assert code == 0, err
    manifest = json.loads(Path("out/manifest.json").read_text())
    assert manifest["model"]["format"] == "pickle"
    assert manifest["input_spec"][0]["name"] == "x"
    assert manifest["input_spec"][0]["shape"][1] == 4 and not isinstance(manifest["input_spec"][0]["shape"][0], int)
    np.testing.assert_allclose(outputs(Path("out/model.onnx"), samples(5, 1)), reference(net, samples(5, 1)),
                               rtol=1e-5, atol=1e-5)
    assert sys.path == path and "mynet" not in sys.modules  # the import path is restored, mynet forgotten
    assert not (user_dir / "__pycache__").exists()  # nothing written into the user's folder


def test_packages_found_elsewhere_stay_imported(user_dir, monkeypatch):
    """Only what was found in the added folders is forgotten: a package from a path entry inside them
    (a .venv's site-packages in the working directory) stays."""
    lib = user_dir / "venv-site-packages"
    (lib / "helperpkg").mkdir(parents=True)
    (lib / "helperpkg" / "__init__.py").write_text("SCALE = 2.0\n")
    (user_dir / "scaled.py").write_text("import helperpkg\n" + MYNET)
    monkeypatch.syspath_prepend(str(lib))
    with user_module(user_dir, "scaled") as scaled:
        torch.save(scaled.Net().state_dict(), user_dir / "model.pt")
    sys.modules.pop("helperpkg")
    capture(user_dir / "model.pt", model_class="scaled:Net", example_inputs={"x": samples()})
    assert "scaled" not in sys.modules and "helperpkg" in sys.modules
    del sys.modules["helperpkg"]


def test_pickle_from_another_folder_finds_the_class_next_to_the_model(user_dir, tmp_path_factory, monkeypatch, capsys):
    with user_module(user_dir, "mynet") as mynet:
        torch.save(mynet.Net(), user_dir / "model.pt")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    captured = capture(user_dir / "model.pt", trust_pickle=True, example_inputs={"x": samples()})
    assert [v.name for v in captured.model.graph.inputs] == ["x"]


def test_pickle_whose_class_lives_in_main_says_the_two_fixes(main_pickle, monkeypatch, capsys):
    monkeypatch.chdir(main_pickle)
    line = fail(["model.pt", "--trust-pickle", "--recipe", "fold", "--calib", "c.npz", "-o", "out"], capsys, 2,
                r"model\.pt: the pickled class Net was defined in the script that saved the model \(__main__\.Net\)")
    assert re.search(r"fix: \(1\) move class Net into a module next to that script, e.g\. mynet\.py, "
                     r"`from mynet import Net` there, and save the model again; or \(2\) pass --import train "
                     r"\(train\.py here defines class Net\) and keep its training code under "
                     r"`if __name__ == \"__main__\":`", line), line


def test_import_defines_the_main_class(main_pickle, monkeypatch, capsys):
    monkeypatch.chdir(main_pickle)
    code, _, err = run(["model.pt", "--trust-pickle", "--import", "train", "--recipe", "fold", "--calib", "c.npz",
                        "-o", "out", "--latency-runs", "1"], capsys)
    assert code == 0, err
    assert "train" not in sys.modules


def test_import_of_a_module_without_the_class(main_pickle, monkeypatch, capsys):
    monkeypatch.chdir(main_pickle)
    (main_pickle / "other.py").write_text("X = 1\n")
    fail(["model.pt", "--trust-pickle", "--import", "other", "--recipe", "fold", "--calib", "c.npz", "-o", "out"],
         capsys, 2, r"the pickled class Net was defined in the script .* \(the --import module other defines no Net\)")


def test_import_that_fails_names_the_module_and_the_error(user_dir, capsys):
    torch.save(torch.nn.Linear(4, 3), user_dir / "model.pt")
    fail(["model.pt", "--import", "nosuch", "--recipe", "fold", "--calib", "c.npz", "-o", "out"], capsys, 2,
         r"^error: --import nosuch: cannot import it \(ModuleNotFoundError: No module named 'nosuch'\); it must be a "
         r"module in the working directory \(.*\), in the model's folder, or installed$")
    (user_dir / "needs.py").write_text("import librosa_not_here\n")
    fail(["model.pt", "--import", "needs", "--recipe", "fold", "--calib", "c.npz", "-o", "out"], capsys, 2,
         r"^error: --import needs: cannot import it \(ModuleNotFoundError: No module named 'librosa_not_here'\); "
         r"needs imports librosa_not_here, which is not installed: install the package that provides it$")
    (user_dir / "broken.py").write_text("import sys\nraise RuntimeError('needs a GPU')\n")
    fail(["model.pt", "--import", "broken", "--recipe", "fold", "--calib", "c.npz", "-o", "out"], capsys, 2,
         r"^error: --import broken: cannot import it \(RuntimeError: needs a GPU\); it fails when imported: fix it, "
         r"and keep code that should not run on import under `if __name__ == \"__main__\":`$")
    (user_dir / "script.py").write_text("import sys\nsys.exit('usage: script.py DATA')\n")
    fail(["model.pt", "--import", "script", "--recipe", "fold", "--calib", "c.npz", "-o", "out"], capsys, 2,
         r"^error: --import script: cannot import it \(SystemExit: usage: script\.py DATA\)")


def test_pickle_whose_module_is_missing(user_dir, tmp_path_factory, monkeypatch, capsys):
    with user_module(user_dir, "mynet") as mynet:
        torch.save(mynet.Net(), user_dir / "model.pt")
    (user_dir / "mynet.py").unlink()
    fail(["model.pt", "--trust-pickle", "--recipe", "fold", "--calib", "c.npz", "-o", "out"], capsys, 2,
         r"model\.pt: the pickle needs class mynet\.Net, but no module mynet can be imported from the working "
         r"directory, the model's folder or the installed packages")


def test_shapes_need_input_or_data(user_dir, capsys):
    with user_module(user_dir, "mynet") as mynet:
        torch.save(mynet.Net(), user_dir / "model.pt")
    fail(["model.pt", "--trust-pickle", "--recipe", "fold", "-o", "out"], capsys, 2,
         r"a pickled Net records no input shapes; pass --input NAME=SHAPE for each forward argument \(x\), e\.g\. "
         r"--input x=1x3x224x224 \(append :int64 for integer inputs\), or \(compress, sweep\) --calib or --eval "
         r"data keyed by argument name$")
    fail(["model.pt", "--trust-pickle", "--recipe", "fold", "--calib", "nope.npz", "-o", "out"], capsys, 2,
         r"^error: calib nope\.npz: no such file$")
    (user_dir / "bad.npz").write_bytes(b"not a zip")
    fail(["model.pt", "--trust-pickle", "--recipe", "fold", "--eval", "bad.npz", "-o", "out"], capsys, 2,
         r"^error: eval bad\.npz: not an \.npz file")
    np.savez(user_dir / "wrong.npz", images=samples())
    fail(["model.pt", "--trust-pickle", "--recipe", "fold", "--calib", "wrong.npz", "-o", "out"], capsys, 2,
         r"the data holds 'images', but the pickled Net takes no argument 'images'; its forward arguments are x")


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_and_float64_data_give_the_shapes(user_dir):
    with user_module(user_dir, "mynet") as mynet:
        torch.manual_seed(0)
        net = mynet.Net().eval()
        torch.jit.script(net).save(str(user_dir / "scripted.pt"))
        torch.save(net, user_dir / "pickled.pt")
    for name in ("scripted.pt", "pickled.pt"):  # numpy's default float64 is taken as the parameters' float32
        captured = capture(user_dir / name, trust_pickle=True, example_inputs={"x": samples().astype(np.float64)})
        value = captured.model.graph.inputs[0]
        assert value.dtype.name == "FLOAT" and value.shape[1] == 4 and not isinstance(value.shape[0], int), value
        assert any("input shapes from the first samples of the data (x 2x4 float32)" in n for n in captured.notes)
        path = model_io.save_model(captured.model, user_dir / f"{name}.onnx")
        np.testing.assert_allclose(outputs(path, samples(5, 4)), reference(net, samples(5, 4)), rtol=1e-5, atol=1e-5)


def test_export_failure_on_data_shapes_says_pass_input(user_dir, capsys):
    (user_dir / "single.py").write_text(MYNET.replace("self.fc1(x)", "self.fc1(x.reshape(1, 4))"))
    with user_module(user_dir, "single") as single:
        torch.save(single.Net(), user_dir / "model.pt")
    fail(["model.pt", "--trust-pickle", "--recipe", "fold", "--calib", "c.npz", "-o", "out"], capsys, 2,
         r"model\.pt: torch\.onnx\.export failed \(.*\); .*; the example inputs were the data's first samples "
         r"\(x 2x4 float32\), their first axis taken as the batch axis: if the model takes them otherwise, pass "
         r"--input NAME=SHAPE$")
    code, _, err = run(["model.pt", "--trust-pickle", "--recipe", "fold", "--input", "x=4", "--calib", "c.npz",
                        "-o", "out", "--latency-runs", "1"], capsys)
    assert code == 0, err  # then each row of the data is one whole input (data.py's second layout)


# -- state_dicts ----------------------------------------------------------------------------------

def test_state_dict_with_model_class_matches_torch(user_dir, state_dict_of, capsys):
    torch.save(state_dict_of.state_dict(), user_dir / "model.pt")
    code, _, err = run(["model.pt", "--model-class", "mynet:Net", "--model-kwargs", "{hidden: 8}", "--recipe", "fold",
                        "--calib", "c.npz", "-o", "out", "--latency-runs", "1"], capsys)
    assert code == 0, err
    assert json.loads(Path("out/manifest.json").read_text())["model"]["format"] == "state_dict"
    np.testing.assert_allclose(outputs(Path("out/model.onnx"), samples(7, 2)), reference(state_dict_of, samples(7, 2)),
                               rtol=1e-5, atol=1e-5)
    assert "mynet" not in sys.modules


@pytest.mark.parametrize("wrap", ["model", "state_dict", "model_state_dict"])
def test_checkpoint_wrappers_and_dataparallel_prefix(user_dir, state_dict_of, wrap):
    weights = {f"module.{k}": v for k, v in state_dict_of.state_dict().items()}
    torch.save({wrap: weights, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, user_dir / "ckpt.pth")
    captured = capture(user_dir / "ckpt.pth", model_class="mynet:make", model_kwargs={"hidden": 8},
                       example_inputs={"x": samples(1)})
    assert captured.source_format == "state_dict"
    assert any(f"under {wrap!r}" in n and "'module.' prefix" in n for n in captured.notes), captured.notes
    path = model_io.save_model(captured.model, user_dir / "m.onnx")
    np.testing.assert_allclose(outputs(path, samples(3, 3)), reference(state_dict_of, samples(3, 3)),
                               rtol=1e-5, atol=1e-5)


def test_state_dict_without_model_class_says_what_to_pass(user_dir, state_dict_of, capsys):
    torch.save(state_dict_of.state_dict(), user_dir / "model.pt")
    fail(["model.pt", "--recipe", "fold", "--calib", "c.npz", "-o", "out"], capsys, 2,
         r"model\.pt: a state_dict \(weights only, no graph\); pass --model-class MODULE:CLASS naming the "
         r"nn\.Module class \(or a function returning one\) these weights belong to \(defined here: mynet:Net\), "
         r"e\.g\. --model-class mynet:Net "
         r"for class Net in mynet\.py in the working directory, and --model-kwargs '\{hidden: 8\}' for its "
         r"constructor arguments")


def test_state_dict_with_wrong_keys_names_them(user_dir, state_dict_of, capsys):
    weights = state_dict_of.state_dict()
    weights["head.weight"] = weights.pop("fc2.weight")
    torch.save(weights, user_dir / "model.pt")
    fail(["model.pt", "--model-class", "mynet:Net", "--model-kwargs", "{hidden: 8}", "--recipe", "fold",
          "--calib", "c.npz", "-o", "out"], capsys, 2,
         r"model\.pt: the state_dict does not fit mynet:Net: missing fc2\.weight; unexpected head\.weight; "
         r"check --model-class names the class these weights were saved from")


def test_state_dict_with_other_sizes_says_check_the_kwargs(user_dir, state_dict_of, capsys):
    torch.save(state_dict_of.state_dict(), user_dir / "model.pt")
    fail(["model.pt", "--model-class", "mynet:Net", "--recipe", "fold", "--calib", "c.npz", "-o", "out"], capsys, 2,
         r"model\.pt: the state_dict does not fit mynet:Net: size mismatch for fc1\.weight: copying a param with "
         r"shape torch\.Size\(\[8, 4\]\) from checkpoint, the shape in current model is torch\.Size\(\[16, 4\]\)\.? ?; "
         r"check --model-kwargs builds the model the weights were saved from")


@pytest.mark.parametrize("spec,kwargs,pattern", [
    ("mynet:Nett", None, r"^error: --model-class mynet:Nett: module mynet \(.*mynet\.py\) has no 'Nett'; "
                         r"its nn\.Module classes: Net"),
    ("nosuch:Net", None, r"^error: --model-class nosuch:Net: cannot import nosuch \(ModuleNotFoundError: No module "
                         r"named 'nosuch'\)"),
    ("mynet.Net", None, r"^error: --model-class 'mynet\.Net': expected MODULE:NAME"),
    ("mynet:Net", "{width: 8}", r"^error: --model-class mynet:Net: Net\(width=8\) failed \(TypeError: .*unexpected "
                                r"keyword argument 'width'\); its signature is Net\(hidden: int = 16\)"),
    ("mynet:Net", "[8]", r"^error: --model-kwargs must be a mapping such as '\{hidden: 8\}', got '\[8\]'"),
])
def test_model_class_that_cannot_be_built(user_dir, state_dict_of, capsys, spec, kwargs, pattern):
    torch.save(state_dict_of.state_dict(), user_dir / "model.pt")
    extra = ["--model-kwargs", kwargs] if kwargs else []
    fail(["model.pt", "--model-class", spec, *extra, "--recipe", "fold", "--calib", "c.npz", "-o", "out"],
         capsys, 2, pattern)


def test_model_class_is_for_state_dicts_only(user_dir, capsys, tmp_path):
    fail([Path(__file__).parents[1] / "examples" / "digits_cnn.pt2", "--model-class", "mynet:Net", "--recipe", "fold",
          "-o", "out"], capsys, 2, r"--model-class applies to a state_dict file; digits_cnn\.pt2 is a torch\.export "
                                   r"program, which holds its own graph: leave --model-class out")
    fail(["c.npz", "--model-kwargs", "{hidden: 8}", "--recipe", "fold", "-o", "out"], capsys, 2,
         r"--model-kwargs needs --model-class")


def test_inspect_and_sweep_take_the_model_source_flags(user_dir, state_dict_of, capsys):
    torch.save({"state_dict": state_dict_of.state_dict()}, user_dir / "model.pt")
    source = ["--model-class", "mynet:Net", "--model-kwargs", '{"hidden": 8}']
    code, out, err = run(["inspect", "model.pt", *source, "--input", "x=?x4", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["format"] == "state_dict"
    np.savez(user_dir / "e.npz", x=samples(16, 5))
    code, out, err = run(["sweep", "model.pt", *source, "--pass", "prune-magnitude", "--levels", "0.5",
                          "--eval", "e.npz", "-o", "sweep", "--latency-runs", "0"], capsys)
    assert code == 0, err
    assert "0.5" in out


def test_search_loads_a_state_dict_with_model_class(user_dir, state_dict_of, capsys):
    """``compress search`` takes the model-source flags as ``compress`` does: the state_dict is
    built with ``--model-class`` for the search and for the best artifact."""
    torch.save(state_dict_of.state_dict(), user_dir / "weights.pt")
    np.savez(user_dir / "e.npz", x=samples(16, seed=1))
    code, _, err = run(["search", "weights.pt", "--model-class", "mynet:Net", "--model-kwargs", "{hidden: 8}",
                        "--calib", "c.npz", "--eval", "e.npz", "--max-drop", "0.05", "--latency-runs", "1",
                        "--grid", "{calibrator: [minmax], sparsity: [0], accuracy_control: [false]}", "-o", "se",
                        "-q"], capsys)
    assert code == 0, err
    manifest = json.loads((user_dir / "se" / "best" / "manifest.json").read_text())
    assert manifest["model"]["format"] == "state_dict"
    assert "built mynet:Net(hidden=8) and loaded 4 tensors from the state_dict" in manifest["model"]["notes"]
    assert json.loads((user_dir / "se" / "search.json").read_text())["best"] == 0
