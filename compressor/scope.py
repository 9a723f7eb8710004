"""Scopes: *where* a pass applies, kept apart from *what* it does.

A scope is written in a recipe as ``{include: [...], exclude: [...]}``. Each entry is an
exact node name, or ``re:`` followed by a regular expression matched (``re.fullmatch``)
against the node name. A node is in scope when ``include`` is empty or matches it, and
``exclude`` does not. Besides the node name, a pattern is also tried on the names of the
node's weight initializers, which survive re-export better than node names do.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

__all__ = ["Scope"]


@dataclasses.dataclass(frozen=True)
class Scope:
    """Which nodes a pass may touch.

    Attributes:
        include: Names or ``re:`` patterns; empty means every node.
        exclude: Names or ``re:`` patterns removed from the included set.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(f"scope pattern {pattern!r} is not a valid regular expression: {err}") from None

    @staticmethod
    def _matches(patterns: Iterable[str], names: list[str]) -> bool:
        for pattern in patterns:
            if pattern.startswith("re:"):
                rx = re.compile(pattern[3:])
                if any(rx.fullmatch(n) for n in names):
                    return True
            elif pattern in names:
                return True
        return False

    def contains(self, *names: str | None) -> bool:
        """Whether a node known by any of ``names`` (node name, weight names) is in scope."""
        known = [n for n in names if n]
        if self.include and not self._matches(self.include, known):
            return False
        return not self._matches(self.exclude, known)
