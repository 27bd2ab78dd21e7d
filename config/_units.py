"""Human units in settings: durations ("15m", "1h30m", "90s", 30) and sizes ("50GiB")."""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = ["duration_text", "parse_duration", "parse_size", "size_text"]

_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
    "p": 1000**5,
    "pb": 1000**5,
    "pi": 1024**5,
    "pib": 1024**5,
}


#: The longest duration any key takes: a hundred years. Beyond it, and at infinity or NaN
#: (which YAML writes .inf and .nan), a setting is a mistake: a NaN tag_ttl revalidated every
#: pull, an infinite shutdown_delay kept the process from ever stopping.
MAX_DURATION: Final = 100 * 365 * 86400.0


def parse_duration(value: object) -> float:
    """Seconds from ``15m``, ``1h30m``, ``500ms``, ``90`` (seconds) or a number; at most
    ``MAX_DURATION``."""
    seconds = _duration(value)
    if not seconds <= MAX_DURATION:  # NaN too
        raise ValueError(f"not a duration: {value!r} (at most 100 years, 36500d)")
    return seconds


def _duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r} (expected e.g. 30s, 15m, 1h30m)")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"not a duration: {value!r} (must not be negative)")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"not a duration: {value!r} (expected e.g. 30s, 15m, 1h30m)")
    text = value.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"not a duration: {value!r} (expected e.g. 30s, 15m, 1h30m)")
    return total


def duration_text(seconds: float) -> str:
    """Seconds as the settings write them: ``2592000`` as ``30d``, ``5400`` as ``1h30m``,
    ``0.25`` as ``250ms``."""
    if not math.isfinite(seconds) or seconds < 0:
        return f"{seconds:g}s"
    milliseconds = round(seconds * 1000)  # once, so that 3599.9996 is 1h, not 59m60s
    if seconds and milliseconds < 1000:
        return f"{milliseconds}ms" if milliseconds else f"{seconds:g}s"
    whole, parts = milliseconds // 1000, []
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= length:
            parts.append(f"{whole // length}{unit}")
            whole %= length
    rest = whole + (milliseconds % 1000) / 1000
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)


def size_text(value: int) -> str:
    """Bytes as a person reads them: ``1536`` as ``1.5 KiB``."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def parse_size(value: object) -> int:
    """Bytes from ``50GiB``, ``500MB``, ``1024`` or a number."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r} (expected e.g. 500MiB, 50GiB)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"not a size: {value!r} (must not be negative)")
        return value
    if not isinstance(value, str):
        raise ValueError(f"not a size: {value!r} (expected e.g. 500MiB, 50GiB)")
    match = _SIZE_RE.fullmatch(value.strip())
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (expected e.g. 500MiB, 50GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
