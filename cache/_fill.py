"""Single flight: one upstream fetch per digest, followed by every reader as it grows.

A fill is one task per digest, owned by :class:`Fills`, never by a request handler: a client
that disconnects does not cancel it. It writes the upstream body to a temporary file while
hashing; readers (every client asking for the digest while it runs, including one that joins
late) read that file with ``pread`` up to the bytes written so far, so they get their first
byte without waiting for the end. The last byte of any reader's response is held back until
the fill has verified the digest and committed the blob, so a reader can never see a complete
response of wrong bytes. If the fill fails, every reader gets :class:`FillAborted` (its
response must be cut) and nothing is kept. A body cut mid-way is resumed from the offset
reached (``Range``), or refetched and the known prefix skipped, up to ``MAX_RESUMES`` times;
the digest is still verified end to end. The digest's entry leaves the registry in
``finally``, so nothing leaks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Final, Literal

from moorage.upstreams import UpstreamProtocolError, UpstreamUnavailable
from moorage.upstreams.reference import Digest, RepositoryName

from ._observer import CacheObserver, NullCacheObserver
from ._source import BlobSource
from ._store import BlobStore, PendingBlob
from .errors import DigestMismatch, FillAborted

__all__ = ["Fill", "FillReader", "Fills"]

CHUNK_SIZE: Final = 1024 * 1024
MAX_RESUMES: Final = 3
RECENTLY_COMMITTED: Final = 1024
log = logging.getLogger("moorage.cache")


def _nothing() -> None:
    pass


#: Closes handed to the executor and not awaited (nobody needs to wait for them).
_CLOSING: set[asyncio.Future[None]] = set()

FillState = Literal["starting", "running", "committed", "failed"]


class Fill:
    def __init__(
        self, digest: Digest, origin: tuple[str, str], observer: CacheObserver, on_done: Callable[[], None]
    ) -> None:
        self.digest = digest
        #: (upstream host, repository) the fill fetches from.
        self.origin = origin
        self.state: FillState = "starting"
        self.size: int | None = None
        self.written = 0
        self.error: BaseException | None = None
        self._pending: PendingBlob | None = None
        self._progress = asyncio.Event()
        self._readers = 0
        self._task_done = False
        self._observer = observer
        self._on_done = on_done

    # -- the writer ---------------------------------------------------------------------------

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def run(self, store: BlobStore, source: BlobSource, repository: RepositoryName) -> None:
        try:
            self._pending = await asyncio.to_thread(store.begin, self.digest)
            await self._download(source, repository)
            await asyncio.to_thread(self._pending.commit)
            self.state = "committed"
            self._observer.on_stored("blob", self.written)
        except BaseException as exc:  # every failure, cancellation included, aborts readers
            if isinstance(exc, DigestMismatch):
                self._observer.on_digest_mismatch(self.origin[0], "blob")
            self.state = "failed"
            self.error = exc
            self._leave_registry()  # before any await: no client may join a failed fill
            if self._pending is not None:
                await asyncio.shield(asyncio.to_thread(self._pending.discard))
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("fill failed", extra={"event": "fill_failed", "digest": str(self.digest), "error": str(exc)})
        finally:
            # Leave the registry before the file may close: a later client finds the stored
            # blob (committed) or starts a new fill (failed), never a closed one.
            self._leave_registry()
            self._task_done = True
            self._notify()
            self._maybe_close()

    async def _download(self, source: BlobSource, repository: RepositoryName) -> None:
        assert self._pending is not None
        resumes = 0
        while True:
            try:
                async with source.open_blob(repository, self.digest, self.written) as body:
                    if body.size is not None:
                        if self.size is not None and body.size != self.size:
                            raise UpstreamProtocolError(
                                source.host, f"blob {self.digest}: size changed from {self.size} to {body.size}"
                            )
                        self.size = body.size
                    skip = self.written - body.offset
                    self.state = "running"
                    self._notify()
                    async for received in body.chunks():
                        chunk = received
                        if skip:  # the upstream ignored Range: drop what we already hold
                            dropped = min(skip, len(chunk))
                            chunk, skip = chunk[dropped:], skip - dropped
                            if not chunk:
                                continue
                        await asyncio.to_thread(self._pending.write, chunk)
                        self.written += len(chunk)
                        self._observer.on_fetched_bytes(source.host, "blob", len(chunk))
                        if self.size is not None and self.written > self.size:
                            raise UpstreamProtocolError(source.host, f"blob {self.digest}: more bytes than announced")
                        self._notify()
                if self.size is None:
                    self.size = self.written
                if self.written == self.size:
                    return
                raise UpstreamUnavailable(
                    source.host, f"blob {self.digest}: body ended at {self.written} of {self.size}"
                )
            except UpstreamUnavailable:
                if self.state == "starting" or resumes >= MAX_RESUMES:
                    raise
                resumes += 1
                self._observer.on_fill_resumed(source.host)
                log.info(
                    "resuming cut blob body",
                    extra={"event": "fill_resume", "digest": str(self.digest), "offset": self.written},
                )

    def _leave_registry(self) -> None:
        on_done, self._on_done = self._on_done, _nothing
        on_done()

    # -- readers ------------------------------------------------------------------------------

    def add_reader(self) -> FillReader:
        self._readers += 1
        return FillReader(self)

    def _remove_reader(self) -> None:
        self._readers -= 1
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._task_done and self._readers == 0 and self._pending is not None:
            pending, self._pending = self._pending, None
            closing = asyncio.get_running_loop().run_in_executor(None, pending.close)
            _CLOSING.add(closing)  # a strong reference until the executor ran it
            closing.add_done_callback(_CLOSING.discard)

    def _aborted(self) -> FillAborted:
        error = FillAborted(f"fill of {self.digest} failed: {self.error}")
        error.__cause__ = self.error
        return error


class FillReader:
    """One client's view of a fill; ``close`` it when done (the file stays open until then)."""

    def __init__(self, fill: Fill) -> None:
        self._fill = fill
        self._closed = False

    @property
    def digest(self) -> Digest:
        return self._fill.digest

    @property
    def size(self) -> int | None:
        return self._fill.size

    @property
    def origin(self) -> tuple[str, str]:
        return self._fill.origin

    async def wait_started(self) -> int:
        """The blob's size, once the upstream answered; the fill's error if it failed first."""
        fill = self._fill
        while fill.state == "starting":
            await fill._progress.wait()
        if fill.state == "failed" and fill.written == 0 and fill.error is not None:
            raise fill.error
        if fill.size is None:
            # An upstream that sends no Content-Length: the size is known at the end.
            while fill.state == "running" and fill.size is None:
                await fill._progress.wait()
            if fill.state == "failed":
                raise fill._aborted()
        assert fill.size is not None
        return fill.size

    async def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)``; the last one only after the blob was verified."""
        fill = self._fill
        position = start
        while position < end:
            if fill.state == "failed":
                raise fill._aborted()
            committed = fill.state == "committed"
            deliverable = end if committed else min(fill.written, end - 1)
            if position >= deliverable:
                await fill._progress.wait()
                continue
            pending = fill._pending
            assert pending is not None
            size = min(CHUNK_SIZE, deliverable - position)
            chunk = await asyncio.to_thread(pending.pread, size, position)
            if not chunk:
                raise fill._aborted()
            position += len(chunk)
            yield chunk

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._fill._remove_reader()


class Fills:
    """The registry of fills in flight, keyed by digest."""

    def __init__(self, store: BlobStore, observer: CacheObserver | None = None) -> None:
        self._store = store
        self._fills: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._observer: CacheObserver = observer or NullCacheObserver()
        self._committed: OrderedDict[Digest, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._fills)

    @property
    def readers(self) -> int:
        """Clients following a fill right now."""
        return sum(fill._readers for fill in self._fills.values())

    def join(self, digest: Digest) -> FillReader | None:
        """A reader of the fill in flight for ``digest``, if there is one."""
        fill = self._fills.get(digest)
        return fill.add_reader() if fill is not None else None

    def start(self, source: BlobSource, repository: RepositoryName, digest: Digest) -> FillReader:
        """A reader of a new fill; call only after :meth:`join` found none."""
        assert digest not in self._fills

        def done() -> None:
            if self._fills.get(digest) is fill:
                del self._fills[digest]
            if fill.state == "committed" and fill.size is not None:
                self._committed[digest] = fill.size
                while len(self._committed) > RECENTLY_COMMITTED:
                    self._committed.popitem(last=False)

        fill = Fill(digest, (source.host, str(repository)), self._observer, done)
        self._fills[digest] = fill
        reader = fill.add_reader()
        task = asyncio.get_running_loop().create_task(fill.run(self._store, source, repository))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return reader

    def recently_committed(self, digest: Digest) -> int | None:
        """The size of a blob a fill committed lately.

        Closes the gap between a fill leaving the registry and a caller whose look at the store
        (in a thread) happened just before the commit: that caller must not start a second fill.
        """
        return self._committed.get(digest)

    async def aclose(self) -> None:
        """Cancel fills in flight; their temporaries are removed, readers are aborted."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
