"""Single flight: one upstream fetch per digest, followed by every reader as it grows.

A fill is one task per digest, owned by :class:`Fills`, never by a request handler: a client
that disconnects does not cancel it once its download began. One whose every client left while
it waited for a download slot or the upstream's first answer is dropped (a prefetch's is kept).
It writes the upstream body to a temporary file while hashing; readers (every client asking for
the digest while it runs, including one that joins late) read that file with ``pread`` up to the
bytes written so far, so they get their first byte without waiting for the end. The last byte of
any reader's response is held back until the fill has verified the digest, so a reader can never
see a complete response of wrong bytes; it does not wait for the blob to be made durable (fsync,
rename), which follows. If the fill fails before the digest is verified, every reader gets
:class:`FillAborted` (its response must be cut) and nothing is kept; if only storing fails
after, readers finish from the open file (their bytes are verified) and nothing is kept. A body
cut mid-way is resumed from the offset reached (``Range``), or refetched and the known prefix
skipped, for as long as each try brings a piece more, and ``MAX_RESUMES`` times in a row, with
pauses, where none does; the digest is still verified end to end. The digest's
entry leaves the registry in ``finally``, so nothing leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from typing import BinaryIO, Final, Literal

from moorage.upstreams import UpstreamNotFound, UpstreamProtocolError, UpstreamRefused, UpstreamUnavailable
from moorage.upstreams.reference import Digest, RepositoryName

from ._observer import CacheObserver, NullCacheObserver
from ._source import BlobSource
from ._store import BlobStore, Fingerprint, PendingBlob
from .errors import ClientGone, DigestMismatch, FillAborted, StoreFailure, error_text

__all__ = ["Fill", "FillReader", "Fills"]

CHUNK_SIZE: Final = 1024 * 1024
#: Cuts in a row, each less than a piece (CHUNK_SIZE) after the last, before a fill gives up.
#: A try that brought a piece or more starts the count again: a link that drops every
#: connection after some megabytes (a NAT, a firewall cutting long flows) had failed every
#: pull of a large layer after its third cut, however far it had got.
MAX_RESUMES: Final = 3
#: Seconds before a resume after a try that brought less than a piece, doubling: an outage of
#: some seconds (1 + 2 + 4) is waited out, where three resumes within a second had failed
#: every download in flight.
RESUME_PAUSE = 1.0
#: Pieces of CHUNK_SIZE waiting for the writer: bounds memory per fill to about 4 MiB.
WRITE_QUEUE: Final = 3
#: Seconds after the last piece (or the body's start) when a chunk arriving is written however
#: small the piece it ends: over a slow upstream, clients got no byte until a whole piece had
#: come (a minute below 17 KB/s, past a load balancer's idle timeout), where a direct pull would
#: have kept flowing. Bytes that came before a pause wait for the next chunk.
PIECE_AGE: Final = 0.5
RECENTLY_COMMITTED: Final = 1024
#: A body that brings less than ``SLOW_BODY_BYTES`` in ``SLOW_BODY_SECONDS`` counts as cut and
#: is resumed (on another connection, as any cut): one that trickles never goes silent for a
#: whole read timeout, and had held its clients (kubelets have no deadline of their own) and a
#: download slot for as long as it took, days for a layer at a few bytes a second. Low enough
#: for a slow link shared by every download at once: 32 fills over 256 kbit/s get 60 KiB a
#: minute each.
SLOW_BODY_SECONDS = 60.0
SLOW_BODY_BYTES = 16 * 1024
#: Seconds between looks, while a client waits for its download to begin, at whether it left.
CLIENT_GONE_POLL: Final = 0.5
log = logging.getLogger("moorage.cache")


def _nothing() -> None:
    pass


async def _put(
    queue: asyncio.Queue[list[bytes] | None], writer: asyncio.Future[None], item: list[bytes] | None
) -> None:
    """Queue a piece for the writer; if the writer failed (disk full), raise its error."""
    if writer.done():
        writer.result()
        raise AssertionError("the writer stopped before the end of the body")
    put = asyncio.ensure_future(queue.put(item))
    try:
        await asyncio.wait([put, writer], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        put.cancel()
        raise
    if not put.done():
        put.cancel()
        writer.result()  # raises the writer's error


#: Closes and removals of temporaries handed off and not awaited: a strong reference until done.
_CLOSING: set[asyncio.Future[None]] = set()


async def _opened(store: BlobStore, digest: Digest) -> PendingBlob:
    """``store.begin`` in a thread. Cancelled, the thread still makes the temporary, which
    nobody would remove (or close): a task of its own waits for the thread and removes it,
    and the caller waits for that task unless cancelled again."""
    opening = asyncio.ensure_future(asyncio.to_thread(store.begin, digest))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        removing = asyncio.ensure_future(_remove_when_opened(opening))
        _CLOSING.add(removing)
        removing.add_done_callback(_CLOSING.discard)
        await asyncio.shield(removing)
        raise


async def _remove_when_opened(opening: asyncio.Future[PendingBlob]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.to_thread(_discarded, await opening)


def _discarded(pending: PendingBlob) -> None:
    try:
        pending.discard()
    finally:
        pending.close()


FillState = Literal["starting", "running", "committed", "failed"]


class Fill:
    def __init__(
        self,
        digest: Digest,
        origin: tuple[str, str],
        observer: CacheObserver,
        on_done: Callable[[], None],
        on_commit: Callable[[Digest, Fingerprint, tuple[str, str]], None],
    ) -> None:
        self.digest = digest
        #: (upstream host, repository) the fill fetches from.
        self.origin = origin
        self.state: FillState = "starting"
        self.size: int | None = None
        self.written = 0
        #: Bytes received from the upstream: those written and those on their way to the file.
        self.received = 0
        #: The bytes in the file hashed to the digest: readers may have all of them.
        self.verified = False
        #: Seconds from asking the upstream (waiting for one of its download slots, the request,
        #: round trips, redirects) until the whole body was in the file; None until then.
        self.body_seconds: float | None = None
        self.error: BaseException | None = None
        self._pending: PendingBlob | None = None
        self._progress = asyncio.Event()
        self._readers = 0
        #: A fill that goes on with no reader (a prefetch's, or one a prefetch counts on);
        #: others are dropped when every reader left before the download began (``_abandon``).
        self.kept = False
        self.abandoned = False
        self.task: asyncio.Task[None] | None = None
        self._task_done = False
        self._observer = observer
        self._on_done = on_done
        self._on_commit = on_commit

    # -- the writer ---------------------------------------------------------------------------

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def run(self, store: BlobStore, source: BlobSource, repository: RepositoryName) -> None:
        try:
            began = time.monotonic()
            await self._download(store, source, repository)
            self.body_seconds = time.monotonic() - began
            assert self._pending is not None
            self._pending.verify()  # the hash is done: this only compares
            self.verified = True
            self._notify()  # readers may send their last byte while the blob is made durable
            fingerprint = await asyncio.to_thread(self._pending.commit)
            self.state = "committed"
            self._on_commit(self.digest, fingerprint, self.origin)
            if self._pending.placed_new:
                self._observer.on_stored("blob", self.written, self.digest)
        except BaseException as exc:  # every failure, cancellation included, aborts readers
            if isinstance(exc, DigestMismatch):
                self._observer.on_digest_mismatch(self.origin[0], "blob")
            if isinstance(exc, StoreFailure):
                self._observer.on_store_failure(exc.disk_full)
            self.state = "failed"
            self.error = exc
            self._leave_registry()  # before any await: no client may join a failed fill
            if self.abandoned:
                log.info(
                    "fill dropped: its clients left before its download began",
                    extra={
                        "event": "fill_abandoned",
                        "upstream": self.origin[0],
                        "repository": self.origin[1],
                        "digest": str(self.digest),
                    },
                )
            elif not isinstance(exc, asyncio.CancelledError):
                # Counted before any await: a reader cut by this failure may already be
                # telling its client, who then finds the failure in the metrics.
                # A digest the upstream does not have is an answer, and any client can ask for
                # one: not a failed download, and no warning of its own. So is a repository it
                # refuses (Docker Hub's 401 for a name it does not have).
                answered = isinstance(exc, UpstreamNotFound | UpstreamRefused)
                if not answered:
                    self._observer.on_fill_failed(self.origin[0])
                log.log(
                    logging.INFO if answered else logging.WARNING,
                    "fill failed",
                    extra={
                        "event": "fill_failed",
                        "upstream": self.origin[0],
                        "repository": self.origin[1],
                        "digest": str(self.digest),
                        "error": error_text(exc),
                    },
                )
            if self._pending is not None:
                await asyncio.shield(asyncio.to_thread(self._pending.discard))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            # Leave the registry before the file may close: a later client finds the stored
            # blob (committed) or starts a new fill (failed), never a closed one.
            self._leave_registry()
            self._task_done = True
            self._notify()
            self._maybe_close()

    async def _download(self, store: BlobStore, source: BlobSource, repository: RepositoryName) -> None:
        resumes = 0
        resumed_from = self.written
        while True:
            try:
                async with source.open_blob(repository, self.digest, self.written) as body:
                    if body.size is not None:
                        if self.size is not None and body.size != self.size:
                            raise UpstreamProtocolError(
                                source.host, f"blob {self.digest}: size changed from {self.size} to {body.size}"
                            )
                        self.size = body.size
                    if self._pending is None:
                        # Only once the upstream answers with a body: a fill waiting for a
                        # download slot, or for a 404 (any digest a client makes up), holds
                        # no file.
                        self._pending = await _opened(store, self.digest)
                    self.state = "running"
                    self._notify()
                    await self._pipe(source.host, body.chunks(), skip=self.written - body.offset)
                if self.size is None:
                    self.size = self.written
                if self.written == self.size:
                    return
                raise UpstreamUnavailable(
                    source.host, f"blob {self.digest}: body ended at {self.written} of {self.size}"
                )
            except UpstreamUnavailable as exc:
                if self.state == "starting":
                    raise
                if self.written - resumed_from >= CHUNK_SIZE:  # this try brought a piece: no count
                    resumes, pause = 0, 0.0
                else:
                    resumes += 1
                    if resumes > MAX_RESUMES:
                        raise
                    pause = RESUME_PAUSE * 2 ** (resumes - 1)
                self._observer.on_fill_resumed(source.host)
                log.info(
                    "resuming cut blob body",
                    extra={
                        "event": "fill_resume",
                        "upstream": source.host,
                        "repository": str(repository),
                        "digest": str(self.digest),
                        "offset": self.written,
                        "cuts_without_progress": resumes,
                        "pause_seconds": pause,
                        "error": error_text(exc),
                    },
                )
                await asyncio.sleep(pause)
                resumed_from = self.written

    async def _pipe(self, upstream: str, chunks: AsyncIterator[bytes], skip: int) -> None:
        """Copy a body into the file. Network reads and disk writes (with hashing) overlap: the
        body is gathered into 1 MiB pieces (or what ``PIECE_AGE`` brought) for a writer task
        through a short queue, so the socket is read while the previous piece is written.
        ``written`` only counts what is in the file, so a resume after a cut starts exactly
        there."""
        queue: asyncio.Queue[list[bytes] | None] = asyncio.Queue(maxsize=WRITE_QUEUE)
        writer = asyncio.ensure_future(self._write_from(queue, upstream))
        queued = self.received = self.written
        piece: list[bytes] = []
        piece_size = 0
        last_piece = window = time.monotonic()
        # Bytes off the wire, those skipped too: an upstream that ignores Range sends the
        # prefix again, at the link's pace.
        wire = window_from = 0
        try:
            async for received in chunks:
                now = time.monotonic()
                if now - window >= SLOW_BODY_SECONDS:
                    if wire - window_from < SLOW_BODY_BYTES:
                        raise UpstreamUnavailable(
                            upstream,
                            f"blob {self.digest}: body slower than {SLOW_BODY_BYTES} bytes in {SLOW_BODY_SECONDS:g} s",
                        )
                    window, window_from = now, wire
                wire += len(received)
                chunk = received
                if skip:  # the upstream ignored Range: drop what we already hold
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                    if not chunk:
                        continue
                piece.append(chunk)
                piece_size += len(chunk)
                self.received += len(chunk)
                if self.size is not None and queued + piece_size > self.size:
                    raise UpstreamProtocolError(upstream, f"blob {self.digest}: more bytes than announced")
                if piece_size >= CHUNK_SIZE or time.monotonic() - last_piece >= PIECE_AGE:
                    last_piece = time.monotonic()
                    queued += piece_size
                    ready, piece, piece_size = piece, [], 0
                    await _put(queue, writer, ready)
        except asyncio.CancelledError:
            writer.cancel()  # shutdown: the writer finishes the write in hand, then stops
            await asyncio.gather(writer, return_exceptions=True)
            raise
        finally:
            # Whatever happened upstream, what was received is written before anyone resumes.
            if not writer.done():
                if piece:
                    await _put(queue, writer, piece)
                await _put(queue, writer, None)
            await writer

    async def _write_from(self, queue: asyncio.Queue[list[bytes] | None], upstream: str) -> None:
        assert self._pending is not None
        while (piece := await queue.get()) is not None:
            write = asyncio.ensure_future(asyncio.to_thread(self._pending.write_many, piece))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # The thread cannot be stopped: wait for it, so the file is never closed under
                # a write in progress.
                await asyncio.gather(write, return_exceptions=True)
                raise
            size = sum(len(chunk) for chunk in piece)
            self.written += size
            self._observer.on_fetched_bytes(upstream, "blob", size)
            self._notify()

    def _leave_registry(self) -> None:
        on_done, self._on_done = self._on_done, _nothing
        on_done()

    # -- readers ------------------------------------------------------------------------------

    def add_reader(self) -> FillReader:
        self._readers += 1
        return FillReader(self)

    def _remove_reader(self, *, left: bool = False) -> None:
        self._readers -= 1
        if left and self._readers == 0 and self.state == "starting" and not self.kept and not self._task_done:
            self._abandon()
        self._maybe_close()

    def _abandon(self) -> None:
        """Every client left while the download waited for a slot or for the upstream's answer:
        drop it rather than fetch, when its turn comes, a blob no one waits for (abandoned
        requests queued ahead had held up real pulls for a minute). It leaves the registry
        at once, so a client asking now starts a fill of its own instead of joining this one."""
        self.abandoned = True
        self._leave_registry()
        if self.task is not None:
            self.task.cancel()

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

    @property
    def received(self) -> int:
        """Bytes received from the upstream so far (also after ``close``)."""
        return self._fill.received

    @property
    def body_seconds(self) -> float | None:
        """Seconds from asking the upstream until the whole body was in the file (see
        ``Fill.body_seconds``; the digest check and fsync follow); None until then."""
        return self._fill.body_seconds

    async def wait_started(self, client_gone: Callable[[], bool] | None = None) -> int:
        """The blob's size, once the upstream answered; the fill's error if it failed first.
        ``client_gone`` is asked every ``CLIENT_GONE_POLL`` seconds until then: once it says
        the client left, this raises :class:`ClientGone` (``leave`` the reader, which gives up
        its place)."""
        fill = self._fill
        while fill.state == "starting":
            progress = fill._progress
            if client_gone is None:
                await progress.wait()
                continue
            try:
                async with asyncio.timeout(CLIENT_GONE_POLL):
                    await progress.wait()
            except TimeoutError:
                if client_gone():
                    raise ClientGone(f"the client left while the download of {fill.digest} waited to begin") from None
        if fill.state == "failed" and fill.written == 0 and fill.error is not None:
            raise fill.error
        if fill.size is None:
            # An upstream that sends no Content-Length: the size is known at the end.
            while fill.state == "running" and fill.size is None:
                await fill._progress.wait()
            if fill.state == "failed":
                raise fill._aborted()
        assert fill.size is not None
        if fill.size == 0:
            # No last byte to hold back (see ``ranges``): an empty answer goes out only once
            # the digest matched, else an upstream's empty 200 would pass for the blob whole.
            while not fill.verified and not fill._task_done:
                await fill._progress.wait()
            if not fill.verified:
                raise fill.error if fill.error is not None else fill._aborted()
        return fill.size

    async def body_received(self) -> None:
        """Wait until the whole body is in the file (the digest check and fsync follow) or the
        fill ended. Works after ``close``."""
        fill = self._fill
        while fill.body_seconds is None and not fill._task_done:
            await fill._progress.wait()

    async def finished(self) -> bool:
        """Wait until the fill ended; True when it stored the blob. Works after ``close``."""
        fill = self._fill
        while not fill._task_done:
            await fill._progress.wait()
        return fill.state == "committed"

    async def ranges(self, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """(offset, count) spans of ``[start, end)`` as they become readable in the file;
        the last byte only once the blob was verified and committed. Raises FillAborted
        when the fill fails. The caller must have sent each span before asking for the next."""
        fill = self._fill
        position = start
        while position < end:
            if fill.state == "failed" and not fill.verified:
                raise fill._aborted()
            deliverable = end if fill.verified else min(fill.written, end - 1)
            if position >= deliverable:
                await fill._progress.wait()
                continue
            yield position, deliverable - position
            position = deliverable

    async def read(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` in chunks of at most 1 MiB (see :meth:`ranges`)."""
        async for offset, count in self.ranges(start, end):
            pending = self._fill._pending
            assert pending is not None
            done = 0
            while done < count:
                chunk = await asyncio.to_thread(pending.pread, min(CHUNK_SIZE, count - done), offset + done)
                if not chunk:
                    raise self._fill._aborted()
                done += len(chunk)
                yield chunk

    def open_file(self) -> BinaryIO:
        """A file object of its own on the growing file (for sendfile); close it when done."""
        pending = self._fill._pending
        assert pending is not None, "the file stays open while a reader holds the fill"
        return os.fdopen(os.dup(pending.fileno()), "rb", buffering=0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._fill._remove_reader()

    def leave(self) -> None:
        """Close: the client left. A fill whose download has not begun, and that no other
        reader still waits for, is dropped. Any other close (a request cut by the server's
        stop, say) leaves it to run."""
        if not self._closed:
            self._closed = True
            self._fill._remove_reader(left=True)

    def keep(self) -> None:
        """The fill goes on whoever leaves it (a prefetch counts on a client's fill)."""
        self._fill.kept = True


class Fills:
    """The registry of fills in flight, keyed by digest."""

    def __init__(
        self,
        store: BlobStore,
        observer: CacheObserver | None = None,
        on_commit: Callable[[Digest, Fingerprint, tuple[str, str]], None] | None = None,
    ) -> None:
        self._store = store
        #: Told of every committed blob, the fingerprint of its verified file and its origin.
        self._on_commit = on_commit or (lambda digest, fingerprint, origin: None)
        self._fills: dict[Digest, Fill] = {}
        #: Every fill's task, until it ended (a fill leaves ``_fills`` before its task ends).
        self._tasks: dict[asyncio.Task[None], Fill] = {}
        self._observer: CacheObserver = observer or NullCacheObserver()
        self._committed: OrderedDict[Digest, tuple[int, float]] = OrderedDict()

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

    def start(
        self, source: BlobSource, repository: RepositoryName, digest: Digest, *, kept: bool = False
    ) -> FillReader:
        """A reader of a new fill; call only after :meth:`join` found none. A ``kept`` fill
        (a prefetch's) goes on with no reader; any other is dropped when every reader left
        before its download began."""
        assert digest not in self._fills

        def done() -> None:
            if self._fills.get(digest) is fill:
                del self._fills[digest]
            if fill.state == "committed" and fill.size is not None:
                self._committed[digest] = (fill.size, time.monotonic())
                while len(self._committed) > RECENTLY_COMMITTED:
                    self._committed.popitem(last=False)

        fill = Fill(digest, (source.host, str(repository)), self._observer, done, self._on_commit)
        fill.kept = kept
        self._fills[digest] = fill
        reader = fill.add_reader()
        task = fill.task = asyncio.get_running_loop().create_task(fill.run(self._store, source, repository))
        self._tasks[task] = fill
        task.add_done_callback(lambda done: self._tasks.pop(done, None))
        return reader

    @property
    def digests(self) -> list[Digest]:
        """The digests being filled now."""
        return list(self._fills)

    def pending(self) -> list[PendingBlob]:
        """The temporaries of the fills running now (those queued for a download slot too)."""
        return [fill._pending for fill in self._tasks.values() if fill._pending is not None]

    def forget_committed(self, digests: Iterable[Digest]) -> None:
        """Evicted content is no longer "recently committed"."""
        for digest in digests:
            self._committed.pop(digest, None)

    def recently_committed(self, digest: Digest, since: float) -> int | None:
        """The size of a blob a fill committed after ``since`` (monotonic).

        Closes the gap between a fill leaving the registry and a caller whose look at the store
        (in a thread, started at ``since``) happened just before the commit: that caller must
        not start a second fill. An older commit is no evidence: the blob may be evicted since.
        """
        entry = self._committed.get(digest)
        return entry[0] if entry is not None and entry[1] >= since else None

    async def aclose(self) -> None:
        """Cancel fills still downloading (their temporaries are removed, readers are
        aborted); wait for those already verified to store their blob."""
        tasks = list(self._tasks.items())
        for task, fill in tasks:
            if not fill.verified:  # a verified fill is storing its blob: let it finish
                task.cancel()
        if tasks:
            await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)
