"""Declarative checks for recipe keys.

Each recipe kind is a frozen dataclass whose YAML keys are fields declared with `key(default,
check)`; `parse_keys` rejects unknown keys and wrong types with one line that names the recipe and
the key (dotted for nested keys, e.g. `splits.train`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping

from dopd_vlm.data.schema import RecipeError

Check = Callable[[Any, str], Any]


class KeyProblem(Exception):
    """A value failed its check; `parse_keys` adds the recipe's name."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"key '{path}' {problem}")


def key(default: Any, check: Check) -> Any:
    """A dataclass field that is also a recipe key, validated by `check`."""
    return dataclasses.field(
        default_factory=lambda: copy.deepcopy(default), metadata={"check": check}
    )


def recipe_keys(cls: type) -> dict[str, Check]:
    return {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}


def parse_keys(cls: type, data: Mapping[str, Any], *, kind: str, source: str, **extra: Any) -> Any:
    """Build `cls` from recipe mapping `data` (without `kind`); `extra` sets non-key fields."""
    checks = recipe_keys(cls)
    unknown = sorted(set(data) - set(checks))
    if unknown:
        allowed = ", ".join(["kind", *sorted(checks)])
        raise RecipeError(
            f"recipe {source}: unknown key '{unknown[0]}' for kind '{kind}' (allowed: {allowed})"
        )
    try:
        values = {name: checks[name](value, name) for name, value in data.items()}
    except KeyProblem as problem:
        raise RecipeError(f"recipe {source}: {problem}") from None
    return cls(**values, source=source, **extra)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KeyProblem(path, f"must be an integer, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise KeyProblem(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise KeyProblem(path, f"must be <= {maximum}, got {value}")
        return value

    return check


def boolean() -> Check:
    def check(value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise KeyProblem(path, f"must be true or false, got {_describe(value)}")
        return value

    return check


def string() -> Check:
    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise KeyProblem(path, f"must be a string, got {_describe(value)}")
        return value

    return check


def choice(*options: str) -> Check:
    def check(value: Any, path: str) -> str:
        if value not in options:
            raise KeyProblem(path, f"must be one of {', '.join(options)}; got {value!r}")
        return value

    return check


def int_range(minimum: int, maximum: int | None = None) -> Check:
    """`[low, high]`, both inclusive, returned as a tuple."""
    bound = integer(minimum, maximum)

    def check(value: Any, path: str) -> tuple[int, int]:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise KeyProblem(path, f"must be a list [low, high], got {_describe(value)}")
        low, high = bound(value[0], f"{path}[0]"), bound(value[1], f"{path}[1]")
        if low > high:
            raise KeyProblem(path, f"must have low <= high, got [{low}, {high}]")
        return low, high

    return check


def mapping(value_check: Check, keys: tuple[str, ...] | None = None) -> Check:
    """A non-empty mapping; with `keys`, only those names are allowed."""

    def check(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, Mapping) or not value:
            raise KeyProblem(path, f"must be a non-empty mapping, got {_describe(value)}")
        for name in value:
            if keys is not None and name not in keys:
                raise KeyProblem(f"{path}.{name}", f"is not allowed (allowed: {', '.join(keys)})")
        return {name: value_check(item, f"{path}.{name}") for name, item in value.items()}

    return check


def sequence(item_check: Check) -> Check:
    """A non-empty list, returned as a tuple."""

    def check(value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or not value:
            raise KeyProblem(path, f"must be a non-empty list, got {_describe(value)}")
        return tuple(item_check(item, f"{path}[{i}]") for i, item in enumerate(value))

    return check
