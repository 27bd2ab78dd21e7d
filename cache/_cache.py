"""The cache's face: answers for manifests, blobs, tag and referrers lists, and how each was obtained.

A lookup never raises for an ordinary outcome; it returns an answer whose ``result`` says
what happened, in the words used everywhere (logs, metrics, README):

- ``hit``: from the store, no upstream request;
- ``miss``: fetched from upstream now (a fill, for blobs);
- ``coalesced``: joined a fetch another client had started (one who joined a revalidation
  says ``revalidated``: it was answered from the store as well);
- ``prefetched``: a blob fetched ahead of this request, once a client had started pulling its
  image (see ``_prefetch``); like ``miss``, it cost an upstream fetch, which the first answer
  for it through that upstream reports (through another upstream it is content in store);
- ``revalidated``: a stale tag confirmed unchanged with one upstream HEAD;
- ``refreshed``: a stale tag whose digest changed, fetched again;
- ``stale``: the upstream failed (network, 5xx, 429, auth) and the last good answer is served;
  ``stale_reason`` says why.

A fresh tag costs no upstream request; a stale one costs one HEAD; only a changed digest
costs a GET. Upstream errors reach the caller only when the cache has nothing to answer with.

:class:`Cache` also keeps what the answers cost and change: usage counters, pull and read
times and store totals (``_totals``), written to the index in one batch every 10 s
(``flush``), tells the size cap (``_size_cap``, which decides when a pass runs) what is
stored and what clients are using (``_in_use``), and drives the scheduled passes (``every``:
gc, lifecycle, stale temporaries) whose walks live in ``_evict``, ``_gc`` and ``_lifecycle``.
:func:`open_cache` opens a store for serving (through :func:`open_store`, which creates one
that is not there yet), with its background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Final, Literal

from moorage.config import ConfigError, StorageSettings, UpstreamSettings
from moorage.upstreams import (
    FetchedManifest,
    HeadRefused,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from moorage.upstreams.reference import (
    IMAGE_MEDIA_TYPES,
    INDEX_MEDIA_TYPES,
    MAX_MANIFEST_BYTES,
    AcceptClass,
    Digest,
    Reference,
    RepositoryName,
    Tag,
    is_manifest_document,
    parse_digest,
    sniff_media_type,
)

from ._clock import within
from ._evict import RECENT_SECONDS, ReadGuard, touch
from ._fill import FillReader, Fills
from ._flight import SingleFlight
from ._gc import GcReport, Platform, default_platform, index_platforms, sweep
from ._hot import HotAnswers, StoredManifest
from ._in_use import InUse
from ._index import Index, TagEntry, Usage, is_disk_full
from ._keys import (
    IndexKey,
    image_key,
    image_pulled_key,
    manifest_flight_key,
    pulled_key,
    route_flight_key,
    tag_key,
)
from ._layout import index_dir
from ._lifecycle import LifecycleResult, PolicyFor, apply_expiries, plan, policy_resolver
from ._listings import Listings, ReferrersAnswer, TagsAnswer
from ._observer import CacheObserver, ContentKind, NullCacheObserver
from ._prefetch import Prefetcher
from ._routes import ContentRoute, MayRead, RouteBook
from ._serving import ServingLock
from ._size_cap import SizeCap
from ._source import Source
from ._stale import BACKING_OFF, StaleWindows
from ._store import BlobStore, DirectoryStore, Fingerprint, WriteCheck
from ._totals import Batch, StoreTotals
from ._verify import counted_size, hash_file
from .errors import CacheError, ClientGone, DigestMismatch, IndexFailure, StoreFailure, error_text

__all__ = [
    "BlobAnswer",
    "Cache",
    "CacheResult",
    "FillingBlob",
    "ManifestAnswer",
    "ReferrersAnswer",
    "TagsAnswer",
    "WarmBlob",
    "open_cache",
]

log = logging.getLogger("moorage.cache")
CacheResult = Literal["hit", "miss", "coalesced", "prefetched", "revalidated", "refreshed", "stale"]
#: Answers a caller that joined another's fetch did not cause: it waited on that GET. One who
#: joined a revalidation is answered from the store as the first was, and says ``revalidated``.
_CAUSED_UPSTREAM: Final = frozenset({"miss", "refreshed"})
#: The wait after a start before a scheduled pass that is due (gc, lifecycle) runs.
OVERDUE_PASS_DELAY: Final = 60.0
#: Revalidations of one upstream in flight at once. A revalidation goes on after its clients
#: were answered stale, with its retries: 80 hanging HEADs had taken every connection to the
#: upstream for three minutes, and pulls of images with no fault waited 54 s for one. A tag
#: that finds no place is answered stale once its clients' ``revalidate_timeout`` is up.
MAX_REVALIDATIONS: Final = 16
#: How long a tag's move to a new index waits at most for a platform manifest the upstream
#: keeps failing (but 429s: those wait for the budget); tags held at once, at most.
MOVE_HOLD_SECONDS: Final = 600.0
MAX_HELD_MOVES: Final = 4096
#: Indexes within indexes followed for a moved tag's platforms (a node pulls through each).
MAX_INDEX_NESTING: Final = 4
#: Prefetched blobs no client of their upstream has asked for yet, remembered to answer the
#: first one "prefetched".
MAX_UNCLAIMED_PREFETCHES: Final = 4096


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    digest: Digest
    media_type: str
    body: bytes
    result: CacheResult
    stale_reason: str | None = None
    #: False for a verified manifest served although the store could not keep it.
    stored: bool = True


@dataclass(frozen=True, slots=True)
class WarmBlob:
    digest: Digest
    size: int
    #: A local file the transport may sendfile from; None for stores that have none.
    path: Path | None
    result: CacheResult = "hit"


@dataclass(frozen=True, slots=True)
class FillingBlob:
    """A blob being fetched; its upstream has answered, so its size is known."""

    reader: FillReader
    size: int
    result: CacheResult


BlobAnswer = WarmBlob | FillingBlob


@dataclass(frozen=True, slots=True)
class _TagAsk:
    """One client's question about a tag: where to ask, what, and under which index key."""

    source: Source
    repository: RepositoryName
    tag: Tag
    accept: AcceptClass
    key: IndexKey


def first_pass_delay(last: float, now: float, interval: float) -> float:
    """The wait before a scheduled pass that last ran at ``last``: what is left of its interval,
    and ``OVERDUE_PASS_DELAY`` (no less, so that a start is not slowed) once it is due, or
    when ``last`` is an interval or more ahead of now (the clock was stepped back since). A
    pass a little ahead (recorded by a replica whose clock runs ahead) ran just now."""
    if not within(last, now, interval):
        return min(interval, OVERDUE_PASS_DELAY)
    return min(interval, max(OVERDUE_PASS_DELAY, last + interval - now))


