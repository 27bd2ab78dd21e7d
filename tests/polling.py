"""Waiting in tests for what the code under test offers no event for (a background fill's end,
a prefetch's requests): poll a condition, fail with a clear message when it never comes true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["until", "until_async", "until_sync"]

INTERVAL = 0.005


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Return once ``condition()`` holds; raise AssertionError after ``within`` seconds."""
    for _ in range(max(1, round(within / INTERVAL))):
        if condition():
            return
        await asyncio.sleep(INTERVAL)
    raise AssertionError(f"the condition did not come true within {within:g} s")


async def until_async(condition: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """:func:`until` for a condition that must await (a scrape of ``/metrics``)."""
    for _ in range(max(1, round(within / INTERVAL))):
        if await condition():
            return
        await asyncio.sleep(INTERVAL)
    raise AssertionError(f"the condition did not come true within {within:g} s")


def until_sync(condition: Callable[[], bool], within: float = 10.0, what: str = "the condition") -> None:
    """:func:`until` for tests without an event loop (a server in its own process)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come true within {within:g} s")
        time.sleep(0.05)
