"""The upstream's pull budget as its last answer reported it.

Docker Hub sends ``ratelimit-limit: 100;w=21600`` and ``ratelimit-remaining: 76;w=21600``;
others send ``x-ratelimit-limit`` / ``x-ratelimit-remaining``. No header means no limit. The
numbers are read from headers, never assumed. Also how long a ``Retry-After`` asks to wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final

__all__ = ["MAX_RETRY_AFTER", "RateLimitState", "parse_ratelimit", "retry_after_seconds"]


@dataclass(frozen=True, slots=True)
class RateLimitState:
    limit: int | None
    remaining: int | None
    window_seconds: int | None


def _number_and_window(value: str) -> tuple[int | None, int | None]:
    head, _, rest = value.partition(";")
    try:
        number = int(head.strip())
    except ValueError:
        return None, None
    window = None
    for param in rest.split(";"):
        key, _, raw = param.partition("=")
        if key.strip() == "w" and raw.strip().isdigit():
            window = int(raw.strip())
    return number, window


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimitState | None:
    """The budget in a response's headers, or None when it reports none."""
    limit_value = headers.get("ratelimit-limit") or headers.get("x-ratelimit-limit")
    remaining_value = headers.get("ratelimit-remaining") or headers.get("x-ratelimit-remaining")
    if limit_value is None and remaining_value is None:
        return None
    limit, window = _number_and_window(limit_value) if limit_value else (None, None)
    remaining, remaining_window = _number_and_window(remaining_value) if remaining_value else (None, None)
    return RateLimitState(limit, remaining, window or remaining_window)


#: A Retry-After beyond this is taken as this (``1e400`` is a float too).
MAX_RETRY_AFTER: Final = 86_400.0


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # asctime's form, or -0000: HTTP dates are GMT, not local time
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)
