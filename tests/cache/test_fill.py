"""Single flight at the unit level, with an in-memory upstream whose body the test feeds
chunk by chunk: readers follow a growing fill, the last byte waits for verification (not for
the blob to be made durable), a failure aborts every reader, nothing leaks."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest

import moorage.cache._fill as fill_module
from moorage.cache import Cache, DirectoryStore, FillAborted, FillReader, StoreFailure
from moorage.cache._fill import Fills
from moorage.cache._index import Index
from moorage.cache._store import Fingerprint, PendingBlob
from moorage.upstreams import BlobBody, UpstreamNotFound, UpstreamUnavailable
from moorage.upstreams.reference import Digest, RepositoryName
from tests.polling import until

REPO = RepositoryName("library/x")


class FedBody(BlobBody):
    def __init__(self, queue: asyncio.Queue[bytes | Exception | None], size: int, offset: int) -> None:
        self._queue = queue
        self.offset = offset
        self.size = size

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item


class FedSource:
    """An upstream whose blob body arrives when the test puts chunks in ``queue``."""

    host = "test"

    def __init__(self, size: int) -> None:
        self.size = size
        self.queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()
        self.opened: list[int] = []
        self.missing = False

    @asynccontextmanager
    async def open_blob(self, repository: RepositoryName, digest: Digest, offset: int = 0) -> AsyncIterator[BlobBody]:
        self.opened.append(offset)
        if self.missing:
            raise UpstreamNotFound(self.host, "blob: not found")
        yield FedBody(self.queue, self.size, offset)


async def collect(reader_iter: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in reader_iter])


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    return DirectoryStore(tmp_path)


async def test_readers_follow_the_fill_and_the_last_byte_waits_for_verification(store: DirectoryStore) -> None:
    data = os.urandom(3000)
    digest = Digest.of(data)
    source = FedSource(len(data))
    fills = Fills(store)
    first = fills.start(source, REPO, digest)
    assert await asyncio.wait_for(first.wait_started(), 1) == 3000
    received = bytearray()
    reading = asyncio.ensure_future(collect(first.read(0, 3000)))
    await source.queue.put(data[:1000])
    second = fills.join(digest)
    assert second is not None, "a client asking meanwhile joins the same fill"
    await source.queue.put(data[1000:])
    late = asyncio.ensure_future(collect(second.read(0, 3000)))
    await asyncio.sleep(0.05)
    assert not reading.done() and not late.done(), "all bytes written, but not yet verified"
    await source.queue.put(None)
    received += await reading
    assert bytes(received) == data and await late == data
    assert source.opened == [0]
    first.close()
    second.close()
    await until(lambda: len(fills) == 0)  # after the commit, which the readers did not wait for
    assert store.size_of(digest) == 3000
    assert fills.recently_committed(digest, since=0.0) == 3000
    assert fills.recently_committed(digest, since=time.monotonic()) is None, "an older commit is no evidence"


class GatedCommits(DirectoryStore):
    """A store whose commits (fsync and rename) wait for ``release``, then fail if ``fail``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()
        self.fail = False

    def begin(self, digest: Digest) -> PendingBlob:
        pending = super().begin(digest)
        store = self

        class Gated:
            def __getattr__(self, name: str) -> Any:
                return getattr(pending, name)

            def commit(self) -> Fingerprint:
                assert store.release.wait(5)
                if store.fail:
                    pending.discard()
                    raise StoreFailure(f"cannot store {digest}: No space left on device", disk_full=True)
                return pending.commit()

        return cast(PendingBlob, Gated())


async def fed_whole(store: DirectoryStore, data: bytes) -> tuple[Fills, FillReader]:
    """A fill of ``data`` whose whole body the upstream has sent, and its first reader."""
    source = FedSource(len(data))
    fills = Fills(store)
    reader = fills.start(source, REPO, Digest.of(data))
    await reader.wait_started()
    await source.queue.put(data)
    await source.queue.put(None)
    return fills, reader


async def test_the_last_byte_does_not_wait_for_the_blob_to_be_made_durable(tmp_path: Path) -> None:
    store = GatedCommits(tmp_path)
    data = os.urandom(5000)
    digest = Digest.of(data)
    fills, reader = await fed_whole(store, data)
    assert await asyncio.wait_for(collect(reader.read(0, len(data))), 2) == data
    assert store.size_of(digest) is None, "the reader had every byte while the commit was still waiting"
    store.release.set()
    reader.close()
    await until(lambda: store.size_of(digest) == len(data))
    await fills.aclose()


