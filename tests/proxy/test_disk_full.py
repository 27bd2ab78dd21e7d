"""A disk that fills up (the store on a 2 MiB tmpfs): the fill that cannot be written fails
cleanly (never a complete-looking response, nothing partial kept), an evicting pass frees
space, and content already stored keeps being served."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import FakeRegistry
from tests.integration.harness.tools import in_ci

from .conftest import StartMoorage, metric

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


async def test_a_full_disk_fails_the_fill_cleanly_and_evicts(
    start_moorage: StartMoorage, upstream: FakeRegistry, small_disk: Path
) -> None:
    moorage = await start_moorage(storage={"path": str(small_disk / "store")})
    stored = [upstream.add_blob(os.urandom(400 * KiB)) for _ in range(4)]
    for digest in stored:  # 1.6 MiB of the 2 MiB disk
        assert len(await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()) == 400 * KiB
    too_big = upstream.add_blob(os.urandom(800 * KiB))
    response = await moorage.get(f"/v2/alpine/blobs/{too_big}")
    if response.status == 200:  # the headers went out before the disk filled: the body is cut
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    else:
        assert response.status == 503
        assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert await metric(moorage, "moorage_store_write_failures_total") >= 1
    assert not any((small_disk / "store" / "tmp").iterdir()), "nothing partial kept"
    assert not (small_disk / "store" / "blobs" / "sha256" / too_big[7:9] / too_big[7:]).exists()
    for _ in range(100):  # the pass runs in the background
        if await metric(moorage, "moorage_evictions_total", reason="disk_full") >= 1:
            break
        await asyncio.sleep(0.02)
    assert await metric(moorage, "moorage_evictions_total", reason="disk_full") >= 1
    upstream.reset_requests()
    kept = [d for d in stored if (small_disk / "store" / "blobs" / "sha256" / d[7:9] / d[7:]).exists()]
    assert kept, "the pass frees some space, not everything"
    body = await (await moorage.get(f"/v2/alpine/blobs/{kept[-1]}")).read()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == kept[-1]
    assert upstream.requests == [], "stored content is still served from the store"
