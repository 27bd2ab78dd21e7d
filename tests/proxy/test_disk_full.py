"""A disk that fills up (the store on a 2 MiB tmpfs): the fill that cannot be written fails
cleanly (never a complete-looking response, nothing partial kept), an evicting pass frees
space, and content already stored keeps being served."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import moorage.cache._evict as evict_module
from moorage.cache import DirectoryStore, open_cache
from moorage.cache.errors import StoreFailure
from moorage.config import ConfigError, StorageSettings
from moorage.upstreams.reference import Digest
from tests.fakes import FakeRegistry
from tests.integration.harness.tools import in_ci
from tests.polling import until

from .conftest import StartMoorage, advance_clock, metric, until_settled

KiB = 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("the disk-full test mounts a tmpfs and needs root")
        pytest.skip("needs root to mount a small tmpfs")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.logs_errors("bookkeeping not written")  # the disk may still be full at the stop
async def test_a_full_disk_fails_the_fill_cleanly_and_evicts(
    start_moorage: StartMoorage, upstream: FakeRegistry, small_disk: Path
) -> None:
    moorage = await start_moorage(storage={"path": str(small_disk / "store")})
    stored = [upstream.add_blob(os.urandom(400 * KiB)) for _ in range(4)]
    for digest in stored:  # 1.6 MiB of the 2 MiB disk
        assert len(await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()) == 400 * KiB
    await until_settled(moorage)
    too_big = upstream.add_blob(os.urandom(800 * KiB))
    response = await moorage.get(f"/v2/alpine/blobs/{too_big}")
    if response.status == 200:  # the headers went out before the disk filled: the body is cut
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    else:
        assert response.status == 503
        assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert await metric(moorage, "moorage_store_write_failures_total") >= 1
    tmp = small_disk / "store" / "tmp"
    await until(lambda: not any(tmp.iterdir()))  # nothing partial kept: a thread removes it
    assert not (small_disk / "store" / "blobs" / "sha256" / too_big[7:9] / too_big[7:]).exists()
    await disk_full_pass_ended(moorage)
    upstream.reset_requests()
    kept = [d for d in stored if (small_disk / "store" / "blobs" / "sha256" / d[7:9] / d[7:]).exists()]
    assert kept, "the pass frees some space, not everything"
    body = await (await moorage.get(f"/v2/alpine/blobs/{kept[-1]}")).read()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == kept[-1]
    assert upstream.requests == [], "stored content is still served from the store"


async def test_a_manifest_that_cannot_be_stored_is_served_all_the_same(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Verified against its digest, it is the right answer; only keeping it failed (here a file
    stands where its directory must go, which even root cannot write through)."""
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store)})
    image = upstream.add_image("library/alpine", "3.19")
    blocking = store / "blobs" / "sha256" / image.digest[7:9]
    blocking.parent.mkdir(parents=True, exist_ok=True)
    blocking.write_text("not a directory")
    response = await moorage.get("/v2/alpine/manifests/3.19")
    assert response.status == 200 and await response.read() == image.manifest
    assert response.headers["Docker-Content-Digest"] == image.digest
    assert await metric(moorage, "moorage_store_write_failures_total") == 1
    failures = [r for r in caplog.records if getattr(r, "event", "") == "store_write_failed"]
    assert [getattr(r, "digest", None) for r in failures] == [image.digest]
    upstream.reset_requests()
    assert (await moorage.get("/v2/alpine/manifests/3.19")).status == 200
    assert upstream.count("GET", "/manifests/") == 1, "not kept, so asked for again"


async def test_readiness_fails_when_blobs_cannot_be_put_in_place(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """A writable tmp/ is not enough: a read-only blobs/ (a remount after disk errors) keeps
    every manifest and blob out of the store."""
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("the read-only store test mounts a file system and needs root")
        pytest.skip("needs root to mount a read-only file system")
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store)})
    assert (await moorage.get("/readyz")).status == 200
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(store / "blobs")]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    try:
        readiness = await moorage.get("/readyz")
        assert readiness.status == 503
        assert f"cannot write in {store / 'blobs'}" in await readiness.text()
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(store / "blobs")], check=False)
    assert (await moorage.get("/readyz")).status == 200


