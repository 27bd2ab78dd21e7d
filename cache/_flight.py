"""Single flight for small answers (manifests, tag revalidations, tag lists).

``run(key, factory)``: the first caller starts ``factory()`` as a task; callers that arrive
while it runs await the same task. The task belongs to the flight, not to a caller: a caller
cancelled while waiting (its client left) does not cancel it. The key leaves in ``finally``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, factory: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """The factory's result and whether this caller joined a flight already under way."""
        task = self._tasks.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.ensure_future(factory())
            self._tasks[key] = task

            def done(finished: asyncio.Task[V]) -> None:
                if self._tasks.get(key) is finished:
                    del self._tasks[key]
                if not finished.cancelled():
                    finished.exception()  # retrieved: no "never retrieved" noise when all left

            task.add_done_callback(done)
        return await asyncio.shield(task), joined

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
