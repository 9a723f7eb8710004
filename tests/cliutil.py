"""Helpers for tests that run the ``compress`` command line in process."""

from __future__ import annotations

import json
from typing import Any

from compressor.cli import main

__all__ = ["run", "error_line", "raise_on_constant", "strict_loads"]


def run(argv, capsys) -> tuple[int, str, str]:
    """``compress ARGV`` in process: exit code, stdout, stderr."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one ``error: ...`` line of stderr (asserts there is exactly one)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def raise_on_constant(name: str) -> None:
    """``json.loads(parse_constant=...)``: Infinity/NaN are not strict JSON."""
    raise ValueError(f"not strict JSON: {name}")


def strict_loads(text: str) -> Any:
    """Parse ``text`` as strict JSON (no Infinity/NaN)."""
    return json.loads(text, parse_constant=raise_on_constant)