@pytest.mark.logs_errors("bookkeeping not written")  # a flush while the disk is full, or at the stop
async def test_a_full_disk_keeps_the_cache_ready_and_starts_a_pass(
    start_moorage: StartMoorage, upstream: FakeRegistry, small_disk: Path
) -> None:
    """What is stored is still served on a full disk: failing readiness would take the pod out
    of its Service, and with no traffic no failed fill would ever start the pass that frees
    space. The probe starts it, and leaves no file of its own behind."""
    moorage = await start_moorage(storage={"path": str(small_disk / "store")})
    stored = [upstream.add_blob(os.urandom(300 * KiB)) for _ in range(4)]
    for digest in stored:
        assert len(await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()) == 300 * KiB
    await until_settled(moorage)
    fill_up(small_disk)
    readiness = await moorage.get("/readyz")
    assert readiness.status == 200, await readiness.text()
    assert (await readiness.json())["store"] == "disk full"
    await disk_full_pass_ended(moorage)
    assert [p.name for p in (small_disk / "store" / "tmp").iterdir()] == [], "no probe left behind"
    kept = [d for d in stored if (small_disk / "store" / "blobs" / "sha256" / d[7:9] / d[7:]).exists()]
    assert 0 < len(kept) < len(stored), "the least recently used went"
    upstream.reset_requests()
    assert len(await (await moorage.get(f"/v2/alpine/blobs/{kept[-1]}")).read()) == 300 * KiB
    assert upstream.requests == []


async def disk_full_pass_ended(moorage: TestClient[web.Request, web.Application]) -> None:
    """Wait for the eviction pass a full disk starts in the background."""
    for _ in range(250):
        if await metric(moorage, "moorage_evictions_total", reason="disk_full") >= 1:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no eviction pass after the disk filled up")


def fill_up(disk: Path) -> None:
    """Take every free byte of ``disk``."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (64 * KiB, 1):  # then byte by byte, up to the last free one
            with contextlib.suppress(OSError):
                while os.write(descriptor, b"\0" * size):
                    pass
    finally:
        os.close(descriptor)


@pytest.mark.logs_errors("bookkeeping not written")  # at the stop too, on the disk still full
async def test_a_tag_confirmed_while_the_index_cannot_write_is_still_answered(
    start_moorage: StartMoorage,
    upstream: FakeRegistry,
    small_disk: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite's disk full: the upstream's HEAD confirmed the stored answer, so it is the answer,
    not a 500, and the full disk is counted and starts eviction like the store's. The pass that
    follows takes the image's layer, not the manifest just confirmed.

    The layer's read counts as long ago: a file found in the store is kept for 5 s after (the
    read guard), and whether the layer's GET found it there or followed its fill depended on
    the machine's timing, which made the pass take the manifest instead, now and then."""
    monkeypatch.setattr(evict_module, "RECENT_SECONDS", 0.0)
    moorage = await start_moorage(tag_ttl="1h", storage={"path": str(small_disk / "store")})
    image = upstream.add_image("library/alpine", "3.19", layers=[os.urandom(200 * KiB)])
    assert (await moorage.get("/v2/alpine/manifests/3.19")).status == 200
    layer = image.layer_digests[0]
    assert len(await (await moorage.get(f"/v2/alpine/blobs/{layer}")).read()) == 200 * KiB
    assert (await moorage.head(f"/v2/alpine/blobs/{layer}")).status == 200  # found in the store, whatever the timing
    fill_up(small_disk)
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    for pull in range(3):
        response = await moorage.get("/v2/alpine/manifests/3.19")
        assert response.status == 200, await response.text()
        assert await response.read() == image.manifest
        if pull == 0:  # the pass has ended before the next pull, the order a busy machine may give
            await disk_full_pass_ended(moorage)
    assert not (small_disk / "store" / "blobs" / "sha256" / layer[7:9] / layer[7:]).exists()
    assert upstream.count("HEAD", "/manifests/") == 1 and upstream.count("GET", "/manifests/") == 0
    assert await metric(moorage, "moorage_cache_results_total", kind="manifest", result="revalidated") == 1
    assert await metric(moorage, "moorage_store_write_failures_total") >= 1
    assert [r for r in caplog.records if getattr(r, "event", "") == "store_write_failed"]


@pytest.mark.logs_errors("bookkeeping not written")  # the disk may still be full at the stop
async def test_a_tag_the_index_cannot_record_is_remembered_in_memory(
    start_moorage: StartMoorage, upstream: FakeRegistry, small_disk: Path
) -> None:
    """The manifest is in the store, only the index is full: later pulls of the tag are not
    each another upstream GET (a Docker Hub pull) for as long as the disk stays full, and the
    eviction pass the full disk starts takes the layer, not that manifest."""
    moorage = await start_moorage(storage={"path": str(small_disk / "store")})
    image = upstream.add_image("library/alpine", "3.19", layers=[os.urandom(200 * KiB)])
    assert (await moorage.get(f"/v2/alpine/manifests/{image.digest}")).status == 200  # stored by digest
    assert len(await (await moorage.get(f"/v2/alpine/blobs/{image.layer_digests[0]}")).read()) == 200 * KiB
    fill_up(small_disk)
    for pull in range(3):
        response = await moorage.get("/v2/alpine/manifests/3.19")
        assert response.status == 200 and await response.read() == image.manifest
        if pull == 0:  # the pass has ended before the next pull, the order a busy machine may give
            await disk_full_pass_ended(moorage)
    assert upstream.count("GET", "/manifests/3.19") == 1
    assert await metric(moorage, "moorage_store_write_failures_total") >= 1


