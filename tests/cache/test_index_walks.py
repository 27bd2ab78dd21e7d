"""Walks of the whole index (garbage collection, eviction, lifecycle policies, ``ls``): their
work grows with the index, not with its square, and the write lock is not held through them."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest

import moorage.cache._catalog as catalog_module
import moorage.cache._verify as verify_module
from moorage.cache import DirectoryStore, read_catalog, verify_store
from moorage.cache._index import DELETE_BATCH, Index, TagEntry
from moorage.cache._keys import blob_key, image_key, manifest_key, pulled_key, routes_key
from moorage.upstreams.reference import Digest, parse_digest

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(number: int) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(str(number).encode()).hexdigest())


def filled(directory: Path, blobs: int) -> Index:
    """An index as a store of ``blobs`` layers and one tagged image per ten of them leaves it."""
    index = Index(directory)
    with index._db.transact():
        for number in range(blobs):
            index._db.set(blob_key(digest_of(number)), (1000, 1, 2))
            index._db.set(routes_key(digest_of(number)), (("docker.io", "library/x"),))
        for number in range(blobs // 10):
            manifest = digest_of(-number - 1)
            index._db.set(manifest_key(manifest), MANIFEST)
            index.put_tag(("tag", "docker.io", f"r{number}", "1", "image"), TagEntry(manifest, MANIFEST, 1.0))
            index._db.set(image_key("docker.io", f"r{number}", manifest), 1.0)
    return index


def work_of_a_walk(index: Index) -> int:
    """SQLite's virtual machine steps (in thousands) to list every tag: a count, not a time."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    connection = index._db._con
    connection.set_progress_handler(count, 1000)
    try:
        assert sum(1 for _ in index.tag_entries()) > 0
    finally:
        connection.set_progress_handler(None, 0)
    return steps


def test_a_walk_of_the_index_grows_with_its_size_not_its_square(tmp_path: Path) -> None:
    """diskcache's key-ordered walk asked again from the top for each hundred keys: 4 s for
    80,000 keys, most of an hour for a store of a million blobs, on every garbage collection,
    eviction of a manifest, lifecycle pass and ``ls``."""
    small = filled(tmp_path / "small", 4_000)
    large = filled(tmp_path / "large", 16_000)
    ratio = work_of_a_walk(large) / work_of_a_walk(small)
    small.close()
    large.close()
    assert ratio < 6, f"four times the keys took {ratio:.1f} times the work"


def test_forgetting_a_manifest_leaves_the_index_writable_while_it_walks(tmp_path: Path) -> None:
    """The walk for the tags of a manifest that left the store ran inside a write transaction:
    on an index of 230,000 keys every tag and manifest recorded waited 34 s for it, and every
    pull with them, cached blobs too."""
    index = filled(tmp_path / "index", 2_000)
    other = diskcache.Cache(str(tmp_path / "index"), timeout=0)  # a write that would wait fails at once
    written = []
    walk = index._walk

    def walking_while_another_writes() -> Iterator[Any]:
        for number, key in enumerate(walk()):
            if number % 500 == 0:
                other.set(("probe", number), 1.0)
                written.append(number)
            yield key

    gone = digest_of(-1)
    index._walk = walking_while_another_writes  # type: ignore[method-assign]
    dropped = index.forget({gone})
    assert written, "the walk ran"
    assert dropped == 1
    assert index.tag(("tag", "docker.io", "r0", "1", "image")) is None
    assert index._db.get(image_key("docker.io", "r0", gone)) is None
    assert index.tag(("tag", "docker.io", "r1", "1", "image")) is not None, "other tags stay"
    other.close()
    index.close()


def test_forgetting_many_blobs_writes_in_batches_not_one_long_transaction(tmp_path: Path) -> None:
    """An eviction pass removing 393,000 blobs deleted their entries in one transaction, and
    held the index's write lock for 36 s: every pull recording a tag waited, and with them the
    threads cached pulls and readiness checks needed. Every entry still goes."""
    index = filled(tmp_path / "index", 3_000)
    deletes: list[int] = [0]
    transact, delete = index._db.transact, index._db.delete

    @contextlib.contextmanager
    def counted() -> Iterator[Any]:
        deletes.append(0)
        with transact():
            yield

    def counting(key: Any) -> bool:
        deletes[-1] += 1
        return bool(delete(key))

    index._db.transact = counted
    index._db.delete = counting
    digests = {digest_of(number) for number in range(3_000)} | {digest_of(-number - 1) for number in range(300)}
    assert index.forget(digests) == 300
    assert max(deletes) <= DELETE_BATCH < sum(deletes)
    index._db.transact, index._db.delete = transact, delete
    assert list(index._walk()) == [], "every entry of every blob and image went"
    index.close()


