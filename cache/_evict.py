"""The size cap: least recently used content leaves when the store passes its high watermark.

Last access is the blob file's modification time, brought forward in batches (with the other
bookkeeping, every 10 s) for what clients read, so a hit costs no write. A pass walks the
store in a thread, sorts by last access (the in-memory accesses not yet written count too),
and deletes from the oldest until the store is under the low watermark. It never removes a
blob being filled or read in the last few seconds. A manifest's tag entries go with it (and the
in-memory front forgets it), so the next pull fetches it again. Passes never overlap.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Final

from moorage.upstreams.reference import Digest

from ._index import Index
from ._store import DirectoryStore, Fingerprint

__all__ = ["EvictionResult", "evict_to", "touch"]

log = logging.getLogger("moorage.cache")
#: Content read this recently is never evicted: its reader may still be opening the file (once
#: open, a file removed from under a reader stays readable).
RECENT_SECONDS: Final = 5.0


@dataclass(frozen=True, slots=True)
class EvictionResult:
    evicted: tuple[Digest, ...]
    freed_bytes: int
    #: The store's size and entries after the pass, as walked.
    store_bytes: int
    store_entries: int


def evict_to(
    store: DirectoryStore,
    index: Index,
    target_bytes: int,
    protected: set[Digest],
    accessed: dict[Digest, float],
) -> EvictionResult:
    """Delete least recently used blobs until the store holds at most ``target_bytes``. Blocks."""
    entries = list(store.entries())
    total = sum(blob.size for blob in entries)
    count = len(entries)
    recent = time.time() - RECENT_SECONDS
    seen = dict(accessed)  # ordering by a snapshot; the skip below reads the live map
    entries.sort(key=lambda blob: max(blob.mtime, seen.get(blob.digest, 0.0)))
    evicted: list[Digest] = []
    freed = 0
    for blob in entries:
        if total - freed <= target_bytes:
            break
        if blob.digest in protected or accessed.get(blob.digest, 0.0) >= recent:
            continue
        try:
            blob.path.unlink()
        except FileNotFoundError:
            continue
        evicted.append(blob.digest)
        freed += blob.size
    if evicted:
        index.forget(set(evicted))
    return EvictionResult(tuple(evicted), freed, total - freed, count - len(evicted))


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
        if known == before:
            renewed[digest] = before._replace(mtime_ns=stamp)
            trusted[digest] = renewed[digest]  # a serve between here and the index write agrees
    return renewed
