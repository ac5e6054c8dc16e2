"""Typed dataclasses from YAML mappings: the one validation mechanism of run configs and recipes.

A config section or a recipe kind is a dataclass; its field annotations are the schema:

    top_k: Annotated[int, AtLeast(1)] = 128
    topk_variant: TopKVariant = "tail"                       # a Literal: one of its values
    splits: Annotated[dict[Split, Annotated[int, AtLeast(0)]], NonEmpty()]

`build(cls, mapping)` rejects unknown keys, wrong types, values outside a `Literal` and values
failing an `Annotated` check, raising `Invalid` with the dotted key (`splits.train`) and the
problem; the caller turns it into its one-line error (`config key ...`, `recipe X: key ...`).
Checks that relate several keys stay with the dataclass (`__post_init__`) or its loader.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping

INTERNAL = {"internal": True}  # metadata of a dataclass field that is not a key (set by the loader)


class Invalid(ValueError):
    """A value that does not fit the schema: `path` is the dotted key, `known` the keys of its
    section when the key itself is unknown."""

    def __init__(self, path: str, problem: str, known: tuple[str, ...] | None = None):
        super().__init__(f"key '{path}': {problem}")
        self.path, self.problem, self.known = path, problem, known


# -- checks usable in Annotated[...] -----------------------------------------------------------


@dataclass(frozen=True)
class AtLeast:
    minimum: float

    def problem(self, value: Any) -> str | None:
        return None if value >= self.minimum else f"must be >= {self.minimum}, got {value}"


@dataclass(frozen=True)
class Above:
    minimum: float

    def problem(self, value: Any) -> str | None:
        return None if value > self.minimum else f"must be > {self.minimum}, got {value}"


@dataclass(frozen=True)
class Between:
    """low <= value <= high; `high_open` makes the upper bound exclusive, `low_open` the lower."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if above and below:
            return None
        # `g`: Between(0, 1) and Between(0.0, 1.0) are equal, so typing's cache may hand either to a
        # field; both print as [0, 1]
        interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return f"must be in {interval}, got {value}"


@dataclass(frozen=True)
class IntRange:
    """A pair [low, high] of integers within [minimum, maximum] with low <= high."""

    minimum: int
    maximum: int | None = None

    def problem(self, value: Any) -> str | None:
        low, high = value
        for end in value:
            if end < self.minimum or (self.maximum is not None and end > self.maximum):
                upper = "" if self.maximum is None else f" and <= {self.maximum}"
                return f"values must be >= {self.minimum}{upper}, got {list(value)}"
        return None if low <= high else f"must have low <= high, got {list(value)}"


@dataclass(frozen=True)
class NonEmpty:
    def problem(self, value: Any) -> str | None:
        return None if len(value) else "must not be empty"


# -- building ---------------------------------------------------------------------------------


def keys(cls: type) -> tuple[str, ...]:
    """The YAML keys of a dataclass (its fields, without the internal ones)."""
    return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal"))


def build(cls: type, raw: Any, prefix: str = "", **internal: Any) -> Any:
    """`cls` built from the mapping `raw` (nested dataclasses from nested mappings), checked
    against its annotations; `internal` sets the fields that are not keys."""
    if not isinstance(raw, Mapping):
        raise Invalid(prefix.rstrip(".") or "(top level)", f"expected a mapping, got {describe(raw)}")
    known = keys(cls)
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        raise Invalid(f"{prefix}{unknown[0]}", "unknown key", known)
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {name: convert(value, hints[name], f"{prefix}{name}") for name, value in raw.items()}
    return cls(**values, **internal)


def convert(value: Any, hint: Any, path: str) -> Any:
    """`value` checked against the annotation `hint` (and converted: lists of pairs to tuples, ...)."""
    checks: tuple = ()
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extras = typing.get_args(hint)
        checks = tuple(extras)
    value = _convert_plain(value, hint, path)
    for check in checks:
        problem = check.problem(value)
        if problem is not None:
            raise Invalid(path, problem)
    return value


def _convert_plain(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:  # free-form (e.g. chat-template arguments): any YAML value
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{path}.")
    if origin is Literal:
        options = typing.get_args(hint)
        if value not in options or isinstance(value, bool) != isinstance(options[0], bool):
            hint = " (YAML reads yes/no/on/off as booleans: quote the word)" if isinstance(value, bool) else ""
            raise Invalid(path, f"{value!r} is not one of {', '.join(map(str, options))}{hint}")
        return value
    if origin in (list, tuple):
        return _convert_sequence(value, hint, path)
    if origin is dict:
        return _convert_mapping(value, hint, path)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, hint, path)
    return _convert_scalar(value, hint, path)


def _convert_union(value: Any, hint: Any, path: str) -> Any:
    """The first alternative `value` fits (`str | list[str]`: one pattern or a list of them)."""
    options = typing.get_args(hint)
    errors = []
    for option in options:
        try:
            return convert(value, option, path)
        except Invalid as error:
            errors.append(error)
    inner = max(errors, key=lambda error: len(error.path))
    if inner.path != path:  # the value has an alternative's shape (a list) but an item is wrong: name the item
        raise inner
    raise Invalid(path, f"must be {' or '.join(_type_name(option) for option in options)}, got {describe(value)}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _convert_sequence(value: Any, hint: Any, path: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise Invalid(path, f"expected a list, got {describe(value)}")
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return [convert(item, args[0], f"{path}[{i}]") for i, item in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]
        return tuple(convert(item, args[0], f"{path}[{i}]") for i, item in enumerate(value))
    if len(value) != len(args):
        raise Invalid(path, f"expected a list of {len(args)} values, got {describe(value)}")
    return tuple(convert(item, arg, f"{path}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))


def _convert_mapping(value: Any, hint: Any, path: str) -> dict:
    if not isinstance(value, Mapping):
        raise Invalid(path, f"expected a mapping, got {describe(value)}")
    key_type, value_type = typing.get_args(hint)
    allowed = typing.get_args(key_type) if typing.get_origin(key_type) is Literal else None
    out = {}
    for name, item in value.items():
        if key_type is str and not isinstance(name, str):
            raise Invalid(f"{path}.{name}", f"keys must be strings, got {describe(name)} (quote it)")
        if allowed is not None and name not in allowed:
            raise Invalid(f"{path}.{name}", f"not allowed (allowed: {', '.join(allowed)})")
        out[name] = convert(item, value_type, f"{path}.{name}")
    return out


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert_scalar(value: Any, hint: type, path: str) -> Any:
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-6" as a string
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise Invalid(path, f"must be {_TYPE_NAMES.get(hint, hint.__name__)}, got {describe(value)}")
    return value


def choices(literal: Any) -> tuple:
    """The values of a `Literal` type (for help texts and loops)."""
    return typing.get_args(literal)


def describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
