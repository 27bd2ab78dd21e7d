"""What can go wrong inside the cache, as one exception tree.

    CacheError
    ├── DigestMismatch   bytes from upstream did not hash to the digest asked for; nothing kept
    ├── FillAborted      the fill a reader was following failed; the reader's response must be
    │                    cut (never finished), and nothing was kept
    ├── ClientGone       the client left while its blob's download waited to begin
    └── StoreFailure     the store could not write (disk full, permissions); nothing kept
        └── IndexFailure the index could not record what the store holds

Upstream failures keep their own types (``moorage.upstreams.errors``); a fill that fails for
an upstream reason hands readers a FillAborted whose ``__cause__`` is that error.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from moorage.config import size_text

__all__ = ["CacheError", "ClientGone", "DigestMismatch", "FillAborted", "IndexFailure", "StoreFailure", "error_text"]


class CacheError(Exception):
    pass


def error_text(error: BaseException) -> str:
    """What a log line says of ``error``: its message, or its type where it has none
    (diskcache's ``Timeout``, for an index another process holds locked, says nothing)."""
    return str(error) or type(error).__name__


class DigestMismatch(CacheError):
    def __init__(self, expected: str, actual: str, where: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"{where}: content hashed to {actual}, expected {expected}; not kept")


class FillAborted(CacheError):
    pass


class ClientGone(CacheError):
    """The client left while its blob's download waited for a slot or for the upstream's
    answer; it gave up its place, and a download no one else waits for is dropped."""


class StoreFailure(CacheError):
    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        #: The disk (or the user's quota) is full: an eviction pass can help, unlike with a
        #: permission error or a file another process removed.
        self.disk_full = disk_full

    @classmethod
    def of(cls, what: str, error: OSError, store: Path | None = None) -> StoreFailure:
        """The failure of an OS call; a full disk under ``store`` is said with the space left
        there, which the operator acts on (what is full, and how full)."""
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        where = ""
        if full and store is not None:
            try:
                where = f" (the store at {store} has {size_text(shutil.disk_usage(store).free)} free)"
            except OSError:
                where = f" (the store at {store})"
        return cls(f"{what}: {error.strerror}{where}", disk_full=full)


class IndexFailure(StoreFailure):
    """The index could not record something (SQLite's disk full, its lock held too long); what
    the store holds is in place, so this process may remember it in memory."""