class Cache:
    def __init__(
        self,
        store: BlobStore,
        index: Index,
        *,
        revalidate_timeout: float = 5.0,
        stale_backoff: float = 30.0,
        observer: CacheObserver | None = None,
        max_size: int | None = None,
        watermarks: tuple[float, float] = (0.95, 0.85),
        clock: Callable[[], float] = time.time,
        prefetch: Mapping[str, int] | None = None,
        prefetch_limits: Mapping[str, int] | None = None,
    ) -> None:
        self._store = store
        self._index = index
        self._clock = clock
        self._observer = _Bookkeeping(self, observer or NullCacheObserver())
        #: Bytes and entries in the blob store (``_totals``).
        self.totals = StoreTotals(index.store_totals())
        self._flushing = asyncio.Lock()
        #: Whether the last flush wrote its batch (a clean stop needs the last one to).
        self.flushed = True
        #: Set while the store must be counted again (after a crash) and has not been yet.
        self.count_pending = False
        self._hot = HotAnswers()
        self._usage: Usage = {}
        self._pulled: dict[IndexKey, float] = {}
        #: The pulls of the batch being written: in neither ``_pulled`` nor the index until
        #: it is (a tag's move asks both which platforms clients pulled).
        self._pulled_writing: dict[IndexKey, float] = {}
        #: Manifests pulled from the store that the index does not record (see
        #: ``StoredManifest.recorded``), by media type; recorded with the next batch.
        self._unrecorded: dict[Digest, str] = {}
        #: Blobs and manifests read since the last flush, and when (for least-recently-used).
        self._accessed: dict[Digest, float] = {}
        #: Reads of stored files, for sweepers: a file a client found is not removed under it.
        self._guard = ReadGuard()
        #: Images being pulled and content stored just now, which size passes take out last.
        self._in_use = InUse(lambda: self._clock())  # noqa: PLW0108 (a test may move the clock)
        #: One maintenance pass (eviction, garbage collection, lifecycle) at a time.
        self._maintenance = asyncio.Lock()
        #: Stale tags and listings: how long their revalidation is waited for, and back-offs.
        self._stale = StaleWindows(revalidate_timeout, stale_backoff)
        #: Places for revalidations in flight, by upstream (see ``MAX_REVALIDATIONS``).
        self._revalidation_places: dict[str, asyncio.Semaphore] = {}
        #: Fingerprints of files known good (hashed on their way in, or again since) that the
        #: index does not hold yet; written with the bookkeeping batch.
        self._trusted: dict[Digest, Fingerprint] = {}
        self._verifications: SingleFlight[Digest, int | None] = SingleFlight()
        #: Corrupt files moved aside by a thread, for the event loop to account for.
        self._quarantined: deque[tuple[Digest, int, ContentKind]] = deque()
        #: The routes each stored digest is known under (see ``_routes``).
        self._routes = RouteBook()
        self._route_flights: SingleFlight[IndexKey, None] = SingleFlight()
        self.fills = Fills(store, self._observer, on_commit=self._committed)
        self.size_cap = SizeCap(
            store,
            index,
            totals=self.totals,
            fills=self.fills,
            guard=self._guard,
            maintenance=self._maintenance,
            in_use=self._in_use,
            accessed=lambda: self._accessed,
            removed=self._gone,
            observer=self._observer,
            clock=lambda: self._clock(),  # noqa: PLW0108 (a test may move the clock)
            max_size=max_size,
            watermarks=watermarks,
        )
        #: Blobs prefetched at once per image, by upstream host (absent: no prefetch).
        self._prefetch_at_once = dict(prefetch or {})
        self.prefetches = Prefetcher(
            self.fills, self._is_stored, self._prefetch_started, self._forget_unclaimed, dict(prefetch_limits or {})
        )
        #: Prefetched blob -> the upstream host whose prefetch fetched it, until claimed.
        self._unclaimed: OrderedDict[Digest, str] = OrderedDict()
        self._manifest_flights: SingleFlight[IndexKey, ManifestAnswer] = SingleFlight()
        #: Tags whose move to a new index waits for its platforms (``_fetch_platforms_in_use``):
        #: the first and the last failure (monotonic) and the index of the last; until a move or
        #: the tag confirmed unchanged.
        self._held_moves: dict[IndexKey, tuple[float, float, Digest]] = {}
        #: Tag lists and referrers lists (see ``_listings``), on this cache's clock as it is at
        #: each call (a test may move it).
        self.listings = Listings(self._index, lambda: self._clock(), self._stale, self._not_kept, self._known_under)  # noqa: PLW0108

    @property
    def store_bytes(self) -> int:
        return self.totals.bytes

    @property
    def store_entries(self) -> int:
        return self.totals.entries

    async def aclose(self) -> None:
        await self.size_cap.aclose()
        await self.prefetches.aclose()
        await self.fills.aclose()
        await self._manifest_flights.aclose()
        await self.listings.aclose()
        await self._verifications.aclose()
        await self._route_flights.aclose()
        await self.flush()

    def check(self) -> tuple[WriteCheck, str | None]:
        """(whether the store can be written, index problem or None); blocks (run in a thread)."""
        return self._store.check_writable(), self._index.check()

    def disk_full(self) -> None:
        """Something found the store's disk full (a readiness probe): an eviction pass, as
        often as the full disk's passes may run."""
        self.size_cap.schedule("disk_full")

    async def sweep_stale_temporaries(self) -> None:
        """Remove temporaries nothing wrote for ``STALE_TEMPORARY_SECONDS``: a process that
        died while others served the store left them, and only a start alone sweeps them."""
        if not isinstance(self._store, DirectoryStore):
            return
        store, ours = self._store, self.fills.pending()

        def sweep() -> int:
            for pending in ours:  # every process marks its own first: others sweep every 10 min too
                pending.keep_alive()
            return store.sweep_temporaries(STALE_TEMPORARY_SECONDS)

        removed = await asyncio.to_thread(sweep)
        if removed:
            log.warning(
                "stale partial downloads removed",
                extra={"event": "temporaries_swept", "files": removed, "unwritten_for": STALE_TEMPORARY_SECONDS},
            )

    # -- bookkeeping ----------------------------------------------------------------------------

    def record(self, upstream: str, result: CacheResult, sent_bytes: int) -> None:
        """Count an answer a client received (for ``moorage stats`` across restarts)."""
        counters = self._usage.setdefault(upstream, {})
        counters[result] = counters.get(result, 0) + 1
        counters["served_bytes"] = counters.get("served_bytes", 0) + sent_bytes
        if result == "hit":
            counters["hit_bytes"] = counters.get("hit_bytes", 0) + sent_bytes

    def _count_fetched(self, upstream: str, count: int) -> None:
        counters = self._usage.setdefault(upstream, {})
        counters["upstream_bytes"] = counters.get("upstream_bytes", 0) + count

    async def flush(self) -> None:
        """Write usage counters, pull times, store totals, read times and fingerprints of
        files known good, in one batch."""
        async with self._flushing:  # one at a time: each adds what changed since the last
            try:
                await self._flush()
            finally:
                self._pulled_writing = {}  # written, or back in ``_pulled`` for the next try

    async def _flush(self) -> None:
        usage, self._usage = self._usage, {}
        pulled, self._pulled = self._pulled, {}
        self._pulled_writing = pulled
        unrecorded, self._unrecorded = self._unrecorded, {}
        accessed = self._accessed
        # What was read in the last seconds stays in the live map: it protects those blobs from
        # every sweeper (eviction, gc, lifecycle) while their readers may still be opening them.
        now = self._clock()
        self._accessed = {digest: when for digest, when in accessed.items() if within(when, now, RECENT_SECONDS)}
        # On a thread: a sweeper holds the guard's lock while it unlinks, which for a file of
        # gigabytes takes a while.
        await asyncio.to_thread(self._guard.prune)
        self._in_use.prune(now)
        batch = self.totals.batch()
        trusted = self._trusted  # live: touch renews entries in it for serves meanwhile
        routes = self._routes.take_learnt()

        def write() -> tuple[dict[Digest, Fingerprint], tuple[int, int]]:
            fingerprints = dict(trusted)
            if isinstance(self._store, DirectoryStore):
                fingerprints.update(touch(self._store, self._index, accessed, trusted))
            held = self._index.write_batch(
                usage, pulled, batch.change, fingerprints, routes, counted_totals=batch.counted, manifests=unrecorded
            )
            return fingerprints, held

        writing = asyncio.ensure_future(asyncio.to_thread(write))
        try:
            written, held = await asyncio.shield(writing)
        except asyncio.CancelledError:
            # Shutdown: the thread writes the batch regardless. Wait for it and take note of
            # what it wrote, or the last flush would add this batch's store change again.
            await asyncio.gather(writing, return_exceptions=True)
            if writing.exception() is None:
                self._note_written(*writing.result(), batch, unrecorded)
            else:
                self._keep_for_next_flush(usage, pulled, accessed, routes, unrecorded)
            raise
        except Exception as exc:  # a full disk, a broken index: keep the batch for the next try
            self.flushed = False
            self._keep_for_next_flush(usage, pulled, accessed, routes, unrecorded)
            log.error(
                "bookkeeping not written; kept for the next try",
                extra={"event": "flush_failed", "error": error_text(exc)},
            )
            if is_disk_full(exc):  # with no fill failing, nothing else would free space
                self.size_cap.schedule("disk_full")
            return
        self._note_written(written, held, batch, unrecorded)
        self.flushed = True

    def _note_written(
        self,
        written: dict[Digest, Fingerprint],
        held: tuple[int, int],
        batch: Batch,
        recorded: Mapping[Digest, str],
    ) -> None:
        """After a batch is in the index: ``held`` is the store totals it holds now, written
        from ``batch``; ``recorded``, the manifests it recorded again."""
        for digest, fingerprint in written.items():  # in the index now; newer ones stay
            if self._trusted.get(digest) == fingerprint:
                del self._trusted[digest]
        for digest in recorded:
            stored = self._hot.manifest(digest)
            if stored is not None:
                self._hot.put_manifest(digest, replace(stored, recorded=True))
        if self.totals.written(batch, held):  # what the others stored may take the store over its cap
            self.size_cap.schedule()

    def _keep_for_next_flush(
        self,
        usage: Usage,
        pulled: dict[IndexKey, float],
        accessed: dict[Digest, float],
        routes: dict[Digest, list[ContentRoute]],
        unrecorded: dict[Digest, str],
    ) -> None:
        """Put a batch that could not be written back under what came in meanwhile."""
        for digest, media_type in unrecorded.items():
            self._unrecorded.setdefault(digest, media_type)
        for upstream, deltas in usage.items():
            counters = self._usage.setdefault(upstream, {})
            for name, delta in deltas.items():
                counters[name] = counters.get(name, 0) + delta
        for key, when in pulled.items():
            self._pulled.setdefault(key, when)
        for digest, when in accessed.items():
            self._accessed.setdefault(digest, when)
        self._routes.relearn(routes)

    def _trust(self, digest: Digest, fingerprint: Fingerprint) -> None:
        self._trusted[digest] = fingerprint

    def _committed(self, digest: Digest, fingerprint: Fingerprint, origin: ContentRoute) -> None:
        """A fill stored a blob fetched through ``origin``."""
        self._trust(digest, fingerprint)
        self._routes.learn(digest, origin)
        self._in_use.stored(digest)

    def _gone(self, digests: Iterable[Digest]) -> None:
        """Content a maintenance pass removed: nothing in memory holds it any longer."""
        digests = list(digests)
        self.fills.forget_committed(digests)
        for digest in digests:
            self._forget(digest)

    def _forget(self, digest: Digest) -> None:
        """What the event loop holds of content that left the store."""
        self._hot.forget_manifest(digest)
        self._trusted.pop(digest, None)
        self._routes.forget(digest)
        self._unclaimed.pop(digest, None)

    # -- the size cap (``_size_cap``) ------------------------------------------------------------

    @property
    def max_size(self) -> int | None:
        return self.size_cap.max_size

    async def evict(self, reason: str = "size") -> None:
        """One size-cap pass (see ``SizeCap.evict``)."""
        await self.size_cap.evict(reason)

    async def recount(self, *, crashed: bool = True) -> None:
        """Count the store again (after a daemon stopped without writing its last totals, or
        where the index keeps no totals of its blobs), then evict if that shows it above its
        cap. Serving goes on meanwhile."""
        if not isinstance(self._store, DirectoryStore):
            return
        store = self._store
        async with self._maintenance:
            before = self.store_bytes
            fresh_since = self.totals.walk_began()
            try:
                counted = await asyncio.to_thread(store.walk_count, fresh_since)
            except Exception as exc:  # the count stays owed: the next start tries again
                self.totals.walk_failed()
                log.error(
                    "store not counted",
                    extra={"event": "maintenance_failed", "task": "count", "error": error_text(exc)},
                )
                return
            self.totals.walk_ended(counted.bytes, counted.entries, counted.fresh)
            self.count_pending = False
        log.warning(
            "the last run did not stop cleanly (or kept no mark of it); the store was counted again"
            if crashed
            else "the index kept no totals of the store's blobs (moved aside, or new); the store was counted",
            extra={"event": "store_counted", "store_bytes_before": before, "store_bytes": self.store_bytes},
        )
        self.size_cap.schedule()

    # -- garbage collection and lifecycle policies ------------------------------------------------

    async def collect_garbage(self, grace_seconds: float) -> GcReport:
        """One garbage collection beside serving: blobs no manifest reaches, and nobody read
        for ``grace_seconds``, leave the store."""
        if not isinstance(self._store, DirectoryStore):
            return GcReport()
        async with self._maintenance:
            started = time.monotonic()
            report = await asyncio.to_thread(
                sweep,
                self._store,
                self._index,
                grace_seconds=grace_seconds,
                protected=frozenset(self.fills.digests),
                accessed=self._accessed,
                guard=self._guard,
            )
            self._removed([parse_digest(d) for d in report.swept], report.swept_bytes, "gc")
            seconds = time.monotonic() - started
            self._observer.on_maintenance("gc", seconds)
        log.info(
            "garbage collected",
            extra={
                "event": "gc",
                "blobs": len(report.swept),
                "freed_bytes": report.swept_bytes,
                "reachable": report.reachable,
                "kept_young": report.kept_young,
                "seconds": round(seconds, 3),
            },
        )
        return report

    async def apply_lifecycle(self, policy_for: PolicyFor) -> LifecycleResult:
        """Expire what the lifecycle policies say, now; pull times are written first so the
        rules see them."""
        if not isinstance(self._store, DirectoryStore):
            return LifecycleResult()
        store = self._store
        async with self._maintenance:
            started = time.monotonic()
            await self.flush()

            protected = frozenset(self.fills.digests)  # taken on the loop, which changes the fills
            unreadable: set[str] = set()

            def run() -> LifecycleResult:
                now = self._clock()
                expiries = plan(store, self._index, policy_for, now, unreadable=unreadable)
                return apply_expiries(
                    store, self._index, expiries, protected=protected, guard=self._guard, planned_at=now
                )

            result = await asyncio.to_thread(run)
            for error in sorted(unreadable):  # its repositories wait; the other policies applied
                log.error(
                    "lifecycle policy not applied",
                    extra={"event": "maintenance_failed", "task": "lifecycle", "error": error},
                )
            for key in result.dropped_tags:
                self._hot.forget_tag(key)
            for expiry in result.expired:  # their records are gone, files that stay too (see StoredManifest.recorded)
                for digest in expiry.going:
                    self._hot.forget_manifest(digest)
            self._removed(result.removed, result.freed_bytes, "lifecycle")
            counts: dict[tuple[str, int], int] = {}
            for expiry in result.expired:
                where = (expiry.image.upstream, expiry.rule.rulePriority)
                counts[where] = counts.get(where, 0) + 1
                log.info(
                    "image expired",
                    extra={"event": "image_expired", "image": expiry.image.name, "rule": expiry.reason},
                )
            for (upstream, rule), count in counts.items():
                self._observer.on_images_expired(upstream, rule, count)
            self._observer.on_maintenance("lifecycle", time.monotonic() - started)
        return result

    def _removed(self, digests: list[Digest], freed: int, reason: str) -> None:
        """Account for blobs a gc or lifecycle pass removed."""
        self.totals.removed(freed, len(digests))
        self._gone(digests)
        if digests:
            self._observer.on_evicted(reason, len(digests), freed)

    async def every(
        self, seconds: float, task: str, job: Callable[[], Awaitable[object]], *, first: float | None = None
    ) -> None:
        """Run a maintenance job every ``seconds`` until cancelled; a failed pass is logged and
        the next one runs on time. A job given its ``first`` wait (see :meth:`due_in`) is
        remembered: when it ran is kept in the index, so that the first after a start is due
        ``seconds`` after the last. Counted from each start, a daemon restarted more often than
        that (a rolling deployment, nodes drained nightly) ran none."""
        remembered = first is not None
        delay = seconds if first is None else first
        while True:
            await asyncio.sleep(delay)
            delay = seconds
            try:
                await job()
            except Exception as exc:
                log.error(
                    "maintenance pass failed",
                    extra={"event": "maintenance_failed", "task": task, "error": error_text(exc)},
                )
            if remembered:  # a failed pass too: the next is due an interval on, not at every start
                with contextlib.suppress(CacheError):  # not kept: the next start counts from itself
                    await asyncio.to_thread(self._index.record_pass, task, time.time())

    async def due_in(self, task: str, seconds: float) -> float:
        """How long after a start the first pass of a job run every ``seconds`` is due, from
        when it last ran; a store's first start is recorded as a pass, here."""
        now = time.time()
        try:
            last = await asyncio.to_thread(self._index.last_pass, task, now)
        except CacheError:
            return seconds
        return first_pass_delay(last, now, seconds)

    async def flush_every(self, seconds: float) -> None:
        """Batch bookkeeping writes instead of one per request; runs until cancelled."""
        while True:
            await asyncio.sleep(seconds)
            await self.flush()

    # -- manifests ------------------------------------------------------------------------------

    async def manifest(
        self,
        source: Source,
        repository: RepositoryName,
        reference: Reference,
        accept: AcceptClass,
        ttl: float,
        may_read: MayRead = None,
        *,
        reading: bool = True,
    ) -> ManifestAnswer:
        """The manifest for a tag or digest. ``may_read`` tells which routes the caller may read
        (None: all); a stored manifest known only under other routes is confirmed upstream first.
        ``reading``: the client reads the body (a GET), so its blobs come next; not for a HEAD,
        which pollers (kubelet's Always, update bots) send without pulling anything."""
        answer = await self._manifest(source, repository, reference, accept, ttl, may_read)
        # Pull times of tags and images, for lifecycle rules; written with the bookkeeping
        # batch. Only for an answer: a name or tag the upstream does not have (any a client
        # makes up) leaves nothing in the index.
        now = self._clock()
        if not isinstance(reference, Digest):
            self._pulled[pulled_key(source.host, repository, reference)] = now
        if answer.stored:  # an image the index does not hold has no pull time to keep
            self._pulled[image_pulled_key(source.host, repository, answer.digest)] = now
            held = self._hot.manifest(answer.digest)
            if held is not None and not held.recorded:
                self._unrecorded[answer.digest] = held.media_type
            # A read, for the size cap's order, whatever the answer (the one place manifests are
            # counted): a tag pulled less often than its TTL is answered "revalidated".
            self._accessed[answer.digest] = now
        if reading:  # what it names comes next: the size cap keeps it (``_in_use``)
            self._in_use.served_for_reading(answer.digest, answer.body, now)
        return answer

    async def _manifest(
        self,
        source: Source,
        repository: RepositoryName,
        reference: Reference,
        accept: AcceptClass,
        ttl: float,
        may_read: MayRead,
    ) -> ManifestAnswer:
        if isinstance(reference, Digest):
            return await self._manifest_by_digest(source, repository, reference, may_read)
        ask = _TagAsk(source, repository, reference, accept, tag_key(source.host, repository, reference, accept))
        entry = self._hot.tag(ask.key)
        stored = self._hot.manifest(entry.digest) if entry is not None else None
        if entry is None or stored is None:  # not in memory: one thread hop for index and store
            entry, stored = await asyncio.to_thread(self._lookup_tag, ask.key)
            self._account_quarantined()
            self._remember(ask.key, entry, stored)
        if entry is None:
            single = await self._single_image(ask, may_read) if ask.accept == "image" else None
            if single is None:
                return await self._flight(ask.key, lambda: self._fetch_tag(ask))
            # The answer held for clients that take indexes is one image: the same manifest
            # answers this client once the upstream confirms it (one HEAD), or stale.
            return await self._revalidate_or_stale(ask, *single, changed="miss")
        if within(entry.checked_at, self._clock(), ttl):
            if stored is not None:
                return ManifestAnswer(entry.digest, stored.media_type, stored.body, "hit")
            return await self._manifest_by_digest(source, repository, entry.digest)
        if stored is None:  # nothing to fall back on: wait for the upstream, however long
            return await self._flight(ask.key, lambda: self._revalidate(ask, entry, stored))
        return await self._revalidate_or_stale(ask, entry, stored)

    async def _single_image(self, ask: _TagAsk, may_read: MayRead) -> tuple[TagEntry, StoredManifest] | None:
        """For a client that takes no index: from the tag's answer held for clients that do,
        the image the upstream would most likely answer this client with. That answer itself
        when it is an image manifest (the tag names one platform's image); for an index, its
        linux/amd64 manifest when the store holds it under a route the caller may read
        (Docker Hub and Distribution answer such a client with that one); else None. The
        caller confirms it upstream with a HEAD, and serves it stale when that fails: an index
        naming a manifest held only under a route the caller may not read would have served
        it past the access policy."""
        key = tag_key(ask.source.host, ask.repository, ask.tag, "index")
        entry = self._hot.tag(key)
        stored = self._hot.manifest(entry.digest) if entry is not None else None
        if entry is None or stored is None:
            entry, stored = await asyncio.to_thread(self._lookup_tag, key)
            self._account_quarantined()
            self._remember(key, entry, stored)
        if entry is None or stored is None:
            return None
        if stored.media_type in IMAGE_MEDIA_TYPES:
            return entry, stored
        platform = default_platform(stored.body)
        held = await self._stored_manifest(platform) if platform is not None else None
        if platform is None or held is None or held.media_type not in IMAGE_MEDIA_TYPES:
            return None
        if may_read is not None:
            routes = await self._routes_of(platform)
            route: ContentRoute = (ask.source.host, str(ask.repository))
            if route not in routes and not any(may_read(upstream, name) for upstream, name in routes):
                return None
        return TagEntry(platform, held.media_type, entry.checked_at), held

    async def _stored_manifest(self, digest: Digest) -> StoredManifest | None:
        """A manifest the store holds, from memory or (one thread hop) from the store."""
        stored = self._hot.manifest(digest)
        if stored is None:
            stored = await asyncio.to_thread(self._load_manifest, digest)
            self._account_quarantined()
            self._remember(None, None, stored, digest)
        return stored

    async def _revalidate_or_stale(
        self, ask: _TagAsk, entry: TagEntry, stored: StoredManifest, changed: CacheResult = "refreshed"
    ) -> ManifestAnswer:
        """A stale tag with an answer on hand: revalidated, or served stale as ``_stale``
        says. ``changed`` is the result when the upstream's digest differs."""

        def stale(reason: str) -> ManifestAnswer:
            return ManifestAnswer(entry.digest, stored.media_type, stored.body, "stale", stale_reason=reason)

        key = ask.key
        if self._stale.backing_off(key):
            return stale(BACKING_OFF)

        async def revalidate() -> ManifestAnswer:
            places = self._revalidation_places.setdefault(ask.source.host, asyncio.Semaphore(MAX_REVALIDATIONS))
            async with places:
                return await self._revalidate(ask, entry, stored, changed)

        try:
            answer = await self._stale.in_time(
                key, lambda: self._flight(key, lambda: self._stale.asking(key, revalidate))
            )
        except (UpstreamError, CacheError, TimeoutError) as exc:
            if isinstance(exc, UpstreamNotFound):
                raise
            first, backoff = self._stale.failed(key, exc)
            reason = self._stale.reason(ask.source.host, exc)
            if not first:
                return stale(reason)
            log.warning(
                "serving stale: revalidation failed",
                extra={
                    "event": "revalidation_failed",
                    "upstream": ask.source.host,
                    "repository": str(ask.repository),
                    "tag": str(ask.tag),
                    "digest": str(entry.digest),
                    "stale_seconds": round(max(0.0, self._clock() - entry.checked_at)),
                    "backoff_seconds": round(backoff),
                    "error": reason,
                },
            )
            return stale(reason)
        self._stale.succeeded(key)
        return answer

    async def _flight(self, key: IndexKey, fetch: Callable[[], Awaitable[ManifestAnswer]]) -> ManifestAnswer:
        answer, joined = await self._manifest_flights.run(key, fetch)
        # A caller that joined did not cause the upstream request it shares.
        return replace(answer, result="coalesced") if joined and answer.result in _CAUSED_UPSTREAM else answer

    async def _manifest_by_digest(
        self, source: Source, repository: RepositoryName, digest: Digest, may_read: MayRead = None
    ) -> ManifestAnswer:
        """By digest: from the store when held (``may_read`` as in :meth:`manifest`; a tag's
        own answer passes None, since the tag's entry belongs to this route), else fetched."""
        stored = await self._stored_manifest(digest)
        if stored is not None:
            await self._check_route(source, repository, digest, "manifest", may_read)
            return ManifestAnswer(digest, stored.media_type, stored.body, "hit")
        key = manifest_flight_key(source.host, repository, digest)
        return await self._flight(key, lambda: self._fetch_by_digest(source, repository, digest))

    async def _fetch_by_digest(self, source: Source, repository: RepositoryName, digest: Digest) -> ManifestAnswer:
        fetched = await source.get_manifest(repository, digest, "index")
        where = f"manifest {repository}@{digest} from {source.host}"
        _, kept = await self._keep(source.host, repository, fetched, where, digest, None)
        self._prefetch(source, repository, fetched)
        return ManifestAnswer(digest, fetched.media_type, fetched.body, "miss", stored=kept)

    async def _keep(
        self,
        upstream: str,
        repository: RepositoryName,
        fetched: FetchedManifest,
        where: str,
        expected: Digest | None,
        tag: IndexKey | None,
    ) -> tuple[Digest, bool]:
        """The manifest's digest, and whether the store kept it."""
        self._observer.on_fetched_bytes(upstream, "manifest", len(fetched.body))
        try:
            digest, entry, new, failure = await asyncio.to_thread(
                self._keep_manifest, fetched, where, expected, tag, (upstream, str(repository))
            )
        except DigestMismatch:
            self._observer.on_digest_mismatch(upstream, "manifest")
            raise
        if new:
            self._observer.on_stored("manifest", len(fetched.body), digest)
        if failure is not None:  # verified, so it is served all the same; only not kept
            self._not_kept("manifest served but not stored", failure, digest=str(digest))
            if isinstance(failure, IndexFailure):  # in the store: remembered here, not asked for again,
                # and recorded by the next pull's batch once the index takes writes again
                stored = StoredManifest(fetched.body, fetched.media_type, recorded=False)
                self._remember(tag, entry, stored, digest)
            return digest, False
        self._in_use.stored(digest)
        self._routes.learn(digest, (upstream, str(repository)))
        self._remember(tag, entry, StoredManifest(fetched.body, fetched.media_type), digest)
        return digest, True

    def _not_kept(self, message: str, failure: StoreFailure, **fields: str) -> None:
        """An answer in hand that the store or the index could not keep: counted and logged
        (a full disk starts eviction), and served all the same."""
        self._observer.on_store_failure(failure.disk_full)
        log.warning(message, extra={"event": "store_write_failed", **fields, "error": str(failure)})

    def _prefetch(self, source: Source, repository: RepositoryName, fetched: FetchedManifest) -> None:
        """Arm the prefetch of an image manifest just fetched (see ``_prefetch``)."""
        at_once = self._prefetch_at_once.get(source.host, 0)
        if at_once:
            self.prefetches.arm(source, repository, fetched.body, at_once)

    def _prefetch_started(self, host: str, digest: Digest) -> None:
        self._unclaimed[digest] = host
        while len(self._unclaimed) > MAX_UNCLAIMED_PREFETCHES:
            self._unclaimed.popitem(last=False)

    def _forget_unclaimed(self, digest: Digest) -> None:
        """A prefetch stored nothing, or a client fetches the blob for itself."""
        self._unclaimed.pop(digest, None)

    def _claimed(self, host: str, digest: Digest, result: CacheResult) -> CacheResult:
        """``prefetched`` for the first client a prefetched blob reaches through the upstream
        that fetched it, else ``result``: to a client of another upstream it was in store."""
        if self._unclaimed and self._unclaimed.get(digest) == host:
            del self._unclaimed[digest]
            return "prefetched"
        return result

    def _remember(
        self, key: IndexKey | None, entry: TagEntry | None, stored: StoredManifest | None, digest: Digest | None = None
    ) -> None:
        """Keep what the index and store just said in the in-memory front."""
        if key is not None and entry is not None:
            self._hot.put_tag(key, entry)
        digest = digest or (entry.digest if entry is not None else None)
        if stored is not None and digest is not None:
            self._hot.put_manifest(digest, stored)

    async def _fetch_tag(self, ask: _TagAsk, result: CacheResult = "miss") -> ManifestAnswer:
        fetched = await ask.source.get_manifest(ask.repository, ask.tag, ask.accept)
        where = f"manifest {ask.repository}:{ask.tag} from {ask.source.host}"
        digest, kept = await self._keep(ask.source.host, ask.repository, fetched, where, None, ask.key)
        self._prefetch(ask.source, ask.repository, fetched)
        return ManifestAnswer(digest, fetched.media_type, fetched.body, result, stored=kept)

    async def _revalidate(
        self, ask: _TagAsk, entry: TagEntry, stored: StoredManifest | None, changed: CacheResult = "refreshed"
    ) -> ManifestAnswer:
        try:
            # With the stored answer on hand, a 429 serves it at once, not after waiting it out.
            head = await ask.source.head_manifest(ask.repository, ask.tag, ask.accept, wait_out_429=stored is None)
            current = head.digest
        except HeadRefused:
            current = None
        if current is None:  # a HEAD that names no digest, or none taken: the GET tells
            if stored is not None and stored.media_type in INDEX_MEDIA_TYPES:
                return await self._refresh_index(ask, entry, stored, changed)
            answer = await self._fetch_tag(ask, result=changed)
            # Unchanged, but fetched all the same: not a change, and no answer from the store.
            return replace(answer, result="miss") if answer.digest == entry.digest else answer
        if current == entry.digest:
            await self._confirm_tag(ask, entry)
            if stored is not None:
                return ManifestAnswer(entry.digest, stored.media_type, stored.body, "revalidated")
            answer = await self._fetch_by_digest(ask.source, ask.repository, entry.digest)
            if answer.result in ("miss", "coalesced"):  # the stored copy was gone: a GET after all
                return answer
            return replace(answer, result="revalidated")
        held = await self._stored_manifest(current)
        if held is not None:  # moved back, or to what another tag pulled: no GET of it
            fetched = stored is not None and await self._fetch_platforms_in_use(ask, stored, held.body, current)
            moved = await self._moved_to_stored(ask, current, held)
            return replace(moved, result=changed) if fetched else moved
        if stored is not None and stored.media_type in INDEX_MEDIA_TYPES:
            return await self._refresh_index(ask, entry, stored, changed)
        return await self._fetch_tag(ask, result=changed)

    async def _confirm_tag(self, ask: _TagAsk, entry: TagEntry) -> None:
        """The upstream says the tag still names ``entry``'s digest: fresh from now."""
        self._held_moves.pop(ask.key, None)  # moved back: a later move is held anew
        confirmed = replace(entry, checked_at=self._clock())
        try:
            await asyncio.to_thread(self._index.put_tag, ask.key, confirmed)
        except StoreFailure as failure:  # confirmed all the same: this process remembers it
            self._not_kept("tag revalidated but not recorded", failure, digest=str(entry.digest))
        self._hot.put_tag(ask.key, confirmed)

    async def _refresh_index(
        self, ask: _TagAsk, entry: TagEntry, stored: StoredManifest, changed: CacheResult
    ) -> ManifestAnswer:
        """A tag that named a cached index moved, or may have (its upstream's ``HEAD`` named no
        digest): the new answer is fetched and kept, and the tag recorded to it only once the
        platforms clients pulled of the old index are kept too (see
        ``_fetch_platforms_in_use``). Recorded from the ``GET`` at once, a ``HEAD`` that names no
        digest had moved the tag past a platform the upstream was failing."""
        fetched = await ask.source.get_manifest(ask.repository, ask.tag, ask.accept)
        where = f"manifest {ask.repository}:{ask.tag} from {ask.source.host}"
        digest, kept = await self._keep(ask.source.host, ask.repository, fetched, where, None, None)
        self._prefetch(ask.source, ask.repository, fetched)
        if digest == entry.digest:  # unchanged, but fetched all the same: no answer from the store
            await self._confirm_tag(ask, entry)
            return ManifestAnswer(digest, fetched.media_type, fetched.body, "miss", stored=kept)
        if not kept:  # served all the same, as a tag's answer the store could not keep
            return ManifestAnswer(digest, fetched.media_type, fetched.body, changed, stored=False)
        await self._fetch_platforms_in_use(ask, stored, fetched.body, digest)
        held = StoredManifest(fetched.body, fetched.media_type)
        return replace(await self._moved_to_stored(ask, digest, held), result=changed)

    async def _fetch_platforms_in_use(
        self, ask: _TagAsk, old: StoredManifest, new_body: bytes, moving_to: Digest
    ) -> bool:
        """Before a tag moves from a cached index to another: the new one's manifests for the
        platforms clients pulled of the old one, fetched and kept. Recorded at once, a moved
        tag had sent its next pull to the upstream for them, and where that failed (a 429 once
        the index's GET spent the last of a pull budget, an outage just after a poller's HEAD)
        every pull of the tag failed until it recovered, with the old release whole in the
        store. A platform counts as pulled when a client pulled the old one's manifest (a pull
        time is recorded; what a move fetched has none), a platform as a client matches it
        (``_gc.Platform``: a Windows node its own build), and only the first entry for it is
        fetched (the one a client picks); attestations (``unknown/unknown``) never are. Where
        that entry is itself an index, its own entry for the platform is fetched too (a node
        pulls through both). Returns whether the upstream was asked for any.

        A fetch the upstream refuses for now (a 429, an outage, a timeout) fails the move, and
        the old index is served stale meanwhile: for as long as 429s last (the budget comes
        back), for at most ``MOVE_HOLD_SECONDS`` of other failures (a platform the upstream
        keeps failing must not hold the tag for ever). Any other failure (a digest mismatch,
        a manifest too large, gone) lets the tag move: its clients are told, as before. A hold
        that ends so is logged (``tag_move_unheld``): the platform's clients get errors next."""
        before = {
            digest: platform for digest, platform in index_platforms(old.body).items() if platform[0] != "unknown"
        }
        after = index_platforms(new_body)
        if not before or not after:
            return False
        host, repository = ask.source.host, ask.repository
        keys = {digest: image_pulled_key(host, repository, digest) for digest in before}
        lately = {digest for digest, key in keys.items() if key in self._pulled or key in self._pulled_writing}
        earlier = {digest: key for digest, key in keys.items() if digest not in lately}
        recorded = await asyncio.to_thread(
            lambda: {digest for digest, key in earlier.items() if self._index.pulled_at(key) is not None}
        )
        pulled = {before[digest] for digest in lately | recorded}
        wanted: dict[Platform, Digest] = {}
        for digest, platform in after.items():
            if platform in pulled:
                wanted.setdefault(platform, digest)
        if not wanted:
            return False
        asked: list[Digest] = []

        async def fetch(platform: Platform, digest: Digest, depth: int = 0) -> None:
            try:
                answer = await self._manifest_by_digest(ask.source, repository, digest)
            except (UpstreamUnavailable, UpstreamRateLimited, TimeoutError):
                asked.append(digest)
                raise
            except (UpstreamError, CacheError):  # lasting: its clients hear of it as before
                asked.append(digest)
                return
            if answer.result != "hit":
                asked.append(digest)
            if answer.media_type in INDEX_MEDIA_TYPES and depth < MAX_INDEX_NESTING:
                inner = next((d for d, p in index_platforms(answer.body).items() if p == platform), None)
                if inner is not None:
                    await fetch(platform, inner, depth + 1)

        try:
            await asyncio.gather(*(fetch(platform, digest) for platform, digest in wanted.items()))
        except UpstreamRateLimited:
            raise
        except (UpstreamUnavailable, TimeoutError) as exc:
            if self._still_held(ask.key, moving_to):
                raise
            held = self._held_moves.get(ask.key)  # none: too many tags held at once to hold it
            log.warning(
                "a moved tag's platform manifest could not be fetched and its hold is over: the tag moves,"
                " and that platform's clients get the upstream's error",
                extra={
                    "event": "tag_move_unheld",
                    "upstream": host,
                    "repository": str(repository),
                    "tag": str(ask.tag),
                    "digest": str(moving_to),
                    "held_seconds": round(held[1] - held[0], 1) if held is not None else 0,
                    "error": error_text(exc),
                },
            )
        self._held_moves.pop(ask.key, None)
        return bool(asked)

    def _still_held(self, key: IndexKey, moving_to: Digest) -> bool:
        """Whether a tag's move to ``moving_to`` that just failed stays held: for
        ``MOVE_HOLD_SECONDS`` from the first failure of a move of the tag, wherever it moved
        meanwhile (a tag pushed more often than the hold lasts had been held for ever). A
        failure of the same move counts from its first however far apart they come (a tag
        pulled less often than the hold lasts, or a long ``stale_backoff``, had held it for
        ever); a move elsewhere after a hold that ended with no failure since is held anew (a
        nightly tag held through one night's outage, its next outage)."""
        now = time.monotonic()
        first, last, before = self._held_moves.get(key, (now, now, moving_to))
        if before != moving_to and now - last >= MOVE_HOLD_SECONDS:
            first = now
        if key not in self._held_moves and len(self._held_moves) >= MAX_HELD_MOVES:
            self._held_moves = {
                held: times for held, times in self._held_moves.items() if now - times[1] < MOVE_HOLD_SECONDS
            }
            if len(self._held_moves) >= MAX_HELD_MOVES:  # all in force: this tag moves, no other restarts
                return False
        self._held_moves[key] = (first, now, moving_to)
        return now - first < MOVE_HOLD_SECONDS

    async def _moved_to_stored(self, ask: _TagAsk, digest: Digest, held: StoredManifest) -> ManifestAnswer:
        """The tag now names ``digest``, a manifest the store holds: recorded, and answered
        from the store under this route (the upstream's HEAD just named it there), so it is
        ``revalidated``: one HEAD, no GET."""
        now = self._clock()
        entry = TagEntry(digest, held.media_type, now)
        image = image_key(ask.source.host, ask.repository, digest)
        try:
            await asyncio.to_thread(self._record_tag, ask.key, entry, image)
        except StoreFailure as failure:  # answered all the same: this process remembers it
            self._not_kept("tag moved but not recorded", failure, digest=str(digest))
        self._routes.learn(digest, (ask.source.host, str(ask.repository)))
        self._remember(ask.key, entry, held, digest)
        return ManifestAnswer(digest, held.media_type, held.body, "revalidated")

    # Blocking helpers: each is one whole operation for one thread hop.

    def _record_tag(self, key: IndexKey, entry: TagEntry, image: IndexKey) -> None:
        # (put_manifest: one the index lost, say in a disk-full spell, is known again)
        self._index.put_manifest(entry.digest, entry.media_type)
        self._index.add_image(image, entry.checked_at)
        self._index.put_tag(key, entry)

    def _is_stored(self, digest: Digest) -> bool:
        return self._store.size_of(digest) is not None

    def _lookup_tag(self, key: IndexKey) -> tuple[TagEntry | None, StoredManifest | None]:
        entry = self._index.tag(key)
        return entry, (self._load_manifest(entry.digest) if entry is not None else None)

    def _load_manifest(self, digest: Digest) -> StoredManifest | None:
        """A stored manifest, hashed on every load (it is small, and loads are rare: the
        in-memory front answers repeats); a corrupt one is quarantined and reads as absent.

        A digest the index does not know as a manifest (a layer or a config asked for on the
        manifests route, or an index rebuilt beside its store) is answered only if its file is
        shaped like a manifest, and is never taken for a corrupt manifest: anyone may ask the
        manifests route for a layer's digest, and that must not cost the store the layer.
        """
        size = self._store.size_of(digest)  # no file: no question for the index
        if size is None:
            return None
        media_type = self._index.manifest_media_type(digest)
        if media_type is None and size > MAX_MANIFEST_BYTES:
            return None
        body = self._store.read_small(digest, MAX_MANIFEST_BYTES)
        if body is None:
            return None
        if media_type is None and (len(body) > MAX_MANIFEST_BYTES or not is_manifest_document(body)):
            return None
        if not digest.matches(body):
            self._quarantine(digest, len(body), "manifest")
            return None
        return StoredManifest(body, media_type or sniff_media_type(body), recorded=media_type is not None)

    def _keep_manifest(
        self,
        fetched: FetchedManifest,
        where: str,
        expected: Digest | None,
        tag: IndexKey | None,
        image: tuple[str, str],
    ) -> tuple[Digest, TagEntry | None, bool, StoreFailure | None]:
        """Hash, verify, store and index a manifest from upstream; nothing is kept on a mismatch.
        Returns the digest, the tag entry written (if a tag), whether the store is new to it,
        and the store's failure when it could not be kept (then nothing is indexed either).

        ``expected``: the digest it was asked by. For a tag, the upstream's own
        Docker-Content-Digest (when it sent one) must match instead.
        """
        body = fetched.body
        digest = Digest.of(body, expected.algorithm if expected is not None else "sha256")
        claimed = expected or fetched.claimed_digest
        if claimed is not None and claimed.algorithm == digest.algorithm and claimed != digest:
            raise DigestMismatch(str(claimed), str(digest), where)
        new = self._store.size_of(digest) is None
        if new:
            try:
                pending = self._store.begin(digest)
                try:
                    pending.write(body)
                    self._trusted[digest] = pending.commit()
                    new = pending.placed_new  # not when another process stored it meanwhile
                finally:
                    pending.close()
            except StoreFailure as failure:
                return digest, None, False, failure
        entry = TagEntry(digest, fetched.media_type, self._clock()) if tag is not None else None
        try:
            self._index.put_manifest(digest, fetched.media_type)
            self._index.add_image(image_key(*image, digest), self._clock(), anew=new)
            if tag is not None and entry is not None:
                self._index.put_tag(tag, entry)
        except StoreFailure as failure:  # in the store, but the index could not record it
            return digest, entry, new, failure
        return digest, entry, new, None

    # -- blobs ----------------------------------------------------------------------------------

    async def blob(
        self,
        source: Source,
        repository: RepositoryName,
        digest: Digest,
        may_read: MayRead = None,
        client_gone: Callable[[], bool] | None = None,
    ) -> BlobAnswer:
        """The stored blob, or a started reader of its fill (joined, or started now).

        ``may_read`` tells which routes the caller may read (None: all). Content known only
        under routes it may not read is confirmed under this one with an upstream HEAD first;
        the upstream's 404 is then the caller's answer (see ``_routes``). An answer fires the
        prefetch this blob arms, if any (see ``_prefetch``). ``client_gone`` says whether the
        client left: one that leaves while its download waits to begin gets :class:`ClientGone`
        and gives up its place (see ``FillReader.wait_started``)."""
        answer = await self._blob(source, repository, digest, may_read, client_gone)
        self.prefetches.fire(source.host, repository, digest)
        return answer

    async def _blob(
        self,
        source: Source,
        repository: RepositoryName,
        digest: Digest,
        may_read: MayRead,
        client_gone: Callable[[], bool] | None,
    ) -> BlobAnswer:
        reader = self.fills.join(digest)
        if reader is None:
            looked = time.monotonic()
            size = await self._stored_size(digest)
            if size is None:
                size = self.fills.recently_committed(digest, since=looked)
            if size is not None:
                await self._check_route(source, repository, digest, "blob", may_read)
                self._accessed[digest] = self._clock()
                return WarmBlob(digest, size, self._store.local_path(digest), self._claimed(source.host, digest, "hit"))
        joined: CacheResult = "coalesced"
        while True:
            if reader is None:
                reader = self.fills.join(digest)
            if reader is None:
                reader = self.fills.start(source, repository, digest)
                self._forget_unclaimed(digest)  # this client's own fetch, whatever a prefetch did
                size = await self._started(reader, source, repository, own=True, client_gone=client_gone)
                assert size is not None
                return FillingBlob(reader, size, "miss")
            # A fill in flight, joined: its route checked, its failure this caller's answer only
            # on its own route. One that failed so is followed by a look for the next (another
            # client's, begun since, is joined the same way) or a fill of this caller's own.
            size = await self._started(reader, source, repository, client_gone=client_gone)
            if size is not None:
                await self._check_joined(reader, source, repository, may_read)
                return FillingBlob(reader, size, self._claimed(source.host, digest, joined))
            reader, joined = None, "miss"

    async def _stored_size(self, digest: Digest) -> int | None:
        """The size of a stored blob whose bytes are known good, None when it is not stored.

        A file whose fingerprint differs from the one recorded when its bytes were last known
        good (rewritten, truncated, restored from elsewhere) is hashed again first, once however
        many clients ask; if it fails it is quarantined and reads as absent, so the caller
        fetches it again. A stored blob never reaches a client unverified.
        """
        known = self._trusted.get(digest)
        fingerprint, known = await asyncio.to_thread(self._fingerprints, digest, known)
        if fingerprint is None:
            return None
        if fingerprint == known:
            return fingerprint.size
        size, _ = await self._verifications.run(digest, lambda: self._reverify(digest))
        return size

    def _fingerprints(self, digest: Digest, known: Fingerprint | None) -> tuple[Fingerprint | None, Fingerprint | None]:
        """(the file's fingerprint now, the one last known good); blocks. The look counts as a
        read: no sweeper removes the file before the client opened it."""
        fingerprint = self._guard.looking(digest, lambda: self._store.fingerprint(digest))
        if fingerprint is None or known is not None:
            return fingerprint, known
        return fingerprint, self._index.fingerprint(digest)

    async def _reverify(self, digest: Digest) -> int | None:
        fingerprint = await asyncio.to_thread(self._rehash, digest)
        self._account_quarantined()
        if fingerprint is None:
            return None
        self._trust(digest, fingerprint)
        return fingerprint.size

    def _rehash(self, digest: Digest) -> Fingerprint | None:
        """Hash a stored file again: its fingerprint when good; None when it is gone, or was
        corrupt and is quarantined now (its index entries dropped). Blocks."""
        path = self._store.local_path(digest)
        before = self._store.fingerprint(digest)
        if path is None or before is None:
            return None
        known_good = self._trusted.get(digest) or self._index.fingerprint(digest)
        try:
            actual = hash_file(path, digest.algorithm)
        except FileNotFoundError:
            return None
        if actual == digest.encoded:
            # Hashing a large file takes a while: the client's look counts from now, so no
            # sweeper removes the file before the client opens it.
            return self._guard.looking(digest, lambda: self._store.fingerprint(digest))
        self._quarantine(digest, counted_size(known_good, before.size), "blob")
        return None

    def _quarantine(self, digest: Digest, size: int, kind: ContentKind) -> None:
        """Move a corrupt stored file aside and forget it; blocks. The event loop accounts for
        it at its next :meth:`_account_quarantined`."""
        if self._store.quarantine(digest):
            self._index.forget({digest})
            self._quarantined.append((digest, size, kind))

    def _account_quarantined(self) -> None:
        while self._quarantined:
            digest, size, kind = self._quarantined.popleft()
            self.totals.removed(size)
            self.fills.forget_committed([digest])
            self._forget(digest)
            self._observer.on_evicted("corrupt", 1, size)
            log.warning(
                "stored file failed its digest; quarantined, the next pull fetches it again",
                extra={"event": "quarantined", "digest": str(digest), "kind": kind, "size": size},
            )

    # -- routes: content is read only through routes it is known under -------------------------

    async def _check_route(
        self,
        source: Source,
        repository: RepositoryName,
        digest: Digest,
        kind: ContentKind,
        may_read: MayRead,
        fill_origin: ContentRoute | None = None,
    ) -> None:
        """Return when the caller may read held content ``digest`` through this route: it is
        known under this route, or under one the caller may read. Otherwise ask the upstream
        once (HEAD, single flight) whether this route has it: its refusal (404, …) is raised."""
        if may_read is None:
            return
        route: ContentRoute = (source.host, str(repository))
        routes = await self._routes_of(digest)
        if fill_origin is not None:
            routes = (*routes, fill_origin)
        if route in routes or any(may_read(upstream, name) for upstream, name in routes):
            return
        key = route_flight_key(source.host, repository, digest)
        await self._route_flights.run(key, lambda: self._confirm_route(source, repository, digest, kind))

    async def _routes_of(self, digest: Digest) -> tuple[ContentRoute, ...]:
        """The routes held content ``digest`` is known under (see ``_routes``)."""
        routes = self._routes.known(digest)
        if routes is None:
            self._routes.remember(digest, await asyncio.to_thread(self._index.routes, digest))
            routes = self._routes.known(digest) or ()
        return routes

    async def _known_under(self, digest: Digest, route: ContentRoute) -> bool:
        return route in await self._routes_of(digest)

    async def _confirm_route(
        self, source: Source, repository: RepositoryName, digest: Digest, kind: ContentKind
    ) -> None:
        if kind == "blob":
            await source.head_blob(repository, digest)
        else:
            try:
                await source.head_manifest(repository, digest, "index")
            except HeadRefused:  # an upstream that takes only GET: the manifest itself confirms it
                await source.get_manifest(repository, digest, "index")
        self._routes.learn(digest, (source.host, str(repository)))
        log.info(
            "route confirmed",
            extra={
                "event": "route_confirmed",
                "upstream": source.host,
                "repository": str(repository),
                "digest": str(digest),
                "kind": kind,
            },
        )

    async def _check_joined(
        self, reader: FillReader, source: Source, repository: RepositoryName, may_read: MayRead
    ) -> None:
        """:meth:`_check_route` for a fill in flight, whose origin counts as a known route;
        the reader is closed when the check refuses."""
        try:
            await self._check_route(source, repository, reader.digest, "blob", may_read, reader.origin)
        except BaseException:
            reader.close()
            raise

    @staticmethod
    async def _started(
        reader: FillReader,
        source: Source,
        repository: RepositoryName,
        *,
        own: bool = False,
        client_gone: Callable[[], bool] | None = None,
    ) -> int | None:
        """The blob's size once its fill answered. None when another route's fill failed before
        its first byte: that failure (a 404, a refused credential) is not this caller's answer,
        and the caller fetches for itself. The reader is closed unless a size is returned."""
        try:
            return await reader.wait_started(client_gone)
        except ClientGone:
            reader.leave()
            raise
        except UpstreamError:
            reader.close()
            if own or reader.origin == (source.host, str(repository)):
                raise
            return None
        except BaseException:
            reader.close()
            raise

    async def blob_size(
        self,
        source: Source,
        repository: RepositoryName,
        digest: Digest,
        may_read: MayRead = None,
        client_gone: Callable[[], bool] | None = None,
    ) -> tuple[int, CacheResult]:
        """For HEAD: the size from the store or a fill in flight, else one upstream HEAD
        (``may_read`` and ``client_gone`` as in :meth:`blob`)."""
        reader = self.fills.join(digest)
        if reader is not None:
            size = await self._started(reader, source, repository, client_gone=client_gone)
            if size is not None:
                await self._check_joined(reader, source, repository, may_read)
                reader.close()
                return size, "coalesced"
        size = await self._stored_size(digest)
        if size is not None:
            await self._check_route(source, repository, digest, "blob", may_read)
            return size, "hit"
        return await source.head_blob(repository, digest), "miss"

    # -- tag lists ------------------------------------------------------------------------------

    async def tags(self, source: Source, repository: RepositoryName, query: str, ttl: float) -> TagsAnswer:
        return await self.listings.tags(source, repository, query, ttl)

    async def referrers(
        self, source: Source, repository: RepositoryName, digest: Digest, query: str, ttl: float
    ) -> ReferrersAnswer:
        return await self.listings.referrers(source, repository, digest, query, ttl)


