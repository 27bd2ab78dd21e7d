"""How long a walk of a large store stalls the event loop (``python -m tests.bench.walk_pause``).

An eviction pass and a gc pass hold every stored blob at once, on a thread. Whatever that
thread does in one call into C (a sort, freeing a million objects, a full pass of Python's
cyclic garbage collector, which runs in whichever thread allocates) holds the GIL, and the
serving loop waits. This runs both passes in a thread over a synthetic store of ``--blobs``
blobs (no files: the store and the index answer from memory) while the loop ticks every
5 ms, and prints one JSON line per pass: its time, the loop's longest stall and the
collector's full passes. The reference is the same loop ticking with no pass, measured in the
same run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from moorage.cache._evict import ReadGuard, evict_to
from moorage.cache._gc import sweep
from moorage.cache._store import StoredBlob
from moorage.upstreams.reference import OCI_IMAGE_MANIFEST, Digest, parse_digest

TICK = 0.005
#: An image of ten blobs (a config and nine layers): 100,000 manifests in a store of a million.
LAYERS_PER_MANIFEST = 10


class SyntheticStore:
    """Blobs named by counting, answered from memory: images of ``LAYERS_PER_MANIFEST`` blobs,
    a manifest and its config and layers, every blob reached by one manifest."""

    def __init__(self, blobs: int) -> None:
        self.names = [hashlib.sha256(b"%d" % n).hexdigest() for n in range(blobs)]
        layers = blobs - blobs // LAYERS_PER_MANIFEST
        self.manifests = {f"sha256:{name}": n for n, name in enumerate(self.names[layers:])}

    def entries(self) -> Iterator[StoredBlob]:
        now, last_use = time.time(), random.Random(0)  # a walk by name meets uses in no order
        for name in self.names:
            yield StoredBlob(parse_digest(f"sha256:{name}"), 1_000, now - last_use.uniform(0, 30 * 86_400))

    def path_of(self, digest: Digest) -> Path:
        return Path("/nonexistent") / digest.encoded

    def read_small(self, digest: Digest, limit: int) -> bytes | None:
        first = self.manifests.get(str(digest))
        if first is None:
            return None
        layers = self.names[first * (LAYERS_PER_MANIFEST - 1) : (first + 1) * (LAYERS_PER_MANIFEST - 1)]
        return json.dumps(
            {"mediaType": OCI_IMAGE_MANIFEST, "layers": [{"digest": f"sha256:{name}"} for name in layers]}
        ).encode()


class KeepingGuard(ReadGuard):
    def remove_unless_read(self, path: Path, digest: Digest) -> int | None:
        return None  # the pass decides and orders everything, and removes nothing


class SyntheticIndex:
    def __init__(self, store: SyntheticStore) -> None:
        self.store = store

    def manifest_digests(self) -> set[str]:
        return set(self.store.manifests)

    def forget(self, digests: set[Digest]) -> int:
        return 0


async def stall_during(walk: Callable[[], object] | None, seconds: float = 2.0) -> dict[str, float]:
    """The loop's longest stall while ``walk`` runs on a thread (or for ``seconds`` idle)."""
    loop = asyncio.get_running_loop()
    longest = 0.0
    running = True

    async def tick() -> None:
        nonlocal longest
        while running:
            started = time.perf_counter()
            await asyncio.sleep(TICK)
            longest = max(longest, time.perf_counter() - started - TICK)

    ticker = loop.create_task(tick())
    full_passes = gc.get_stats()[2]["collections"]
    started = time.perf_counter()
    if walk is None:
        await asyncio.sleep(seconds)
    else:
        await loop.run_in_executor(None, walk)
    took = time.perf_counter() - started
    running = False
    await ticker
    return {
        "seconds": round(took, 2),
        "longest_stall_ms": round(longest * 1000, 1),
        "full_gc_passes": gc.get_stats()[2]["collections"] - full_passes,
    }


async def main(blobs: int) -> None:
    store = SyntheticStore(blobs)
    index = SyntheticIndex(store)
    walks: dict[str, Callable[[], object] | None] = {
        "idle": None,
        "eviction pass": lambda: evict_to(store, index, 0, set(), {}, KeepingGuard()),  # type: ignore[arg-type]
        "gc pass": lambda: sweep(store, index, grace_seconds=0, dry_run=True).reachable,  # type: ignore[arg-type]
    }
    for name, walk in walks.items():
        gc.collect()
        print(json.dumps({"walk": name, "blobs": blobs, **await stall_during(walk)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=1_000_000)
    asyncio.run(main(parser.parse_args().blobs))
