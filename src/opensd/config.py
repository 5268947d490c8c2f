"""Typed, frozen dataclass configs: conversion to and from plain dicts (JSON/TOML).

Every config in opensd is a ``@dataclass(frozen=True)`` built in code. This module
turns such a config into a JSON-able dict and back, and rejects unknown keys,
wrong types and bad enum values with a :class:`ConfigError` that names the
problem and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from opensd.errors import OpenSDError

T = TypeVar("T")


class ConfigError(OpenSDError):
    """A config dict or file does not fit its dataclass."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """A frozen dataclass as a JSON-able dict (enums become their values, tuples lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        chosen = _by_kind(args, value, where)
        if chosen is not None:
            return _convert(chosen, value, where)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table/object, got {type(value).__name__}")
        return from_dict(tp, value, _where=where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {allowed}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=False)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table/object, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _kind_of(tp: Any) -> str | None:
    """The default of dataclass ``tp``'s ``kind`` field (its tag in a union), else None."""
    if not (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
        return None
    for f in dataclasses.fields(tp):
        if f.name == "kind" and isinstance(f.default, str):
            return f.default
    return None


def _by_kind(args: tuple[Any, ...], value: Any, where: str) -> Any:
    """For a union of dataclasses some of which carry a ``kind`` tag (a ``kind: str`` field
    with a default): the member a dict names by its ``"kind"``, or, without one, the single
    untagged dataclass member. None: no tagged member (try each member in order)."""
    kinds = {k: a for a in args if (k := _kind_of(a)) is not None}
    if not kinds or not isinstance(value, dict):
        return None
    untagged = [a for a in args if dataclasses.is_dataclass(a) and _kind_of(a) is None]
    if "kind" in value:
        if value["kind"] not in kinds:
            allowed = ", ".join(repr(k) for k in kinds)
            untagged_note = f" (or no kind: {getattr(untagged[0], '__name__', '?')})" if len(untagged) == 1 else ""
            raise ConfigError(f"{where}.kind: {value['kind']!r:.60} is not allowed; choose one of {allowed}{untagged_note}")
        return kinds[value["kind"]]
    return untagged[0] if len(untagged) == 1 else None


def from_dict(cls: type[T], data: dict[str, Any], *, _where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    where = _where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table/object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys are {', '.join(fields)}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def load_json(cls: type[T], path: str | Path) -> T:
    """Read a JSON config file into dataclass ``cls``; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return from_dict(cls, data, _where=path.name)
