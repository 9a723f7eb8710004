"""The artifact folder: lowered files plus ``manifest.json``, written atomically.

Everything is built in a hidden temporary folder beside the destination and moved into
place at the end, so an interrupted or failed run leaves nothing half-written.

``-o DIR`` never removes a file this tool did not write. What may be at the destination:

1. nothing, or an empty folder: the new artifact is moved there;
2. an artifact this tool wrote, and nothing else: its ``manifest.json`` says so (a
   ``"tool": "compressor"`` key, or, as versions before that key wrote it, a string
   ``"compressor"`` version plus a ``files`` list of ``{path, bytes, sha256}``), and the
   folder holds only the files that manifest lists, the folders they sit in, and the
   manifest itself. Those files are replaced one by one;
3. anything else (a user's files, a ``manifest.json`` that is not valid JSON or not ours,
   a symbolic link, a file the manifest does not list): refused with exit 2, naming the
   foreign entries.

The destination is checked before any long work (:func:`check_destination`) and again at
:meth:`ArtifactWriter.commit`. A symbolic link given as ``-o`` is followed: the artifact
goes into the folder it points to. When the destination exists, the folder itself is
kept (its permissions, and the shell's working directory with ``-o .``): the old files are
moved into a hidden folder beside it, the new files moved in (``manifest.json`` last, so a
manifest is only ever seen next to complete files), then the old files are deleted one by
one as listed and emptied folders removed with ``rmdir``. A failure while moving puts
everything back.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from typing import Any

from compressor.errors import UsageError
from compressor.strict_json import write_json

__all__ = ["ArtifactWriter", "file_entries", "deployable_entries", "deployable_bytes", "check_destination", "MANIFEST",
           "TOOL"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: The value of the manifest's ``tool`` key: the mark of an artifact this tool wrote.
TOOL = "compressor"
#: A ``manifest.json`` larger than this is not one of ours (ours are kilobytes).
MAX_MANIFEST_BYTES = 64 << 20
#: Foreign entries named in a refusal before "+N more".
SHOWN = 5


def _safe_relative(path: Any) -> bool:
    """``path`` is a plain relative POSIX path inside the folder (no ``..``, not absolute)."""
    if not isinstance(path, str) or not path or "\\" in path:
        return False
    pure = PurePosixPath(path)
    return not pure.is_absolute() and pure.as_posix() == path and ".." not in pure.parts and path != MANIFEST


def _listed_files(folder: Path) -> tuple[set[str] | None, str]:
    """The paths the folder's manifest lists, or ``None`` and why the manifest is not ours."""
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None, f"holds no {MANIFEST}"
    if path.is_symlink() or not path.is_file():
        return None, f"has a {MANIFEST} that is not a regular file, so not written by compressor"
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None, f"has a {MANIFEST} too large to be written by compressor"
        data = json.loads(path.read_text(encoding="utf-8"))  # lenient: earlier versions wrote Infinity/NaN
    except (UnicodeDecodeError, ValueError):
        return None, f"has a {MANIFEST} that is not valid JSON, so not written by compressor"
    except OSError as err:
        return None, f"has a {MANIFEST} that cannot be read ({err.strerror})"
    if not isinstance(data, dict):
        return None, f"has a {MANIFEST} not written by compressor"
    marked = data.get("tool") == TOOL
    earlier = "tool" not in data and isinstance(data.get("compressor"), str)
    if not (marked or earlier):
        return None, f"has a {MANIFEST} not written by compressor (no \"tool\": \"{TOOL}\")"
    files = data.get("files")
    entries_ok = isinstance(files, list) and all(
        isinstance(e, dict) and _safe_relative(e.get("path"))
        and (marked or (isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)))
        for e in files)
    if not entries_ok:
        return None, f"has a {MANIFEST} not written by compressor (its \"files\" list is missing or malformed)"
    return {e["path"] for e in files}, ""


