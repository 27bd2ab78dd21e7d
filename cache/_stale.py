"""When an answer on hand is served stale instead of waiting for the upstream.

A stale tag, tag list or referrers list with an answer kept is asked for again within
``revalidate_timeout``. Past it, or when the upstream fails, the kept answer is served; for
``stale_backoff`` after (or a 429's ``Retry-After``, up to ``MAX_RETRY_AFTER_BACKOFF``) it is
served without asking again, so a hung or throttling upstream costs one wait, not one per
request. The upstream's answer is still waited for when nothing is kept to answer with.

A request still running when the back-off ends is joined only for what is left of its own
``revalidate_timeout``: a hung upstream stalls one pull, not one per back-off.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from moorage.upstreams import UpstreamRateLimited

from ._keys import IndexKey

__all__ = ["BACKING_OFF", "MAX_RETRY_AFTER_BACKOFF", "StaleWindows"]

#: Keys remembered as failing; the oldest are forgotten past this.
MAX_FAILING_KEYS: Final = 10_000
#: The longest an upstream's ``Retry-After`` keeps a stale answer from being asked for again.
MAX_RETRY_AFTER_BACKOFF: Final = 3600.0
#: Why an answer is stale while its key backs off.
BACKING_OFF: Final = "the upstream failed lately; asking again after a back-off"
T = TypeVar("T")


class StaleWindows:
    """Per key (a tag's, a listing's): until when it is served stale without asking, and when
    the request asking for it began. Monotonic times."""

    def __init__(self, timeout: float, backoff: float) -> None:
        self.timeout = timeout
        self._backoff = backoff
        self._failing: OrderedDict[IndexKey, float] = OrderedDict()
        self._asking: dict[IndexKey, float] = {}

    def backing_off(self, key: IndexKey) -> bool:
        """Whether ``key`` failed lately: answer stale without asking."""
        until = self._failing.get(key)
        return until is not None and time.monotonic() < until

    async def in_time(self, key: IndexKey, run: Callable[[], Awaitable[T]]) -> T:
        """``run`` (which joins or starts the request, :meth:`asking`) within what is left of
        the request's time; TimeoutError past it (the request goes on)."""
        began = self._asking.get(key)
        budget = self.timeout if began is None else began + self.timeout - time.monotonic()
        if budget <= 0:
            raise TimeoutError
        async with asyncio.timeout(budget):
            return await run()

    async def asking(self, key: IndexKey, work: Callable[[], Awaitable[T]]) -> T:
        """The request itself (run once, however many join it): its start is what
        :meth:`in_time` counts from."""
        self._asking[key] = time.monotonic()
        try:
            return await work()
        finally:
            self._asking.pop(key, None)

    def failed(self, key: IndexKey, error: Exception) -> tuple[bool, float]:
        """Serve ``key`` stale for a back-off: whether this is the first caller to hear of the
        failure (callers that waited on one request fail together: the first logs it), and
        the back-off in seconds."""
        backoff = self._backoff
        if isinstance(error, UpstreamRateLimited) and error.retry_after is not None:
            backoff = max(backoff, min(error.retry_after, MAX_RETRY_AFTER_BACKOFF))
        now = time.monotonic()
        first = self._failing.get(key, 0.0) <= now
        self._failing[key] = now + backoff
        self._failing.move_to_end(key)
        while len(self._failing) > MAX_FAILING_KEYS:
            self._failing.popitem(last=False)
        return first, backoff

    def succeeded(self, key: IndexKey) -> None:
        self._failing.pop(key, None)

    def reason(self, upstream: str, error: Exception) -> str:
        """Why an answer is stale, for its log line."""
        if isinstance(error, TimeoutError):
            return f"{upstream}: no answer within {self.timeout:g} s"
        return str(error)
