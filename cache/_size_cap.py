"""When a size-cap pass runs, how far it goes, and what it reports: the event loop's side of
the size cap, whose walk of the store (in a thread) is ``_evict``'s.

A pass is scheduled whenever the store goes over the high watermark of its cap (a store, a
batch that took in what other processes stored, a recount, a lowered cap at start), one at a
time, and once more when content stored during a pass took the store over again. A pass that
could not get under the high watermark left only content in use; no pass runs for
``RECENT_SECONDS`` after it, since each walks the whole store. A full disk (a fill or the
readiness probe finding it so) asks for a pass too, below what the store holds now, at most
every ``DISK_FULL_PASS_SECONDS`` and only once the cache has stored again half of what the last
one freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from moorage.upstreams.reference import Digest

from ._clock import within
from ._evict import RECENT_SECONDS, ReadGuard, evict_to
from ._fill import Fills
from ._in_use import InUse
from ._index import Index
from ._observer import CacheObserver
from ._store import BlobStore, DirectoryStore
from ._totals import StoreTotals
from .errors import error_text

__all__ = ["DISK_FULL_PASS_SECONDS", "SizeCap"]

log = logging.getLogger("moorage.cache")

#: Passes for a full disk at most this often, and only once the cache has stored again at least
#: half of what the last one freed: when it was not the cache that filled the disk again (others
#: write there, or a blob is larger than the disk), pass after pass would only empty the store.
DISK_FULL_PASS_SECONDS: Final = 60.0


class SizeCap:
    def __init__(
        self,
        store: BlobStore,
        index: Index,
        *,
        totals: StoreTotals,
        fills: Fills,
        guard: ReadGuard,
        maintenance: asyncio.Lock,
        in_use: InUse,
        accessed: Callable[[], Mapping[Digest, float]],
        removed: Callable[[Iterable[Digest]], None],
        observer: CacheObserver,
        clock: Callable[[], float],
        max_size: int | None,
        watermarks: tuple[float, float],
    ) -> None:
        """``maintenance`` is the lock every sweeper holds (one pass at a time); ``accessed``
        gives the reads not yet written; ``removed`` forgets what a pass took out."""
        self._store = store
        self._index = index
        self._totals = totals
        self._fills = fills
        self._guard = guard
        self._maintenance = maintenance
        self._in_use = in_use
        self._accessed = accessed
        self._removed = removed
        self._observer = observer
        self._clock = clock
        self.max_size = max_size
        self._high, self._low = watermarks
        self._running: asyncio.Task[None] | None = None
        self._disk_full_pass: float | None = None  # when the last one ended (monotonic)
        self._disk_full_freed = 0  # what it freed
        self._stored_since_disk_full_pass = 0  # bytes
        #: Set when a store took the store over its cap while a pass ran: one more pass then.
        self._pass_again = False
        #: When (the cache's clock) a size pass last ended above the high watermark; None once
        #: one got under it (see ``_held_off``).
        self._short_since: float | None = None
        self._closing = False

    @property
    def running(self) -> asyncio.Task[None] | None:
        """The pass under way (with the one it may run after it), or None."""
        return self._running if self._running is not None and not self._running.done() else None

    async def aclose(self) -> None:
        """No pass starts after this; the one running is waited for."""
        self._closing = True
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)

    def stored(self, size: int) -> None:
        """The cache stored ``size`` bytes: a pass if that took the store over its cap."""
        if self._running is not None and not self._running.done():  # its walk may have missed this
            self._pass_again = True
        self._stored_since_disk_full_pass += size
        self.schedule()

    def schedule(self, reason: str = "size") -> None:
        """A pass, unless one runs or none is wanted: ``size`` when over the cap (and not held
        off), ``disk_full`` as often as full-disk passes may run."""
        if self._closing:  # the last flush of a stop: no pass may start after aclose waited for one
            return
        if reason == "disk_full":
            last = self._disk_full_pass
            wanted = last is None or (
                time.monotonic() - last >= DISK_FULL_PASS_SECONDS
                and self._stored_since_disk_full_pass * 2 >= self._disk_full_freed
            )
        else:
            wanted = self._over_cap() and not self._held_off()
        if wanted and (self._running is None or self._running.done()):
            self._running = asyncio.get_running_loop().create_task(self.evict(reason))

    def _over_cap(self) -> bool:
        return self.max_size is not None and self._totals.bytes > self.max_size * self._high

    def _held_off(self) -> bool:
        """The last size pass ended above the high watermark less than ``RECENT_SECONDS`` ago.
        What it left was in use (read in the last seconds, being filled, or an image served
        lately), and no pass takes it out before some of that ages. Each pass walks the whole
        store: one per stored blob meanwhile had kept a core walking it."""
        return self._short_since is not None and within(self._short_since, self._clock(), RECENT_SECONDS)

    async def evict(self, reason: str = "size") -> None:
        """One pass: least recently used content out until the store is under the low watermark
        of its cap (``size``), or of what it holds now when the disk filled up (``disk_full``)."""
        if not isinstance(self._store, DirectoryStore):
            return
        while True:
            async with self._maintenance:
                self._pass_again = False
                try:
                    await self._evict(self._store, reason)
                except Exception as exc:  # an index that cannot write, a walk that failed: next pass
                    log.error(
                        "eviction pass failed",
                        extra={"event": "maintenance_failed", "task": "evict", "error": error_text(exc)},
                    )
                    if reason == "disk_full":  # tried again in a minute, not at every probe
                        self._disk_full_pass, self._disk_full_freed = time.monotonic(), 0
                    return  # the next store asks again
            # Content stored while the pass ran took the store over its cap again: without
            # another pass it would stay there until the next store.
            if self._closing or not (self._pass_again and self._over_cap()) or self._held_off():
                return
            reason = "size"

    async def _evict(self, store: DirectoryStore, reason: str) -> None:
        totals = self._totals
        if reason == "disk_full":
            target = ceiling = short = int(min(self.max_size or totals.bytes, totals.bytes) * self._low)
        elif self.max_size is not None:
            # Content in use goes last, and only down to halfway between the watermarks: an
            # image being pulled is not taken apart, and passes stay as far apart as that.
            target, short = int(self.max_size * self._low), int(self.max_size * self._high)
            ceiling = (target + short) // 2
        else:
            return
        protected = set(self._fills.digests)
        recent = self._in_use.recent_stores() | self._in_use.images()
        before = totals.bytes
        # Reads and the manifests served lately order the pass; a blob read while it runs is
        # skipped when its turn comes (the read guard).
        seen = self._in_use.order(self._accessed())
        fresh_since = totals.walk_began()
        try:
            result = await asyncio.to_thread(
                evict_to,
                store,
                self._index,
                target,
                protected,
                seen,
                self._guard,
                recent,
                ceiling,
                self._in_use.served(),
                fresh_since,
            )
        except BaseException:
            totals.walk_failed()
            raise
        # The walk counted what is on disk, which also corrects any drift of the running
        # totals (two writers of one manifest both counting it).
        totals.walk_ended(result.store_bytes, result.store_entries, result.fresh)
        self._removed(result.evicted)
        if reason == "disk_full":  # throttled from a pass that went through: a failed one is tried again
            self._disk_full_pass, self._disk_full_freed = time.monotonic(), result.freed_bytes
            self._stored_since_disk_full_pass = 0
        self._observer.on_evicted(reason, len(result.evicted), result.freed_bytes)
        log.info(
            "evicted",
            extra={
                "event": "evicted",
                "reason": reason,
                "blobs": len(result.evicted),
                "freed_bytes": result.freed_bytes,
                "store_bytes_before": before,
                "store_bytes_after": totals.bytes,
                "max_size": self.max_size,
                # How long what it removed last had sat unread, at the least: minutes, pass
                # after pass, is a cap below what clients pull (each removal a refetch).
                "newest_removed_idle_seconds": None
                if result.newest_removed_use is None
                else max(0, round(time.time() - result.newest_removed_use)),
            },
        )
        # Judged by what the walk saw: content stored during it is the next pass's (_pass_again).
        ended_short = result.store_bytes > short
        # Said once until a pass gets under again: passes while it lasts would repeat it.
        first_short = ended_short and (reason != "size" or self._short_since is None)
        if reason == "size":
            self._short_since = self._clock() if ended_short else None
        if first_short:
            log.warning(
                "eviction left the store above its limit: what is left was read in the last seconds,"
                " is being filled or belongs to an image served lately",
                extra={
                    "event": "eviction_short",
                    "reason": reason,
                    "store_bytes": totals.bytes,
                    "limit_bytes": short,
                    "target_bytes": target,
                },
            )