def _scan(folder: Path, listed: set[str] | None) -> tuple[list[str], list[str]]:
    """``(ours, foreign)``: relative paths of the listed regular files present, and everything else.

    ``listed`` is ``None`` when the manifest is not ours: then everything is foreign. A
    folder is entered only when a listed path lies in it; any other folder, symbolic link
    or special file is foreign as a whole (folders are named with a trailing ``/``).
    """
    allowed = set() if listed is None else listed | {MANIFEST}
    listed = listed or set()
    prefixes = {parent.as_posix() for p in listed for parent in PurePosixPath(p).parents if parent.as_posix() != "."}
    ours: list[str] = []
    foreign: list[str] = []

    def walk(directory: Path, rel: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            name = rel + entry.name
            if entry.is_symlink():
                foreign.append(name)
            elif entry.is_dir(follow_symlinks=False):
                if name in prefixes:
                    walk(Path(entry.path), name + "/")
                else:
                    foreign.append(name + "/")
            elif entry.is_file(follow_symlinks=False) and name in allowed:
                ours.append(name)
            else:
                foreign.append(name)

    walk(folder, "")
    return ours, foreign


def _names(entries: list[str]) -> str:
    shown = ", ".join(entries[:SHOWN])
    return shown + (f" +{len(entries) - SHOWN} more" if len(entries) > SHOWN else "")


def _old_artifact(outdir: Path, shown: str | Path) -> list[str]:
    """The files of the artifact at ``outdir`` that a new one replaces (``[]``: nothing there).

    Raises:
        UsageError: ``outdir`` is a file, or a folder holding anything this tool did not write.
    """
    if not outdir.exists():
        return []
    if not outdir.is_dir():
        raise UsageError(f"-o {shown}: exists and is not a folder; choose another output folder")
    try:
        if not any(outdir.iterdir()):
            return []
        listed, why = _listed_files(outdir)
        ours, foreign = _scan(outdir, listed)
    except OSError as err:
        raise UsageError(f"-o {shown}: cannot be read ({err.strerror}); choose another output folder") from None
    if listed is None:
        raise UsageError(f"-o {shown}: folder is not empty and {why}; refusing to overwrite it ({_names(foreign)}): "
                         "move those elsewhere or choose an empty or new folder")
    if foreign:
        raise UsageError(f"-o {shown}: holds an artifact written by compressor plus files this tool did not write "
                         f"({_names(foreign)}); refusing to overwrite them: move them elsewhere or choose an empty "
                         "or new folder")
    return ours


def copy_lowered(files: list[Path], folder: Path, outdir: Path) -> list[Path]:
    """``files``, lowered into ``folder`` (a try in the run's work folder), copied to the same
    places under ``outdir``; returns the copies. Copied, not moved: a runner of the try may
    read its own files again."""
    copies = []
    for path in files:
        target = outdir / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copies.append(target)
    return copies


def check_destination(outdir: str | Path) -> None:
    """Refuse a destination that :class:`ArtifactWriter` may not write (see the module docstring).

    Raises:
        UsageError: what is in the way, and what to do.
    """
    _old_artifact(Path(outdir).resolve(), outdir)


def file_entries(root: Path, files: list[Path], deployable: Collection[Path] | None = None) -> list[dict[str, Any]]:
    """``{path, bytes, sha256, deploy}`` per file, paths relative to ``root``, sorted.

    Args:
        root: The folder the paths are relative to.
        files: The files the target lowered.
        deployable: Those of ``files`` that are deployed (the target's
            :meth:`~compressor.targets.base.Target.deployable`); ``None``: all of them.
            ``deploy`` is false on the others (companions: a QDQ source, encodings, a log).
    """
    deployed = set(files if deployable is None else deployable)
    out = []
    for f in sorted(files):
        data = f.read_bytes()
        out.append({"path": f.relative_to(root).as_posix(), "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(), "deploy": f in deployed})
    return out


def deployable_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of a manifest's ``files`` that are deployed (``deploy`` true).

    An entry without ``deploy`` (a manifest written before the key existed) counts as
    deployed, as those manifests' sizes did.
    """
    return [e for e in entries if e.get("deploy", True) is not False]


def deployable_bytes(entries: list[dict[str, Any]]) -> int:
    """The artifact's size: the bytes of its deployed files (:func:`deployable_entries`).

    What every figure meaning "the artifact's size" reads (the summary's ``size`` row, a
    search candidate's bytes, the benchmarks' rows), so companions are never counted.
    """
    return sum(e["bytes"] for e in deployable_entries(entries))


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _remove_empty_parents(root: Path, rels: list[str]) -> None:
    """``rmdir`` the folders (below ``root``) that held ``rels``, deepest first, where empty."""
    folders = {parent for rel in rels for parent in PurePosixPath(rel).parents if parent.as_posix() != "."}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            (root / folder).rmdir()
        except OSError:
            pass  # not empty: something else is in it, and stays


class ArtifactWriter:
    """Context manager: a temp folder to fill, moved to ``outdir`` by :meth:`commit`.

    Example:
        with ArtifactWriter(out) as w:
            files = target.lower(model, w.path)
            w.commit(manifest)
    """

    def __init__(self, outdir: str | Path):
        self.shown = outdir
        self.outdir = Path(outdir).resolve()
        self.path = self.outdir.parent / f".{self.outdir.name}.partial-{uuid.uuid4().hex[:8]}"
        self.committed = False

    def __enter__(self) -> ArtifactWriter:
        _old_artifact(self.outdir, self.shown)
        try:
            self.outdir.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
        except OSError as err:
            raise UsageError(f"-o {self.shown}: cannot create the temporary folder {self.path.name} in "
                             f"{self.path.parent} ({err.strerror}); choose an output folder whose parent folder "
                             "is writable") from None
        return self

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Stamp ``manifest`` with ``tool``, write it as strict JSON and move the artifact into place.

        Raises:
            UsageError: the destination changed during the run and now holds files this
                tool did not write (nothing there is touched, the new artifact is dropped).
        """
        manifest["tool"] = TOOL
        write_json(self.path / MANIFEST, manifest)
        old = _old_artifact(self.outdir, self.shown)
        if self.outdir.is_dir():
            self._swap(old)
        else:
            try:
                os.rename(self.path, self.outdir)
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                raise UsageError(f"-o {self.shown}: appeared during the run; nothing was replaced, run again "
                                 "with an empty or new folder") from None
        self.committed = True
        logger.info("artifact written to %s", self.outdir)
        return self.outdir

    def _swap(self, old: list[str]) -> None:
        """Replace the listed ``old`` files in the existing folder with the new ones (module docstring)."""
        new = sorted(_files_under(self.path), key=lambda rel: rel == MANIFEST)  # manifest last in
        backup = self.outdir.parent / f".{self.outdir.name}.old-{uuid.uuid4().hex[:8]}"
        moved: list[str] = []
        placed: list[str] = []
        try:
            if old:
                backup.mkdir()
            for rel in sorted(old, key=lambda rel: rel != MANIFEST):  # manifest first out
                (backup / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.outdir / rel, backup / rel)
                moved.append(rel)
            for rel in new:
                target = self.outdir / rel
                if target.exists() or target.is_symlink():
                    raise UsageError(f"-o {self.shown}: {rel} appeared there during the run; nothing was replaced, "
                                     "move it elsewhere and run again")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path / rel, target)
                placed.append(rel)
        except BaseException:
            for rel in reversed(placed):
                os.replace(self.outdir / rel, self.path / rel)
            _remove_empty_parents(self.outdir, placed)
            for rel in reversed(moved):
                (self.outdir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(backup / rel, self.outdir / rel)
            _remove_empty_parents(backup, moved)
            if old:
                backup.rmdir()
            raise
        for rel in moved:
            (backup / rel).unlink()
        _remove_empty_parents(backup, moved)
        _remove_empty_parents(self.outdir, moved)
        if old:
            backup.rmdir()
        _remove_empty_parents(self.path, new)
        self.path.rmdir()

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
