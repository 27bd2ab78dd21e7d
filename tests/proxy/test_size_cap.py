"""A store with a size cap, filled past it through real requests: it shrinks to the low
watermark, pulls keep succeeding with verified bytes, and what was evicted is fetched again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from moorage.cache import _evict
from moorage.cache import _size_cap as size_cap_module
from moorage.proxy._state import CACHE
from moorage.upstreams.reference import parse_digest
from tests.fakes import FakeRegistry

from .conftest import StartMoorage, advance_clock, metric, until_settled

KiB = 1024


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "blobs").rglob("*") if p.is_file())


async def test_filling_past_the_cap_evicts_least_recently_used(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    moorage = await start_moorage(storage={"path": str(tmp_path / "store"), "max_size": "1MiB"})
    blobs = [upstream.add_blob(os.urandom(100 * KiB)) for _ in range(20)]
    sizes = []
    for digest in blobs:
        body = await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        await until_settled(moorage)  # the blob stored and the pass it asked for ended
        sizes.append(store_bytes(tmp_path / "store"))
    after = store_bytes(tmp_path / "store")
    print(f"\nstore bytes after each pull: {sizes}; at rest: {after} (cap {1024 * KiB})")
    fetched = await metric(moorage, "moorage_upstream_fetched_bytes_total", kind="blob")
    assert fetched == 20 * 100 * KiB > 1024 * KiB, "twice the cap went into the store"
    assert max(sizes) <= 0.95 * 1024 * KiB, "never above the high watermark once the pulls' passes ran"
    # Everything was stored in the last seconds: taken only halfway between the watermarks.
    assert after <= 0.90 * 1024 * KiB
    assert await metric(moorage, "moorage_evictions_total", reason="size") >= 10
    assert await metric(moorage, "moorage_store_max_bytes") == 1024 * KiB
    assert await metric(moorage, "moorage_store_bytes") == after
    stored = {p.name for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()}
    assert blobs[-1].split(":")[1] in stored, "the most recent stays"
    assert blobs[0].split(":")[1] not in stored, "the oldest went first"
    upstream.reset_requests()
    again = await (await moorage.get(f"/v2/alpine/blobs/{blobs[0]}")).read()
    assert "sha256:" + hashlib.sha256(again).hexdigest() == blobs[0]
    assert upstream.count("GET", f"/blobs/{blobs[0]}") == 1, "evicted content is simply fetched again"


@pytest.mark.parametrize(("low", "rest_at_most"), [(0.85, 8), (0.6, 6)])
async def test_a_pass_over_content_not_in_use_takes_the_store_down_to_the_low_watermark(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, low: float, rest_at_most: int
) -> None:
    """Only down to the high watermark, a pass would leave no room: the next blob stored would
    start another, and the store would sit at its cap, a pass per pull."""
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store), "max_size": "1MiB", "low_watermark": low})
    old = [upstream.add_blob(os.urandom(100 * KiB)) for _ in range(9)]
    for digest in old:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        await until_settled(moorage)
    assert store_bytes(store) == 900 * KiB, "below the high watermark: nothing evicted"
    advance_clock(moorage, 60)  # stored a minute ago: not in use
    new = upstream.add_blob(os.urandom(100 * KiB))
    await (await moorage.get(f"/v2/alpine/blobs/{new}")).read()
    await until_settled(moorage)
    after = store_bytes(store)
    assert after <= low * 1024 * KiB, f"{after} bytes left, above the low watermark"
    assert after == rest_at_most * 100 * KiB, "no more than that taken"
    assert new.split(":")[1] in {p.name for p in (store / "blobs").rglob("*")}, "the newest stays"


async def test_an_image_just_pulled_that_fits_under_the_cap_stays_whole(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """The pass its pull triggers takes older content, and leaves the new image above the low
    watermark rather than take it apart: the next pull of it would fetch it all again."""
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store), "max_size": "1MiB"})
    old = [upstream.add_blob(os.urandom(100 * KiB)) for _ in range(2)]
    for digest in old:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    image = upstream.add_image("library/big", "1", [os.urandom(450 * KiB), os.urandom(450 * KiB)])
    assert (await moorage.get("/v2/big/manifests/1")).status == 200
    for digest in (image.config_digest, *image.layer_digests):
        await (await moorage.get(f"/v2/big/blobs/{digest}")).read()
    await until_settled(moorage)
    assert await metric(moorage, "moorage_evictions_total", reason="size") >= 1
    stored = {p.name for p in (store / "blobs").rglob("*") if p.is_file()}
    assert not {digest.split(":")[1] for digest in old} & stored, "the older content went"
    kept = {image.digest, image.config_digest, *image.layer_digests}
    assert {digest.split(":")[1] for digest in kept} <= stored, "the image just pulled stayed whole"
    upstream.reset_requests()
    assert (await moorage.get("/v2/big/manifests/1")).status == 200
    for digest in image.layer_digests:
        await (await moorage.get(f"/v2/big/blobs/{digest}")).read()
    assert upstream.requests == [], "pulled again from the store"


async def test_an_evicted_manifest_is_fetched_again_for_its_tag(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    moorage = await start_moorage(storage={"path": str(tmp_path / "store"), "max_size": "300KiB"})
    image = upstream.add_image("library/alpine", "3.19", [b"small layer"])
    # A HEAD stores it too, and is no pull: a manifest pulled lately would outlast the blobs.
    assert (await moorage.head("/v2/alpine/manifests/3.19")).status == 200
    for _ in range(4):  # push the manifest out
        digest = upstream.add_blob(os.urandom(100 * KiB))
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        await until_settled(moorage)
    stored = {p.name for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()}
    assert image.digest.split(":")[1] not in stored
    upstream.reset_requests()
    again = await moorage.get("/v2/alpine/manifests/3.19")
    assert again.status == 200 and await again.read() == image.manifest
    assert upstream.count("GET", "/manifests/") == 1


async def test_a_blob_larger_than_the_cap_goes_alone(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """It can never stay under the cap: it leaves the store, not everything else before it."""
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store), "max_size": "300KiB"})
    small = [upstream.add_blob(os.urandom(30 * KiB)) for _ in range(5)]
    for digest in small:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    big = upstream.add_blob(os.urandom(1024 * KiB))
    body = await (await moorage.get(f"/v2/alpine/blobs/{big}")).read()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == big, "its client has every byte"
    await until_settled(moorage)  # the client has its bytes before the blob is made durable and stored
    stored = {p.name for p in (store / "blobs").rglob("*") if p.is_file()}
    assert stored == {digest.split(":")[1] for digest in small}, "the small ones stay, the big one went"
    assert await metric(moorage, "moorage_evictions_total", reason="size") == 1
    assert await metric(moorage, "moorage_store_bytes") == store_bytes(store) == 5 * 30 * KiB


async def test_an_image_whose_manifest_was_just_served_keeps_its_blobs_through_a_pass(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """Its client asks for the config and layers next: a pass between the manifest and them
    takes older content first, instead of those blobs because they were stored long ago."""
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store), "max_size": "400KiB"})
    image = upstream.add_image("library/alpine", "3.19", [os.urandom(60 * KiB), os.urandom(60 * KiB)])
    assert (await moorage.get("/v2/alpine/manifests/3.19")).status == 200
    for digest in (image.config_digest, *image.layer_digests):
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    others = [upstream.add_blob(os.urandom(40 * KiB)) for _ in range(5)]
    for digest in others:  # read after the image: more recent than its blobs
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    assert (await moorage.get("/v2/alpine/manifests/3.19")).status == 200  # a new pull begins
    trigger = upstream.add_blob(os.urandom(100 * KiB))
    await (await moorage.get(f"/v2/alpine/blobs/{trigger}")).read()
    await until_settled(moorage)
    assert await metric(moorage, "moorage_evictions_total", reason="size") > 0
    stored = {p.name for p in (store / "blobs").rglob("*") if p.is_file()}
    assert {digest.split(":")[1] for digest in image.layer_digests} <= stored, "the pull's layers stayed"
    assert others[0].split(":")[1] not in stored, "older content went instead"
    upstream.reset_requests()
    for digest in image.layer_digests:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    assert upstream.count("GET", "/blobs/") == 0


async def test_a_tag_answered_revalidated_is_a_read_for_the_cap(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """A tag pulled less often than its TTL is always answered "revalidated": its manifest had
    aged from its first fetch in the cap's order and went first, each pull of it then a
    counted manifest GET. A stale answer is a read too."""
    moorage = await start_moorage(tag_ttl="1h", storage={"path": str(tmp_path / "store"), "max_size": "1MiB"})
    cache = moorage.app[CACHE]
    often = upstream.add_image("library/often", "1", [os.urandom(10 * KiB)])
    once = upstream.add_image("library/once", "1", [os.urandom(10 * KiB)])
    for name in ("often", "once"):
        assert (await moorage.get(f"/v2/{name}/manifests/1")).status == 200
    advance_clock(moorage, 3601)
    revalidated_at = cache._clock()
    # HEAD: a poller's check, not recorded as an image being pulled; a read all the same.
    assert (await moorage.head("/v2/often/manifests/1")).headers["X-Moorage-Cache"] == "revalidated"
    order = cache._in_use.order(cache._accessed)
    assert order[parse_digest(often.digest)] >= revalidated_at > order[parse_digest(once.digest)]
    await upstream.stop_listening()
    advance_clock(moorage, 3601)
    stale_at = cache._clock()
    assert (await moorage.head("/v2/once/manifests/1")).headers["X-Moorage-Cache"] == "stale"
    assert cache._in_use.order(cache._accessed)[parse_digest(once.digest)] >= stale_at


async def test_a_store_held_above_its_cap_by_content_in_use_is_not_walked_per_stored_blob(
    start_moorage: StartMoorage,
    upstream: FakeRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pass that could not get under the high watermark left only content in use (read in
    the last seconds by busy clients). Each pass walks the whole store, seconds for 100,000
    blobs, and one had run for every blob stored meanwhile."""
    walks: list[int] = []
    walk = _evict.evict_to

    def all_in_use(store: Any, index: Any, target_bytes: int, *rest: Any) -> Any:
        walks.append(1)
        return walk(store, index, 2**62, *rest)  # a walk that finds nothing it may remove

    def evicting(*args: Any) -> Any:
        walks.append(1)
        return walk(*args)

    monkeypatch.setattr(size_cap_module, "evict_to", all_in_use)
    caplog.set_level("INFO", logger="moorage.cache")
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store), "max_size": "1MiB"})
    for _ in range(4):
        digest = upstream.add_blob(os.urandom(260 * KiB))
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        await until_settled(moorage)
    assert len(walks) == 1, "the store went over its cap: a pass, which could remove nothing"
    for _ in range(5):
        digest = upstream.add_blob(os.urandom(10 * KiB))
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        await until_settled(moorage)
    assert len(walks) == 1, "no pass while nothing in the store could have aged out of use"

    async def five_seconds_on_one_more_stored() -> None:
        advance_clock(moorage, 6)  # what was in use may have aged out of it: passes again
        digest = upstream.add_blob(os.urandom(10 * KiB))
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        await until_settled(moorage)

    await five_seconds_on_one_more_stored()
    assert len(walks) == 2, "a pass once what was in use may have aged"
    # A clock stepped back (NTP correcting one that ran ahead) held passes off for as long as
    # the step: the store grew past its cap with no pass.
    advance_clock(moorage, -3600)
    digest = upstream.add_blob(os.urandom(10 * KiB))
    await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    await until_settled(moorage)
    assert len(walks) == 3, "a pass: the one that found all in use is not 5 s ago, but in the future"
    short = [record for record in caplog.records if getattr(record, "event", "") == "eviction_short"]
    assert len(short) == 1, "said once, not at every pass"

    monkeypatch.setattr(size_cap_module, "evict_to", evicting)
    await five_seconds_on_one_more_stored()
    assert len(walks) == 4
    assert store_bytes(store) <= 0.95 * 1024 * KiB, "the next pass got under the cap"
