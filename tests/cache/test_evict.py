"""The size cap: a store filled past its cap shrinks to the low watermark, least recently used
first; content read in the last minute, or being filled, stays; evicted manifests take their
tag answers with them."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest

from moorage.cache._evict import ReadGuard, evict_to, touch
from moorage.cache._index import Index, TagEntry
from moorage.cache._keys import tag_key
from moorage.cache._store import DirectoryStore, Fingerprint, StoredBlob
from moorage.upstreams.reference import OCI_IMAGE_MANIFEST, Digest, RepositoryName, Tag
from tests.immutable import immutable

KiB = 1024


def put(store: DirectoryStore, data: bytes, age_seconds: float) -> Digest:
    digest = Digest.of(data)
    pending = store.begin(digest)
    pending.write(data)
    pending.commit()
    pending.close()
    when = time.time() - age_seconds
    os.utime(store.path_of(digest), (when, when))
    return digest


@pytest.mark.parametrize("sort_slice", [1 << 16, 3])
def test_least_recently_used_go_first_down_to_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sort_slice: int
) -> None:
    """Also with the store sorted in slices of three and merged, as a large one is."""
    monkeypatch.setattr("moorage.cache._evict.SORT_SLICE", sort_slice)
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    blobs = [put(store, os.urandom(100 * KiB) + bytes([i]), age_seconds=3600 - i * 60) for i in range(10)]
    result = evict_to(store, index, target_bytes=550 * KiB, protected=set(), accessed={}, guard=ReadGuard())
    assert result.evicted == tuple(blobs[:5]), "the five oldest"
    assert all(store.size_of(d) is None for d in blobs[:5])
    assert all(store.size_of(d) is not None for d in blobs[5:])
    assert result.store_bytes <= 550 * KiB and result.store_entries == 5
    assert result.freed_bytes == sum(100 * KiB + 1 for _ in range(5))
    # What an operator reads to tell a cap below what clients use: the fifth had sat 56 min.
    assert result.newest_removed_use is not None
    assert 3360 - 5 < time.time() - result.newest_removed_use < 3360 + 60


def test_reads_not_yet_written_back_count_and_recent_or_filling_blobs_stay(tmp_path: Path) -> None:
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    old, read_lately, filling, read_before = (put(store, os.urandom(100 * KiB), age_seconds=3600) for _ in range(4))
    accessed = {read_lately: time.time() - 1, read_before: time.time() - 600}
    guard = ReadGuard()
    guard.looking(read_lately, lambda: store.size_of(read_lately))  # a client just found it
    result = evict_to(store, index, target_bytes=0, protected={filling}, accessed=accessed, guard=guard)
    assert set(result.evicted) == {old, read_before}
    assert result.evicted[0] == old, "read ten minutes ago is younger than written an hour ago"
    assert store.size_of(read_lately) is not None and store.size_of(filling) is not None


def test_an_evicted_manifest_takes_its_tags_along(tmp_path: Path) -> None:
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    manifest = put(store, b'{"schemaVersion": 2}', age_seconds=3600)
    kept = put(store, b'{"schemaVersion": 2, "kept": true}', age_seconds=0)
    index.put_manifest(manifest, OCI_IMAGE_MANIFEST)
    gone_key = tag_key("docker.io", RepositoryName("library/a"), Tag("1"), "index")
    kept_key = tag_key("docker.io", RepositoryName("library/b"), Tag("1"), "index")
    index.put_tag(gone_key, TagEntry(manifest, OCI_IMAGE_MANIFEST, time.time()))
    index.put_tag(kept_key, TagEntry(kept, OCI_IMAGE_MANIFEST, time.time()))
    evict_to(store, index, target_bytes=40, protected=set(), accessed={}, guard=ReadGuard())
    assert index.tag(gone_key) is None and index.manifest_media_type(manifest) is None
    assert index.tag(kept_key) is not None


def test_content_in_use_goes_last_and_only_down_to_the_ceiling(tmp_path: Path) -> None:
    """An image being pulled (stored lately, or named by a manifest just served) is not taken
    apart to reach the target: older content goes first, and it only as far as the ceiling."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    old = [put(store, os.urandom(100 * KiB) + bytes([i]), age_seconds=7200 - i) for i in range(3)]
    in_use = [put(store, os.urandom(100 * KiB) + bytes([i]), age_seconds=3600 - i) for i in range(5)]
    kwargs = {"protected": set(), "accessed": {}, "guard": ReadGuard(), "recent": set(in_use)}
    result = evict_to(store, index, target_bytes=300 * KiB, ceiling_bytes=450 * KiB, **kwargs)  # type: ignore[arg-type]
    assert set(result.evicted) == {*old, in_use[0]}, "all the old content, then in-use content to the ceiling"
    assert result.store_bytes <= 450 * KiB and result.store_bytes > 300 * KiB
    assert all(store.size_of(d) is not None for d in in_use[1:])


