"""Index scale: start-up time and tag-lookup cost with a large synthetic index.

``python -m tests.bench.index DIR BLOBS TAGS`` fills an index with BLOBS manifest entries and
TAGS tags (blob files are not written: start-up never walks them once the store's totals are
kept), then prints one JSON line: start-up seconds, and microseconds per tag lookup with TAGS
tags and with 100.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from moorage.cache._cache import Cache, open_store
from moorage.cache._index import TagEntry
from moorage.cache._keys import tag_key
from moorage.upstreams.reference import OCI_IMAGE_MANIFEST, Digest, RepositoryName, Tag

BATCH = 50_000


def digest(i: int) -> Digest:
    return Digest("sha256", hashlib.sha256(str(i).encode()).hexdigest())


def fill(root: Path, blobs: int, tags: int) -> None:
    _, index = open_store(root)
    db = index._db
    for start in range(0, blobs, BATCH):
        with db.transact():
            for i in range(start, min(blobs, start + BATCH)):
                index.put_manifest(digest(i), OCI_IMAGE_MANIFEST)
    for start in range(0, tags, BATCH):
        with db.transact():
            for i in range(start, min(tags, start + BATCH)):
                key = tag_key("docker.io", RepositoryName(f"org/repo-{i % 5000}"), Tag(f"v{i}"), "index")
                index.put_tag(key, TagEntry(digest(i), OCI_IMAGE_MANIFEST, time.time()))
    index.write_batch({}, {}, counted_totals=(blobs * 1000, blobs))
    index.close()


def lookup_us(root: Path, tags: int) -> float:
    store, index = open_store(root)
    cache = Cache(store, index)
    keys = [
        tag_key("docker.io", RepositoryName(f"org/repo-{i % 5000}"), Tag(f"v{i}"), "index")
        for i in range(0, tags, max(1, tags // 2000))
    ]
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
