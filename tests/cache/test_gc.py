"""GC: blobs no stored manifest reaches are swept once older than the grace period; everything
an image or an index refers to stays, and so does anything young."""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moorage.cache import collect_garbage
from moorage.cache._evict import ReadGuard
from moorage.cache._gc import sweep
from moorage.cache._index import Index
from moorage.cache._store import DirectoryStore, Fingerprint, StoredBlob
from moorage.upstreams.reference import OCI_IMAGE_INDEX, OCI_IMAGE_MANIFEST, Digest


def put(store: DirectoryStore, data: bytes, age: float = 7200) -> Digest:
    digest = Digest.of(data)
    pending = store.begin(digest)
    pending.write(data)
    pending.commit()
    pending.close()
    os.utime(store.path_of(digest), (time.time() - age, time.time() - age))
    return digest


def image(store: DirectoryStore, layers: list[Digest], config: Digest) -> Digest:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MANIFEST,
            "config": {"digest": str(config), "size": 1},
            "layers": [{"digest": str(d), "size": 1} for d in layers],
        }
    ).encode()
    return put(store, body)


def test_sweeps_only_what_no_manifest_reaches(tmp_path: Path) -> None:
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    layer, config, child_layer, child_config = (put(store, os.urandom(100)) for _ in range(4))
    orphan, young_orphan = put(store, os.urandom(100)), put(store, os.urandom(100), age=60)
    tagged = image(store, [layer], config)
    child = image(store, [child_layer], child_config)
    top = put(store, json.dumps({"mediaType": OCI_IMAGE_INDEX, "manifests": [{"digest": str(child)}]}).encode())
    index.put_manifest(tagged, OCI_IMAGE_MANIFEST)
    index.put_manifest(top, OCI_IMAGE_INDEX)  # the child is reached through the index only
    index.close()

    dry = collect_garbage(tmp_path, dry_run=True)
    assert dry.swept == [str(orphan)] and store.size_of(orphan) is not None

    report = collect_garbage(tmp_path)
    assert report.swept == [str(orphan)]
    assert report.kept_young == 1 and store.size_of(young_orphan) is not None
    for digest in (layer, config, tagged, top, child, child_layer, child_config):
        assert store.size_of(digest) is not None, digest
    assert store.size_of(orphan) is None
    assert report.roots == 2 and report.reachable == 7


def test_the_blobs_of_an_oci_artifact_manifest_are_kept(tmp_path: Path) -> None:
    """ORAS 1.0 and notation pushed artifact manifests, which list their content under
    ``blobs``; ACR, Zot and Harbor still serve them. gc read only config and layers, and
    swept an artifact's blobs while its manifest stayed cached."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    signature, orphan = put(store, os.urandom(100)), put(store, os.urandom(100))
    body = json.dumps(
        {
            "mediaType": "application/vnd.oci.artifact.manifest.v1+json",
            "artifactType": "application/vnd.cncf.notary.signature",
            "blobs": [{"mediaType": "application/jose+json", "digest": str(signature), "size": 100}],
        }
    ).encode()
    artifact = put(store, body)
    index.put_manifest(artifact, "application/vnd.oci.artifact.manifest.v1+json")
    report = sweep(store, index, grace_seconds=0)
    assert report.swept == [str(orphan)]
    assert store.size_of(signature) is not None


def test_a_blob_written_before_the_clock_stepped_back_is_not_young(tmp_path: Path) -> None:
    """A file time ahead of now was written before the clock was stepped back (NTP correcting a
    clock that ran ahead): unreachable garbage it is, and it was kept as young for as long as
    the step, as was a blob read before it (the guard holds that read's time)."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    written_ahead, read_ahead = put(store, os.urandom(100), age=-86400), put(store, os.urandom(100))
    ahead = time.time() + 86400
    guard = ReadGuard()
    guard._reads[read_ahead] = ahead
    report = sweep(store, index, grace_seconds=3600, accessed={read_ahead: ahead}, guard=guard)
    assert sorted(report.swept) == sorted([str(written_ahead), str(read_ahead)]) and report.kept_young == 0
    assert store.size_of(written_ahead) is None and store.size_of(read_ahead) is None


def test_a_blob_written_or_read_while_the_walk_ran_is_young(tmp_path: Path) -> None:
    """A pass reads the time once, then walks the store (minutes, for a large one): what was
    written or read meanwhile is a little ahead of that time. Taken for a clock stepped back,
    it was swept despite the grace period, and a read the guard had just seen was forgotten,
    so its file went before the client opened it."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    written, read = put(store, os.urandom(100), age=-30), put(store, os.urandom(100))
    guard = ReadGuard()
    guard._reads[read] = time.time() + 2
    guard.prune()
    report = sweep(store, index, grace_seconds=3600, accessed={read: time.time() + 30}, guard=guard)
    assert report.swept == [] and report.kept_young == 2
    assert store.size_of(written) is not None
    assert guard.remove_unless_read(store.path_of(read), read) is None, "a read the guard saw keeps its file"


def test_an_interrupted_collection_counts_what_it_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in a long `moorage gc` left the store's totals counting every file it had
    removed, for good: no start counts the store again after a gc, and the cap read them."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    orphans = [put(store, os.urandom(100)) for _ in range(10)]
    known = {d: Fingerprint.of(store.path_of(d).stat()) for d in orphans}
    index.write_batch({}, {}, fingerprints=known, counted_totals=store.count())
    index.close()
    removing = ReadGuard.remove_unless_read
    calls = 0

    def interrupted_at_the_fourth(guard: ReadGuard, path: Path, digest: Digest) -> int | None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return removing(guard, path, digest)

    monkeypatch.setattr(ReadGuard, "remove_unless_read", interrupted_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        collect_garbage(tmp_path)
    index = Index(tmp_path / "index")
    assert index.store_totals() == store.count() == (700, 7)
    removed = [d for d in orphans if store.size_of(d) is None]
    assert len(removed) == 3 and all(index.fingerprint(d) is None for d in removed), "forgotten too"
    index.close()


def test_a_collection_holds_nothing_the_garbage_collector_tracks_per_reachable_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc holds every blob a manifest reaches while it walks the store. As Digest objects, each
    tracked by Python's cyclic garbage collector, a million of them made its full passes pause
    a serving daemon's event loop for most of a second."""
    store, index = DirectoryStore(tmp_path), Index(tmp_path / "index")
    layers = 20_000
    manifest = image(store, [Digest.of(b"%d" % n) for n in range(layers)], put(store, b"{}"))
    index.put_manifest(manifest, OCI_IMAGE_MANIFEST)
    tracked_while_walking: list[int] = []
    walk = store.entries

    def counting_walk() -> Iterator[StoredBlob]:
        gc.collect()  # everything reachable is marked and held by now
        tracked_while_walking.append(len(gc.get_objects()))
        return walk()

    monkeypatch.setattr(store, "entries", counting_walk)
    gc.collect()
    tracked_before = len(gc.get_objects())
    report = sweep(store, index, grace_seconds=0)
    assert report.reachable == layers + 2, "the layers, the config and the manifest"
    assert tracked_while_walking and tracked_while_walking[0] - tracked_before < layers // 10
    index.close()
