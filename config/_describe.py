"""One line per pydantic validation error: ``key.path[0].name: what is wrong``.

Shared by the settings file and the lifecycle policy files, so both speak alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["describe_error"]


def describe_error(error: Mapping[str, Any]) -> str:
    key = ""
    for part in error["loc"]:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key missing"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{key}: {message}" if key else message
