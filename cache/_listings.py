"""Listings: tag lists and referrers lists, the answers that describe content and are none.

Neither has a digest to check, so each is kept for a time-to-live (``tags_list_ttl``,
``referrers_ttl``), served as a ``hit`` while fresh, fetched again after, and served ``stale``
while the upstream fails: one kept is waited for no longer than ``revalidate_timeout``, and not
asked for again for a back-off after a failure (``_stale``), as a stale tag. One fetch per key
runs at a time; callers that ask meanwhile join it.

What a client cannot vary without end is kept in the index and outlives a restart: the whole
tag list of a repository, and the whole referrers answer of a manifest the store holds under
that upstream and repository (a list, or the upstream's word that it has no referrers API);
it leaves the index with the manifest. Everything else is kept in a bounded map in memory:
pages asked for with ``n``, ``last`` or an upstream's own paging parameters, lists filtered by
``artifactType``, and the answers about digests the store does not hold (an upstream lists any
made-up digest, as empty). An upstream without the referrers API (``NoReferrersApi``) is
answered 404, which sends clients to the ``sha256-<hex>`` tag schema; one that fails
(network, 5xx, 429, refused credentials) with nothing kept is the caller's to answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol, TypeVar
from urllib.parse import parse_qsl

from moorage.upstreams import (
    NoReferrersApi,
    UpstreamError,
    UpstreamNotFound,
    artifact_type_only,
    cut_tags_page,
    of_artifact_type,
)
from moorage.upstreams.reference import Digest, RepositoryName

from ._clock import within
from ._flight import SingleFlight
from ._index import Index, ReferrersEntry, TagsEntry
from ._keys import IndexKey, referrers_key, tags_list_key
from ._routes import ContentRoute
from ._source import Source
from ._stale import BACKING_OFF, StaleWindows
from .errors import StoreFailure

if TYPE_CHECKING:
    from ._cache import CacheResult

__all__ = ["Listings", "ReferrersAnswer", "TagsAnswer"]

log = logging.getLogger("moorage.cache")

#: Listings kept in memory: at most this many, and this many bytes.
MAX_PAGES_IN_MEMORY: Final = 1024
MAX_PAGE_BYTES_IN_MEMORY: Final = 32 * 1024 * 1024
_Entry = TypeVar("_Entry", TagsEntry, ReferrersEntry)
_Answer = TypeVar("_Answer", "TagsAnswer", "ReferrersAnswer")


@dataclass(frozen=True, slots=True)
class TagsAnswer:
    body: bytes
    #: The query of the next page (canonical, as ``reference.page_query`` makes it), if any.
    next_query: str | None
    result: CacheResult
    stale_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ReferrersAnswer:
    #: An OCI image index of the referrers; None when the upstream has no referrers API.
    body: bytes | None
    #: The query of the next page (canonical, as ``reference.page_query`` makes it), if any.
    next_query: str | None
    result: CacheResult
    stale_reason: str | None = None


class NotKept(Protocol):
    """How the cache counts and logs an answer served that it could not keep."""

    def __call__(self, message: str, failure: StoreFailure, **fields: str) -> None: ...


class Listings:
    def __init__(
        self,
        index: Index,
        clock: Callable[[], float],
        stale: StaleWindows,
        not_kept: NotKept,
        known_under: Callable[[Digest, ContentRoute], Awaitable[bool]],
    ) -> None:
        self._index = index
        self._clock = clock
        self._stale = stale
        self._not_kept = not_kept
        #: Whether a stored digest was fetched or confirmed under a route (see ``_routes``).
        self._known_under = known_under
        self._tags_flights: SingleFlight[IndexKey, TagsAnswer] = SingleFlight()
        self._referrers_flights: SingleFlight[IndexKey, ReferrersAnswer] = SingleFlight()
        #: Listings kept in memory (see the module's docstring), least recently fetched first.
        self._pages: OrderedDict[IndexKey, TagsEntry | ReferrersEntry] = OrderedDict()
        self._pages_bytes = 0

    async def aclose(self) -> None:
        await self._tags_flights.aclose()
        await self._referrers_flights.aclose()

    async def tags(self, source: Source, repository: RepositoryName, query: str, ttl: float) -> TagsAnswer:
        """The tag list of ``repository`` (``query``: the page asked for, canonical; "" for
        the whole list). A page of ``n`` and ``last`` alone with none kept is cut from the whole
        list kept in the index while the upstream fails."""
        key = tags_list_key(source.host, repository, query)
        kept = not query
        entry = await asyncio.to_thread(self._index.tags, key) if kept else self._page(key, TagsEntry)
        if entry is not None and within(entry.fetched_at, self._clock(), ttl):
            return TagsAnswer(entry.body, entry.next_query, "hit")
        stand_in = entry

        async def on_hand() -> bool:
            """Whether a stale answer is on hand: the one kept, or the page cut from the whole
            list (read from the index only when the upstream is slow or failing)."""
            nonlocal stand_in
            if stand_in is None:
                stand_in = await self._page_of_kept_list(source, repository, query)
            return stand_in is not None

        if self._stale.backing_off(key) and await on_hand():
            assert stand_in is not None
            return TagsAnswer(stand_in.body, stand_in.next_query, "stale", stale_reason=BACKING_OFF)

        async def fetch() -> TagsAnswer:
            page = await source.list_tags(repository, query)
            fresh = TagsEntry(page.body, page.next_query, self._clock())
            if not kept:
                self._keep_page(key, fresh)
            else:
                await self._put(partial(self._index.put_tags, key, fresh), "tag list", repository)
            return TagsAnswer(page.body, page.next_query, "miss")

        try:
            answer, joined = await self._ask(key, self._tags_flights, fetch, on_hand)
        except (UpstreamError, TimeoutError) as exc:
            if isinstance(exc, UpstreamNotFound) or not await on_hand():
                raise
            assert stand_in is not None
            reason = self._failed(key, exc, source.host, repository, "tag list")
            return TagsAnswer(stand_in.body, stand_in.next_query, "stale", stale_reason=reason)
        self._stale.succeeded(key)
        return replace(answer, result="coalesced") if joined else answer

    async def _page_of_kept_list(self, source: Source, repository: RepositoryName, query: str) -> TagsEntry | None:
        """The page ``query`` asks for, cut from the whole tag list in the index, where the
        query holds nothing but ``n`` and ``last`` and the kept list is whole (no next page)."""
        if not query or any(name not in ("n", "last") for name, _ in parse_qsl(query, keep_blank_values=True)):
            return None
        whole = await asyncio.to_thread(self._index.tags, tags_list_key(source.host, repository, ""))
        if whole is None or whole.next_query is not None:
            return None
        page = cut_tags_page(whole.body, query, whole=True)
        return TagsEntry(page.body, page.next_query, whole.fetched_at)

    async def referrers(
        self, source: Source, repository: RepositoryName, digest: Digest, query: str, ttl: float
    ) -> ReferrersAnswer:
        """The referrers of ``digest`` (``query``: ``artifactType`` and paging, canonical). A
        list of one ``artifactType`` is cut from the whole list kept in the index when no
        answer of its own is kept, so it too is answered while the upstream is down."""
        key = referrers_key(source.host, repository, digest, query)
        entry = self._page(key, ReferrersEntry)
        wanted = artifact_type_only(query)
        if (entry is None or not within(entry.fetched_at, self._clock(), ttl)) and (not query or wanted is not None):
            whole_key = referrers_key(source.host, repository, digest, "")
            kept = await asyncio.to_thread(lambda: _narrowed(self._index.referrers(whole_key), wanted))
            if kept is not None and (entry is None or kept.fetched_at > entry.fetched_at):
                entry = kept
                if query:  # cut once, not at every request
                    self._keep_page(key, kept)
        if entry is not None and within(entry.fetched_at, self._clock(), ttl):
            return ReferrersAnswer(entry.body, entry.next_query, "hit")
        if entry is not None and self._stale.backing_off(key):
            return ReferrersAnswer(entry.body, entry.next_query, "stale", stale_reason=BACKING_OFF)
        kept_one = entry is not None

        async def on_hand() -> bool:
            return kept_one

        async def fetch() -> ReferrersAnswer:
            try:
                page = await source.list_referrers(repository, digest, query)
                fresh = ReferrersEntry(page.body, page.next_query, self._clock())
            except NoReferrersApi:
                fresh = ReferrersEntry(None, None, self._clock())
            if query or not await self._keep_referrers(key, fresh, digest, (source.host, str(repository))):
                self._keep_page(key, fresh)
            else:
                self._drop_page(key)
            return ReferrersAnswer(fresh.body, fresh.next_query, "miss")

        try:
            answer, joined = await self._ask(key, self._referrers_flights, fetch, on_hand)
        except (UpstreamError, TimeoutError) as exc:
            if isinstance(exc, UpstreamNotFound) or entry is None:  # the repository is gone
                raise
            reason = self._failed(key, exc, source.host, repository, "referrers list")
            return ReferrersAnswer(entry.body, entry.next_query, "stale", stale_reason=reason)
        self._stale.succeeded(key)
        return replace(answer, result="coalesced") if joined else answer

    async def _ask(
        self,
        key: IndexKey,
        flights: SingleFlight[IndexKey, _Answer],
        fetch: Callable[[], Awaitable[_Answer]],
        on_hand: Callable[[], Awaitable[bool]],
    ) -> tuple[_Answer, bool]:
        """The upstream's listing, joined or fetched: within ``revalidate_timeout`` where a
        stale answer is ``on_hand`` (TimeoutError past it), however long where none is."""
        # One join of the flight, waited on for a while or to its end: joined again after the
        # deadline, a caller would count itself as having joined its own fetch.
        joining = asyncio.ensure_future(flights.run(key, partial(self._stale.asking, key, fetch)))
        joining.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved
        try:
            return await self._stale.in_time(key, lambda: asyncio.shield(joining))
        except TimeoutError:
            if await on_hand():
                raise
            return await joining  # nothing to answer with: wait on

    def _failed(self, key: IndexKey, error: Exception, upstream: str, repository: RepositoryName, what: str) -> str:
        """A listing kept is served stale for a back-off: why, logged by the first caller."""
        first, backoff = self._stale.failed(key, error)
        reason = self._stale.reason(upstream, error)
        if first:
            log.warning(
                f"serving stale: {what} not refreshed",
                extra={
                    "event": "revalidation_failed",
                    "upstream": upstream,
                    "repository": str(repository),
                    "listing": what,
                    "backoff_seconds": round(backoff),
                    "error": reason,
                },
            )
        return reason

    async def _keep_referrers(self, key: IndexKey, entry: ReferrersEntry, subject: Digest, route: ContentRoute) -> bool:
        """Keep a whole referrers list in the index where its subject manifest is stored and
        known under ``route``: a repository any client names holds no such manifest, so the
        index grows with the store, not with what clients make up. Whether it is kept."""
        try:
            if not await self._known_under(subject, route):
                await asyncio.to_thread(self._index.discard, key)  # no older answer outlives this one
                return False
            return await asyncio.to_thread(self._index.put_referrers, key, entry, subject, route)
        except StoreFailure as failure:
            self._not_kept("referrers list served but not stored", failure, repository=route[1])
            return False

    async def _put(self, put: Callable[[], None], what: str, repository: RepositoryName) -> None:
        try:
            await asyncio.to_thread(put)
        except StoreFailure as failure:  # the answer is in hand: served, only not kept
            self._not_kept(f"{what} served but not stored", failure, repository=str(repository))

    def _page(self, key: IndexKey, kind: type[_Entry]) -> _Entry | None:
        entry = self._pages.get(key)
        return entry if isinstance(entry, kind) else None

    def _keep_page(self, key: IndexKey, page: TagsEntry | ReferrersEntry) -> None:
        """Keep a listing in memory, within ``MAX_PAGES_IN_MEMORY`` entries and
        ``MAX_PAGE_BYTES_IN_MEMORY`` bytes (a page may be megabytes)."""
        self._drop_page(key)
        size = len(page.body or b"")
        if size > MAX_PAGE_BYTES_IN_MEMORY // 8:
            return  # served, not kept: a few such pages would push out every other
        self._pages[key] = page
        self._pages_bytes += size
        while len(self._pages) > MAX_PAGES_IN_MEMORY or self._pages_bytes > MAX_PAGE_BYTES_IN_MEMORY:
            _, oldest = self._pages.popitem(last=False)
            self._pages_bytes -= len(oldest.body or b"")

    def _drop_page(self, key: IndexKey) -> None:
        dropped = self._pages.pop(key, None)
        if dropped is not None:
            self._pages_bytes -= len(dropped.body or b"")


def _narrowed(whole: ReferrersEntry | None, wanted: str | None) -> ReferrersEntry | None:
    """The whole list, or its entries of type ``wanted``; None where those cannot all be in
    it (it has a next page)."""
    if whole is None or wanted is None:
        return whole
    if whole.next_query is not None:
        return None
    body = of_artifact_type(whole.body, wanted) if whole.body is not None else None
    return ReferrersEntry(body, None, whole.fetched_at)
