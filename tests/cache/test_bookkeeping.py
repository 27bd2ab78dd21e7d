"""Bookkeeping (usage counters, pull times, routes) is written in batches; a batch the index
cannot take (a full disk) is kept and written with the next one, never lost and never fatal."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from moorage.cache import Cache, DirectoryStore
from moorage.cache._index import Index
from moorage.cache._keys import pulled_key
from moorage.upstreams.reference import Digest, RepositoryName, Tag
from tests.polling import until


class FailingOnce(Index):
    """An index whose first batch write fails, as SQLite does on a full disk."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.failures = 1

    def write_batch(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        return super().write_batch(*args, **kwargs)


async def test_a_batch_the_index_refused_is_written_with_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, index = DirectoryStore(tmp_path), FailingOnce(tmp_path / "index")
    cache = Cache(store, index)
    key = pulled_key("docker.io", RepositoryName("library/alpine"), Tag("3.19"))
    digest = Digest.of(b"a layer")
    cache.record("docker.io", "hit", 100)
    cache._pulled[key] = 1000.0
    cache._routes.learn(digest, ("docker.io", "library/alpine"))
    cache._observer.on_stored("blob", 10)
    await cache.flush()  # refused: logged, kept
    assert index.usage() == {}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "bookkeeping not written; kept for the next try"
    ]
    caplog.clear()  # the one error this test expects
    cache.record("docker.io", "hit", 50)
    await cache.flush()
    usage: Mapping[str, Mapping[str, int]] = index.usage()
    assert usage["docker.io"]["hit"] == 2 and usage["docker.io"]["served_bytes"] == 150, "nothing lost"
    assert index.pulled_at(key) == 1000.0
    assert index.routes(digest) == (("docker.io", "library/alpine"),)
    assert index.store_totals() == (10, 1), "the store size too, once"
    await cache.aclose()
    index.close()


async def test_the_store_size_is_added_once_by_flushes_that_overlap(tmp_path: Path) -> None:
    """Each flush adds what was stored since the last one (so that a command run beside the
    daemon is not overwritten); two at once, as a lifecycle pass and the timer may start
    them, must not add it twice."""
    index = Index(tmp_path / "index")
    cache = Cache(DirectoryStore(tmp_path), index)
    cache._observer.on_stored("blob", 100)
    await asyncio.gather(cache.flush(), cache.flush())
    assert index.store_totals() == (100, 1)
    await cache.aclose()
    index.close()


class HeldUp(Index):
    """An index whose batch writes wait until the test lets them go."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.writing = threading.Event()
        self.go = threading.Event()

    def write_batch(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        self.writing.set()
        assert self.go.wait(10)
        return super().write_batch(*args, **kwargs)


async def test_a_flush_cancelled_at_shutdown_adds_the_store_size_once(tmp_path: Path) -> None:
    """Shutdown cancels the timer's flush while its thread writes; the thread finishes the
    batch regardless, and the last flush must not add the same change again."""
    index = HeldUp(tmp_path / "index")
    cache = Cache(DirectoryStore(tmp_path), index)
    cache._observer.on_stored("blob", 100)
    flushing = asyncio.ensure_future(cache.flush())
    assert await asyncio.to_thread(index.writing.wait, 10)
    flushing.cancel()
    await asyncio.sleep(0.05)
    index.go.set()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    await until(lambda: index.store_totals() is not None)  # the thread wrote the batch
    await cache.aclose()  # the last flush
    assert index.store_totals() == (100, 1)
    index.close()


async def test_an_eviction_walks_count_is_written_as_it_is(tmp_path: Path) -> None:
    """The walk counts what is on disk, so its count goes into the index as it is, not as a
    change: a command beside the daemon had already taken out what it removed, and adding
    the walk's difference would take it out twice."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    blobs = [put(store, os.urandom(1000) + bytes([i])) for i in range(3)]
    index.write_batch({}, {}, counted_totals=store.count())
    cache = Cache(store, index, max_size=10 * 1024 * 1024)
    store.path_of(blobs[0]).unlink()  # moorage gc, in another process
    index.write_batch({}, {}, (-1001, -1))
    await cache.evict()  # the walk finds two blobs
    await cache.flush()
    assert index.store_totals() == (2002, 2) == (cache.store_bytes, cache.store_entries)
    await cache.aclose()
    index.close()


def put(store: DirectoryStore, data: bytes) -> Digest:
    digest = Digest.of(data)
    pending = store.begin(digest)
    pending.write(data)
    pending.commit()
    pending.close()
    return digest