def test_a_tag_pointed_elsewhere_during_the_walk_is_kept(tmp_path: Path) -> None:
    """The tag was fetched again meanwhile and names another manifest now: not the one that left."""
    index = filled(tmp_path / "index", 100)
    gone, fresh = digest_of(-1), digest_of(-1000)
    key = ("tag", "docker.io", "r0", "1", "image")
    walk = index._walk

    def walk_then_repoint() -> Iterator[Any]:
        yield from walk()
        index.put_tag(key, TagEntry(fresh, MANIFEST, 2.0))

    index._walk = walk_then_repoint  # type: ignore[method-assign]
    assert index.forget({gone}) == 0
    entry = index.tag(key)
    assert entry is not None and entry.digest == fresh
    index.close()


def test_a_tag_pointed_elsewhere_as_the_deletes_begin_is_kept(tmp_path: Path) -> None:
    """The tag is repointed after the walk found it, before its delete: the delete looks again."""
    index = filled(tmp_path / "index", 100)
    gone, fresh = digest_of(-1), digest_of(-1000)
    key = ("tag", "docker.io", "r0", "1", "image")
    transact = index._db.transact
    transactions = 0

    @contextlib.contextmanager
    def repointing_at_the_last() -> Iterator[Any]:
        nonlocal transactions
        transactions += 1
        if transactions == 3:  # forget's deletes: blob entries, manifests, then what the walk found
            index.put_tag(key, TagEntry(fresh, MANIFEST, 2.0))
        with transact():
            yield

    index._db.transact = repointing_at_the_last
    assert index.forget({gone}) == 0
    assert transactions >= 3, "the tag was repointed"
    entry = index.tag(key)
    assert entry is not None and entry.digest == fresh
    index.close()


def test_a_manifest_pulled_again_during_the_walk_keeps_its_tag_and_image(tmp_path: Path) -> None:
    """A client pulls the image again while its eviction walks the index: the manifest, its tag
    and its image are written anew, and stay (else the next pull of the tag costs the upstream
    a counted GET, and ls and lifecycle policies miss the image)."""
    index = filled(tmp_path / "index", 100)
    gone = digest_of(-1)
    key = ("tag", "docker.io", "r0", "1", "image")
    walk = index._walk

    def walk_while_pulled_again() -> Iterator[Any]:
        for number, found in enumerate(walk()):
            if number == 10:
                index.put_manifest(gone, MANIFEST)
                index.add_image(image_key("docker.io", "r0", gone), 3.0)
                index.put_tag(key, TagEntry(gone, MANIFEST, 3.0))
            yield found

    index._walk = walk_while_pulled_again  # type: ignore[method-assign]
    assert index.forget({gone}) == 0
    entry = index.tag(key)
    assert entry is not None and entry.digest == gone
    assert index._db.get(image_key("docker.io", "r0", gone)) is not None
    assert index._db.get(manifest_key(gone)) is not None
    index.close()


@pytest.mark.parametrize("walk", ["tag_entries", "manifest_digests"])
def test_walks_find_every_entry(tmp_path: Path, walk: str) -> None:
    index = filled(tmp_path / "index", 1_000)
    found = list(getattr(index, walk)())
    assert len(found) == 100
    index.close()


def test_the_index_is_on_disk_when_a_write_returns(tmp_path: Path) -> None:
    """With diskcache's default (synchronous=NORMAL) the write-ahead log reaches the disk only at
    checkpoints: a power loss, or a file system that aborts, took every tag recorded since
    (seen as an empty index after a file system error, the blobs left as garbage)."""
    index = Index(tmp_path / "index")
    assert index._db._sql("PRAGMA synchronous").fetchall() == [(2,)], "FULL"
    assert index._db._sql("PRAGMA journal_mode").fetchall() == [("wal",)]
    index.close()
    reopened = diskcache.Cache(str(tmp_path / "index"))  # a command's connection keeps it too
    assert reopened._sql("PRAGMA synchronous").fetchall() == [(2,)]
    reopened.close()


