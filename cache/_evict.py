"""The size cap: least recently used content leaves when the store passes its high watermark.

Last access is the blob file's modification time, brought forward in batches (with the other
bookkeeping, every 10 s) for what clients read, so a hit costs no write. A pass walks the
store in a thread, sorts by last access (the in-memory accesses not yet written count too),
and deletes from the oldest until the store is under the low watermark. It never removes a
blob being filled or read in the last few seconds; what was stored in the last seconds, or
belongs to an image pulled lately, goes last and only as far as the store must shrink to get
halfway between the watermarks. A manifest's tag entries go with it (and the
in-memory front forgets it), so the next pull fetches it again. Passes never overlap.

Also here, for every sweeper (eviction, gc, lifecycle): :class:`ReadGuard`, which keeps a blob
a client is about to open from being removed under it, :func:`release`, which empties what a
walk of the store held without stalling the event loop, and :func:`touch`, which writes the
read times of the bookkeeping batch to the files.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from moorage.upstreams.reference import Digest, parse_digest

from ._clock import within
from ._index import Index
from ._store import DirectoryStore, Fingerprint
from .errors import error_text

__all__ = ["EvictionResult", "ReadGuard", "evict_to", "release", "touch"]

log = logging.getLogger("moorage.cache")
#: Content read this recently is never evicted: its reader may still be opening the file (once
#: open, a file removed from under a reader stays readable).
RECENT_SECONDS: Final = 5.0
T = TypeVar("T")
#: A blob a pass walked: its digest as text, its size, its last use (epoch seconds). A plain
#: tuple of text and numbers, which Python's cyclic garbage collector stops tracking at its
#: next young pass: a million StoredBlob and Digest objects, each tracked, had made every full
#: pass of the collector (run by whichever thread allocates) pause the event loop for seconds.
_Walked = tuple[str, int, float]
#: A pass sorts by last use a slice of this many blobs at a time and merges the slices: one
#: sort of a million in a single call held the GIL, and so the event loop, for 2.5 s.
SORT_SLICE: Final = 1 << 16
#: Files already logged as out of the cache's hands, so that each is logged once, not at every
#: pass; bounded, since every file of a store restored as another user could be one.
_LOGGED_UNWRITABLE: set[Path] = set()
MAX_LOGGED_UNWRITABLE: Final = 1024


def _skip_unwritable(path: Path, error: OSError, doing: str) -> None:
    """Log, once per file, that the cache may not change a stored file (another user's, in a
    directory not the daemon's: a store command run as root beside it) and goes on without
    it. One such file had failed every bookkeeping write and every eviction pass after it."""
    if path in _LOGGED_UNWRITABLE or len(_LOGGED_UNWRITABLE) >= MAX_LOGGED_UNWRITABLE:
        return
    _LOGGED_UNWRITABLE.add(path)
    log.warning(
        f"cannot {doing} a stored file: skipped; run store commands as the daemon's user",
        extra={"event": "store_file_unwritable", "path": str(path), "error": str(error)},
    )


class ReadGuard:
    """Closes the race between a sweeper removing a blob and a client about to read it.

    A client's look at a stored file (:meth:`looking`) and a sweeper's removal
    (:meth:`remove_unless_read`) take the same lock: either the look comes first, and the
    sweeper sees a fresh read and keeps the file, or the removal does, and the client finds no
    file and fetches it again. A file a client found is never removed before it is opened.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reads: dict[Digest, float] = {}

    def looking(self, digest: Digest, look: Callable[[], T | None]) -> T | None:
        """Run ``look`` (a stat of the stored file); when it found the file, that is a read
        of ``digest``. Blocks."""
        with self._lock:
            found = look()
            if found is not None:
                self._reads[digest] = time.time()
            return found

    def remove_unless_read(self, path: Path, digest: Digest) -> int | None:
        """Unlink a stored file unless it was read in the last ``RECENT_SECONDS``; its size
        when removed, None when kept or already gone."""
        with self._lock:
            if within(self._reads.get(digest, 0.0), time.time(), RECENT_SECONDS):
                return None
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return None
            except OSError as exc:
                _skip_unwritable(path, exc, "remove")
                return None
            return size

    def prune(self) -> None:
        """Forget reads older than ``RECENT_SECONDS``."""
        with self._lock:  # the time read once the lock is held: a read just recorded is recent
            now = time.time()
            self._reads = {digest: when for digest, when in self._reads.items() if within(when, now, RECENT_SECONDS)}


@dataclass(frozen=True, slots=True)
class EvictionResult:
    evicted: tuple[Digest, ...]
    freed_bytes: int
    #: The store's size and entries after the pass, as walked.
    store_bytes: int
    store_entries: int
    #: The blobs walked that were written at or after the pass's ``fresh_since`` (see
    #: :class:`~._store.WalkCount`).
    fresh: frozenset[Digest] = frozenset()
    #: The last use (epoch seconds) of the most recently used blob it removed; None when none.
    #: Minutes ago, and pass after pass, means a cap below what clients use.
    newest_removed_use: float | None = None


def evict_to(
    store: DirectoryStore,
    index: Index,
    target_bytes: int,
    protected: set[Digest],
    accessed: dict[Digest, float],
    guard: ReadGuard,
    recent: AbstractSet[Digest] = frozenset(),
    ceiling_bytes: int | None = None,
    manifests: AbstractSet[Digest] = frozenset(),
    fresh_since: float = math.inf,
) -> EvictionResult:
    """Delete least recently used blobs until the store holds at most ``target_bytes``. Blocks.

    A blob larger than ``target_bytes`` goes first, however recent: it can never stay under
    the cap, and taking the least recently used first would empty the store around it before
    reaching it (a 200 MB layer in an 8 MiB cache). Its client has its bytes already.

    ``recent`` content (stored in the last seconds, or named by a manifest served lately: an
    image being pulled) goes last, and only as far as the store must shrink to
    ``ceiling_bytes``: an image just pulled that fits is not taken apart to reach the target.
    Of that content the ``manifests`` (those served lately) go after everything else: a client
    reads a manifest before its layers, so by last use they came first, and took their tags
    with them while the layers stayed; a manifest evicted costs an upstream GET, which Docker
    Hub counts as a pull, where a layer costs a blob GET, which it does not."""
    entries: list[_Walked] = [(str(blob.digest), blob.size, blob.mtime) for blob in store.entries()]
    total = sum(size for _, size, _ in entries)
    count = len(entries)
    fresh = frozenset(parse_digest(text) for text, _, mtime in entries if mtime >= fresh_since)
    seen = {str(digest): when for digest, when in accessed.items()}  # a snapshot of reads not yet written back
    entries = [
        *_by_last_use([blob for blob in entries if blob[1] > target_bytes], seen),
        *_by_last_use([blob for blob in entries if blob[1] <= target_bytes], seen),
    ]
    ceiling = target_bytes if ceiling_bytes is None else max(ceiling_bytes, target_bytes)
    kept, in_recent, served = ({str(digest) for digest in named} for named in (protected, recent, manifests))
    candidates = [blob for blob in entries if blob[0] not in kept]
    in_use = [blob for blob in candidates if blob[0] in in_recent and blob[1] <= target_bytes]
    in_use.sort(key=lambda blob: blob[0] in served)  # stable: by last use within each
    in_use_texts = {text for text, _, _ in in_use}
    others = [blob for blob in candidates if blob[0] not in in_use_texts]
    evicted: list[Digest] = []
    freed = 0
    newest_use: float | None = None
    # Each candidate with how small the store must still get for it to go: under the target
    # first, then (content in use) under the ceiling. Under the target is under both.
    for (text, _, mtime), floor in itertools.chain(((b, target_bytes) for b in others), ((b, ceiling) for b in in_use)):
        if total - freed <= floor:
            break
        digest = parse_digest(text)
        size = guard.remove_unless_read(store.path_of(digest), digest)
        if size is not None:
            evicted.append(digest)
            freed += size
            used = max(mtime, seen.get(text, mtime))
            newest_use = used if newest_use is None else max(newest_use, used)
    if evicted:
        try:
            index.forget(set(evicted))
        except Exception as exc:  # SQLite's disk full too: the files are gone all the same
            log.warning(
                "evicted files left in the index; they read as not stored",
                extra={"event": "maintenance_failed", "task": "evict", "error": error_text(exc)},
            )
    for held in (candidates, in_use, others):
        held.clear()
    release(entries)
    return EvictionResult(tuple(evicted), freed, total - freed, count - len(evicted), fresh, newest_use)


def _by_last_use(blobs: list[_Walked], seen: Mapping[str, float]) -> Iterator[_Walked]:
    """``blobs`` least recently used first, ties in their order; ``seen`` holds reads not yet
    written to the files. Sorted in slices and merged (see ``SORT_SLICE``)."""

    def last_use(blob: _Walked) -> float:
        return max(blob[2], seen.get(blob[0], 0.0))

    slices = [sorted(blobs[start : start + SORT_SLICE], key=last_use) for start in range(0, len(blobs), SORT_SLICE)]
    return heapq.merge(*slices, key=last_use)


def release(held: list[Any] | set[Any]) -> None:
    """Empty what a walk held a slice at a time: a million records freed in one call, as a list
    or a set going out of scope is, held the GIL, and so the event loop, for 0.1 to 0.3 s."""
    if isinstance(held, list):
        while held:
            del held[-SORT_SLICE:]
    while held:
        held.pop()


def touch(
    store: DirectoryStore, index: Index, accessed: dict[Digest, float], trusted: dict[Digest, Fingerprint]
) -> dict[Digest, Fingerprint]:
    """Bring files' modification times forward to their last read. Blocks.

    A file known good (its fingerprint matches ``trusted`` or the index) stays known good: its
    new fingerprint is returned, to be written to the index. A file changed behind the cache's
    back is touched but not vouched for; it is hashed again before it is next served.
    """
    renewed: dict[Digest, Fingerprint] = {}
    for digest, when in accessed.items():
        path = store.path_of(digest)
        try:
            before = Fingerprint.of(path.stat())
            known = trusted.get(digest) or index.fingerprint(digest)
            stamp = int(when * 1_000_000_000)
            os.utime(path, ns=(stamp, stamp))
        except FileNotFoundError:
            continue
        except OSError as exc:
            _skip_unwritable(path, exc, "record a read of")
            continue
        if known == before:
            renewed[digest] = before._replace(mtime_ns=stamp)
            trusted[digest] = renewed[digest]  # a serve between here and the index write agrees
    return renewed
