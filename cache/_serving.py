"""Whether the last process serving the store stopped cleanly: a lock file and a mark.

Every process that serves the store (the daemon, ``moorage warm --store``) holds a shared
``flock`` on ``<store>/serving.lock`` while it serves, and the kernel drops it when the process
ends, however it ends. The index holds a mark (``("serving",)``) from a process's start until the
last one stops cleanly. A process that starts alone (it takes the lock exclusively) and finds
the mark knows the last run crashed: what it had not flushed, up to 10 s of store totals, is
lost, and the store must be counted again. A process that starts beside a running one takes
no such view, and one that stops while others serve leaves the mark to them. Blocking.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from ._index import Index

__all__ = ["ServingLock"]

log = logging.getLogger("moorage.cache")


class ServingLock:
    def __init__(self, root: Path, index: Index) -> None:
        self._path = root / "serving.lock"
        self._index = index
        self._fd: int | None = None

    def acquire(self, now: float) -> bool:
        """Begin serving; True when this process is alone and the last run did not stop cleanly."""
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        self._fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        crashed = self._index.begin_serving(now)
        fcntl.flock(fd, fcntl.LOCK_SH)  # others may begin serving beside this one now
        return alone and crashed

    def release(self, clean: bool) -> None:
        """Stop serving: the last process, with everything flushed (``clean``), clears the mark."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if clean:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # others still serve: the mark is theirs
                try:
                    self._index.end_serving()
                except Exception as exc:  # a full disk, a broken index: the next start counts
                    log.warning(
                        "serving mark not cleared; the next start counts the store",
                        extra={"event": "maintenance_failed", "task": "stop", "error": str(exc)},
                    )
        finally:
            os.close(fd)  # drops the lock