async def test_readers_finish_with_verified_bytes_when_storing_fails_after(tmp_path: Path) -> None:
    store = GatedCommits(tmp_path)
    store.fail = True
    data = os.urandom(5000)
    digest = Digest.of(data)
    fills, first = await fed_whole(store, data)
    await until(lambda: fills._fills[digest].verified)
    store.release.set()
    await until(lambda: len(fills) == 0)  # the commit failed: the fill left the registry
    assert await collect(first.read(0, len(data))) == data, "the bytes were verified before the disk failed"
    first.close()
    assert store.size_of(digest) is None
    await until(lambda: not any((tmp_path / "tmp").iterdir()))
    await fills.aclose()


async def test_a_failed_fill_aborts_every_reader_and_keeps_nothing(store: DirectoryStore, tmp_path: Path) -> None:
    data = os.urandom(2000)
    digest = Digest.of(data)
    source = FedSource(len(data))
    fills = Fills(store)
    readers = [fills.start(source, REPO, digest)]
    await readers[0].wait_started()
    readers.append(fills.join(digest))  # type: ignore[arg-type]
    tasks = [asyncio.ensure_future(collect(r.read(0, 2000))) for r in readers]
    await source.queue.put(data[:500])
    for _ in range(4):  # the first cut and three resumes
        await source.queue.put(UpstreamUnavailable("test", "cut"))
    for task in tasks:  # bounded: a fill that tried a fourth resume would wait for a body for good
        with pytest.raises(FillAborted):
            await asyncio.wait_for(task, 30)
    assert source.opened == [0, 500, 500, 500]
    for reader in readers:
        reader.close()
    assert len(fills) == 0, "a failed fill leaves the registry before its readers hear of it"
    await until(lambda: not any((tmp_path / "tmp").iterdir()))
    assert store.size_of(digest) is None
    again = fills.start(source, REPO, digest)
    assert again is not readers[0], "a new pull starts a new fill"
    again.close()
    await fills.aclose()


async def test_a_body_cut_again_and_again_goes_on_while_each_try_brings_a_piece(store: DirectoryStore) -> None:
    """A link that drops every connection after some megabytes: the fill gave up after three
    resumes however far each had got, and a large layer could never be pulled through it."""
    piece = 1024 * 1024
    data = os.urandom(6 * piece)
    digest = Digest.of(data)
    source = FedSource(len(data))
    fills = Fills(store)
    reader = fills.start(source, REPO, digest)
    await reader.wait_started()
    reading = asyncio.ensure_future(collect(reader.read(0, len(data))))
    for start in range(0, len(data), piece):
        await source.queue.put(data[start : start + piece])
        await source.queue.put(UpstreamUnavailable("test", "cut") if start + piece < len(data) else None)
    assert await asyncio.wait_for(reading, 30) == data
    assert source.opened == list(range(0, len(data), piece)), "five cuts, each resumed where it was"
    reader.close()
    await fills.aclose()