class _Bookkeeping:
    """Forwards cache events to the caller's observer and keeps the cache's own totals."""

    def __init__(self, cache: Cache, observer: CacheObserver) -> None:
        self._cache = cache
        self._observer = observer

    def on_fetched_bytes(self, upstream: str, kind: ContentKind, count: int) -> None:
        self._cache._count_fetched(upstream, count)
        self._observer.on_fetched_bytes(upstream, kind, count)

    def on_fill_resumed(self, upstream: str) -> None:
        self._observer.on_fill_resumed(upstream)

    def on_digest_mismatch(self, upstream: str, kind: ContentKind) -> None:
        self._observer.on_digest_mismatch(upstream, kind)

    def on_fill_failed(self, upstream: str) -> None:
        self._observer.on_fill_failed(upstream)

    def on_stored(self, kind: ContentKind, size: int, digest: Digest) -> None:
        self._cache.totals.stored(digest, size)
        self._observer.on_stored(kind, size, digest)
        self._cache.size_cap.stored(size)

    def on_evicted(self, reason: str, count: int, size: int) -> None:
        self._observer.on_evicted(reason, count, size)

    def on_store_failure(self, disk_full: bool) -> None:
        self._observer.on_store_failure(disk_full)
        if disk_full:  # a permission error or a vanished temporary file frees nothing by evicting
            self._cache.size_cap.schedule("disk_full")

    def on_images_expired(self, upstream: str, rule: int, count: int) -> None:
        self._observer.on_images_expired(upstream, rule, count)

    def on_maintenance(self, task: str, seconds: float) -> None:
        self._observer.on_maintenance(task, seconds)


