"""moorage verify: a blob changed on disk after it was stored is found, quarantined with
--repair, and fetched again on the next pull; a clean store passes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from moorage.proxy._state import CACHE
from tests.fakes import FakeRegistry
from tests.immutable import immutable
from tests.polling import until

from .conftest import StartMoorage, metric, until_settled


def verify(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return command("verify", store, *args)


def command(name: str, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moorage.proxy", name, "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_corrupt_blob_is_found_quarantined_and_fetched_again(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    moorage = await start_moorage()
    blobs = [upstream.add_blob(os.urandom(200_000)) for _ in range(3)]
    for digest in blobs:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    clean = verify(store)
    assert clean.returncode == 0 and "checked 3 blobs" in clean.stdout and "0 corrupt" in clean.stdout

    victim = blobs[1]
    path = store / "blobs" / "sha256" / victim[7:9] / victim[7:]
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # bit rot
    path.write_bytes(bytes(data))

    found = verify(store)
    assert found.returncode == 1 and f"corrupt: {victim}" in found.stdout
    assert path.exists(), "without --repair nothing moves"
    repaired = verify(store, "--repair", "--rate", "10MiB")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"corrupt: {victim} (quarantined)" in repaired.stdout
    assert not path.exists() and (store / "quarantine" / f"sha256-{victim[7:]}").exists()

    upstream.reset_requests()
    body = await (await moorage.get(f"/v2/alpine/blobs/{victim}")).read()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == victim
    assert upstream.count("GET", f"/blobs/{victim}") == 1, "the quarantined blob is fetched again"
    assert verify(store).returncode == 0


def test_verify_names_a_missing_store(tmp_path: Path) -> None:
    result = verify(tmp_path / "nothing")
    assert result.returncode == 2 and "no Moorage store" in result.stderr


async def test_gc_keeps_an_image_and_removes_what_nothing_refers_to(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    moorage = await start_moorage()
    image = upstream.add_image("library/alpine", "3.19", [b"layer of the image"])
    assert (await moorage.get("/v2/alpine/manifests/3.19")).status == 200
    for digest in (image.config_digest, *image.layer_digests):
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    stray = upstream.add_blob(os.urandom(5000))  # pulled by digest, referred to by nothing stored
    await (await moorage.get(f"/v2/alpine/blobs/{stray}")).read()
    kept = command("gc", store)
    assert kept.returncode == 0, kept.stderr
    assert "removed 0" in kept.stdout and "1 unreferenced but younger than 1h" in kept.stdout
    settings = tmp_path / "config.yaml"
    settings.write_text("storage: {gc_grace: 2h}\n")
    configured = command("gc", store, "--config", str(settings))  # the grace from the settings
    assert "1 unreferenced but younger than 2h" in configured.stdout, configured.stdout + configured.stderr
    swept = command("gc", store, "--grace", "0s")
    assert swept.returncode == 0, swept.stderr
    assert f"removed: {stray}" in swept.stdout and swept.stdout.count("removed:") == 1
    for digest in (image.digest, image.config_digest, *image.layer_digests):
        assert (store / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()


async def test_gc_and_verify_beside_a_daemon_correct_its_store_size(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """What the commands remove reaches the running daemon's store size at its next flush,
    also what the daemon stored and had not written to the index yet, and what the daemon
    stores meanwhile is kept: the size decides when eviction starts."""
    store = tmp_path / "store"
    moorage = await start_moorage()
    cache = moorage.app[CACHE]

    async def pull(size: int) -> str:
        digest = upstream.add_blob(os.urandom(size))
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        await until(lambda: len(cache.fills) == 0)  # stored (the client has its bytes first)
        return digest

    stray, damaged = await pull(5000), await pull(7000)
    await cache.flush()
    assert await metric(moorage, "moorage_store_bytes") == on_disk(store) == 12000
    unflushed = await pull(4000)  # in the daemon's totals, not in the index yet
    with blob_path(store, damaged).open("r+b") as cut:  # truncated: its counted 7,000 bytes go
        cut.truncate(1000)
    repaired = verify(store, "--repair")
    assert "1 quarantined" in repaired.stdout, repaired.stdout + repaired.stderr
    swept = command("gc", store, "--grace", "0s")
    assert {f"removed: {stray}", f"removed: {unflushed}"} <= set(swept.stdout.splitlines()), swept.stdout
    await pull(3000)  # stored by the daemon after the commands ran
    await cache.flush()
    assert on_disk(store) == 3000
    assert await metric(moorage, "moorage_store_bytes") == 3000
    assert await metric(moorage, "moorage_store_entries") == 1
    await cache.flush()  # a flush with nothing new changes nothing
    assert await metric(moorage, "moorage_store_bytes") == 3000


def blob_path(store: Path, digest: str) -> Path:
    return store / "blobs" / "sha256" / digest[7:9] / digest[7:]


def on_disk(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "blobs").rglob("*") if p.is_file())


async def test_repair_goes_on_past_a_blob_it_can_neither_move_nor_remove(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """Such a blob (its directory another user's) ended the run with one line: the corrupt
    blobs after it were neither checked nor repaired, and none was listed."""
    store = tmp_path / "store"
    moorage = await start_moorage()
    blobs: list[str] = []
    while len(blobs) < 3:  # each in a directory of its own: the stuck one's holds no other
        digest = upstream.add_blob(os.urandom(200_000))
        if digest[7:9] not in {other[7:9] for other in blobs}:
            blobs.append(digest)
    for digest in blobs:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    await until_settled(moorage)  # stored: a client has its last byte before the blob is put in place
    paths = [store / "blobs" / "sha256" / d[7:9] / d[7:] for d in blobs]
    for path in paths:
        path.write_bytes(b"X" * 200_000)
    (store / "quarantine").mkdir()
    stuck = min(paths, key=lambda p: p.name)  # whichever the walk meets, the others follow it
    with immutable(store / "quarantine"), immutable(stuck.parent):
        repaired = verify(store, "--repair")
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr
    assert (
        "not quarantined: corrupt blob" in repaired.stdout
        and "can be neither quarantined nor removed" in repaired.stdout
    )
    assert "3 corrupt" in repaired.stdout
    assert stuck.exists() and not [p for p in paths if p != stuck and p.exists()], "the others are removed"