def test_manifests_of_images_just_pulled_outlast_their_layers(tmp_path: Path) -> None:
    """Two images pulled one after the other into a cache too small for both: a client reads a
    manifest before its layers, so by last use the manifests went first and took their tags
    (an upstream GET, which Docker Hub counts as a pull) while the layers stayed."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    images = []
    for image, started in ((1, 60), (2, 30)):  # seconds ago: both pulled in the last minutes
        manifest = put(store, b'{"schemaVersion": 2, "image": %d}' % image, age_seconds=started)
        layers = [put(store, os.urandom(200 * KiB) + bytes([image, i]), age_seconds=started - 10 - i) for i in range(2)]
        index.put_manifest(manifest, OCI_IMAGE_MANIFEST)
        images.append((manifest, layers))
    (first_manifest, first_layers), (second_manifest, second_layers) = images
    in_use = {first_manifest, second_manifest, *first_layers, *second_layers}
    kwargs = {"protected": set(), "accessed": {}, "guard": ReadGuard(), "recent": in_use}
    manifests = {first_manifest, second_manifest}
    result = evict_to(store, index, 300 * KiB, ceiling_bytes=450 * KiB, manifests=manifests, **kwargs)  # type: ignore[arg-type]
    assert set(result.evicted) == set(first_layers), "the older image's layers, nothing else"
    assert store.size_of(first_manifest) is not None and store.size_of(second_manifest) is not None
    assert index.manifest_media_type(second_manifest) == OCI_IMAGE_MANIFEST
    assert all(store.size_of(d) is not None for d in second_layers)


def test_a_file_the_cache_may_not_change_is_skipped_and_the_rest_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One such file failed every bookkeeping write (its read times, the store's totals, pull
    times) and every eviction pass, for good: the cap was never kept again."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    oldest, older, newer = (put(store, os.urandom(100 * KiB), age_seconds=3600 - i) for i in range(3))
    with immutable(store.path_of(oldest)):
        now = time.time()
        known = {digest: Fingerprint.of(store.path_of(digest).stat()) for digest in (oldest, older)}
        renewed = touch(store, index, {oldest: now, older: now - 30}, trusted=known)
        assert set(renewed) == {older}, "the other reads are recorded"
        assert store.path_of(older).stat().st_mtime == pytest.approx(now - 30)
        result = evict_to(store, index, target_bytes=200 * KiB, protected=set(), accessed={}, guard=ReadGuard())
        assert result.evicted == (newer,), "the next least recently read goes in its place"
        assert store.size_of(oldest) is not None and store.size_of(older) is not None
        evict_to(store, index, target_bytes=0, protected=set(), accessed={}, guard=ReadGuard())
    logged = [r for r in caplog.records if getattr(r, "event", "") == "store_file_unwritable"]
    assert [getattr(r, "path", "") for r in logged] == [str(store.path_of(oldest))], "once, with the file"
    index.close()


def test_a_blob_larger_than_the_target_goes_first_however_recent(tmp_path: Path) -> None:
    """It can never stay under the cap: taking the least recently used first emptied the
    store around it before reaching it."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    small = [put(store, os.urandom(30 * KiB) + bytes([i]), age_seconds=3600) for i in range(5)]
    big = put(store, os.urandom(1024 * KiB), age_seconds=0)
    result = evict_to(store, index, target_bytes=255 * KiB, protected=set(), accessed={}, guard=ReadGuard())
    assert result.evicted == (big,)
    assert all(store.size_of(digest) is not None for digest in small)
    index.close()


def test_a_pass_holds_nothing_the_garbage_collector_tracks_per_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass holds every stored blob at once. Held as StoredBlob and Digest objects, each one
    tracked by Python's cyclic garbage collector, a million of them made every full pass of the
    collector (run by whichever thread allocates, the event loop's too) pause the daemon for up
    to 2.7 s, and the pause grows with the store."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    blobs = 20_000
    monkeypatch.setattr(
        store, "entries", lambda: (StoredBlob(Digest.of(b"%d" % n), 1, 1000.0 + n) for n in range(blobs))
    )
    tracked_while_deleting: list[int] = []

    class CountingGuard(ReadGuard):
        def remove_unless_read(self, path: Path, digest: Digest) -> int | None:
            if not tracked_while_deleting:  # every blob walked, sorted and held
                gc.collect()
                tracked_while_deleting.append(len(gc.get_objects()))
            return None  # every file stays

    gc.collect()
    tracked_before = len(gc.get_objects())
    evict_to(store, index, target_bytes=0, protected=set(), accessed={}, guard=CountingGuard())
    assert tracked_while_deleting, "the pass reached its deletes"
    assert tracked_while_deleting[0] - tracked_before < blobs // 10
    index.close()