def test_a_scrub_that_quarantines_many_manifests_walks_the_index_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify --repair dropped each corrupt manifest's entries with a walk of the whole index:
    20 corrupt manifests took a scrub from 8 s to 41 s, a thousand (a damaged disk) hours."""
    store = DirectoryStore(tmp_path)
    index = Index(tmp_path / "index")
    manifests = [digest_of(-number - 1) for number in range(20)]
    for number, manifest in enumerate(manifests):
        path = store.path_of(manifest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{} not what its name says")
        index.put_manifest(manifest, MANIFEST)
        index.put_tag(("tag", "docker.io", f"r{number}", "1", "image"), TagEntry(manifest, MANIFEST, 1.0))
    index.write_batch({}, {}, counted_totals=(20 * 25, 20))
    index.close()
    walks = 0
    walk = Index._walk

    def counted(self: Index) -> Iterator[Any]:
        nonlocal walks
        walks += 1
        return walk(self)

    monkeypatch.setattr(Index, "_walk", counted)
    report = verify_store(tmp_path, repair=True)
    assert len(report.quarantined) == 20
    assert walks == 1
    index = Index(tmp_path / "index")
    assert list(index.tag_entries()) == [], "every tag of a quarantined manifest went"
    assert index.store_totals() == (0, 0)
    index.close()


def test_a_listing_by_pattern_reads_the_manifests_of_the_tags_it_names_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moorage ls PATTERN read every tag's manifests, then matched: 17 s for 20 tags of
    100,000. The short name of a Docker Hub official image still matches."""
    index = filled(tmp_path / "index", 1_000)
    index.put_tag(("tag", "docker.io", "library/alpine", "3", "image"), TagEntry(digest_of(-1), MANIFEST, 1.0))
    index.close()
    read: list[Digest] = []
    size_of = catalog_module._image_size

    def counted(store: DirectoryStore, digest: Digest, depth: int = 0) -> int | None:
        read.append(digest)
        return size_of(store, digest, depth)

    monkeypatch.setattr(catalog_module, "_image_size", counted)
    (listed,) = read_catalog(tmp_path, "alpine:3")
    assert (listed.upstream, listed.repository, listed.tag) == ("docker.io", "library/alpine", "3")
    assert read == [digest_of(-1)]


def test_a_manifest_pulled_again_after_its_quarantine_keeps_what_the_pull_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrub forgets what it quarantined in batches: a client that pulled the manifest again
    meanwhile had its tag and manifest entry deleted by the late forget, and its next pull of
    the tag cost the upstream a counted GET."""
    store = DirectoryStore(tmp_path)
    index = Index(tmp_path / "index")
    good = b'{"schemaVersion": 2}'
    pulled_again, forgotten = Digest.of(good), digest_of(-2)
    key, other = ("tag", "docker.io", "r0", "1", "image"), ("tag", "docker.io", "r1", "1", "image")
    for manifest, tag in ((pulled_again, key), (forgotten, other)):
        path = store.path_of(manifest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not what its name says")
        index.put_manifest(manifest, MANIFEST)
        index.put_tag(tag, TagEntry(manifest, MANIFEST, 1.0))
    index.close()
    quarantine = DirectoryStore.quarantine

    def quarantined_then_pulled_again(self: DirectoryStore, digest: Digest) -> bool:
        moved = quarantine(self, digest)
        if digest == pulled_again:
            self.path_of(digest).write_bytes(good)  # a client's pull puts it back, and its entries
            again = Index(tmp_path / "index")
            again.put_manifest(digest, MANIFEST)
            again.put_tag(key, TagEntry(digest, MANIFEST, 2.0))
            again.close()
        return moved

    monkeypatch.setattr(DirectoryStore, "quarantine", quarantined_then_pulled_again)
    report = verify_store(tmp_path, repair=True)
    assert len(report.quarantined) == 2
    index = Index(tmp_path / "index")
    kept = index.tag(key)
    assert kept is not None and kept.digest == pulled_again, "what the pull wrote stays"
    assert index.tag(other) is None, "the other quarantined manifest's tag went"
    index.close()


def test_what_a_scrub_quarantined_is_forgotten_within_its_seconds_not_at_the_next_quarantine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time bound was looked at only when another blob was quarantined: one corrupt
    manifest early in an hours-long scrub stayed tagged in the index to its end."""
    monkeypatch.setattr(verify_module, "FORGET_SECONDS", 0.0)
    store = DirectoryStore(tmp_path)
    index = Index(tmp_path / "index")
    manifest = digest_of(-1)
    index.put_manifest(manifest, MANIFEST)
    index.put_tag(("tag", "docker.io", "r0", "1", "image"), TagEntry(manifest, MANIFEST, 1.0))
    forgetting = verify_module._Forgetting(store, index)
    forgetting.add(manifest, 10)
    forgetting.due()  # the next blob walked, clean
    assert index.tag(("tag", "docker.io", "r0", "1", "image")) is None
    index.close()


def test_a_tag_that_left_with_its_manifest_leaves_no_pull_time_unless_answered_for_other_clients(
    tmp_path: Path,
) -> None:
    """Eviction dropped a tag's answers and kept its pull time: under a size cap that evicts
    short-lived CI tags, one row per tag ever pulled stayed for good, walked by every pass."""
    index = filled(tmp_path / "index", 30)
    gone, other = digest_of(-1), digest_of(-2)
    index._db.set(pulled_key("docker.io", "r0", "1"), 5.0)
    index._db.set(pulled_key("docker.io", "r1", "1"), 5.0)
    # r1:1 is also answered for clients that take indexes, with a manifest that stays.
    index.put_tag(("tag", "docker.io", "r1", "1", "index"), TagEntry(digest_of(-3), MANIFEST, 1.0))
    assert index.forget({gone, other}) == 2
    assert index.pulled_at(pulled_key("docker.io", "r0", "1")) is None
    assert index.pulled_at(pulled_key("docker.io", "r1", "1")) == 5.0, "the tag is still cached"
    index.close()
