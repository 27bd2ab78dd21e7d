"""moorage verify: a blob changed on disk after it was stored is found, quarantined with
--repair, and fetched again on the next pull; a clean store passes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tests.fakes import FakeRegistry

from .conftest import StartMoorage


def verify(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moorage.proxy", "verify", "--store", str(store), *args],
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
