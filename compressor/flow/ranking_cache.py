"""Accuracy control's layer ranking, kept on disk so a re-run with another budget only evaluates.

The ranking depends on the model, the recipe's passes and calibration, the calibration and
evaluation data, the target and the tool's version, and not on the budget (``max_drop``,
``max_fallback``): a CI job re-run with a new ``--max-drop`` finds it here and skips the
ranking (the log says "ranking reused from cache").

Files live in ``$COMPRESSOR_CACHE/ranking/`` (default ``~/.cache/compressor/ranking/``), one
JSON file per key, the key being the sha256 of those inputs. A file that cannot be read,
is not JSON, or does not rank exactly the layers of this run is ignored with a warning and
recomputed; a cache that cannot be written is a warning too. Never an error: the cache only
saves time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "ranking_key", "load_ranking", "store_ranking"]

logger = logging.getLogger(__name__)

#: The format of a cache file; a file of another version is recomputed.
VERSION = 1


def cache_dir() -> Path:
    """``$COMPRESSOR_CACHE/ranking``, else ``~/.cache/compressor/ranking``."""
    root = os.environ.get("COMPRESSOR_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "compressor") / "ranking"


def ranking_key(fields: Mapping[str, Any]) -> str:
    """sha256 of ``fields`` (plain JSON data: hashes, the resolved recipe, names)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _valid(entries: Any, layers: Sequence[str]) -> bool:
    if not isinstance(entries, list) or sorted(e.get("layer") for e in entries if isinstance(e, dict)) != sorted(layers):
        return False
    return all(isinstance(e.get(k), (int, float)) and math.isfinite(e[k])
               for e in entries for k in ("sensitivity", "error_without"))


def load_ranking(key: str, layers: Sequence[str]) -> dict[str, Any] | None:
    """The cached entry for ``key`` (``ranking``, ``ranking_backend``...), or ``None`` (module docstring)."""
    path = cache_dir() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict) or entry.get("version") != VERSION or not _valid(entry.get("ranking"), layers):
            raise ValueError("not a ranking of this run's layers")
    except (OSError, ValueError, TypeError, AttributeError) as err:
        logger.warning("accuracy control: ignoring the cached ranking %s (%s); ranking again", path, err)
        return None
    return entry


def store_ranking(key: str, entry: Mapping[str, Any]) -> Path | None:
    """Write ``entry`` for ``key`` atomically; a cache that cannot be written is a warning."""
    folder = cache_dir()
    tmp: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}-", suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump({"version": VERSION, **entry}, out, allow_nan=False)
        os.replace(tmp, folder / f"{key}.json")
    except (OSError, ValueError, TypeError) as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        logger.warning("accuracy control: could not cache the ranking in %s (%s)", folder, err)
        return None
    return folder / f"{key}.json"
