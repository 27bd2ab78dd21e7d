"""Index scale: start-up time and tag-lookup cost with a large synthetic index.

``python -m tests.bench.index DIR BLOBS TAGS`` fills an index with BLOBS manifest entries and
TAGS tags (blob files are not written: start-up never walks them once the store's totals are
kept), then prints one JSON line: start-up seconds, and microseconds per tag lookup with TAGS
tags and with 100.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import pickle
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import diskcache

from moorage.cache._cache import Cache, open_store
from moorage.cache._keys import IndexKey, manifest_key, tag_key
from moorage.upstreams.reference import OCI_IMAGE_MANIFEST, Digest, RepositoryName, Tag

BATCH = 50_000


def digest(i: int) -> Digest:
    return Digest("sha256", hashlib.sha256(str(i).encode()).hexdigest())


def tag_of(i: int) -> IndexKey:
    return tag_key("docker.io", RepositoryName(f"org/repo-{i % 5000}"), Tag(f"v{i}"), "index")


def entries(blobs: int, tags: int) -> Iterator[tuple[IndexKey, object]]:
    """The index entries, as the cache writes them: manifests, then tags."""
    for i in range(blobs):
        yield manifest_key(digest(i)), OCI_IMAGE_MANIFEST
    now = time.time()
    for i in range(tags):
        yield tag_of(i), (str(digest(i)), OCI_IMAGE_MANIFEST, now)


def pickled_key(key: IndexKey) -> bytes:
    """A key as diskcache stores it (``pickletools.optimize`` of its pickle), made directly:
    without a memo the pickle of a tuple of distinct strings is already that, and ``optimize``
    cost a third of a fill. ``fill`` checks it against diskcache on a sample."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.fast = True
    pickler.dump(key)
    return out.getvalue()


def fill(root: Path, blobs: int, tags: int) -> None:
    """An index of ``blobs`` manifests and ``tags`` tags, in diskcache's own table format.
    One ``set`` per entry took 164 s for a million here, most of a benchmark run, so the rows
    are inserted in batches, each made as ``Disk.put``/``Disk.store`` make it (the keys
    checked against ``Disk.put`` on a sample); diskcache's triggers keep its count."""
    _, index = open_store(root)
    index.write_batch({}, {}, counted_totals=(blobs * 1000, blobs))
    disk = index._db.disk
    for key, _ in itertools.islice(entries(blobs, tags), 1000):
        assert pickled_key(key) == disk.put(key)[0], f"diskcache pickles {key!r} otherwise"
    for key in (tag_of(i) for i in range(min(tags, 1000))):
        assert pickled_key(key) == disk.put(key)[0], f"diskcache pickles {key!r} otherwise"
    index.close()
    connection = sqlite3.connect(root / "index" / diskcache.core.DBNAME)
    # A throwaway index: no fsync, and pages in memory while the random keys go in.
    connection.execute("PRAGMA synchronous = OFF")
    connection.execute("PRAGMA cache_size = -1048576")
    now = time.time()
    rows = (
        (pickled_key(key), False, now, None, now, 0, None, *disk.store(value, False, key=key))
        for key, value in entries(blobs, tags)
    )
    with connection:
        while batch := list(itertools.islice(rows, BATCH)):
            connection.executemany(
                "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
                " size, mode, filename, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
    connection.close()
    _, index = open_store(root)
    count = len(index._db)
    index.close()
    assert count == blobs + tags + 2, f"{count} entries in the index, not {blobs + tags + 2} (with totals and format)"


def lookup_us(root: Path, tags: int) -> float:
    store, index = open_store(root)
    cache = Cache(store, index)
    keys = [tag_of(i) for i in range(0, tags, max(1, tags // 2000))]
    for key in keys[:100]:
        cache._lookup_tag(key)  # warm the page cache
    started = time.perf_counter()
    for key in keys:
        entry, _ = cache._lookup_tag(key)
        assert entry is not None
    elapsed = time.perf_counter() - started
    index.close()
    return elapsed / len(keys) * 1e6


def main() -> None:
    root, blobs, tags = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    small = root.with_name(root.name + "-small")
    started = time.monotonic()
    fill(root, blobs, tags)
    fill(small, 100, 100)
    filled = time.monotonic() - started
    started = time.perf_counter()
    store, index = open_store(root)
    Cache(store, index)
    startup = time.perf_counter() - started
    index.close()
    print(
        json.dumps(
            {
                "blobs": blobs,
                "tags": tags,
                "fill_seconds": round(filled, 1),
                "startup_seconds": round(startup, 4),
                "lookup_us_large": round(lookup_us(root, tags), 1),
                "lookup_us_small": round(lookup_us(small, 100), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
