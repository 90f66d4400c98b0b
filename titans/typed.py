"""Typed values for configs and command-line arguments.

A dataclass field's annotation is its type: int, float, bool, str, `X | None`, a union such as
`bool | str`, `tuple[float, float]` or `tuple[str, ...]`. Values from JSON, YAML or TOML arrive
typed and are checked; values from the command line (`--set key=value`, `--task-arg`) arrive as
text and are parsed. Booleans are true/false in any case; none/null is None where the type allows
it; a tuple is written `a,b` or as a JSON list. Anything else is a one-line ValueError naming the
field, what it must be and the value given: `--set momentum=False` is never the truthy string
"False".
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from typing import Any, Callable

__all__ = ["convert", "typed_fields", "check_fields", "typed_arguments"]

_NONE = ("none", "null")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s (a,b,...)"
        return f"{len(args)} values ({','.join(_describe(a).split(' ', 1)[1] for a in args)})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _items(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError from None
            if isinstance(parsed, list):
                return parsed
        return [part.strip() for part in text.strip("()").split(",") if part.strip()]
    raise ValueError


def _convert(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a)
            except ValueError:
                pass
        raise ValueError
    if origin is tuple:
        items = _items(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in items)
        if len(items) != len(args):
            raise ValueError
        return tuple(_convert(v, a) for v, a in zip(items, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return int(value.strip())  # ValueError on "abc" or "1.5"
        raise ValueError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    return value  # an annotation this module does not know (e.g. Any): unchecked


def convert(value: Any, tp: Any, name: str) -> Any:
    """`value` as type `tp` (parsed when it is text); ValueError "NAME must be ..., got ..." otherwise."""
    try:
        return _convert(value, tp)
    except ValueError:
        raise ValueError(f"{name} must be {_describe(tp)}, got {value!r}") from None


def typed_fields(cls: type) -> dict[str, Any]:
    """{field name: type} of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(obj: Any) -> None:
    """Convert every field of a dataclass instance to its annotated type in place (text is
    parsed), or raise ValueError naming the class and the field."""
    owner = type(obj).__name__
    for name, tp in typed_fields(type(obj)).items():
        object.__setattr__(obj, name, convert(getattr(obj, name), tp, f"{owner}.{name}"))


def typed_arguments(fn: Callable, values: dict[str, Any], what: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments for `fn` from `values` (text parsed by fn's annotations); an unknown
    name, or a missing one without a default, is a ValueError listing them (`skip`: the
    arguments the caller sets itself)."""
    hints = typing.get_type_hints(fn)
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    known = {p.name for p in params}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{what}: unknown argument(s) {unknown}; it takes {sorted(known)}")
    missing = [p.name for p in params if p.default is p.empty and p.name not in values]
    if missing:
        raise ValueError(f"{what}: argument(s) {missing} must be given")
    return {k: convert(v, hints.get(k, Any), f"{what} {k}") for k, v in values.items()}
