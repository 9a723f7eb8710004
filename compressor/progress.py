"""Progress reporting: the library asks for bars through a factory; the CLI supplies tqdm's.

A factory is called as ``progress(desc, total, unit)`` and returns a bar: a context manager with
``update(n)`` and ``close()``. The library never draws anything itself; without a factory
(:func:`no_progress`) nothing is shown. The CLI's bars draw only on a terminal, so CI logs
get no bar noise.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Bar", "Progress", "no_progress"]


class Bar(Protocol):
    """What a progress bar offers the library."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


class Progress(Protocol):
    """A factory of progress bars."""

    def __call__(self, desc: str, total: int | None, unit: str = "batch") -> Bar: ...


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


def no_progress(desc: str, total: int | None, unit: str = "batch") -> Bar:
    """The factory that shows nothing."""
    return _NoBar()
