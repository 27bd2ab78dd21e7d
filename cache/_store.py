"""The content-addressed blob store: what a store must do, and the directory store.

Manifests and layers alike live once, by digest: ``blobs/<algorithm>/<2 hex>/<hex>`` under
the store root. Bytes reach that path only through :meth:`PendingBlob.commit`, which checks
the digest, fsyncs and renames a temporary from ``tmp/`` into place; so a crash at any moment
leaves no partial blob visible, and :meth:`DirectoryStore.sweep_temporaries` clears what a
crash left behind at the next start. Every method here blocks: callers run whole operations
in a thread, one hop each.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from moorage.upstreams.reference import Digest, InvalidReference, parse_digest

from ._layout import BLOBS_DIR, TMP_DIR
from .errors import DigestMismatch, StoreFailure

__all__ = ["BlobStore", "DirectoryStore", "Fingerprint", "PendingBlob", "StoredBlob", "WalkCount", "WriteCheck"]

log = logging.getLogger("moorage.cache")

TEMP_SUFFIX = ".partial"


class Fingerprint(NamedTuple):
    """What a stored file looked like when its bytes were last known good. A file whose
    fingerprint still matches was not rewritten since (any write moves its mtime); one that
    differs is hashed again before it is served."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, info: os.stat_result) -> Fingerprint:
        return cls(info.st_size, info.st_mtime_ns, info.st_ino)


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A blob a walk of the store found. No path: an eviction pass holds one of these for every
    stored blob, and a path took half their memory (``DirectoryStore.path_of`` makes it)."""

    digest: Digest
    size: int
    #: Last written or (brought forward in batches) last read; epoch seconds.
    mtime: float


class WriteCheck(NamedTuple):
    """Whether content can be stored: ``problem`` says why not (a read-only file system, no
    permission). A ``full`` disk is no such problem: what is stored is still served, and an
    eviction pass frees space."""

    problem: str | None
    full: bool = False


@dataclass(frozen=True, slots=True)
class WalkCount:
    """A walk's count of the store. A blob stored while the walk ran is in it or not, by when
    it was put in place: ``fresh`` (the blobs walked that were written lately) tells which."""

    bytes: int
    entries: int
    fresh: frozenset[Digest]


class PendingBlob(Protocol):
    """A blob being written; invisible until ``commit`` verified it. ``verify`` checks the
    digest alone, so that readers may have the last byte before the file is made durable."""

    def write(self, chunk: bytes) -> None: ...
    def write_many(self, chunks: list[bytes]) -> None: ...
    def pread(self, size: int, offset: int) -> bytes: ...
    def fileno(self) -> int: ...
    def verify(self) -> None: ...
    def commit(self) -> Fingerprint: ...
    def discard(self) -> None: ...
    def close(self) -> None: ...
    def keep_alive(self) -> None: ...
    #: After ``commit``: False when the blob was in the store already (another process serving
    #: the store stored it meanwhile), so the store's totals do not count it twice.
    @property
    def placed_new(self) -> bool: ...


class BlobStore(Protocol):
    def size_of(self, digest: Digest) -> int | None: ...
    def fingerprint(self, digest: Digest) -> Fingerprint | None: ...
    def quarantine(self, digest: Digest) -> bool: ...
    def local_path(self, digest: Digest) -> Path | None: ...
    def read_small(self, digest: Digest, limit: int) -> bytes | None: ...
    def begin(self, digest: Digest) -> PendingBlob: ...
    def count(self) -> tuple[int, int]: ...
    def check_writable(self) -> WriteCheck: ...
    def sweep_temporaries(self, unwritten_for: float = 0.0) -> int: ...


class _PendingFile:
    def __init__(self, store: DirectoryStore, digest: Digest) -> None:
        self._store = store
        self._digest = digest
        self._hasher = digest.hasher()
        self._temp = store.tmp_dir / f"{digest.algorithm}-{digest.encoded}-{secrets.token_hex(6)}{TEMP_SUFFIX}"
        self._fd = os.open(self._temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._size = 0
        self._closed = False
        self._placed_new = False

    @property
    def placed_new(self) -> bool:
        return self._placed_new

    def write(self, chunk: bytes) -> None:
        # Positioned writes: readers hold other descriptors of this file (for sendfile) whose
        # shared file offset they may move; the writer must not depend on it.
        self._write_unhashed(chunk)
        self._hasher.update(chunk)

    def write_many(self, chunks: list[bytes]) -> None:
        """Several chunks in one vectored write (no joining copy), hashed in order."""
        total = sum(len(c) for c in chunks)
        try:
            written = os.pwritev(self._fd, chunks, self._size)
        except OSError as exc:
            raise StoreFailure.of(f"cannot write {self._digest}", exc, self._store.root) from exc
        if written != total:  # a short vectored write: finish with plain writes
            rest = b"".join(chunks)[written:]
            self._size += written
            for chunk in chunks:
                self._hasher.update(chunk)
            self._write_unhashed(rest)
            return
        self._size += written
        for chunk in chunks:
            self._hasher.update(chunk)

    def _write_unhashed(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self._fd, view, self._size)
                self._size += written
                view = view[written:]
        except OSError as exc:
            raise StoreFailure.of(f"cannot write {self._digest}", exc, self._store.root) from exc

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def fileno(self) -> int:
        return self._fd

    def verify(self) -> None:
        """Raise DigestMismatch unless the bytes written hash to the digest. Cheap (the hash
        was computed as the bytes were written) and touches no file."""
        actual = self._hasher.hexdigest()
        if actual != self._digest.encoded:
            raise DigestMismatch(str(self._digest), f"{self._digest.algorithm}:{actual}", "upstream blob")

    def commit(self) -> Fingerprint:
        try:
            self.verify()
        except DigestMismatch:
            self.discard()
            raise
        final = self._store.path_of(self._digest)
        try:
            os.fsync(self._fd)
            final.parent.mkdir(parents=True, exist_ok=True)
            self._placed_new = not os.path.lexists(final)
            os.rename(self._temp, final)
            _fsync_dir(final.parent)
            return Fingerprint.of(os.fstat(self._fd))
        except OSError as exc:
            self.discard()
            raise StoreFailure.of(f"cannot store {self._digest}", exc, self._store.root) from exc

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temp)

    def keep_alive(self) -> None:
        """Mark the temporary as written now: a fill waiting for a download slot writes
        nothing for as long as it waits, and must not look dead to a sweep. Blocks."""
        with contextlib.suppress(FileNotFoundError):  # committed or discarded meanwhile
            os.utime(self._temp)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unreadable(path: Path, error: OSError) -> StoreFailure:
    """A stored file that cannot be read: a 503 that names it, where it had been a 500 with a
    traceback. Most likely made by a store command run as another user."""
    hint = "; run store commands as the daemon's user" if error.errno in (errno.EACCES, errno.EPERM) else ""
    return StoreFailure(f"cannot read the stored file {path}: {error.strerror or error}{hint}")


#: Store directories said to be unreadable, once each per process.
_unreadable_directories: set[Path] = set()


def _sorted_entries(directory: Path) -> list[os.DirEntry[str]]:
    """A directory's entries by name; none where it vanished meanwhile, or where the daemon
    may not read it (left by a store command run as root with a umask of 077): said once, and
    the walk goes on, where one such directory had failed every eviction pass, gc and count."""
    try:
        with os.scandir(directory) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError as exc:
        if directory not in _unreadable_directories and len(_unreadable_directories) < 1024:
            _unreadable_directories.add(directory)
            log.warning(
                "a store directory the daemon may not read is passed over; run store commands as the daemon's user",
                extra={"event": "store_directory_unreadable", "path": str(directory), "error": str(exc)},
            )
        return []


class DirectoryStore:
    """Blobs as files under a root directory; sendfile-capable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / BLOBS_DIR
        self.tmp_dir = root / TMP_DIR
        for directory in (self.blobs_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def path_of(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.algorithm / digest.encoded[:2] / digest.encoded

    def size_of(self, digest: Digest) -> int | None:
        try:
            return self.path_of(digest).stat().st_size
        except (FileNotFoundError, NotADirectoryError):  # a file where its directory should be
            return None
        except OSError as exc:
            raise _unreadable(self.path_of(digest), exc) from exc

    def fingerprint(self, digest: Digest) -> Fingerprint | None:
        """The stored file's fingerprint, taken through an open file: one the daemon may not
        read is told here, where the answer is decided (sendfile met it after the answer began,
        a bare 403 naming nothing)."""
        try:
            descriptor = os.open(self.path_of(digest), os.O_RDONLY)
            try:
                return Fingerprint.of(os.fstat(descriptor))
            finally:
                os.close(descriptor)
        except (FileNotFoundError, NotADirectoryError):  # a file where its directory should be
            return None
        except OSError as exc:
            raise _unreadable(self.path_of(digest), exc) from exc

    def quarantine(self, digest: Digest) -> bool:
        """Move a stored blob out of the store into ``quarantine/`` (kept for inspection);
        False when it was not there. Where ``quarantine/`` cannot take it (made by another
        user, say by a store command run as root), the blob is deleted instead: a corrupt file
        left in place would be found, and refused, at every request."""
        target = self.root / "quarantine"
        path = self.path_of(digest)
        try:
            target.mkdir(exist_ok=True)
            os.rename(path, target / f"{digest.algorithm}-{digest.encoded}")
        except (FileNotFoundError, NotADirectoryError):  # a file where its directory should be
            return False
        except OSError as exc:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            except OSError as stuck:  # neither moved nor removed: it must not be served, nor stay silent
                raise StoreFailure.of(f"corrupt blob {digest} can be neither quarantined nor removed", stuck) from exc
            log.warning(
                "corrupt blob deleted, not kept: quarantine/ cannot take it",
                extra={"event": "quarantine_failed", "digest": str(digest), "error": str(exc)},
            )
        return True

    def local_path(self, digest: Digest) -> Path | None:
        return self.path_of(digest)

    def read_small(self, digest: Digest, limit: int) -> bytes | None:
        try:
            with open(self.path_of(digest), "rb") as handle:
                return handle.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError):  # a file where its directory should be
            return None
        except OSError as exc:
            raise _unreadable(self.path_of(digest), exc) from exc

    def begin(self, digest: Digest) -> PendingBlob:
        try:
            return _PendingFile(self, digest)
        except OSError as exc:
            raise StoreFailure.of(f"cannot start writing {digest}", exc, self.root) from exc

    def check_writable(self) -> WriteCheck:
        """Whether a temporary can be written in the store and a blob put in place."""
        probe = self.tmp_dir / f".writable-{secrets.token_hex(4)}"
        blobs = self.blobs_dir / "sha256" if (self.blobs_dir / "sha256").is_dir() else self.blobs_dir
        placed = blobs / probe.name
        where = self.tmp_dir
        try:
            probe.write_bytes(b"ok")
            where = blobs  # as a commit puts a blob in place; beside the prefix directories, which walks pass over
            os.rename(probe, placed)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return WriteCheck(None, full=True)
            return WriteCheck(f"cannot write in {where}: {exc.strerror}")
        finally:  # a probe left behind by a failed write would count against the disk
            for path in (probe, placed):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
        return WriteCheck(None)

    def entries(self) -> Iterator[StoredBlob]:
        """Every stored blob with its size and modification time; walks the whole store.
        Files that are not ours, or that vanish while walking, are passed over."""
        # One directory of 256 at a time: a walk holds the names of one, not of the whole
        # store (sorting a glob of a million files held them all, some 500 MB).
        for algorithm_dir in _sorted_entries(self.blobs_dir):
            if algorithm_dir.name.startswith(".") or not algorithm_dir.is_dir():
                continue  # a readiness probe, or something not ours
            for prefix_dir in _sorted_entries(Path(algorithm_dir.path)):
                if prefix_dir.name.startswith(".") or not prefix_dir.is_dir():
                    continue
                for entry in _sorted_entries(Path(prefix_dir.path)):
                    try:
                        digest = parse_digest(f"{algorithm_dir.name}:{entry.name}")
                        info = entry.stat()
                    except (InvalidReference, FileNotFoundError):
                        continue
                    yield StoredBlob(digest, info.st_size, info.st_mtime)

    def count(self) -> tuple[int, int]:
        """(bytes, entries) of every stored blob; walks the whole store."""
        counted = self.walk_count(math.inf)
        return counted.bytes, counted.entries

    def walk_count(self, fresh_since: float) -> WalkCount:
        """Every stored blob counted, and which of them were modified at or after
        ``fresh_since`` (epoch seconds); walks the whole store."""
        total = entries = 0
        fresh: set[Digest] = set()
        for blob in self.entries():
            total += blob.size
            entries += 1
            if blob.mtime >= fresh_since:
                fresh.add(blob.digest)
        return WalkCount(total, entries, frozenset(fresh))

    def sweep_temporaries(self, unwritten_for: float = 0.0) -> int:
        """Remove what interrupted fills left in ``tmp/``: everything (before serving, alone),
        or the temporaries nothing wrote for ``unwritten_for`` seconds (a process that died
        beside others still serving the store; the living mark theirs, see ``keep_alive``);
        how many entries went."""
        if unwritten_for:
            return self._sweep_stale(time.time() - unwritten_for)
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def _sweep_stale(self, written_before: float) -> int:
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if not entry.name.endswith(TEMP_SUFFIX):
                continue  # ours are files of that name; anything else is left to a start alone
            try:
                info = entry.lstat()
                if not stat.S_ISREG(info.st_mode) or info.st_mtime >= written_before:
                    continue
                entry.unlink()
            except FileNotFoundError:  # its fill finished or failed meanwhile
                continue
            except OSError as exc:  # not ours to remove (another user's): the others still go
                log.warning(
                    "stale partial download not removed",
                    extra={"event": "maintenance_failed", "task": "sweep", "path": str(entry), "error": exc.strerror},
                )
                continue
            removed += 1
        return removed
