"""What the blob store holds, in bytes and entries, as one serving process knows it.

The totals are kept as this process stores and removes content, so that the size cap is judged
without a walk. Other processes on the same store (a second daemon, ``moorage gc`` or ``verify
--repair`` run beside it) change the store too: each bookkeeping batch adds this process's
change since the last one to the totals the index holds, and takes in what the others added
meanwhile (:meth:`StoreTotals.batch`, :meth:`StoreTotals.written`). A walk of the store (an
eviction pass, a count after a crash) sets them to what it counted, plus what was stored while
it ran that it did not see; the next batch then writes that count instead of a change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from moorage.upstreams.reference import Digest

__all__ = ["WALK_SLACK_SECONDS", "Batch", "StoreTotals"]

#: How far before a walk's start a blob's write time may lie and still count as written during
#: it: a large blob's fsync runs between its last write (its mtime) and its being put in place.
WALK_SLACK_SECONDS: Final = 600.0


@dataclass(frozen=True, slots=True)
class Batch:
    """What a bookkeeping batch writes of the totals, and what it was taken from."""

    #: (bytes, entries) to add to the index's totals since the last batch.
    change: tuple[int, int]
    #: The totals to set instead, where a walk counted the store since the last batch.
    counted: tuple[int, int] | None
    #: This process's totals, and its count of walks, when the batch was taken.
    totals: tuple[int, int]
    walks: int


class StoreTotals:
    """Bytes and entries in the store (see the module's docstring)."""

    def __init__(self, held: tuple[int, int] | None) -> None:
        """``held``: the totals the index holds (None when it holds none)."""
        held = held or (0, 0)
        self.bytes, self.entries = max(0, held[0]), max(0, held[1])
        #: The totals the index held after the last batch: a batch adds what changed since.
        self._flushed = held
        #: How many walks counted the store; a batch writes the count of the last.
        self._walks = 0
        self._walks_flushed = 0
        #: What was stored while a walk of the store ran (digest -> size), to count once.
        self._stored_during_walk: dict[Digest, int] | None = None

    def stored(self, digest: Digest, size: int) -> None:
        self.bytes += size
        self.entries += 1
        if self._stored_during_walk is not None:
            self._stored_during_walk[digest] = size

    def removed(self, size: int, count: int = 1) -> None:
        self.bytes = max(0, self.bytes - size)
        self.entries = max(0, self.entries - count)

    def walk_began(self) -> float:
        """Start counting what is stored while a walk of the store runs; the ``fresh_since``
        to give the walk."""
        self._stored_during_walk = {}
        return time.time() - WALK_SLACK_SECONDS

    def walk_failed(self) -> None:
        self._stored_during_walk = None

    def walk_ended(self, walked_bytes: int, walked_entries: int, fresh: frozenset[Digest]) -> None:
        """The totals from a walk's count, plus what was stored meanwhile that the walk did not
        see: a blob put in place before the walk reached its directory is in both."""
        stored = self._stored_during_walk or {}
        self._stored_during_walk = None
        unseen = [size for digest, size in stored.items() if digest not in fresh]
        self.bytes = walked_bytes + sum(unseen)
        self.entries = walked_entries + len(unseen)
        self._walks += 1

    def batch(self) -> Batch:
        """What the next bookkeeping batch writes: this process's change since the last, or,
        after a walk counted the store, that count (with what was stored meanwhile)."""
        totals = (self.bytes, self.entries)
        counted = totals if self._walks != self._walks_flushed else None
        change = (totals[0] - self._flushed[0], totals[1] - self._flushed[1])
        return Batch(change, counted, totals, self._walks)

    def written(self, batch: Batch, held: tuple[int, int]) -> bool:
        """``batch`` is in the index, which now holds the totals ``held``; whether the others
        stored more than they removed meanwhile (which may take the store over its cap)."""
        self._walks_flushed = batch.walks
        grew = False
        if batch.walks == self._walks:  # no walk counted the store meanwhile: take in the others'
            # What other processes changed (moorage gc or verify --repair run beside this
            # daemon) is in ``held`` and not in the batch's totals.
            self.bytes = max(0, self.bytes + held[0] - batch.totals[0])
            self.entries = max(0, self.entries + held[1] - batch.totals[1])
            grew = held[0] > batch.totals[0]
        self._flushed = held
        return grew
