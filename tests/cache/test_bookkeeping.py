"""Bookkeeping (usage counters, pull times, routes) is written in batches; a batch the index
cannot take (a full disk) is kept and written with the next one, never lost and never fatal."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from moorage.cache import Cache, DirectoryStore
from moorage.cache._index import Index, ReferrersEntry, TagEntry, TagsEntry
from moorage.cache._keys import FORMAT_KEY, STORE_FORMAT, pulled_key, tags_list_key
from moorage.cache._lifecycle import plan, read_images
from moorage.cache._routes import MAX_ROUTES_PER_DIGEST
from moorage.cache._serving import ServingLock, Started
from moorage.cache._store import StoredBlob
from moorage.cache.errors import IndexFailure
from moorage.config import LifecyclePolicy
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
    cache._observer.on_stored("blob", 10, Digest.of(b"10"))
    manifest = Digest.of(b"a manifest the index no longer records")
    cache._unrecorded[manifest] = "application/vnd.oci.image.manifest.v1+json"
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
    assert index.manifest_media_type(manifest) == "application/vnd.oci.image.manifest.v1+json"
    await cache.aclose()
    index.close()


async def test_the_store_size_is_added_once_by_flushes_that_overlap(tmp_path: Path) -> None:
    """Each flush adds what was stored since the last one (so that a command run beside the
    daemon is not overwritten); two at once, as a lifecycle pass and the timer may start
    them, must not add it twice."""
    index = Index(tmp_path / "index")
    cache = Cache(DirectoryStore(tmp_path), index)
    cache._observer.on_stored("blob", 100, Digest.of(b"100"))
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
    cache._observer.on_stored("blob", 100, Digest.of(b"100"))
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


class WalkHeldUp(DirectoryStore):
    """A store whose walk (an eviction pass's, or a recount's) waits for the test, before or
    after it lists the files."""

    def __init__(self, root: Path, *, listed_first: bool) -> None:
        super().__init__(root)
        self.listed_first = listed_first
        self.held = False
        self.walking = threading.Event()
        self.go = threading.Event()

    def entries(self) -> Iterator[StoredBlob]:
        if not self.held:
            yield from super().entries()
            return
        listed = list(super().entries()) if self.listed_first else None
        self.walking.set()
        assert self.go.wait(10)
        yield from listed if listed is not None else super().entries()


@pytest.mark.parametrize("walk", ["evict", "recount"])
@pytest.mark.parametrize("seen_by_walk", [True, False], ids=["stored_before_listing", "stored_after_listing"])
async def test_a_blob_stored_while_the_store_is_walked_is_counted_once(
    tmp_path: Path, walk: str, seen_by_walk: bool
) -> None:
    """The walk counts what it finds, and what was stored meanwhile is added: a blob put in
    place before the walk listed its directory is in both, and was counted twice (a store of
    1 GB reported as 2, evicted below its cap at the next pass)."""
    store = WalkHeldUp(tmp_path, listed_first=not seen_by_walk)
    index = Index(tmp_path / "index")
    put(store, os.urandom(1000))
    index.write_batch({}, {}, counted_totals=store.count())
    cache = Cache(store, index, max_size=10 * 1024 * 1024)
    store.held = True
    walking = asyncio.ensure_future(cache.evict() if walk == "evict" else cache.recount())
    assert await asyncio.to_thread(store.walking.wait, 10)
    stored = put(store, os.urandom(3000))  # a fill put it in place...
    cache._observer.on_stored("blob", 3000, stored)  # ...and the event loop counts it
    store.go.set()
    await walking
    store.held = False
    assert (cache.store_bytes, cache.store_entries) == store.count() == (4000, 2)
    await cache.aclose()
    index.close()


async def test_a_store_over_the_cap_while_a_pass_runs_gets_another_pass(tmp_path: Path) -> None:
    """A pass walks the store once: what was stored after the walk listed it, and took the
    store over its cap, is left to the next pass. It used to come only with the next store,
    so the store stayed over its cap for as long as pulls stopped there."""
    store = WalkHeldUp(tmp_path, listed_first=True)
    index = Index(tmp_path / "index")
    for age in range(5):
        old = put(store, os.urandom(1000))
        os.utime(store.path_of(old), (time.time() - 3600 + age, time.time() - 3600 + age))
    index.write_batch({}, {}, counted_totals=store.count())
    cache = Cache(store, index, max_size=10_000)  # high watermark 9,500, low 8,500
    store.held = True
    taking_over = put(store, os.urandom(4800))
    cache._observer.on_stored("blob", 4800, taking_over)  # 9,800: a pass starts
    assert await asyncio.to_thread(store.walking.wait, 10)
    during = put(store, os.urandom(3000))
    cache._observer.on_stored("blob", 3000, during)  # 12,800 while the pass walks
    store.go.set()
    assert cache.size_cap.running is not None
    await cache.size_cap.running
    store.held = False
    on_disk = store.count()
    assert on_disk[0] <= 9500, f"{on_disk[0]} bytes stored under a cap of 10,000"
    assert (cache.store_bytes, cache.store_entries) == on_disk
    assert store.size_of(taking_over) is not None and store.size_of(during) is not None, "the oldest went"
    await cache.aclose()
    index.close()


async def test_a_bookkeeping_write_that_finds_the_disk_full_starts_an_eviction_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With no fill failing (nothing pulled just then, or every pull a hit) nothing else would
    free space, and the bookkeeping would fail every 10 s until a pull did."""
    store, index = DirectoryStore(tmp_path), FailingOnce(tmp_path / "index")
    blobs = [put(store, os.urandom(1000) + bytes([i])) for i in range(4)]
    for age, digest in enumerate(blobs):
        os.utime(store.path_of(digest), (time.time() - 3600 + age, time.time() - 3600 + age))
    cache = Cache(store, index)
    cache.totals.bytes, cache.totals.entries = store.count()
    await cache.flush()  # SQLite's disk full
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "bookkeeping not written; kept for the next try"
    ]
    caplog.clear()  # the one error this test expects
    assert cache.size_cap.running is not None, "a pass was asked for"
    await cache.size_cap.running
    assert store.size_of(blobs[0]) is None and store.size_of(blobs[-1]) is not None, "the oldest went"
    await cache.aclose()
    index.close()