async def test_a_slow_body_reaches_readers_before_a_whole_piece_has_come(
    store: DirectoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below 17 KB/s a client got no byte for a minute, waiting for 1 MiB to gather, and a load
    balancer's idle timeout cut it, where a direct pull would have kept flowing."""
    monkeypatch.setattr(fill_module, "PIECE_AGE", 0.05)
    data = os.urandom(100_000)
    source = FedSource(len(data))
    fills = Fills(store)
    reader = fills.start(source, REPO, Digest.of(data))
    await reader.wait_started()
    chunks = reader.read(0, len(data))
    await asyncio.sleep(0.1)
    await source.queue.put(data[:1000])  # the first chunk, a while after the body began
    first = await asyncio.wait_for(anext(chunks), 10)
    assert first == data[:1000], "the bytes come, the rest of the body not yet sent"
    await source.queue.put(data[1000:])
    await source.queue.put(None)
    assert first + await collect(chunks) == data
    reader.close()
    await fills.aclose()


@pytest.mark.parametrize(("first", "expected"), [(500, [0.2, 0.4, 0.8]), (2 * 1024 * 1024, [0.0, 0.2, 0.4, 0.8])])
async def test_cuts_with_nothing_new_between_them_are_resumed_after_growing_pauses(
    store: DirectoryStore, monkeypatch: pytest.MonkeyPatch, first: int, expected: list[float]
) -> None:
    """An outage of a few seconds: three resumes within a second had failed every download in
    flight before the upstream came back. A cut after a try that brought a piece is resumed at
    once and leaves the three for the outage."""
    monkeypatch.setattr(fill_module, "RESUME_PAUSE", 0.2)
    pauses: list[float] = []
    sleep = asyncio.sleep

    async def recorded(delay: float) -> None:
        pauses.append(delay)
        await sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    data = os.urandom(first + 2000)
    source = FedSource(len(data))
    fills = Fills(store)
    reader = fills.start(source, REPO, Digest.of(data))
    await reader.wait_started()
    reading = asyncio.ensure_future(collect(reader.read(0, len(data))))
    await source.queue.put(data[:first])
    for _ in range(len(expected)):
        await source.queue.put(UpstreamUnavailable("test", "cut"))
    await source.queue.put(data[first:])
    await source.queue.put(None)
    assert await asyncio.wait_for(reading, 30) == data
    assert pauses == expected
    reader.close()
    await fills.aclose()


async def test_wrong_bytes_abort_the_reader_before_its_last_byte(store: DirectoryStore) -> None:
    data = os.urandom(1000)
    digest = Digest.of(data)
    source = FedSource(len(data))
    fills = Fills(store)
    reader = fills.start(source, REPO, digest)
    await reader.wait_started()
    got = bytearray()

    async def read() -> None:
        async for chunk in reader.read(0, 1000):
            got.extend(chunk)

    task = asyncio.ensure_future(read())
    await source.queue.put(bytes(1000))  # right length, wrong bytes
    await source.queue.put(None)
    with pytest.raises(FillAborted):
        await task
    assert len(got) < 1000
    reader.close()
    assert store.size_of(digest) is None


async def test_upstream_not_found_reaches_the_first_reader_as_itself(store: DirectoryStore) -> None:
    source = FedSource(10)
    source.missing = True
    reader = Fills(store).start(source, REPO, Digest.of(b"nope"))
    with pytest.raises(UpstreamNotFound):
        await reader.wait_started()
    reader.close()


async def test_a_reader_that_leaves_does_not_stop_the_fill(store: DirectoryStore) -> None:
    data = os.urandom(5000)
    digest = Digest.of(data)
    source = FedSource(len(data))
    fills = Fills(store)
    reader = fills.start(source, REPO, digest)
    await reader.wait_started()
    reader.close()  # the only client went away
    await source.queue.put(data)
    await source.queue.put(None)
    await until(lambda: store.size_of(digest) == 5000)


async def test_shutdown_cancels_fills_and_removes_temporaries(store: DirectoryStore, tmp_path: Path) -> None:
    data = os.urandom(100)
    source = FedSource(len(data))
    fills = Fills(store)
    reader = fills.start(source, REPO, Digest.of(data))
    await reader.wait_started()
    await source.queue.put(data[:50])
    await until(lambda: any((tmp_path / "tmp").iterdir()))
    await fills.aclose()
    reader.close()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert len(fills) == 0


class SlowTemporaries(DirectoryStore):
    """A store whose temporaries take ``seconds`` to create (a slow or busy disk)."""

    def __init__(self, root: Path, seconds: float) -> None:
        super().__init__(root)
        self.seconds = seconds

    def begin(self, digest: Digest) -> PendingBlob:
        time.sleep(self.seconds)
        return super().begin(digest)


async def test_shutdown_while_a_temporary_is_created_leaves_none(tmp_path: Path) -> None:
    """The thread creating the temporary goes on after the fill is cancelled: the fill waits
    for it and removes what it made."""
    store = SlowTemporaries(tmp_path, 0.3)
    data = os.urandom(100)
    fills = Fills(store)
    reader = fills.start(FedSource(len(data)), REPO, Digest.of(data))
    await asyncio.sleep(0.1)  # the thread is in begin()
    await fills.aclose()
    reader.close()
    await asyncio.sleep(0.4)  # long enough for a thread left behind to have made its file
    assert list((tmp_path / "tmp").iterdir()) == []
    assert len(fills) == 0


async def test_a_reader_cancelled_mid_read_releases_the_file(store: DirectoryStore) -> None:
    data = os.urandom(4000)
    digest = Digest.of(data)
    source = FedSource(len(data))
    fills = Fills(store)
    reader = fills.start(source, REPO, digest)
    await reader.wait_started()
    fill = reader._fill
    reading = asyncio.ensure_future(collect(reader.read(0, 4000)))
    await source.queue.put(data[:1000])
    await asyncio.sleep(0.02)
    reading.cancel()  # the client went away mid-body
    reader.close()
    await source.queue.put(data[1000:])
    await source.queue.put(None)
    await until(lambda: store.size_of(digest) == 4000)
    await until(lambda: fill._pending is None)  # the file descriptor was handed back
    assert len(fills) == 0


class QueuedSource(FedSource):
    """An upstream whose download slot comes only when the test says."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.slot = asyncio.Event()

    @asynccontextmanager
    async def open_blob(self, repository: RepositoryName, digest: Digest, offset: int = 0) -> AsyncIterator[BlobBody]:
        await self.slot.wait()
        async with super().open_blob(repository, digest, offset) as body:
            yield body


async def test_fills_waiting_for_a_slot_or_a_404_hold_no_file(store: DirectoryStore, tmp_path: Path) -> None:
    """Any client may ask for digests the upstream does not have: each fill opened its
    temporary before it waited for a download slot, 200 of them 200 files and descriptors."""
    source = QueuedSource(10)
    source.missing = True
    fills = Fills(store)
    readers = [fills.start(source, REPO, Digest.of(os.urandom(8))) for _ in range(20)]
    await asyncio.sleep(0.05)
    assert list((tmp_path / "tmp").iterdir()) == [], "queued: no file yet"
    source.slot.set()
    for reader in readers:
        with pytest.raises(UpstreamNotFound):
            await reader.wait_started()
        reader.close()
    await until(lambda: len(fills) == 0)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert source.opened == [0] * 20


async def test_a_queued_fill_is_dropped_once_its_last_reader_left_and_only_then(store: DirectoryStore) -> None:
    """A client that left gives up its place; a reader closed otherwise (a request the server's
    stop cut) does not, nor may anyone drop a fill a prefetch counts on."""
    source = QueuedSource(10)
    fills = Fills(store)
    data = os.urandom(10)
    digest, kept = Digest.of(os.urandom(8)), Digest.of(data)
    leaving = fills.start(source, REPO, digest)
    waiting = fills.join(digest)
    assert waiting is not None
    leaving.leave()
    assert fills.digests == [digest], "one reader still waits for it"
    waiting.close()
    assert fills.digests == [digest], "closed, not left: it goes on"
    last = fills.join(digest)
    assert last is not None
    last.leave()
    assert fills.digests == [], "every reader left before its download began: dropped"

    client = fills.start(source, REPO, kept)
    prefetch = fills.join(kept)
    assert prefetch is not None
    prefetch.keep()
    prefetch.close()
    client.leave()
    assert fills.digests == [kept], "a prefetch counts on it"
    source.slot.set()
    await source.queue.put(data)
    await source.queue.put(None)
    await until(lambda: store.size_of(kept) == 10)
    assert source.opened == [0], "the dropped fill never asked the upstream; the kept one did"


async def test_the_sweep_of_stale_temporaries_spares_a_running_fill(tmp_path: Path) -> None:
    """A dead process's temporaries go; a fill of this process whose file nothing wrote for
    long (its upstream holding the body back) keeps its temporary, and stores its blob."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    cache = Cache(store, index)
    data = os.urandom(3000)
    source = FedSource(len(data))
    reader = cache.fills.start(source, REPO, Digest.of(data))
    assert await asyncio.wait_for(reader.wait_started(), 5) == len(data)
    (running,) = (tmp_path / "tmp").iterdir()
    dead = tmp_path / "tmp" / f"sha256-{'0' * 64}-dead.partial"  # a process that died beside
    dead.write_bytes(b"half a layer")
    hours_ago = time.time() - 2 * 3600
    for path in (running, dead):
        os.utime(path, (hours_ago, hours_ago))
    await cache.sweep_stale_temporaries()
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [running.name]
    source.queue.put_nowait(data)
    source.queue.put_nowait(None)
    assert await collect(reader.read(0, len(data))) == data
    reader.close()
    await until(lambda: store.size_of(Digest.of(data)) == len(data))
    await cache.aclose()
    index.close()
