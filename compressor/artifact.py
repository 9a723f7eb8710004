"""The artifact folder: lowered files plus ``manifest.json``, written atomically.

Everything is built in a hidden temporary folder beside the destination and renamed into
place at the end, so an interrupted or failed run leaves nothing half-written. An
existing artifact at the destination (a folder holding a ``manifest.json``) is replaced;
any other non-empty folder is refused rather than overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from compressor.errors import UsageError

__all__ = ["ArtifactWriter", "file_entries", "check_destination", "MANIFEST"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def check_destination(outdir: Path) -> None:
    """Refuse a destination that is a file or a non-empty folder that is not an artifact.

    Raises:
        UsageError: what is in the way, and what to do.
    """
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"-o {outdir}: exists and is not a folder; choose another output folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / MANIFEST).is_file():
        raise UsageError(f"-o {outdir}: folder is not empty and holds no {MANIFEST}; "
                         "refusing to overwrite it, choose an empty or new folder")


def file_entries(root: Path, files: list[Path]) -> list[dict[str, Any]]:
    """``{path, bytes, sha256}`` per file, paths relative to ``root``, sorted."""
    out = []
    for f in sorted(files):
        data = f.read_bytes()
        out.append({"path": f.relative_to(root).as_posix(), "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()})
    return out


class ArtifactWriter:
    """Context manager: a temp folder to fill, renamed to ``outdir`` by :meth:`commit`.

    Example:
        with ArtifactWriter(out) as w:
            files = target.lower(model, w.path)
            w.commit(manifest)
    """

    def __init__(self, outdir: str | Path):
        self.outdir = Path(outdir).absolute()
        self.path = self.outdir.parent / f".{self.outdir.name}.partial-{uuid.uuid4().hex[:8]}"
        self.committed = False

    def __enter__(self) -> ArtifactWriter:
        check_destination(self.outdir)
        self.outdir.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Write the manifest and move the folder into place."""
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        old = None
        if self.outdir.exists():
            old = self.outdir.parent / f".{self.outdir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.outdir, old)
        os.replace(self.path, self.outdir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        logger.info("artifact written to %s", self.outdir)
        return self.outdir

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
