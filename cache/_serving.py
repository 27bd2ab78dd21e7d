"""Whether the last process serving the store stopped cleanly: a lock file and a mark.

Every process that serves the store (the daemon, ``moorage warm --store``) holds a shared
``flock`` on ``<store>/serving.lock`` while it serves, and the kernel drops it when the process
ends, however it ends. The index holds a mark (``("serving",)``) from a process's start until the
last one stops cleanly. A process that starts alone (it takes the lock exclusively) and finds
the mark knows the last run crashed: what it had not flushed, up to 10 s of store totals, is
lost, and the store must be counted again, and what its ``tmp/`` holds is partial downloads
nobody will finish. A process that starts beside a running one takes no such view (those
temporaries are the other's downloads in flight), and one that stops while others serve
leaves the mark to them. Blocking.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ._index import Index
from .errors import error_text

__all__ = ["ServingLock", "Started"]

log = logging.getLogger("moorage.cache")


class Started(NamedTuple):
    #: No other process serves the store: what lies in its ``tmp/`` is a dead run's leftovers.
    alone: bool
    #: Alone, and the last run did not stop cleanly: the store must be counted again.
    crashed: bool


class ServingLock:
    def __init__(self, root: Path, index: Index) -> None:
        self._path = root / "serving.lock"
        self._index = index
        self._fd: int | None = None

    def acquire(self, now: float, when_alone: Callable[[], object] = lambda: None) -> Started:
        """Begin serving: whether this process is alone, and whether the last run crashed.
        ``when_alone`` (sweeping a dead run's temporaries) runs under the exclusive lock, so
        that no process starting meanwhile has a temporary of its own there yet."""
        fd = self._open()
        self._fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Others serve, or one is starting or stopping. The mark is set only once the shared
            # lock is held, so a process stopping now cannot clear it after it was set.
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._index.begin_serving(now, alone=False)
            return Started(alone=False, crashed=False)
        crashed = self._index.begin_serving(now)
        when_alone()
        fcntl.flock(fd, fcntl.LOCK_SH)  # others may begin serving beside this one now
        return Started(alone=True, crashed=crashed)

    def _open(self) -> int:
        """Read-write where possible: flock on NFS is a byte-range lock, which needs it. A lock
        file another user (a root-run command) created is opened read-only, which suffices for
        flock on a local file system."""
        try:
            return os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            try:
                return os.open(self._path, os.O_RDONLY)
            except FileNotFoundError:
                raise exc from None  # it could not be made: the first error says why

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
                        extra={"event": "maintenance_failed", "task": "stop", "error": error_text(exc)},
                    )
        finally:
            os.close(fd)  # drops the lock