async def test_what_another_daemon_stored_past_the_cap_starts_a_pass_here(tmp_path: Path) -> None:
    """Two daemons on one store: the totals the other wrote arrive with this one's flush, and
    may take the store over its cap while this one stores nothing (a quiet replica)."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    put(store, os.urandom(3000))
    index.write_batch({}, {}, counted_totals=store.count())
    cache = Cache(store, index, max_size=10_000)
    put(store, os.urandom(9000))  # the other daemon's blob, and its flush
    index.write_batch({}, {}, (9000, 1))
    await cache.flush()
    assert cache.store_bytes == 12_000
    assert cache.size_cap.running is not None, "a pass was asked for"
    await cache.size_cap.running
    assert store.count()[0] <= 9500
    await cache.aclose()
    index.close()


def put(store: DirectoryStore, data: bytes) -> Digest:
    digest = Digest.of(data)
    pending = store.begin(digest)
    pending.write(data)
    pending.commit()
    pending.close()
    return digest


async def test_tag_list_pages_in_memory_stay_within_their_bytes(tmp_path: Path) -> None:
    """Pages asked for with n or last are kept in memory; a page may be megabytes, and any
    client can ask for 1,024 different ones."""
    index = Index(tmp_path / "index")
    cache = Cache(DirectoryStore(tmp_path), index)
    listings = cache.listings
    page = TagsEntry(b"x" * (1024 * 1024), None, 0.0)
    for number in range(100):
        listings._keep_page(("tags", "docker.io", "team/app", str(number), ""), page)
    assert listings._pages_bytes == sum(len(p.body or b"") for p in listings._pages.values()) <= 32 * 1024 * 1024
    assert ("tags", "docker.io", "team/app", "99", "") in listings._pages, "the newest stays"
    big = TagsEntry(b"x" * (5 * 1024 * 1024), None, 0.0)
    listings._keep_page(("tags", "docker.io", "team/app", "big", ""), big)
    assert ("tags", "docker.io", "team/app", "big", "") not in listings._pages
    await cache.aclose()
    index.close()


def test_a_tag_list_stored_by_an_earlier_version_is_read_with_its_next_page(tmp_path: Path) -> None:
    """Stores written before next pages were queries hold (body, next last, next n, fetched
    at): read as three, every kept list gave a 500 after an upgrade."""
    index = Index(tmp_path / "index")
    key = tags_list_key("docker.io", RepositoryName("team/app"), "")
    assert key == ("tags", "docker.io", "team/app", "", ""), "the key such stores used"
    index._db.set(key, (b'{"tags": ["a"]}', "a b", "2", 5.0))
    assert index.tags(key) == TagsEntry(b'{"tags": ["a"]}', "last=a+b&n=2", 5.0)
    index._db.set(key, (b'{"tags": []}', None, None, 6.0))
    assert index.tags(key) == TagsEntry(b'{"tags": []}', None, 6.0)
    index.put_tags(key, TagsEntry(b"{}", "next_page=x", 7.0))
    assert index.tags(key) == TagsEntry(b"{}", "next_page=x", 7.0)
    index.close()


@pytest.mark.parametrize(
    "value",
    [
        ("sha256:" + "a" * 64, "type", 1.0, 2.0),
        ("not a digest", "type", 1.0),
        ("sha256:" + "a" * 64, None, "yesterday"),
        (b"{}", 3, 1.0),
        "a string",
        7,
        [b"{}", None, 1.0],
    ],
)
def test_an_entry_of_another_layout_reads_as_not_cached(tmp_path: Path, value: object) -> None:
    """A value this version cannot read (a later version's layout after a rollback, a damaged
    entry) raised on every read: every pull of that tag, or of that tag list, was a 500 until
    the store was emptied. Read as absent, it is fetched again and written anew."""
    index = Index(tmp_path / "index")
    tag = ("tag", "docker.io", "library/alpine", "3", "image")
    tags = tags_list_key("docker.io", RepositoryName("library/alpine"), "")
    referrers = ("referrers", "docker.io", "library/alpine", "sha256:" + "b" * 64, "")
    for key in (tag, tags, referrers):
        index._db.set(key, value)
    assert index.tag(tag) is None
    assert index.tags(tags) is None
    assert index.referrers(referrers) is None
    index.close()


def test_a_tag_of_another_layout_leaves_the_lifecycle_pass_to_the_rest(tmp_path: Path) -> None:
    """Lifecycle policies read tag entries as they walk the index: one it could not read
    raised, and failed every lifecycle pass until that tag was pulled again."""
    index = Index(tmp_path / "index")
    store = DirectoryStore(tmp_path / "store")
    kept = Digest.of(b"kept")
    index.put_manifest(kept, "application/vnd.oci.image.manifest.v1+json")
    index.put_tag(("tag", "docker.io", "team/app", "1", "image"), TagEntry(kept, "m", 10.0))
    index._db.set(("tag", "docker.io", "team/app", "2", "image"), ("sha256:" + "a" * 64, None, "yesterday"))
    (image,) = read_images(store, index)["docker.io", "team/app"]
    assert image.digest == kept and image.tags == frozenset({"1"}) and image.pushed_at == 10.0
    index.close()


@pytest.mark.parametrize("written", [STORE_FORMAT + 1, "2", 1.5])
def test_a_format_this_version_does_not_know_is_refused(tmp_path: Path, written: object) -> None:
    """A later version may write its format otherwise; one that is not this version's, or an
    earlier one, is no store this version can read."""
    index = Index(tmp_path / "index")
    index._db.set(FORMAT_KEY, written)
    index.close()
    with pytest.raises(IndexFailure, match="was written by a later Moorage"):
        Index(tmp_path / "index")


def test_a_store_from_before_its_format_was_recorded_is_counted_once(tmp_path: Path) -> None:
    """Its daemons kept no mark of a clean stop (or, earlier, no totals): totals a crash left
    short stayed short for good, and the size cap acted on them. The first start marks the
    format and counts; later ones count only after a crash."""
    index = Index(tmp_path / "index")
    index._db.set(("store",), (100, 1))  # an earlier version's totals, no format
    assert index.begin_serving(1.0) is True, "no format written: counted as after a crash"
    assert index._db.get(FORMAT_KEY) == STORE_FORMAT
    index.end_serving()
    assert index.begin_serving(2.0) is False
    assert index.begin_serving(3.0) is True, "the mark of a run that did not end cleanly"
    index.close()


def test_a_store_from_before_its_format_is_counted_by_the_first_start_alone(tmp_path: Path) -> None:
    """A daemon of this version started beside one of an earlier version (a rolling upgrade)
    counts nothing, and recorded the format: the store was never counted. The format stays
    recorded (an earlier version must see it), and the count is owed to the next start alone."""
    index = Index(tmp_path / "index")
    index._db.set(("store",), (100, 1))  # an earlier version's totals, no format
    earlier = ServingLock(tmp_path, index)
    earlier._fd = os.open(tmp_path / "serving.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(earlier._fd, fcntl.LOCK_SH)  # an earlier version's daemon, serving
    beside = ServingLock(tmp_path, index)
    assert beside.acquire(1.0) == Started(alone=False, crashed=False)
    beside.release(clean=True)
    earlier.release(clean=True)  # the last to stop, cleanly: no serving mark is left
    assert index._db.get(FORMAT_KEY) == STORE_FORMAT
    first = ServingLock(tmp_path, index)
    assert first.acquire(2.0) == Started(alone=True, crashed=True), "the first start alone counts the store"
    first.release(clean=True)
    assert ServingLock(tmp_path, index).acquire(3.0) == Started(alone=True, crashed=False), "once"
    index.close()


def test_a_process_that_died_beside_another_leaves_the_next_start_alone_a_count(tmp_path: Path) -> None:
    """The serving mark is one for every process on the store: one killed before it flushed,
    the other stopping cleanly after it, took the mark away, and the totals the dead one had
    not written stayed short for good (a store at 150 % of its cap, never evicted)."""
    index = Index(tmp_path / "index")
    index._db.set(("store",), (100, 1))
    daemon = ServingLock(tmp_path, index)
    assert daemon.acquire(1.0) == Started(alone=True, crashed=True)  # totals with no format: counted
    daemon_counted = ServingLock(tmp_path, index)  # the same store served again, counted
    daemon.release(clean=True)
    assert daemon_counted.acquire(2.0) == Started(alone=True, crashed=False)
    warm = ServingLock(tmp_path, index)  # moorage warm --store beside it, then killed
    assert warm.acquire(3.0) == Started(alone=False, crashed=False)
    assert warm._fd is not None
    os.close(warm._fd)  # killed: the kernel drops its lock, nothing else happens
    daemon_counted.release(clean=True)  # the last to stop, cleanly: no serving mark is left
    after = ServingLock(tmp_path, index)
    assert after.acquire(4.0) == Started(alone=True, crashed=True), "the next start alone counts"
    after.release(clean=True)
    assert ServingLock(tmp_path, index).acquire(5.0) == Started(alone=True, crashed=False), "once"
    index.close()


def test_a_route_that_falls_out_of_the_bound_takes_its_referrers_list_along(tmp_path: Path) -> None:
    """A list kept for a route the index no longer knows could never be replaced, and came
    back after a restart with signatures the upstream had withdrawn."""
    index = Index(tmp_path / "index")
    digest = put(DirectoryStore(tmp_path), b"{}")
    index.put_manifest(digest, "application/vnd.oci.image.manifest.v1+json")
    key = ("referrers", "docker.io", "team/app", str(digest), "")
    assert index.put_referrers(key, ReferrersEntry(b"{}", None, 0.0), digest, ("docker.io", "team/app"))
    others = {digest: [("docker.io", f"copy/n{number}") for number in range(MAX_ROUTES_PER_DIGEST - 1)]}
    index.write_batch({}, {}, routes=others)
    assert index.referrers(key) is not None, "still one of the routes kept"
    index.write_batch({}, {}, routes={digest: [("docker.io", "copy/last")]})
    assert ("docker.io", "team/app") not in index.routes(digest)
    assert index.referrers(key) is None
    index.close()


def test_a_lifecycle_pass_reads_the_manifests_of_the_repositories_its_policies_cover_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass read every cached manifest before it asked which repositories a policy covers:
    on a store of 100,000 tags, every manifest at every pass, for a policy of one repository."""
    index = Index(tmp_path / "index")
    store = DirectoryStore(tmp_path / "store")
    images = {repository: put(store, repository.encode()) for repository in ("team/app", "other/one", "other/two")}
    for repository, digest in images.items():
        index.put_manifest(digest, "application/vnd.oci.image.manifest.v1+json")
        index.put_tag(("tag", "docker.io", repository, "1", "image"), TagEntry(digest, "m", 10.0))
    read: list[Digest] = []
    read_small = store.read_small

    def counted_read(digest: Digest, limit: int) -> bytes | None:
        read.append(digest)
        return read_small(digest, limit)

    monkeypatch.setattr(store, "read_small", counted_read)
    keep_five = {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 5}
    policy = LifecyclePolicy.model_validate(
        {"rules": [{"rulePriority": 1, "selection": keep_five, "action": {"type": "expire"}}]}
    )
    plan(store, index, lambda upstream, repository: policy if repository == "team/app" else None, now=time.time())
    assert read == [images["team/app"]]
    index.close()
