"""Strict JSON for every file the tool writes (manifest, sweep.json, build_log.json, encodings).

Python's ``json`` writes ``Infinity`` and ``NaN`` by default, which strict parsers
(JavaScript's ``JSON.parse``, Go, ``jq``) reject. Here:

* a float that is not finite (``inf``, ``-inf``, ``nan``) is written as ``null``; the
  field's documentation says what ``null`` means there (``sqnr_db: null``: the outputs
  were identical, see :mod:`compressor.flow.evaluation`);
* numpy scalars are written as numbers (or booleans), numpy arrays as lists;
* paths and other objects ``json`` does not know are written as their ``str``;
* tuples and sets become lists, non-string keys become strings;

and the text is serialised with ``allow_nan=False``, so a value that slipped through
is a bug that fails loudly rather than a file a strict reader cannot parse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["jsonable", "dumps", "write_json"]


def jsonable(value: Any) -> Any:
    """``value`` with only strict-JSON types left (see the module docstring)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):  # bool is handled above
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {_key(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    return str(value)


def _key(key: Any) -> str:
    if isinstance(key, np.generic):
        key = key.item()
    return key if isinstance(key, str) else str(key)


def dumps(value: Any, *, indent: int | None = 2, sort_keys: bool = True) -> str:
    """Strict JSON text of ``value`` (no trailing newline)."""
    return json.dumps(jsonable(value), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | Path, value: Any, *, indent: int | None = 2, sort_keys: bool = True) -> Path:
    """Write ``value`` to ``path`` as strict JSON (UTF-8, one trailing newline); returns the path."""
    path = Path(path)
    path.write_text(dumps(value, indent=indent, sort_keys=sort_keys) + "\n", encoding="utf-8")
    return path

