"""Validated, serialisable option records for passes and recipes.

An options record is a frozen dataclass. :func:`parse_options` builds one from the plain
mapping a recipe gives, refusing unknown keys (and listing the valid ones) and values of
the wrong type, so a typo in a recipe fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from compressor.errors import OptionsError

__all__ = ["parse_options", "options_to_dict", "NoOptions"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options record of a pass that takes none."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked against (and lightly coerced to) the annotation ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise OptionsError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in get_args(tp))}")
    if origin in (Union, types.UnionType):
        errors = []
        for alt in get_args(tp):
            try:
                return _coerce(value, alt, where)
            except OptionsError as err:
                errors.append(err)
        given = [alt for alt in get_args(tp) if alt is not type(None)]
        if value is not None and len(given) == 1:  # ``X | None``: X's own, more precise, error
            raise errors[list(get_args(tp)).index(given[0])]
        raise OptionsError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise OptionsError(f"{where}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise OptionsError(f"{where}: expected a mapping of {_type_name(tp)} options, got {value!r}")
        return parse_options(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise OptionsError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise OptionsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise OptionsError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OptionsError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise OptionsError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise OptionsError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise OptionsError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def parse_options(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """Build the options record ``cls`` from a plain mapping.

    Args:
        cls: A dataclass whose fields are the valid keys.
        values: The mapping from the recipe (``None`` means all defaults).
        where: Where the mapping came from, used in every error message
            (e.g. ``"recipes/int8.yaml: passes[2] quantize"``).

    Raises:
        OptionsError: an unknown key (the message lists the valid ones and the closest
            match), a missing required key, or a value of the wrong type.
    """
    values = dict(values or {})
    if not isinstance(values, dict):
        raise OptionsError(f"{where}: options must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        valid = ", ".join(fields) if fields else "none (this pass takes no options)"
        raise OptionsError(f"{where}: unknown option {key!r}{hint}; valid options: {valid}")
    kwargs = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{where}: option {name!r}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise OptionsError(f"{where}: option {name!r} is required")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise OptionsError(f"{where}: {err}") from None


def options_to_dict(options: Any) -> dict[str, Any]:
    """Plain, JSON-ready mapping of an options record (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(options)