@pytest.mark.logs_errors("bookkeeping not written")
async def test_a_large_tag_list_is_answered_when_the_index_cannot_keep_it(
    start_moorage: StartMoorage, upstream: FakeRegistry, small_disk: Path
) -> None:
    """diskcache keeps values from 32 KiB up in files of their own: a full disk fails them with
    OSError, not SQLite's error, and the page in hand is answered all the same."""
    moorage = await start_moorage(storage={"path": str(small_disk / "store")})
    image = upstream.add_image("library/alpine", "3.19")
    for number in range(2500):  # some 45 KiB of JSON
        upstream.add_manifest("library/alpine", f"release-{number:05d}", image.manifest, image.media_type)
    assert (await moorage.get("/v2/")).status == 200  # the store and index are open
    fill_up(small_disk)
    response = await moorage.get("/v2/alpine/tags/list")
    assert response.status == 200, await response.text()
    assert len((await response.json())["tags"]) == 2501
    assert await metric(moorage, "moorage_store_write_failures_total") >= 1


@pytest.mark.logs_errors("bookkeeping not written")
async def test_a_disk_others_filled_costs_the_store_one_pass_not_one_per_failed_pull(
    start_moorage: StartMoorage, upstream: FakeRegistry, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each fill that fails on a full disk asked for a pass, and pass after pass emptied the
    store though nothing it stored had filled the disk again."""
    caplog.set_level("INFO")
    moorage = await start_moorage(storage={"path": str(small_disk / "store")})
    stored = [upstream.add_blob(os.urandom(300 * KiB)) for _ in range(4)]
    for digest in stored:
        assert len(await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()) == 300 * KiB
    await until_settled(moorage)
    fill_up(small_disk)  # another writer
    for pull in range(4):
        digest = upstream.add_blob(os.urandom(200 * KiB))
        response = await moorage.get(f"/v2/alpine/blobs/{digest}")
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await response.read()
        if pull == 0:  # the first failure's pass has ended: the later ones are what it throttles
            await disk_full_pass_ended(moorage)
        await until_settled(moorage)
    passes = [r for r in caplog.records if getattr(r, "event", "") == "evicted"]
    assert [r.__dict__["reason"] for r in passes] == ["disk_full"]
    kept = [d for d in stored if (small_disk / "store" / "blobs" / "sha256" / d[7:9] / d[7:]).exists()]
    assert len(kept) >= 3, "one pass takes the least recently used 15 %, not the store"


async def test_a_restart_on_a_full_disk_says_so_and_what_to_do(
    start_moorage: StartMoorage, upstream: FakeRegistry, small_disk: Path
) -> None:
    """A daemon killed on a full disk (an OOM kill, a pod evicted) crashed at every start with
    a traceback of SQLite's, which never freed the space."""
    store = small_disk / "store"
    first = await start_moorage(storage={"path": str(store)})
    digest = upstream.add_blob(os.urandom(300 * KiB))
    assert len(await (await first.get(f"/v2/alpine/blobs/{digest}")).read()) == 300 * KiB
    await until_settled(first)
    await first.close()
    fill_up(small_disk)
    with pytest.raises(ConfigError) as refused:
        async with open_cache(StorageSettings(path=store)):
            pass
    assert f"storage.path: cannot use {store} as the store: the index" in str(refused.value)
    assert "free space on its volume" in str(refused.value)


def test_a_full_disk_is_said_with_the_store_and_the_space_left_there(small_disk: Path) -> None:
    """A write that failed for space named the blob alone: not which disk is full, nor how
    full, the two things an operator acts on."""
    store = DirectoryStore(small_disk / "store")
    data = os.urandom(3 * 1024 * KiB)  # beyond the 2 MiB disk
    pending = store.begin(Digest.of(data))
    try:
        with pytest.raises(StoreFailure) as full:
            pending.write(data)
    finally:
        pending.discard()
    assert full.value.disk_full
    assert f"No space left on device (the store at {small_disk / 'store'} has 0 B free)" in str(full.value)
