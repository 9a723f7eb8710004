"""``-o DIR`` never removes what the tool did not write, and every JSON file the tool writes is strict.

The refusals run before any long work (exit 2 within the destination check), so most of
these tests are quick; one end-to-end run of the README's main command checks that its
manifest parses as strict JSON (identical outputs: ``sqnr_db`` is ``null``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from compressor.errors import UsageError
from compressor.flow.artifact import (
    MANIFEST,
    ArtifactWriter,
    check_destination,
    deployable_bytes,
    file_entries,
)
from compressor.strict_json import dumps, jsonable
from tests.cliutil import error_line, run, strict_loads

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "digits_cnn.pt2"
CALIB = EXAMPLES / "digits_calib.npz"
EVAL = EXAMPLES / "digits_eval.npz"






def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: file -> sha256, folder -> 'dir', link -> its target."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def user_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text("<html>my site</html>\n")
    (folder / "notes.txt").write_bytes(b"notes \x00\xff binary\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")


def write_artifact(folder: Path, names=("model.onnx",), tool: bool = True, deployable=None) -> dict:
    """An artifact as this tool writes it (``tool: False``: as versions before the marker wrote it;
    ``deployable``: the names deployed, the others companions; ``None``: all)."""
    with ArtifactWriter(folder) as writer:
        files = []
        for name in names:
            path = writer.path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(name.encode() * 10)
            files.append(path)
        deployed = None if deployable is None else [f for f in files if f.name in deployable]
        manifest = {"compressor": "0.1.0", "files": file_entries(writer.path, files, deployed),
                    "versions": {"compressor": "0.1.0"}}
        writer.commit(manifest)
    if not tool:  # as written before the "tool" marker existed (and with a non-strict number)
        data = json.loads((folder / MANIFEST).read_text())
        data.pop("tool", None)
        (folder / MANIFEST).write_text(json.dumps({**data, "sqnr_db": float("inf")}, indent=2))
    return json.loads((folder / MANIFEST).read_text())


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".") and ("partial" in p.name or ".old" in p.name)]


FOLD = ["--recipe", "fold", "--calib", CALIB, "--eval", EVAL, "--latency-runs", "1"]


# -- item 1: -o never removes what it did not write ------------------------------------------------------------

@pytest.mark.parametrize("manifest_text, why", [
    ('{"name": "my web app", "start_url": "/index.html", "files": ["index.html"]}', "not written by compressor"),
    ("this is not json {", "not valid JSON"),
], ids=["foreign-manifest", "invalid-json"])
def test_folder_with_a_foreign_manifest_is_refused_and_kept(tmp_path, capsys, manifest_text, why):
    out = tmp_path / "site"
    user_files(out)
    (out / MANIFEST).write_text(manifest_text)
    before = snapshot(out)
    code, _, err = run([MODEL, *FOLD, "-o", out], capsys)
    assert code == 2, err
    line = error_line(err)
    assert why in line and "manifest.json" in line
    for name in ("index.html", "notes.txt", "sub/"):
        assert name in line
    assert "refusing to overwrite" in line
    assert snapshot(out) == before
    no_leftovers(tmp_path)


def test_artifact_plus_a_user_file_is_refused_and_nothing_removed(tmp_path, capsys):
    out = tmp_path / "out"
    write_artifact(out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, _, err = run([MODEL, *FOLD, "-o", out], capsys)
    assert code == 2, err
    line = error_line(err)
    assert re.search(r"-o .*out: .*files this tool did not write \(notes\.txt\)", line), line
    assert snapshot(out) == before
    no_leftovers(tmp_path)


@pytest.mark.parametrize("tool", [True, False], ids=["marked", "earlier-version"])
def test_artifact_we_wrote_is_replaced(tmp_path, capsys, tool):
    out = tmp_path / "out"
    write_artifact(out, names=("old.onnx", "extra/old.bin"), tool=tool)
    code, _, err = run([MODEL, *FOLD, "-o", out], capsys)
    assert code == 0, err
    manifest = strict_loads((out / MANIFEST).read_text())
    assert manifest["tool"] == "compressor"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["manifest.json", "model.onnx"]
    no_leftovers(tmp_path)


def test_file_entries_flag_the_deployed_files_and_the_size_counts_only_those(tmp_path):
    files = []
    for name, size in (("build_log.json", 5), ("model.engine", 20), ("model.onnx", 10)):
        (tmp_path / name).write_bytes(b"x" * size)
        files.append(tmp_path / name)
    entries = file_entries(tmp_path, files, [tmp_path / "model.engine"])
    assert [(e["path"], e["bytes"], e["deploy"]) for e in entries] == [
        ("build_log.json", 5, False), ("model.engine", 20, True), ("model.onnx", 10, False)]
    assert deployable_bytes(entries) == 20
    assert all(e["deploy"] for e in file_entries(tmp_path, files)) and deployable_bytes(file_entries(tmp_path, files)) == 35
    # a manifest written before the flag existed: every file counts, as its size did then
    assert deployable_bytes([{k: v for k, v in e.items() if k != "deploy"} for e in entries]) == 35


@pytest.mark.parametrize("tool", [True, False], ids=["marked", "earlier-version"])
def test_an_artifact_with_companion_files_is_ours_and_replaced_whole(tmp_path, tool):
    out = tmp_path / "out"
    write_artifact(out, names=("model.onnx", "model_ctx.onnx", "model_ctx_qnn.bin"), tool=tool,
                   deployable={"model_ctx.onnx", "model_ctx_qnn.bin"})
    assert [e["deploy"] for e in json.loads((out / MANIFEST).read_text())["files"]] == [False, True, True]
    check_destination(out)  # the companion is listed, so not foreign
    write_artifact(out, names=("model.xml", "model.bin"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    no_leftovers(tmp_path)


@pytest.mark.parametrize("ours", [False, True], ids=["foreign-manifest", "artifact-plus-keep"])
def test_dot_output_in_a_working_directory_with_user_files(tmp_path, capsys, monkeypatch, ours):
    cwd = tmp_path / "work"
    cwd.mkdir()
    if ours:
        write_artifact(cwd)
    else:
        (cwd / MANIFEST).write_text('{"manifest_version": 3, "name": "extension"}')
    (cwd / "keep.txt").write_text("keep")
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    code, _, err = run([MODEL, *FOLD, "-o", "."], capsys)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith("error: -o .: ") and "keep.txt" in line
    assert snapshot(cwd) == before
    assert Path.cwd() == cwd
    no_leftovers(tmp_path)


def test_dot_output_replaces_our_artifact_in_place(tmp_path, capsys, monkeypatch):
    """The working directory itself is kept (same folder, not a renamed one): only files are swapped."""
    cwd = tmp_path / "work"
    write_artifact(cwd, names=("old.onnx",))
    inode = cwd.stat().st_ino
    monkeypatch.chdir(cwd)
    code, _, err = run([MODEL, *FOLD, "-o", "."], capsys)
    assert code == 0, err
    assert os.stat(".").st_ino == inode and cwd.stat().st_ino == inode
    assert sorted(p.name for p in cwd.iterdir()) == ["manifest.json", "model.onnx"]
    no_leftovers(tmp_path)


def test_relative_output_whose_parent_is_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("keep")
    code, _, err = run([MODEL, *FOLD, "-o", "out"], capsys)
    assert code == 0, err
    assert (tmp_path / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "out"]


def test_symlinked_output_replaces_the_artifact_it_points_to(tmp_path):
    real = tmp_path / "disk" / "art"
    write_artifact(real, names=("old.onnx",))
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    with ArtifactWriter(link) as writer:
        (writer.path / "new.onnx").write_bytes(b"new")
        writer.commit({"compressor": "0.1.0", "files": file_entries(writer.path, [writer.path / "new.onnx"])})
    assert link.is_symlink()
    assert sorted(p.name for p in real.iterdir()) == ["manifest.json", "new.onnx"]
    no_leftovers(tmp_path)
    no_leftovers(real.parent)


def test_a_symlink_inside_an_artifact_is_foreign(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "a.txt").write_text("keep")
    out = tmp_path / "out"
    write_artifact(out)
    (out / "data").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UsageError, match=r"did not write \(data\)"):
        check_destination(out)
    assert (outside / "a.txt").read_text() == "keep"


@pytest.mark.parametrize("manifest", [
    {"tool": "compressor", "files": [{"path": "../victim.txt", "bytes": 1, "sha256": "0" * 64}]},
    {"tool": "compressor", "files": [{"path": "/etc/passwd", "bytes": 1, "sha256": "0" * 64}]},
    {"tool": "compressor"},
    {"compressor": "0.1.0", "files": "model.onnx"},
    ["model.onnx"],
], ids=["parent-path", "absolute-path", "no-files", "files-not-a-list", "not-an-object"])
def test_manifests_that_are_not_ours_are_refused(tmp_path, manifest):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="not written by compressor"):
        check_destination(out)


def test_many_foreign_entries_are_named_a_few_then_counted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text("{}")
    for i in range(9):
        (out / f"f{i}.txt").write_text("x")
    with pytest.raises(UsageError) as err:
        check_destination(out)
    assert "f0.txt, f1.txt, f2.txt, f3.txt, f4.txt +5 more" in str(err.value)


def test_commit_checks_again_and_keeps_a_file_added_during_the_run(tmp_path):
    out = tmp_path / "out"
    write_artifact(out)
    with pytest.raises(UsageError, match=r"did not write \(late\.txt\)"):
        with ArtifactWriter(out) as writer:
            (writer.path / "model.onnx").write_bytes(b"new")
            (out / "late.txt").write_text("written while the model compressed")
            writer.commit({"compressor": "0.1.0", "files": file_entries(writer.path, [writer.path / "model.onnx"])})
    assert (out / "late.txt").read_text() == "written while the model compressed"
    assert (out / "model.onnx").read_bytes() == b"model.onnx" * 10
    no_leftovers(tmp_path)


def test_a_failure_while_swapping_puts_the_old_artifact_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_artifact(out, names=("a.onnx", "sub/b.bin"))
    before = snapshot(out)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 5:  # 3 old files out, the first new file in, then the disk "fails"
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    with pytest.raises(OSError, match="No space left"):
        with ArtifactWriter(out) as writer:
            for name in ("x.onnx", "y.onnx"):
                (writer.path / name).write_bytes(b"new")
            monkeypatch.setattr("compressor.flow.artifact.os.replace", flaky_replace)
            writer.commit({"compressor": "0.1.0",
                           "files": file_entries(writer.path, [writer.path / "x.onnx", writer.path / "y.onnx"])})
    assert snapshot(out) == before
    no_leftovers(tmp_path)


def test_empty_folder_and_new_folder_are_fine(tmp_path):
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        if out.name == "empty":
            out.mkdir()
        write_artifact(out)
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    no_leftovers(tmp_path)


def test_file_in_the_way_is_refused(tmp_path):
    path = tmp_path / "out"
    path.write_text("a file")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        check_destination(path)


# -- item 2: strict JSON --------------------------------------------------------------------------------------

def test_strict_json_nulls_non_finite_and_writes_numpy_as_numbers():
    data = {"inf": float("inf"), "ninf": -math.inf, "nan": float("nan"), "np_nan": np.float32("nan"),
            "f32": np.float32(0.5), "i64": np.int64(7), "bool": np.bool_(True), "arr": np.array([1.5, np.inf]),
            "path": Path("a/b"), "nested": [{"x": (np.float64(2.0), math.inf)}], np.int64(3): "key"}
    text = dumps(data)
    got = strict_loads(text)
    assert got["inf"] is None and got["ninf"] is None and got["nan"] is None and got["np_nan"] is None
    assert got["f32"] == 0.5 and got["i64"] == 7 and got["bool"] is True
    assert got["arr"] == [1.5, None] and got["path"] == "a/b" and got["nested"] == [{"x": [2.0, None]}]
    assert got["3"] == "key"
    assert jsonable({"a": float("nan")}) == {"a": None}


def test_manifest_is_strict_json_on_the_readme_command(tmp_path, capsys):
    """The README's main command: fold keeps outputs identical, so SQNR is infinite and written as null."""
    out = tmp_path / "digits"
    code, _, err = run(["examples/digits_cnn.pt2" if Path.cwd() == ROOT else MODEL, "--recipe", "fold",
                        "--calib", CALIB, "--eval", EVAL, "-o", out], capsys)
    assert code == 0, err
    manifest = strict_loads((out / MANIFEST).read_text())
    compressed = manifest["metrics"]["compressed"]
    assert compressed["max_abs_diff"] == 0.0 and compressed["sqnr_db"] is None
    assert manifest["tool"] == "compressor"


def test_identical_outputs_have_infinite_sqnr_written_as_null():
    from compressor.data import Dataset
    from compressor.flow.evaluation import compare, fidelity

    ref = [np.arange(12, dtype=np.float32).reshape(4, 3)]
    assert fidelity(ref, ref)["sqnr_db"] == math.inf
    assert fidelity([np.zeros((4, 3), np.float32)], ref)["sqnr_db"] == -math.inf
    data = Dataset({"x": np.zeros((4, 3), np.float32)}, [], {"x": False}, None, "x.npz", "0" * 64)
    ev = compare(ref, ref, data, "cosine")
    assert ev.compressed["sqnr_db"] == math.inf  # in memory: the honest float
    as_json = ev.to_json()
    assert as_json["compressed"]["sqnr_db"] is None and as_json["compressed"]["max_abs_diff"] == 0.0
    strict_loads(dumps(as_json))