#: How often usage counters, pull times and store totals are written to the index.
FLUSH_INTERVAL: Final = 10.0
#: A temporary nothing wrote or marked alive for this long is a dead process's: every process
#: serving the store marks its own fills' (queued ones too) every ``TEMPORARY_SWEEP_INTERVAL``.
STALE_TEMPORARY_SECONDS: Final = 3600.0
#: How often temporaries are looked at for stale ones.
TEMPORARY_SWEEP_INTERVAL: Final = 600.0


@asynccontextmanager
async def open_cache(
    settings: StorageSettings,
    *,
    revalidate_timeout: float = 5.0,
    stale_backoff: float = 30.0,
    observer: CacheObserver | None = None,
    upstreams: Sequence[UpstreamSettings] = (),
) -> AsyncIterator[Cache]:
    """The store and index under ``settings.path``; temporaries of a previous run are swept
    (when no other process serves the store),
    bookkeeping is written to the index every ``FLUSH_INTERVAL`` and at the end, and garbage
    collection and the upstreams' lifecycle policies run at their intervals."""
    try:
        store, index = await asyncio.to_thread(open_store, settings.path)
        uncounted = await asyncio.to_thread(index.store_totals) is None
    except (OSError, IndexFailure) as exc:  # a file for the directory, no permission, a full disk
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        raise ConfigError(None, [f"storage.path: cannot use {settings.path} as the store: {reason}"]) from None
    serving = ServingLock(settings.path, index)
    try:
        # Alone, a dead run's temporaries are swept; beside another process, they are its
        # downloads in flight.
        started = await asyncio.to_thread(serving.acquire, time.time(), store.sweep_temporaries)
    except (OSError, IndexFailure) as exc:  # no flock on the file system, a tmp/ entry kept, a full disk
        await asyncio.to_thread(serving.release, False)
        await asyncio.to_thread(index.close)
        if isinstance(exc, IndexFailure):
            raise ConfigError(None, [f"storage.path: cannot use {settings.path} as the store: {exc}"]) from None
        reason, what = exc.strerror or str(exc), exc.filename or settings.path / "serving.lock"
        raise ConfigError(None, [f"storage.path: cannot use {what}: {reason}"]) from None
    cache = Cache(
        store,
        index,
        revalidate_timeout=revalidate_timeout,
        stale_backoff=stale_backoff,
        observer=observer,
        max_size=settings.max_size,
        watermarks=(settings.high_watermark, settings.low_watermark),
        prefetch={upstream.host: upstream.prefetch_blobs for upstream in upstreams},
        # Prefetches take at most half an upstream's download slots: clients' own come first.
        prefetch_limits={upstream.host: max(1, upstream.max_concurrent_fills // 2) for upstream in upstreams},
    )
    cache.size_cap.schedule()  # a cap lowered since the last run applies at once
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(cache.flush_every(FLUSH_INTERVAL)),
        loop.create_task(cache.every(TEMPORARY_SWEEP_INTERVAL, "sweep", cache.sweep_stale_temporaries)),
    ]
    if not started.alone:
        log.warning(
            "another process serves this store: reads may race its removals; run one daemon per store",
            extra={"event": "store_shared", "store": str(settings.path)},
        )
    if started.crashed or uncounted:  # blobs in no total: count, in the background
        cache.count_pending = True
        tasks.append(loop.create_task(cache.recount(crashed=started.crashed)))
    if settings.gc_interval > 0:
        grace = settings.gc_grace
        collect = partial(cache.collect_garbage, grace)
        gc_due = await cache.due_in("gc", settings.gc_interval)
        tasks.append(loop.create_task(cache.every(settings.gc_interval, "gc", collect, first=gc_due)))
    if settings.lifecycle_interval > 0 and any(upstream.lifecycle for upstream in upstreams):
        lifecycle_due = await cache.due_in("lifecycle", settings.lifecycle_interval)
        tasks.append(
            loop.create_task(
                cache.every(
                    settings.lifecycle_interval,
                    "lifecycle",
                    lambda: cache.apply_lifecycle(policy_resolver(upstreams)),
                    first=lifecycle_due,
                )
            )
        )
    try:
        yield cache
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cache.aclose()
        # Unless the last flush failed or a count is still owed: then the next start counts.
        await asyncio.to_thread(serving.release, cache.flushed and not cache.count_pending)
        await asyncio.to_thread(index.close)


def open_store(root: Path) -> tuple[DirectoryStore, Index]:
    """Open (creating) the store and index under ``root``; blocks. Temporaries are swept by
    ``open_cache`` once it knows no other process is filling into them.

    A new store's totals are written at once. Blobs with no totals kept of them (an index
    moved aside, a store from before totals were kept) are left for ``open_cache`` to count in
    the background: at a million blobs the count takes 20 s, during which the daemon had not
    listened, and a liveness probe restarted it, and the count, before it ended."""
    root.mkdir(parents=True, exist_ok=True)
    store = DirectoryStore(root)
    index = Index(index_dir(root))
    if index.store_totals() is None and next(store.entries(), None) is None:
        index.write_batch({}, {}, counted_totals=(0, 0))
        index.mark_format()
    return store, index
