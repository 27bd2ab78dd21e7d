"""Scrubbing the store: rehash every blob, report and quarantine the ones that do not match.

Bit rot, a bad disk or a hand edit can change a stored file after it was verified. ``verify``
reads every blob at a bounded rate (so a scrub does not starve serving), and with ``repair``
moves each mismatching file to ``quarantine/`` (kept for inspection, out of the store) and
drops its index entries, so the next pull fetches it again. Blocking: run it in a thread or
from the command line; it is safe beside a serving daemon (a quarantined file simply reads
as missing, and the daemon refetches it).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from moorage.upstreams.reference import Digest

from ._index import Index
from ._layout import index_dir
from ._store import DirectoryStore, Fingerprint
from .errors import StoreFailure

__all__ = ["VerifyReport", "counted_size", "hash_file", "verify_store"]

READ_SIZE: Final = 1024 * 1024
#: Quarantined blobs whose index entries are dropped together, or whatever ``FORGET_SECONDS``
#: gathered: dropping a manifest's walks the whole index, once per batch, where it walked it
#: once per corrupt manifest (20 of them took a scrub from 8 s to 41 s).
FORGET_BATCH: Final = 256
FORGET_SECONDS: Final = 10.0


@dataclass
class VerifyReport:
    checked: int = 0
    checked_bytes: int = 0
    corrupt: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    #: Corrupt blobs that could be neither quarantined nor removed, and why.
    stuck: dict[str, str] = field(default_factory=dict)


def hash_file(path: Path, algorithm: str, throttle: Callable[[int], None] | None = None) -> str:
    """The hex digest of a file's bytes; blocks."""
    hasher = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(READ_SIZE):
            hasher.update(chunk)
            if throttle is not None:
                throttle(len(chunk))
    return str(hasher.hexdigest())


def counted_size(known_good: Fingerprint | None, on_disk: int) -> int:
    """The size a corrupt file was counted with in the store totals: the size it had when it
    was known good, not what is left of it (a truncated file would leave the totals off by
    what was cut); the size on disk when it was never known good here."""
    return known_good.size if known_good is not None else on_disk


class _Forgetting:
    """Quarantined blobs whose index entries are yet to go, dropped together (see
    ``FORGET_BATCH``), with the sizes the store totals count them at. Not only at the end of a
    run that may last hours: a daemon serving the store takes the smaller size in at its next
    flush, and an interrupted run leaves little behind."""

    def __init__(self, store: DirectoryStore, index: Index) -> None:
        self._store = store
        self._index = index
        self._pending: dict[Digest, int] = {}
        self._since = time.monotonic()

    def add(self, digest: Digest, counted: int) -> None:
        if not self._pending:
            self._since = time.monotonic()
        self._pending[digest] = counted
        if len(self._pending) >= FORGET_BATCH:
            self.flush()

    def due(self) -> None:
        """Forget what waited ``FORGET_SECONDS``; asked at every blob walked."""
        if self._pending and time.monotonic() - self._since >= FORGET_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        # A blob a client pulled again since it was quarantined keeps what its pull wrote.
        self._index.forget({digest for digest in self._pending if self._store.size_of(digest) is None})
        if self._index.store_totals() is not None:
            self._index.write_batch({}, {}, (-sum(self._pending.values()), -len(self._pending)))
        self._pending.clear()


def verify_store(
    root: Path, *, repair: bool = False, rate_bytes: int | None = None, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Rehash every blob under ``root``; at most ``rate_bytes`` per second when given."""
    store = DirectoryStore(root)
    report = VerifyReport()
    started = time.monotonic()

    def throttle(count: int) -> None:
        report.checked_bytes += count
        if progress is not None:
            progress(count)
        if rate_bytes:
            ahead = report.checked_bytes / rate_bytes - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    # Opened before any file is looked at: a store of a later format is refused unchanged.
    index = Index(index_dir(root))
    forgetting = _Forgetting(store, index)
    try:
        for blob in store.entries():
            digest = blob.digest
            try:
                actual = hash_file(store.path_of(digest), digest.algorithm, throttle)
            except FileNotFoundError:
                continue  # evicted meanwhile
            report.checked += 1
            forgetting.due()
            if actual == digest.encoded:
                continue
            report.corrupt.append(str(digest))
            try:
                moved = repair and store.quarantine(digest)
            except StoreFailure as stuck:  # neither moved nor removed: said, and the run goes on
                report.stuck[str(digest)] = str(stuck)
                continue
            if moved:
                report.quarantined.append(str(digest))
                forgetting.add(digest, counted_size(index.fingerprint(digest), blob.size))
    finally:
        try:
            forgetting.flush()  # an interrupted run's too
        finally:
            index.close()
    return report
