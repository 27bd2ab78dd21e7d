"""One line per pydantic validation error: ``key.path[0].name: what is wrong``.

Shared by the settings file and the lifecycle policy files, so both speak alike: in the words
of a YAML file (a list, a section of keys, text, a whole number), not of Python's types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from ._units import duration_text

__all__ = ["describe_error", "without_echoes"]

#: What a value of the wrong shape should have been, by pydantic's error type.
_EXPECTED: Final = {
    "tuple_type": "must be a list ([a, b] or '- a' lines)",
    "list_type": "must be a list ([a, b] or '- a' lines)",
    "dict_type": "must be a section of keys ('key: value' lines)",
    "model_type": "must be a section of keys ('key: value' lines)",
    "model_attributes_type": "must be a section of keys ('key: value' lines)",
    "string_type": "must be text (quote it)",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
}
#: Bounds, by pydantic's error type: the words and the key of the bound in the error's context.
_BOUNDS: Final = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("above", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("below", "lt"),
}


def without_echoes(errors: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The errors less a list's "too short" that only echoes its own items' errors (pydantic
    counts a list whose one item failed as empty)."""
    return [
        error
        for error in errors
        if not (
            error["type"] == "too_short"
            and any(
                other is not error and tuple(other["loc"][: len(error["loc"])]) == tuple(error["loc"])
                for other in errors
            )
        )
    ]


def describe_error(error: Mapping[str, Any], seconds: frozenset[str] = frozenset()) -> str:
    """``key: what is wrong``; a bound of a key named in ``seconds`` is given in seconds."""
    key = ""
    for part in error["loc"]:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    kind = error["type"]
    message = str(error["msg"])
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "required key missing"
    elif kind in _EXPECTED and _secret(error["loc"]):  # a password or token written unquoted
        message = f"{_EXPECTED[kind]}, not {_yaml_kind(error.get('input'))}"
    elif kind in _EXPECTED:
        message = f"{_EXPECTED[kind]}, not {_shown(error.get('input'))}"
    elif kind == "too_short" and isinstance(error.get("ctx"), Mapping):
        least = error["ctx"].get("min_length", 1)
        message = f"must list at least {least} {'entry' if least == 1 else 'entries'}"
    elif kind in _BOUNDS and isinstance(error.get("ctx"), Mapping):
        words, bound = _BOUNDS[kind]
        limit, given = error["ctx"][bound], error.get("input")
        timed = bool(error["loc"]) and str(error["loc"][-1]) in seconds
        if timed and isinstance(limit, int | float) and isinstance(given, int | float):
            shown = (duration_text(limit), duration_text(given))
            if shown[0] == shown[1] and limit != given:  # apart by less than a millisecond: in seconds
                shown = (f"{limit!r} s", f"{given!r} s")
            message = f"must be {words} {shown[0]}, not {shown[1]}"
        else:
            message = f"must be {words} {_number(limit)}, not {_number(given)}"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{key}: {message}" if key else message


def _secret(loc: Sequence[object]) -> bool:
    """A key whose value may be a credential, never to be repeated (``password_env`` names a
    variable, but one written as a number may well be the password itself)."""
    return bool(loc) and "password" in str(loc[-1]).lower()


def _yaml_kind(value: object) -> str:
    """What kind of value it is, without the value."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    return _yaml_words(value) if isinstance(value, dict | list | tuple) else "that value"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(value: object) -> str:
    """The offending value as the user wrote it, cut short."""
    text = repr(value) if isinstance(value, str) else _yaml_words(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _yaml_words(value: object) -> str:
    if isinstance(value, dict):
        return "a section of keys"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "nothing" if value is None else str(value)
