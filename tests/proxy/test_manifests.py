"""Manifests through Moorage: fetch once, fresh tags free, stale tags revalidated with HEAD,
stale answers when the upstream fails, Accept negotiation, size limit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Literal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from moorage.cache import _cache as cache_module
from moorage.cache._index import Index
from moorage.cache.errors import IndexFailure
from moorage.proxy._handlers import _named
from moorage.proxy._state import CACHE
from moorage.upstreams.reference import (
    ACCEPT_ALL_MANIFESTS,
    DOCKER_MANIFEST_V1_SIGNED,
    DOCKER_MANIFEST_V2,
    MAX_MANIFEST_BYTES,
    Digest,
    parse_digest,
)
from tests.fakes import DOCKER_MANIFEST_LIST, OCI_MANIFEST, FakeRegistry
from tests.integration.harness.tools import closed_port

from .conftest import StartMoorage, advance_clock, metric

Client = TestClient[web.Request, web.Application]
ALL = {"Accept": ACCEPT_ALL_MANIFESTS}


async def test_cold_then_warm_tag_costs_one_upstream_get(moorage: Client, upstream: FakeRegistry) -> None:
    image = upstream.add_image("library/alpine", "3.19", [b"layer-1"])
    first = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert first.status == 200
    assert await first.read() == image.manifest
    assert first.headers["Docker-Content-Digest"] == image.digest
    assert first.headers["Content-Type"] == DOCKER_MANIFEST_V2
    assert first.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    upstream.reset_requests()
    for _ in range(3):
        again = await moorage.get("/v2/library/alpine/manifests/3.19", headers=ALL)
        assert await again.read() == image.manifest
    assert upstream.requests == []
    assert await metric(moorage, "moorage_cache_results_total", kind="manifest", result="hit") == 3


async def test_by_digest_is_served_from_the_store_and_verified(moorage: Client, upstream: FakeRegistry) -> None:
    image = upstream.add_image("library/alpine", "3.19", media_type=OCI_MANIFEST)
    response = await moorage.get(f"/v2/alpine/manifests/{image.digest}", headers=ALL)
    assert response.status == 200 and await response.read() == image.manifest
    assert response.headers["Content-Type"] == OCI_MANIFEST
    upstream.reset_requests()
    head = await moorage.head(f"/v2/alpine/manifests/{image.digest}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(image.manifest))
    assert head.headers["Docker-Content-Digest"] == image.digest
    assert upstream.requests == []


async def test_tag_fetched_once_for_concurrent_clients(moorage: Client, upstream: FakeRegistry) -> None:
    upstream.add_image("library/alpine", "3.19")
    upstream.delay_next(1, 0.3, paths=r"/manifests/")
    responses = await asyncio.gather(*(moorage.get("/v2/alpine/manifests/3.19", headers=ALL) for _ in range(16)))
    assert {r.status for r in responses} == {200}
    assert upstream.count("GET", "/manifests/") == 1


async def test_stale_tag_is_revalidated_with_one_head_and_no_get(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    moorage = await start_moorage(tag_ttl="1h")
    image = upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    stale = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert stale.status == 200 and await stale.read() == image.manifest
    assert upstream.count("HEAD", "/manifests/3.19") == 1
    assert upstream.count("GET", "/manifests/") == 0
    # Revalidation refreshed the answer's age: the next pull is free again.
    upstream.reset_requests()
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    assert upstream.requests == []
    assert await metric(moorage, "moorage_cache_results_total", result="revalidated") == 1


async def test_answers_fetched_while_the_clock_ran_ahead_are_revalidated_once_it_steps_back(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """A clock stepped back (NTP correcting one that ran ahead) left every tag and tag list
    fetched before the step fresh for as long as the step: ``latest`` stayed where it was for
    the length of it (a year here), with nothing logged."""
    moorage = await start_moorage(tag_ttl="1h", tags_list_ttl="1m")
    upstream.add_image("library/alpine", "latest")
    advance_clock(moorage, 365 * 86400)
    assert (await moorage.get("/v2/alpine/manifests/latest", headers=ALL)).status == 200
    assert (await (await moorage.get("/v2/alpine/tags/list")).json())["tags"] == ["latest"]
    advance_clock(moorage, -365 * 86400)
    moved = upstream.add_image("library/alpine", "latest", [b"a new layer"])
    upstream.add_image("library/alpine", "3.20")
    pulled = await moorage.get("/v2/alpine/manifests/latest", headers=ALL)
    assert pulled.headers["Docker-Content-Digest"] == moved.digest
    assert (await (await moorage.get("/v2/alpine/tags/list")).json())["tags"] == ["3.20", "latest"]


async def test_a_tag_whose_body_is_not_the_digest_the_upstream_names_is_refused(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """A mirror that answers a tag with other bytes than its Docker-Content-Digest names: the
    client would get them under that digest, and the store would keep them."""
    moorage = await start_moorage()
    image = upstream.add_image("library/alpine", "3.19")
    upstream.corrupt_manifest(image.digest)
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 502
    assert not [p for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()], "nothing unverified kept"


async def test_a_tag_deleted_upstream_is_404_not_stale(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    """The upstream's 404 is an answer: a tag deleted there (a withdrawn release) must not be
    served stale for ever, as an outage is."""
    moorage = await start_moorage(tag_ttl="1h")
    upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    upstream.delete_tag("library/alpine", "3.19")
    advance_clock(moorage, 3601)
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 404 and "Warning" not in response.headers
    assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_a_tag_list_of_a_repository_gone_upstream_is_404_not_stale(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    moorage = await start_moorage(tags_list_ttl="1s")
    upstream.add_image("team/gone", "1")
    assert (await moorage.get("/v2/team/gone/tags/list")).status == 200
    upstream.delete_repository("team/gone")
    advance_clock(moorage, 5)
    response = await moorage.get("/v2/team/gone/tags/list")
    assert response.status == 404 and "Warning" not in response.headers


async def test_clients_that_join_a_revalidation_count_as_revalidated(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """A fleet pulling as a tag went stale showed a dip in the hit ratio that did not happen:
    those who joined the one HEAD were counted coalesced, as if they had waited on a GET."""
    moorage = await start_moorage(tag_ttl="1h")
    upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    upstream.delay_next(1, 0.3, paths=r"/manifests/", methods={"HEAD"})
    responses = await asyncio.gather(*(moorage.get("/v2/alpine/manifests/3.19", headers=ALL) for _ in range(4)))
    assert [r.headers["X-Moorage-Cache"] for r in responses] == ["revalidated"] * 4
    assert upstream.count("HEAD", "/manifests/") == 1 and upstream.count("GET", "/manifests/") == 0


async def test_a_confirmed_tag_whose_manifest_left_the_store_counts_as_a_miss(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """The HEAD confirmed the tag, but the stored copy was gone (evicted, removed by hand), so
    the answer cost an upstream GET: the hit ratio must not count it."""
    first = await start_moorage(tag_ttl="1h", storage={"path": str(tmp_path / "store")})
    image = upstream.add_image("library/alpine", "3.19")
    assert (await first.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    await first.close()
    (tmp_path / "store" / "blobs" / "sha256" / image.digest[7:9] / image.digest[7:]).unlink()
    moorage = await start_moorage(tag_ttl="1h", storage={"path": str(tmp_path / "store")})
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 200 and await response.read() == image.manifest
    assert upstream.count("HEAD", "/manifests/") == 1 and upstream.count("GET", "/manifests/") == 1
    assert response.headers["X-Moorage-Cache"] == "miss"
    assert await metric(moorage, "moorage_cache_results_total", result="revalidated") == 0


async def test_changed_tag_is_fetched_again(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    moorage = await start_moorage(tag_ttl="1s")
    upstream.add_image("library/alpine", "3.19", [b"old"])
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    new = upstream.add_image("library/alpine", "3.19", [b"new"])
    await asyncio.sleep(1.1)
    upstream.reset_requests()
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.headers["Docker-Content-Digest"] == new.digest
    assert await response.read() == new.manifest
    assert upstream.count("HEAD", "/manifests/") == 1 and upstream.count("GET", "/manifests/") == 1


async def test_a_tag_moved_to_a_manifest_the_store_holds_costs_a_head_and_no_get(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """alpine:3 moving to what alpine:3.20 already pulled (or a tag moving back) is answered
    from the store: each extra tag of one new image would otherwise cost a counted pull."""
    moorage = await start_moorage(tag_ttl="1h")
    upstream.add_image("library/alpine", "3", [b"old"])
    assert (await moorage.get("/v2/alpine/manifests/3", headers=ALL)).status == 200
    new = upstream.add_image("library/alpine", "3.20", [b"new"])
    assert (await moorage.get("/v2/alpine/manifests/3.20", headers=ALL)).status == 200
    upstream.add_manifest("library/alpine", "3", new.manifest)
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    moved = await moorage.get("/v2/alpine/manifests/3", headers=ALL)
    assert moved.status == 200 and await moved.read() == new.manifest
    assert moved.headers["Docker-Content-Digest"] == new.digest
    assert moved.headers["X-Moorage-Cache"] == "revalidated"
    assert upstream.count("HEAD", "/manifests/3") == 1 and upstream.count("GET", "/manifests/") == 0
    upstream.reset_requests()
    again = await moorage.get("/v2/alpine/manifests/3", headers=ALL)  # recorded: fresh now
    assert again.headers["Docker-Content-Digest"] == new.digest and upstream.requests == []


@pytest.mark.parametrize("fault", [429, 503])
async def test_a_moved_index_tag_keeps_its_old_release_until_the_platforms_pulled_are_kept(
    start_moorage: StartMoorage, upstream: FakeRegistry, fault: int
) -> None:
    """A stale multi-platform tag that moved was recorded to the new index at once; its
    platform manifests were left for the clients' next requests. When those failed (a 429
    once the index's GET spent the last of a pull budget; an outage just after), every pull
    of the tag failed until the upstream recovered, with the old release whole in the store.
    The tag moves once the new index's manifests for the platforms clients pulled are kept."""
    moorage = await start_moorage(tag_ttl="1h", stale_backoff="0.2s")
    old_amd = upstream.add_image("library/app", None, [b"amd64 v1"])
    old_arm = upstream.add_image("library/app", None, [b"arm64 v1"], architecture="arm64")
    old = upstream.add_index(
        "library/app", "1", [(old_amd.digest, "linux", "amd64"), (old_arm.digest, "linux", "arm64")]
    )
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).status == 200
    assert (await moorage.get(f"/v2/app/manifests/{old_amd.digest}", headers=ALL)).status == 200  # amd64 nodes
    new_amd = upstream.add_image("library/app", None, [b"amd64 v2"])
    new_arm = upstream.add_image("library/app", None, [b"arm64 v2"], architecture="arm64")
    new = upstream.add_index(
        "library/app", "1", [(new_amd.digest, "linux", "amd64"), (new_arm.digest, "linux", "arm64")]
    )
    advance_clock(moorage, 3601)
    # A 429 whose Retry-After outlasts the retries' waits fails at once; a 503, every retry.
    retry_after = 3600 if fault == 429 else None
    upstream.fail_next(1 if fault == 429 else 3, fault, retry_after=retry_after, paths=f"/manifests/{new_amd.digest}")
    upstream.reset_requests()
    during = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert during.status == 200 and during.headers["Docker-Content-Digest"] == old
    assert during.headers["X-Moorage-Cache"] == "stale" and "Warning" in during.headers
    platform = await moorage.get(f"/v2/app/manifests/{old_amd.digest}", headers=ALL)
    assert platform.status == 200 and platform.headers["X-Moorage-Cache"] == "hit", "the old release pulls whole"
    if fault == 429:  # backed off for the hour its Retry-After asked
        return
    await asyncio.sleep(0.3)  # the back-off over, and the upstream answering again
    upstream.reset_requests()
    after = await moorage.get("/v2/app/manifests/1", headers=ALL)
    # Waited on the GET of its platform: refreshed, not answered from the store after a HEAD.
    assert after.headers["Docker-Content-Digest"] == new and after.headers["X-Moorage-Cache"] == "refreshed"
    assert upstream.count("GET", f"/manifests/{new_amd.digest}") == 1, "kept before the tag moved"
    amd = await moorage.get(f"/v2/app/manifests/{new_amd.digest}", headers=ALL)
    assert amd.status == 200 and amd.headers["X-Moorage-Cache"] == "hit"
    assert upstream.count("GET", f"/manifests/{new_arm.digest}") == 0, "no client pulled arm64: not fetched"


async def test_a_moved_index_tag_with_its_platforms_at_hand_is_refreshed_in_one_pass(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """With the upstream well, a moved multi-platform tag costs what the clients' pulls would
    have: the index and the platform they pull, fetched once, and answered refreshed."""
    moorage = await start_moorage(tag_ttl="1h")
    old_amd = upstream.add_image("library/app", None, [b"amd64 v1"])
    upstream.add_index("library/app", "1", [(old_amd.digest, "linux", "amd64")])
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).status == 200
    assert (await moorage.get(f"/v2/app/manifests/{old_amd.digest}", headers=ALL)).status == 200
    new_amd = upstream.add_image("library/app", None, [b"amd64 v2"])
    new = upstream.add_index("library/app", "1", [(new_amd.digest, "linux", "amd64")])
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    moved = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert moved.headers["Docker-Content-Digest"] == new and moved.headers["X-Moorage-Cache"] == "refreshed"
    amd = await moorage.get(f"/v2/app/manifests/{new_amd.digest}", headers=ALL)
    assert amd.status == 200 and amd.headers["X-Moorage-Cache"] == "hit"
    assert upstream.count("GET", "/manifests/") == 2 and upstream.count("HEAD", "/manifests/") == 1


def _release(upstream: FakeRegistry, version: str, *platforms: str) -> tuple[str, dict[str, str]]:
    """``library/app:1`` as an index of one image per platform (``unknown`` for an attestation,
    ``amd64-twin`` for a second amd64 entry, as a zstd copy is listed); its digest and theirs."""
    images: dict[str, str] = {}
    for platform in platforms:
        architecture = platform.split("-")[0]
        image = upstream.add_image("library/app", None, [f"{platform} {version}".encode()], architecture=architecture)
        images[platform] = image.digest
    entries = [(digest, "unknown" if p == "unknown" else "linux", p.split("-")[0]) for p, digest in images.items()]
    return upstream.add_index("library/app", "1", entries), images


async def test_a_moved_index_tag_fetches_the_first_entry_of_each_platform_pulled_since(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """A platform counts as pulled when a client pulled it, not when the store holds it: what a
    move fetched had counted at every later move, an arm64 pulled once cost a GET at each, and
    one held attestation fetched every attestation of the next index. Of entries for one
    platform (a zstd twin) only the first is fetched: the one a client picks."""
    moorage = await start_moorage(tag_ttl="1h")
    _, first = _release(upstream, "v1", "amd64", "arm64", "unknown")
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).status == 200
    for platform in ("amd64", "arm64", "unknown"):  # an arm64 node once; a verifier read the attestation
        assert (await moorage.get(f"/v2/app/manifests/{first[platform]}", headers=ALL)).status == 200
    _, second = _release(upstream, "v2", "amd64", "amd64-twin", "arm64", "unknown")
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).headers["X-Moorage-Cache"] == "refreshed"
    fetched = {p for p, digest in second.items() if upstream.count("GET", f"/manifests/{digest}")}
    assert fetched == {"amd64", "arm64"}, "pulled before: each platform's first entry, no attestation"
    assert (await moorage.get(f"/v2/app/manifests/{second['amd64']}", headers=ALL)).status == 200  # amd64 only now
    _, third = _release(upstream, "v3", "amd64", "arm64", "unknown")
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).headers["X-Moorage-Cache"] == "refreshed"
    assert {p for p, digest in third.items() if upstream.count("GET", f"/manifests/{digest}")} == {"amd64"}, (
        "the arm64 the last move fetched was pulled by no client"
    )


def _index_of(upstream: FakeRegistry, tag: str, entries: list[tuple[str, dict[str, str]]]) -> str:
    """``library/app:<tag>`` as an index of (manifest digest, platform) entries, as written."""
    manifests = []
    for digest, platform in entries:
        body = upstream.manifest(digest)
        manifests.append({"mediaType": DOCKER_MANIFEST_V2, "size": len(body), "digest": digest, "platform": platform})
    document = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": manifests}
    return upstream.add_manifest("library/app", tag, json.dumps(document).encode(), DOCKER_MANIFEST_LIST)


async def test_a_moved_index_tag_fetches_the_platform_a_node_matches(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """A Windows node takes the entry of its own build, among several windows/amd64 ones: the
    move fetched the first (another build's) and left the node's to fail. arm64 written with
    and without its v8 variant is one platform."""
    moorage = await start_moorage(tag_ttl="1h", stale_backoff="0.2s")
    builds = {"ltsc2019": "10.0.17763.6414", "ltsc2022": "10.0.20348.2762"}

    def release(version: str) -> tuple[str, dict[str, str]]:
        images = {
            name: upstream.add_image("library/app", None, [f"{name} {version}".encode()], os="windows").digest
            for name in builds
        }
        images["arm64"] = upstream.add_image("library/app", None, [f"arm64 {version}".encode()]).digest
        arm = {"os": "linux", "architecture": "arm64"} | ({"variant": "v8"} if version == "v2" else {})
        entries = [
            (images[name], {"os": "windows", "architecture": "amd64", "os.version": build})
            for name, build in builds.items()
        ]
        return _index_of(upstream, "1", [*entries, (images["arm64"], arm)]), images

    _, first = release("v1")
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).status == 200
    for name in ("ltsc2022", "arm64"):
        assert (await moorage.get(f"/v2/app/manifests/{first[name]}", headers=ALL)).status == 200
    _, second = release("v2")
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).headers["X-Moorage-Cache"] == "refreshed"
    assert {name for name, digest in second.items() if upstream.count("GET", f"/manifests/{digest}")} == {
        "ltsc2022",
        "arm64",
    }


async def _moved_past_a_failing_platform(
    start_moorage: StartMoorage, upstream: FakeRegistry, fault: int, times: int
) -> tuple[Client, str, str, dict[str, str]]:
    """``library/app:1`` pulled by an amd64 node, then moved to a release whose amd64 manifest
    fails ``times`` times with ``fault``, the tag stale. Returns the client, the old index,
    the new one and the new release's manifests."""
    moorage = await start_moorage(tag_ttl="1h", stale_backoff="0.2s", upstream_settings={"retries": {"attempts": 1}})
    old, first = _release(upstream, "v1", "amd64")
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).status == 200
    assert (await moorage.get(f"/v2/app/manifests/{first['amd64']}", headers=ALL)).status == 200
    new, second = _release(upstream, "v2", "amd64")
    advance_clock(moorage, 3601)
    upstream.fail_next(times, fault, paths=f"/manifests/{second['amd64']}")
    return moorage, old, new, second


async def _held_move(
    start_moorage: StartMoorage,
    upstream: FakeRegistry,
    monkeypatch: pytest.MonkeyPatch,
    hold: float,
    fault: int,
    times: int,
) -> tuple[Client, str, str, dict[str, str]]:
    """``library/app:1`` pulled by an amd64 node, then moved to a release whose amd64 manifest
    fails ``times`` times with ``fault``: the move is held and the old index answered stale.
    One try per request: the hold's bounds are timed, and retries' waits would blur them.
    Returns the client, the old index, the new one and the new release's manifests."""
    monkeypatch.setattr(cache_module, "MOVE_HOLD_SECONDS", hold)
    moorage, old, new, second = await _moved_past_a_failing_platform(start_moorage, upstream, fault, times)
    held = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert held.headers["X-Moorage-Cache"] == "stale" and held.headers["Docker-Content-Digest"] == old
    return moorage, old, new, second


async def test_a_moved_index_tag_waits_a_bounded_time_for_a_platform_that_keeps_failing(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A platform manifest the upstream keeps failing (an outage of its own) held every client
    that takes indexes on the old release for ever; a 429 waits for the budget to come back."""
    moorage, _, new, _ = await _held_move(start_moorage, upstream, monkeypatch, hold=2.0, fault=500, times=1000)
    await asyncio.sleep(1.5)  # past the back-off: the tag moved again meanwhile, still held
    newer, third = _release(upstream, "v3", "amd64")
    upstream.fail_next(1000, 500, paths=f"/manifests/{third['amd64']}")
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).headers["X-Moorage-Cache"] == "stale"
    # Past the hold, counted from the first failure of a move of this tag (not of this move:
    # a tag pushed more often than the hold lasts had been held for ever).
    await asyncio.sleep(0.8)
    moved = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert moved.headers["Docker-Content-Digest"] == newer and moved.headers["X-Moorage-Cache"] == "refreshed"
    assert (await moorage.get(f"/v2/app/manifests/{third['amd64']}", headers=ALL)).status >= 500
    assert new != newer


async def test_a_hold_that_ended_with_no_pull_since_does_not_cut_the_next_one_short(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nightly tag held through one night's outage, then left unpulled: its next move in an
    outage went through at once onto a platform that could not be fetched."""
    moorage, old, _, _ = await _held_move(start_moorage, upstream, monkeypatch, hold=1.0, fault=503, times=1)
    await asyncio.sleep(1.2)  # the hold's time over, with no pull (and no failure) since
    _, third = _release(upstream, "v3", "amd64")
    upstream.fail_next(1000, 503, paths=f"/manifests/{third['amd64']}")
    held = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert held.headers["X-Moorage-Cache"] == "stale" and held.headers["Docker-Content-Digest"] == old


async def test_a_hold_of_the_same_move_seen_rarely_ends_all_the_same(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag pulled less often than the hold lasts (most tags), or revalidated that seldom (a
    long stale_backoff): each failure of the same move had opened a hold of its own, and the
    tag never moved."""
    moorage, _, new, _ = await _held_move(start_moorage, upstream, monkeypatch, hold=1.0, fault=500, times=100000)
    await asyncio.sleep(1.1)  # the next pull, past the hold
    moved = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert moved.headers["Docker-Content-Digest"] == new and moved.headers["X-Moorage-Cache"] == "refreshed"


async def test_a_moved_index_tag_moves_past_a_platform_that_fails_for_good(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """A platform manifest whose bytes do not match its digest will not be kept however often
    it is asked for: the tag moves, and that platform's clients are told, as before."""
    moorage = await start_moorage(tag_ttl="1h")
    _, first = _release(upstream, "v1", "amd64", "arm64")
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).status == 200
    for platform in ("amd64", "arm64"):
        assert (await moorage.get(f"/v2/app/manifests/{first[platform]}", headers=ALL)).status == 200
    new, second = _release(upstream, "v2", "amd64", "arm64")
    upstream.corrupt_manifest(second["arm64"])
    advance_clock(moorage, 3601)
    moved = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert moved.headers["Docker-Content-Digest"] == new and moved.headers["X-Moorage-Cache"] == "refreshed"
    amd = await moorage.get(f"/v2/app/manifests/{second['amd64']}", headers=ALL)
    assert amd.status == 200 and amd.headers["X-Moorage-Cache"] == "hit"


@pytest.mark.parametrize("head", ["naming_no_digest", "refused"])
async def test_a_moved_index_tag_checked_with_a_get_keeps_its_old_release_until_the_platforms_are_kept(
    start_moorage: StartMoorage, upstream: FakeRegistry, head: str
) -> None:
    """An upstream whose HEAD names no digest, or that refuses HEAD (both taken: the GET tells):
    the tag was recorded to the new index from that GET at once, past an amd64 manifest the
    upstream was failing, and amd64 nodes got the new index and then a 503."""
    moorage = await start_moorage(tag_ttl="1h", stale_backoff="0.2s", upstream_settings={"retries": {"attempts": 1}})
    old, first = _release(upstream, "v1", "amd64")
    assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).status == 200
    assert (await moorage.get(f"/v2/app/manifests/{first['amd64']}", headers=ALL)).status == 200
    if head == "naming_no_digest":
        upstream.manifest_head_omits = frozenset({"Docker-Content-Digest", "ETag"})
    else:
        upstream.fail_next(1000, 405, methods={"HEAD"}, paths=r"/manifests/1$")
    advance_clock(moorage, 3601)
    unchanged = await moorage.get("/v2/app/manifests/1", headers=ALL)  # the GET says: still the same
    assert unchanged.headers["Docker-Content-Digest"] == old and unchanged.headers["X-Moorage-Cache"] == "miss"
    new, second = _release(upstream, "v2", "amd64")
    advance_clock(moorage, 3601)
    upstream.fail_next(1, 503, paths=f"/manifests/{second['amd64']}")
    held = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert held.headers["Docker-Content-Digest"] == old and held.headers["X-Moorage-Cache"] == "stale"
    await asyncio.sleep(0.3)  # the back-off over, and the upstream answering again
    upstream.reset_requests()
    moved = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert moved.headers["Docker-Content-Digest"] == new and moved.headers["X-Moorage-Cache"] == "refreshed"
    amd = await moorage.get(f"/v2/app/manifests/{second['amd64']}", headers=ALL)
    assert amd.status == 200 and amd.headers["X-Moorage-Cache"] == "hit"


def _nested_release(upstream: FakeRegistry, version: str) -> tuple[str, str, str]:
    """``library/app:1`` as an index whose amd64 entry is an index of its own (as some build
    tools nest them); the outer index's digest, the inner one's and the image's."""
    image = upstream.add_image("library/app", None, [f"amd64 {version}".encode()])
    inner = upstream.add_index("library/app", None, [(image.digest, "linux", "amd64")])
    body = upstream.manifest(inner)
    outer = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [
            {
                "mediaType": DOCKER_MANIFEST_LIST,
                "size": len(body),
                "digest": inner,
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    digest = upstream.add_manifest("library/app", "1", json.dumps(outer).encode(), DOCKER_MANIFEST_LIST)
    return digest, inner, image.digest


async def test_a_moved_index_tag_whose_platform_entry_is_an_index_waits_for_the_image_in_it(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """Of a platform entry that is itself an index, only that index was fetched before the
    move: the image a node pulls through it was not, and failed in an outage after the move."""
    moorage = await start_moorage(tag_ttl="1h", stale_backoff="0.2s", upstream_settings={"retries": {"attempts": 1}})
    old, inner, image = _nested_release(upstream, "v1")
    for reference in ("1", inner, image):  # an amd64 node pulls through both indexes
        assert (await moorage.get(f"/v2/app/manifests/{reference}", headers=ALL)).status == 200
    new, new_inner, new_image = _nested_release(upstream, "v2")
    advance_clock(moorage, 3601)
    upstream.fail_next(1, 503, paths=f"/manifests/{new_image}")
    held = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert held.headers["Docker-Content-Digest"] == old and held.headers["X-Moorage-Cache"] == "stale"
    await asyncio.sleep(0.3)
    moved = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert moved.headers["Docker-Content-Digest"] == new and moved.headers["X-Moorage-Cache"] == "refreshed"
    upstream.reset_requests()
    for reference in (new_inner, new_image):
        answer = await moorage.get(f"/v2/app/manifests/{reference}", headers=ALL)
        assert answer.status == 200 and answer.headers["X-Moorage-Cache"] == "hit"
    assert upstream.requests == []


async def test_a_platform_pulled_while_the_bookkeeping_is_being_written_counts_for_a_move(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull recorded since the last batch, while that batch was being written (a busy
    disk), was in neither memory nor the index: a move then skipped that platform."""
    moorage, old, _, _ = await _moved_past_a_failing_platform(start_moorage, upstream, 503, 1000)
    writing, write_batch = asyncio.Event(), Index.write_batch
    loop = asyncio.get_running_loop()

    def slow_write(index: Index, *args: object, **kwargs: object) -> tuple[int, int]:
        loop.call_soon_threadsafe(writing.set)
        time.sleep(1.0)
        return write_batch(index, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Index, "write_batch", slow_write)
    flushing = asyncio.ensure_future(moorage.app[CACHE].flush())
    await writing.wait()
    held = await moorage.get("/v2/app/manifests/1", headers=ALL)
    await flushing
    assert held.headers["Docker-Content-Digest"] == old and held.headers["X-Moorage-Cache"] == "stale"


async def test_a_hold_that_ends_with_the_platform_still_failing_is_logged(
    start_moorage: StartMoorage,
    upstream: FakeRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The tag moved onto a platform that could not be fetched without a word: the first the
    operator heard of it was the nodes' errors."""
    moorage, _, new, _ = await _held_move(start_moorage, upstream, monkeypatch, hold=1.0, fault=503, times=1000)
    await asyncio.sleep(1.1)
    caplog.clear()
    moved = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert moved.headers["Docker-Content-Digest"] == new
    (unheld,) = [r for r in caplog.records if getattr(r, "event", "") == "tag_move_unheld"]
    assert unheld.levelno == logging.WARNING
    assert (unheld.tag, unheld.digest) == ("1", new) and "503" in unheld.error  # type: ignore[attr-defined]
    assert unheld.held_seconds >= 1.0  # type: ignore[attr-defined]
    assert await metric(moorage, "moorage_cache_results_total", kind="manifest", result="refreshed") == 1


async def test_a_manifest_the_index_could_not_record_is_recorded_by_its_next_pull(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index that refused a manifest's record (its lock held too long; a full disk is the
    other case) while its file was stored: it was served and
    remembered in memory, and no lifecycle rule, gc root or ``moorage ls`` knew of it for as
    long as the process lived. Its next pull records it, with the bookkeeping batch."""
    moorage = await start_moorage()
    cache = moorage.app[CACHE]
    image = upstream.add_image("library/alpine", "3.19", [b"layer"])
    digest = parse_digest(image.digest)
    refusing = [True]
    put_manifest = Index.put_manifest

    def locked_index(index: Index, manifest: Digest, media_type: str) -> None:
        if refusing[0]:
            raise IndexFailure("the index cannot record a manifest: database is locked")
        put_manifest(index, manifest, media_type)

    monkeypatch.setattr(Index, "put_manifest", locked_index)
    first = await moorage.get(f"/v2/alpine/manifests/{image.digest}", headers=ALL)
    assert first.status == 200 and await first.read() == image.manifest
    assert await asyncio.to_thread(cache._index.manifest_media_type, digest) is None
    refusing[0] = False
    await cache.flush()
    assert await asyncio.to_thread(cache._index.manifest_media_type, digest) is None, "not pulled since"
    again = await moorage.get(f"/v2/alpine/manifests/{image.digest}", headers=ALL)
    assert again.status == 200 and again.headers["X-Moorage-Cache"] == "hit"
    await cache.flush()
    assert await asyncio.to_thread(cache._index.manifest_media_type, digest) == DOCKER_MANIFEST_V2
    held = cache._hot.manifest(digest)
    assert held is not None and held.recorded, "marked recorded: the next pull adds nothing to the batch"
    await moorage.get(f"/v2/alpine/manifests/{image.digest}", headers=ALL)
    assert digest not in cache._unrecorded


@pytest.mark.parametrize("status", [400, 405, 501])
async def test_an_upstream_that_refuses_head_is_revalidated_with_get(
    start_moorage: StartMoorage, upstream: FakeRegistry, status: int
) -> None:
    """A registry that takes only GET for manifests: a stale tag is checked with a GET, so a
    moved tag is picked up, where the refusal had been taken for an outage and the old
    answer served stale for ever."""
    moorage = await start_moorage(tag_ttl="1h")
    image = upstream.add_image("library/alpine", "3.19", [b"old"])
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    advance_clock(moorage, 3601)
    upstream.fail_next(1, status, methods={"HEAD"}, paths=r"/manifests/")
    unchanged = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert unchanged.status == 200 and await unchanged.read() == image.manifest
    assert "Warning" not in unchanged.headers and unchanged.headers["X-Moorage-Cache"] == "miss"
    moved = upstream.add_image("library/alpine", "3.19", [b"new"])
    advance_clock(moorage, 3601)
    upstream.fail_next(1, status, methods={"HEAD"}, paths=r"/manifests/")
    upstream.reset_requests()
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 200 and await response.read() == moved.manifest
    assert response.headers["X-Moorage-Cache"] == "refreshed"
    assert upstream.count("HEAD", "/manifests/") == 1 and upstream.count("GET", "/manifests/") == 1


@pytest.mark.parametrize(
    ("omitted", "result", "gets"),
    [
        pytest.param({"Docker-Content-Digest"}, "revalidated", 0, id="read_by_its_etag"),
        # Counted as a miss (it cost a GET), not as ``refreshed``, which says the tag moved.
        pytest.param({"Docker-Content-Digest", "ETag"}, "miss", 1, id="checked_with_a_get"),
    ],
)
async def test_a_head_without_docker_content_digest(
    start_moorage: StartMoorage, upstream: FakeRegistry, omitted: set[str], result: str, gets: int
) -> None:
    moorage = await start_moorage(tag_ttl="1h")
    image = upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    upstream.manifest_head_omits = frozenset(omitted)
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 200 and await response.read() == image.manifest
    assert response.headers["X-Moorage-Cache"] == result
    assert upstream.count("HEAD", "/manifests/") == 1 and upstream.count("GET", "/manifests/") == gets
    assert await metric(moorage, "moorage_cache_results_total", kind="manifest", result="refreshed") == 0


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        pytest.param({"status": 429, "retry_after": 60}, "429", id="rate_limited"),
        pytest.param({"status": 503}, "503", id="server_error"),
        pytest.param(None, "down", id="unreachable"),
    ],
)
async def test_stale_answer_when_upstream_fails(
    start_moorage: StartMoorage, upstream: FakeRegistry, fault: dict[str, int] | None, reason: str
) -> None:
    moorage = await start_moorage(tag_ttl="1s")
    image = upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    await asyncio.sleep(1.1)
    if fault is None:
        await upstream.stop_listening()
    else:
        upstream.fail_next(10, fault["status"], retry_after=fault.get("retry_after"))
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 200, await response.text()
    assert await response.read() == image.manifest
    assert response.headers["Warning"] == '110 - "stale"'
    assert await metric(moorage, "moorage_cache_results_total", kind="manifest", result="stale") == 1


async def test_a_manifest_body_cut_mid_way_is_fetched_again(moorage: Client, upstream: FakeRegistry) -> None:
    """A connection lost inside the manifest's body is retried like one lost before its head:
    a 503 there would send a Docker daemon to Docker Hub, to spend the quota."""
    image = upstream.add_image("library/alpine", "3.19")
    upstream.manifest_bodies_to_cut = 1
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 200, await response.text()
    assert await response.read() == image.manifest
    assert upstream.count("GET", "/manifests/3.19") == 2 and upstream.manifest_bodies_to_cut == 0


async def test_upstream_429_with_nothing_cached_is_toomanyrequests(moorage: Client, upstream: FakeRegistry) -> None:
    upstream.add_image("library/alpine", "3.19")
    upstream.fail_next(5, 429, retry_after=120)
    # Bounded: a cache that waited out the Retry-After would hold the client for two minutes.
    response = await asyncio.wait_for(moorage.get("/v2/alpine/manifests/3.19", headers=ALL), 30)
    assert response.status == 429
    assert response.headers["Retry-After"] == "120"
    body = await response.json()
    assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
    # Retry-After above the configured max wait: no retry, the client learns at once.
    assert upstream.count("GET", "/manifests/") == 1


async def test_a_429_without_retry_after_is_asked_again_a_second_later_at_the_soonest(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """public.ecr.aws allows anonymous clients one request a second: retried after 0.1 and
    0.2 s, a multi-arch pull's platform manifest failed with all three attempts in half a
    second."""
    moorage = await start_moorage(upstream_settings={"retries": {"attempts": 3, "max_wait": "5s"}})
    upstream.add_image("library/alpine", "3.19")
    upstream.fail_next(2, 429, paths=r"/manifests/")
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 200
    first, second, third = [r.at for r in upstream.requests if r.method == "GET" and "/manifests/" in r.path]
    assert second - first >= 1.0 and third - second >= 2.0, "a second, then twice that"


async def test_a_stale_tag_meeting_a_429_is_served_at_once_and_says_why(
    start_moorage: StartMoorage, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Waiting out a 429 before the stale answer took some 4 s, or, past revalidate_timeout,
    was logged as 'no answer' instead of the 429."""
    moorage = await start_moorage(tag_ttl="1h", upstream_settings={"retries": {"attempts": 3, "max_wait": "5s"}})
    upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    advance_clock(moorage, 3601)
    upstream.reset_requests()
    upstream.fail_next(5, 429, paths=r"/manifests/")
    stale = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert stale.status == 200 and stale.headers["X-Moorage-Cache"] == "stale"
    assert upstream.count("HEAD", "/manifests/") == 1, "not asked again: the stored answer stands in"
    (failed,) = [r for r in caplog.records if getattr(r, "event", "") == "revalidation_failed"]
    assert "429" in getattr(failed, "error", "")


async def test_429_with_pull_budget_spent_is_not_retried(moorage: Client, upstream: FakeRegistry) -> None:
    # Docker Hub's answer once the anonymous budget is gone: 429, remaining 0, no Retry-After.
    upstream.add_image("library/alpine", "3.19")
    upstream.ratelimit = (100, 0)
    upstream.ratelimit_countdown = True
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 429
    assert (await response.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    # The window is six hours: asking again within a second would only add to the count.
    assert upstream.count("GET", "/manifests/") == 1
    assert await metric(moorage, "moorage_upstream_retries_total") == 0


async def test_short_429_and_5xx_are_retried(moorage: Client, upstream: FakeRegistry) -> None:
    image = upstream.add_image("library/alpine", "3.19")
    upstream.fail_next(1, 429, retry_after=0)
    upstream.fail_next(1, 502)
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 200 and await response.read() == image.manifest
    assert upstream.count("GET", "/manifests/") == 3
    assert await metric(moorage, "moorage_upstream_retries_total") == 2


async def test_a_429_is_asked_again_only_once_its_retry_after_has_passed(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """Asked again at once, a registry that rate-limits counts one more request against the
    budget it just said was spent for now."""
    image = upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage(upstream_settings={"retries": {"attempts": 3, "max_wait": "5s"}})
    upstream.fail_next(1, 429, retry_after=1)
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 200 and await response.read() == image.manifest
    refused, answered = [r for r in upstream.requests if r.method == "GET" and "/manifests/" in r.path]
    assert answered.at - refused.at >= 0.95, "the Retry-After of 1 s was waited out"


async def test_upstream_down_with_nothing_cached_is_503(
    moorage: Client, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    await upstream.stop_listening()
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 503
    assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"
    [warned] = [r for r in caplog.records if getattr(r, "event", "") == "upstream_failed"]  # the operator hears
    assert (warned.levelname, warned.__dict__["upstream"], warned.__dict__["status"]) == ("WARNING", "docker.io", 503)


async def test_readiness_tells_the_last_failure_without_naming_what_was_asked(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """/readyz is open to anyone who reaches the cache: no repository or tag in it."""
    upstream.fail_next(5, 503)
    assert (await moorage.get("/v2/team/secret-project/manifests/v2-prerelease", headers=ALL)).status == 503
    ready = await moorage.get("/readyz")
    text = await ready.text()
    assert "secret-project" not in text and "v2-prerelease" not in text
    failure = (await ready.json())["upstreams"]["docker.io"]["last_failure"]
    assert failure["error"] == "HTTP 503"


async def test_readiness_orders_answers_and_failures_by_when_they_happened_not_by_the_clock(
    moorage: Client, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer after a failure means the upstream is back. Ordered by wall-clock time, an
    answer after the clock was stepped back came before the failure, and /readyz said the
    upstream that was answering was unreachable."""
    upstream.add_image("library/alpine", "3.19")
    upstream.fail_next(5, 503)
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 503
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    monkeypatch.setattr(time, "time", real_time)
    assert (await (await moorage.get("/readyz")).json())["upstreams"]["docker.io"]["reachable"] is True


@pytest.mark.parametrize(
    ("link", "following"),
    [
        pytest.param('</v2/library/alpine/tags/list?last=a%0d%0aSet-Cookie:%20x&n=2>; rel="next"', None, id="crlf"),
        pytest.param(
            "</v2/library/alpine/tags/list?last=a%3E%3B%20rel%3D%22next%22%2C%20%3Chttps%3A%2F%2Fevil.example%2F"
            '&n=2>; rel="next"',
            "last=a%3E%3B+rel%3D%22next%22%2C+%3Chttps%3A%2F%2Fevil.example%2F&n=2",
            id="a_second_link",
        ),
        pytest.param('</v2/library/alpine/tags/list?last=b&n=two>; rel="next"', "last=b", id="n_not_a_number"),
        pytest.param('</v2/library/alpine/tags/list?last=b&n=1234567>; rel="next"', "last=b", id="n_too_long"),
    ],
)
async def test_an_upstream_next_page_link_is_passed_on_percent_encoded_or_not_at_all(
    moorage: Client, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture, link: str, following: str | None
) -> None:
    """What the upstream's link holds lands in a header of ours: a CRLF would add a header,
    a quote and a comma a second link to another host."""
    upstream.add_image("library/alpine", "a")
    upstream.add_image("library/alpine", "b")
    upstream.tags_link = link
    page = await moorage.get("/v2/alpine/tags/list?n=2")
    assert page.status == 200
    assert "Set-Cookie" not in page.headers
    if following is None:
        assert "Link" not in page.headers
        assert [r for r in caplog.records if getattr(r, "event", "") == "tags_page_dropped"]
    else:
        assert page.headers["Link"] == f'</v2/alpine/tags/list?{following}>; rel="next"'
        assert (await moorage.get(f"/v2/alpine/tags/list?{following}")).status == 200, "a link we give is taken"


async def test_a_tag_list_paged_by_the_upstream_s_own_token_is_listed_whole(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """Quay named its next page by a next_page token, with no last: the cache dropped the
    link, and `skopeo list-tags` through it saw 50 of a repository's tags."""
    upstream.tags_page_token = True
    names = [f"v{number:03d}" for number in range(120)]
    for name in names:
        upstream.add_image("owner/app", name, [b"layer"])
    listed: list[str] = []
    path: str | None = "/v2/owner/app/tags/list?ns=docker.io"
    while path is not None:
        page = await moorage.get(path)
        assert page.status == 200, await page.text()
        listed += (await page.json())["tags"]
        link = page.headers.get("Link")
        path = link[1 : link.index(">")] if link else None
        assert path is None or path.endswith("&ns=docker.io")
    assert listed == names
    assert any("next_page=pos-100" in request.query_string for request in upstream.requests)


async def test_a_manifest_the_client_holds_is_answered_304(moorage: Client, upstream: FakeRegistry) -> None:
    """The ETag is the digest: If-None-Match with it was answered with the whole manifest."""
    image = upstream.add_image("library/alpine", "3.19")
    etag = f'"{image.digest}"'
    for method in ("GET", "HEAD"):
        same = await moorage.request(method, "/v2/alpine/manifests/3.19", headers={**ALL, "If-None-Match": etag})
        assert (same.status, same.headers["ETag"], await same.read()) == (304, etag, b"")
    changed = await moorage.get(
        "/v2/alpine/manifests/3.19", headers={**ALL, "If-None-Match": '"sha256:' + "0" * 64 + '"'}
    )
    assert changed.status == 200 and await changed.read() == image.manifest
    refused = await moorage.get("/v2/alpine/manifests/3.19", headers={**ALL, "If-Match": '"sha256:' + "0" * 64 + '"'})
    assert refused.status == 412


async def test_unknown_tag_is_manifest_unknown(moorage: Client, caplog: pytest.LogCaptureFixture) -> None:
    response = await moorage.get("/v2/alpine/manifests/nope", headers=ALL)
    assert response.status == 404
    assert not [r for r in caplog.records if getattr(r, "event", "") == "upstream_failed"], "a 404 is no outage"
    assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_index_for_clients_that_take_indexes_and_platform_image_for_those_that_do_not(
    moorage: Client, upstream: FakeRegistry
) -> None:
    amd = upstream.add_image("library/multi", None, [b"amd"], architecture="amd64")
    arm = upstream.add_image("library/multi", None, [b"arm"], architecture="arm64")
    index = upstream.add_index("library/multi", "1", [(amd.digest, "linux", "amd64"), (arm.digest, "linux", "arm64")])
    full = await moorage.get("/v2/multi/manifests/1", headers=ALL)
    assert full.headers["Docker-Content-Digest"] == index
    assert full.headers["Content-Type"] == DOCKER_MANIFEST_LIST
    single = await moorage.get("/v2/multi/manifests/1", headers={"Accept": DOCKER_MANIFEST_V2})
    assert single.headers["Docker-Content-Digest"] == amd.digest
    assert await single.read() == amd.manifest
    # Each answer is cached under its own Accept class.
    upstream.reset_requests()
    assert (await moorage.get("/v2/multi/manifests/1", headers=ALL)).headers["Docker-Content-Digest"] == index
    assert (await moorage.get("/v2/multi/manifests/1", headers={"Accept": DOCKER_MANIFEST_V2})).headers[
        "Docker-Content-Digest"
    ] == amd.digest
    assert upstream.requests == []


async def test_a_client_that_takes_no_index_is_answered_from_a_single_image_held_for_others(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """A one-platform tag held for clients that take indexes answers a client that takes only
    image manifests after one HEAD (no GET), and while the upstream is down, stale rather
    than 503: upstream trouble stays upstream."""
    image = upstream.add_image("library/alpine", "3.19", media_type=OCI_MANIFEST)
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    upstream.reset_requests()
    only_oci = {"Accept": OCI_MANIFEST}
    confirmed = await moorage.get("/v2/alpine/manifests/3.19", headers=only_oci)
    assert confirmed.status == 200 and await confirmed.read() == image.manifest
    assert upstream.count("HEAD", "/manifests/3.19") == 1 and upstream.count("GET", "/manifests/") == 0

    other = upstream.add_image("library/alpine", "3.20", media_type=OCI_MANIFEST)
    assert (await moorage.get("/v2/alpine/manifests/3.20", headers=ALL)).status == 200
    await upstream.stop_listening()
    stale = await moorage.get("/v2/alpine/manifests/3.20", headers=only_oci)
    assert stale.status == 200, await stale.text()
    assert await stale.read() == other.manifest and stale.headers["Warning"] == '110 - "stale"'


async def test_a_single_image_the_upstream_moved_since_is_a_miss_for_a_client_that_takes_no_index(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """Counted as what it is for that client, a miss, not as a cached answer refreshed."""
    upstream.add_image("library/alpine", "3.19", [b"old"], media_type=OCI_MANIFEST)
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    moved = upstream.add_image("library/alpine", "3.19", [b"new"], media_type=OCI_MANIFEST)
    misses = await metric(moorage, "moorage_cache_results_total", kind="manifest", result="miss")
    response = await moorage.get("/v2/alpine/manifests/3.19", headers={"Accept": OCI_MANIFEST})
    assert response.headers["Docker-Content-Digest"] == moved.digest and await response.read() == moved.manifest
    assert await metric(moorage, "moorage_cache_results_total", kind="manifest", result="miss") == misses + 1
    assert await metric(moorage, "moorage_cache_results_total", kind="manifest", result="refreshed") == 0


async def test_a_client_that_takes_no_index_gets_the_linux_amd64_image_held_from_an_index_pull(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """After a current client pulled a multi-arch tag (the index, then linux/amd64 by digest),
    a client that takes no index is answered from the store after one HEAD, no counted GET,
    and stale while the upstream is down, not 503."""
    amd = upstream.add_image("library/multi", None, [b"amd"], architecture="amd64")
    arm = upstream.add_image("library/multi", None, [b"arm"], architecture="arm64")
    upstream.add_index("library/multi", "1", [(arm.digest, "linux", "arm64"), (amd.digest, "linux", "amd64")])
    assert (await moorage.get("/v2/multi/manifests/1", headers=ALL)).status == 200
    assert (await moorage.get(f"/v2/multi/manifests/{amd.digest}", headers=ALL)).status == 200
    upstream.reset_requests()
    only_image = {"Accept": DOCKER_MANIFEST_V2}
    confirmed = await moorage.get("/v2/multi/manifests/1", headers=only_image)
    assert confirmed.status == 200 and await confirmed.read() == amd.manifest
    assert confirmed.headers["Docker-Content-Digest"] == amd.digest
    assert upstream.count("HEAD", "/manifests/1") == 1 and upstream.count("GET", "/manifests/") == 0

    amd2 = upstream.add_image("library/multi", None, [b"amd2"], architecture="amd64")
    upstream.add_index("library/multi", "2", [(amd2.digest, "linux", "amd64")])
    assert (await moorage.get("/v2/multi/manifests/2", headers=ALL)).status == 200
    assert (await moorage.get(f"/v2/multi/manifests/{amd2.digest}", headers=ALL)).status == 200
    await upstream.stop_listening()
    stale = await moorage.get("/v2/multi/manifests/2", headers=only_image)
    assert stale.status == 200, await stale.text()
    assert await stale.read() == amd2.manifest and stale.headers["Warning"] == '110 - "stale"'


async def test_an_index_held_for_others_does_not_answer_a_client_that_takes_no_index(
    moorage: Client, upstream: FakeRegistry
) -> None:
    amd = upstream.add_image("library/multi", None, [b"amd"], architecture="amd64")
    index = upstream.add_index("library/multi", "1", [(amd.digest, "linux", "amd64")])
    assert (await moorage.get("/v2/multi/manifests/1", headers=ALL)).headers["Docker-Content-Digest"] == index
    await upstream.stop_listening()
    single = await moorage.get("/v2/multi/manifests/1", headers={"Accept": DOCKER_MANIFEST_V2})
    assert single.status == 503, "the index is not an answer for it, and the upstream cannot pick a platform"


@pytest.mark.parametrize("odd", ['"layers": null', '"layers": 7, "config": null', '"manifests": null'])
async def test_a_manifest_with_null_lists_is_served(moorage: Client, upstream: FakeRegistry, odd: str) -> None:
    """Go writes a nil slice as null: reading what such a manifest names (for the eviction
    order, gc and prefetch) finds nothing, and never fails the pull."""
    body = f'{{"schemaVersion": 2, "mediaType": "{OCI_MANIFEST}", {odd}}}'.encode()
    upstream.add_manifest("library/odd", "1", body, OCI_MANIFEST)
    for _ in range(2):
        response = await moorage.get("/v2/odd/manifests/1", headers=ALL)
        assert response.status == 200 and await response.read() == body


async def test_wrong_manifest_bytes_are_refused_and_not_kept(moorage: Client, upstream: FakeRegistry) -> None:
    image = upstream.add_image("library/alpine", "3.19")
    fake_digest = str(Digest.of(b"something else"))
    upstream.add_manifest("library/alpine", None, image.manifest, DOCKER_MANIFEST_V2)
    # Serve the image's bytes under a digest they do not hash to.
    upstream._manifests[fake_digest] = upstream._manifests[image.digest]
    upstream._repo_manifests["library/alpine"].add(fake_digest)
    response = await moorage.get(f"/v2/alpine/manifests/{fake_digest}", headers=ALL)
    assert response.status == 502
    assert "expected " + fake_digest in (await response.json())["errors"][0]["message"]
    upstream.reset_requests()
    again = await moorage.get(f"/v2/alpine/manifests/{fake_digest}", headers=ALL)
    assert again.status == 502
    assert upstream.count("GET", "/manifests/") == 1  # asked again: nothing was kept


async def test_manifest_above_4_mib_is_refused(moorage: Client, upstream: FakeRegistry) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_V2, "pad": "x" * MAX_MANIFEST_BYTES}).encode()
    upstream.add_manifest("library/huge", "1", body, DOCKER_MANIFEST_V2)
    response = await moorage.get("/v2/huge/manifests/1", headers=ALL)
    assert response.status == 502
    assert "limit" in (await response.json())["errors"][0]["message"]


@pytest.mark.parametrize("content_type", [DOCKER_MANIFEST_V1_SIGNED, "application/json"])
async def test_a_schema_1_manifest_is_refused_by_name_not_as_corrupt(
    moorage: Client, upstream: FakeRegistry, content_type: str
) -> None:
    """A signed schema 1 manifest's digest is over its payload without the signatures: it read
    as corrupt upstream content, a 502. Current clients no longer pull schema 1 either. Some
    registries label it only as JSON."""
    body = json.dumps({"schemaVersion": 1, "name": "library/old", "tag": "1", "signatures": []}).encode()
    upstream.add_manifest("library/old", "1", body, content_type)
    response = await moorage.get("/v2/old/manifests/1", headers=ALL)
    assert response.status == 404
    error = (await response.json())["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN" and "schema 1" in error["message"]


async def test_tag_answers_survive_a_restart(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    image = upstream.add_image("library/alpine", "3.19")
    first = await start_moorage()
    assert (await first.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    await first.close()
    upstream.reset_requests()
    second = await start_moorage()
    response = await second.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert await response.read() == image.manifest
    assert upstream.requests == []


async def test_tags_list_is_proxied_paginated_and_served_stale(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    moorage = await start_moorage(tags_list_ttl="1s")
    for tag in ("a", "b", "c"):
        upstream.add_image("owner/app", tag, [tag.encode()])
    page = await moorage.get("/v2/docker-hub/owner/app/tags/list?n=2")
    assert page.status == 200
    assert await page.json() == {"name": "docker-hub/owner/app", "tags": ["a", "b"]}
    assert page.headers["Link"] == '</v2/docker-hub/owner/app/tags/list?last=b&n=2>; rel="next"'
    rest = await moorage.get("/v2/docker-hub/owner/app/tags/list?n=2&last=b")
    assert (await rest.json())["tags"] == ["c"]
    assert (await (await moorage.get("/v2/docker-hub/owner/app/tags/list")).json())["tags"] == ["a", "b", "c"]
    await asyncio.sleep(1.1)
    await upstream.stop_listening()
    stale = await moorage.get("/v2/docker-hub/owner/app/tags/list?n=2")
    assert stale.status == 200 and stale.headers["Warning"] == '110 - "stale"'
    assert (await stale.json())["tags"] == ["a", "b"]
    # A page never asked for is cut from the whole list kept: a client that always sends n
    # got 503 while the list was in the index.
    unseen = await moorage.get("/v2/docker-hub/owner/app/tags/list?n=1&last=a")
    assert unseen.status == 200 and unseen.headers["Warning"] == '110 - "stale"'
    assert (await unseen.json())["tags"] == ["b"]
    assert unseen.headers["Link"] == '</v2/docker-hub/owner/app/tags/list?last=b&n=1>; rel="next"'
    # The kept list is whole: cut whatever it holds, a last that is no tag of it too.
    between = await moorage.get("/v2/docker-hub/owner/app/tags/list?n=5&last=bb")
    assert (await between.json())["tags"] == ["c"] and "Link" not in between.headers


@pytest.mark.parametrize(
    ("count", "query"),
    [(120, "n=10&last=v049"), (30, "n=10&next_page=pos-10")],
    ids=["past_the_kept_part", "a_token"],
)
async def test_a_page_the_kept_list_cannot_answer_is_not_made_up_during_an_outage(
    start_moorage: StartMoorage, upstream: FakeRegistry, count: int, query: str
) -> None:
    """The list kept is the upstream's first page only (it pages by default), or the page is
    named by the upstream's own token: cut from the kept list, either would be a stale answer
    that leaves tags out without a word."""
    moorage = await start_moorage(tags_list_ttl="1s")
    upstream.tags_page_token = True  # 50 a page unless n says otherwise
    image = upstream.add_image("owner/app", "v000")
    upstream.add_tags("owner/app", [f"v{number:03d}" for number in range(1, count)], image.digest)
    first = await moorage.get("/v2/owner/app/tags/list")
    assert len((await first.json())["tags"]) == min(count, 50)
    advance_clock(moorage, 5)
    await upstream.stop_listening()
    response = await moorage.get(f"/v2/owner/app/tags/list?{query}")
    assert response.status == 503, await response.text()


async def test_a_tag_list_larger_than_a_manifest_may_be_is_listed(moorage: Client, upstream: FakeRegistry) -> None:
    """gcr.io lists every digest of a repository in one answer: past 4 MiB, the manifest limit,
    the list was a 502."""
    image = upstream.add_image("owner/big", "v0")
    names = [f"nightly-{number:07d}-" + "x" * 50 for number in range(75_000)]
    upstream.add_tags("owner/big", names, image.digest)
    response = await moorage.get("/v2/owner/big/tags/list")
    assert response.status == 200, await response.text()
    body = await response.read()
    assert len(body) > 4 * 1024 * 1024
    assert len(json.loads(body)["tags"]) == 75_001


async def test_what_clients_make_up_leaves_nothing_in_the_index(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """Tags the upstream does not have, and tag-list pages by every n and last a client can
    write, each left an entry in the index that nothing ever removed: any anonymous client
    could grow it without end."""
    moorage = await start_moorage()
    cache = moorage.app[CACHE]
    for tag in ("a", "b", "c"):
        upstream.add_image("owner/app", tag, [tag.encode()])
    for number in range(30):
        assert (await moorage.get(f"/v2/owner/app/manifests/made-up-{number}", headers=ALL)).status == 404
        assert (await moorage.get(f"/v2/owner/app/tags/list?n={number + 1:06d}")).status == 200
    assert (await moorage.get("/v2/owner/app/tags/list")).status == 200
    assert (await moorage.get("/v2/owner/app/manifests/a", headers=ALL)).status == 200
    await cache.flush()
    keys = list(cache._index._db.iterkeys())
    assert [k for k in keys if k[0] == "pulled"] == [("pulled", "docker.io", "owner/app", "a")]
    assert [k for k in keys if k[0] == "tags"] == [("tags", "docker.io", "owner/app", "", "")], "the whole list"


async def test_a_next_page_link_names_the_upstream_the_ns_resolved_to(moorage: Client, upstream: FakeRegistry) -> None:
    """The ns value went into the Link header as the client wrote it: a control character in
    it gave a 500 and a traceback."""
    for tag in ("a", "b", "c"):
        upstream.add_image("owner/app", tag, [tag.encode()])
    for ns in ("docker.io", "Docker.IO%0d%0a", "%20docker.io"):
        page = await moorage.get(f"/v2/owner/app/tags/list?n=2&ns={ns}")
        assert page.status == 200, await page.text()
        assert page.headers["Link"] == '</v2/owner/app/tags/list?last=b&n=2&ns=docker.io>; rel="next"'


async def test_rate_limit_budget_is_exported(moorage: Client, upstream: FakeRegistry) -> None:
    upstream.ratelimit = (100, 76)
    upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    assert await metric(moorage, "moorage_upstream_ratelimit_limit", upstream="docker.io") == 100
    assert await metric(moorage, "moorage_upstream_ratelimit_remaining", upstream="docker.io") == 76


async def test_a_429_from_the_token_service_counts_as_the_upstream_rate_limiting(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """Docker Hub limits at auth.docker.io too: the client had its 429, and the panel and alerts
    on 429s from upstreams saw nothing."""
    upstream.auth = "bearer"
    upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage()
    upstream.fail_next(5, 429, paths="^/token", retry_after=30)
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 429
    assert upstream.count("GET", "/token") == 1
    assert await metric(moorage, "moorage_upstream_rate_limited_total", upstream="docker.io") == 1


async def test_a_token_service_out_of_reach_is_named_with_what_failed(
    start_moorage: StartMoorage, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Docker Hub's token service is another host than its registry: the line said "token
    service unreachable: ConnectError", naming neither which host nor what failed (a name that
    does not resolve, a refused connection, TLS)."""
    upstream.auth = "bearer"
    upstream.token_realm = f"http://localhost:{closed_port()}/token"
    upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage()
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 503
    (line,) = [r for r in caplog.records if getattr(r, "event", "") == "upstream_failed"]
    error = getattr(line, "error", "")
    assert "token service at localhost: ConnectError: " in error, error
    assert error.split("ConnectError: ", 1)[1].strip(), "and what the connection met"
    assert getattr(line, "url", None) == upstream.url, "and where the registry itself is"


async def test_token_is_fetched_once_for_many_requests(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    upstream.auth = "bearer"
    upstream.token_expires_in = None  # absent: 60 s by the spec
    image = upstream.add_image("library/alpine", "3.19")
    for tag in ("b", "c", "d"):
        upstream.add_image("library/alpine", tag, [tag.encode()])
    moorage = await start_moorage()
    # Six different upstream requests at once, each needing a token for the same scope.
    responses = await asyncio.gather(
        *(moorage.get(f"/v2/alpine/manifests/{tag}", headers=ALL) for tag in ("3.19", "b", "c", "d")),
        moorage.get(f"/v2/alpine/blobs/{image.config_digest}"),
        moorage.get(f"/v2/alpine/blobs/{image.layer_digests[0]}"),
    )
    assert {r.status for r in responses} == {200}
    assert upstream.tokens_issued == 1
    assert (await moorage.get(f"/v2/alpine/manifests/{image.digest}", headers=ALL)).status == 200
    assert upstream.tokens_issued == 1, "a cached token must be reused"


@pytest.mark.parametrize("source", ["password_file", "password_env"])
async def test_upstream_credentials_are_sent_to_the_token_service(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """From a file, or from a variable as a CI service container receives its secrets."""
    password = tmp_path / "password"
    password.write_text("hunter2\n")
    monkeypatch.setenv("HUB_TOKEN", "hunter2")
    upstream.auth = "bearer"
    upstream.credentials = ("bob", "hunter2")
    upstream.add_image("private/app", "1")
    given = {"password_file": str(password)} if source == "password_file" else {"password_env": "HUB_TOKEN"}
    moorage = await start_moorage(upstream_settings={"username": "bob", **given})
    response = await moorage.get("/v2/private/app/manifests/1", headers=ALL)
    assert response.status == 200
    upstream.add_image("private/app", "2")
    # Without the password the cache pulls anonymously: as ghcr.io answers a name it does not
    # have, or a private one, the token service refuses. Not found, and said how to fix it.
    anonymous = await start_moorage(upstream_settings={"username": "bob"})
    refused = await anonymous.get("/v2/private/app/manifests/2", headers=ALL)
    assert refused.status == 404
    error = (await refused.json())["errors"][0]
    assert error["code"] == "NAME_UNKNOWN" and "anonymously: set credentials if private" in error["message"]


async def test_a_name_the_upstream_refuses_is_unknown_not_a_credentials_fault(
    start_moorage: StartMoorage, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Docker Hub grants an anonymous token for a name it does not hold, then answers 401: a
    typo, or a private repository. Clients without a fallback show the cache's answer."""
    caplog.set_level("INFO")
    upstream.auth = "bearer"
    upstream.grant_unknown = False
    upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage()
    response = await moorage.get("/v2/nosuch/app/manifests/1", headers=ALL)
    assert response.status == 404
    error = (await response.json())["errors"][0]
    assert error["code"] == "NAME_UNKNOWN"
    assert "no such repository" in error["message"] and "configuration" not in error["message"]
    assert upstream.count("GET", "/manifests/") >= 1, "the upstream was asked and answered 401"
    # It answered: the upstream is reachable, and a pull it holds goes through.
    ready = await (await moorage.get("/readyz")).json()
    assert ready["upstreams"]["docker.io"]["reachable"] is True, ready
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    # Nothing an alert watches: any client can ask for a name that does not exist.
    blob = await moorage.get("/v2/nosuch/app/blobs/sha256:" + "a" * 64)
    assert blob.status == 404
    assert await metric(moorage, "moorage_fill_failures_total") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert [r for r in caplog.records if getattr(r, "event", "") == "upstream_failed"], "still logged, at info"


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param("plain", id="quay_plain_challenge_to_its_token"),
        pytest.param(401, id="ghcr_token_service_401"),
        pytest.param(403, id="gcr_token_service_403"),
    ],
)
async def test_every_registry_s_way_of_refusing_a_name_is_unknown_not_an_outage(
    start_moorage: StartMoorage, upstream: FakeRegistry, refusal: str | int
) -> None:
    """Docker Hub's 401 insufficient_scope was the only refusal read as "no such repository":
    Quay's plain challenge to the token it had just given, and the 401 or 403 of ghcr.io's and
    gcr.io's token services, were 502 "check the credentials", and marked the upstream down."""
    upstream.auth = "bearer"
    upstream.grant_unknown = False
    upstream.unknown_refusal = refusal  # type: ignore[assignment]
    upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage()
    for path in ("/v2/nosuch/app/manifests/1", "/v2/nosuch/app/blobs/sha256:" + "a" * 64):
        response = await moorage.get(path, headers=ALL)
        assert response.status == 404, await response.text()
        assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    ready = await (await moorage.get("/readyz")).json()
    assert ready["upstreams"]["docker.io"]["reachable"] is not False, ready
    assert ready["upstreams"]["docker.io"]["last_failure"] is None, ready
    assert await metric(moorage, "moorage_fill_failures_total") == 0
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200


async def test_a_refusal_where_the_cache_signs_in_is_a_warning(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ECR answers an expired authorization token with 403: read as 'no such repository' and
    logged at info, a cache whose password stopped rotating failed every pull without a
    warning."""
    upstream.auth = "bearer"
    upstream.credentials = ("AWS", "token")
    upstream.add_image("team/app", "1")
    password = tmp_path / "password"
    password.write_text("token\n")
    moorage = await start_moorage(upstream_settings={"username": "AWS", "password_file": str(password)})
    upstream.fail_next(5, 403, paths=r"/manifests/")
    response = await moorage.get("/v2/team/app/manifests/1", headers=ALL)
    assert response.status == 404
    (failed,) = [r for r in caplog.records if getattr(r, "event", "") == "upstream_failed"]
    assert failed.levelno == logging.WARNING


async def test_a_refusal_where_the_cache_signs_in_to_another_upstream_stays_at_info(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Credentials for one upstream say nothing of a refusal by another the cache pulls from
    anonymously: a typo there is no outage."""
    caplog.set_level("INFO")
    upstream.auth = "bearer"
    upstream.grant_unknown = False
    password = tmp_path / "password"
    password.write_text("secret\n")
    hub = {"host": "docker.io", "url": upstream.url, "default": True, "prefetch_blobs": 0}
    other = {
        "host": "ghcr.io",
        "url": upstream.url,
        "prefixes": ["ghcr"],
        "username": "bob",
        "password_file": str(password),
    }
    moorage = await start_moorage(upstreams=[hub, other])
    assert (await moorage.get("/v2/nosuch/app/manifests/1", headers=ALL)).status == 404
    (failed,) = [r for r in caplog.records if getattr(r, "event", "") == "upstream_failed"]
    assert failed.levelno == logging.INFO


@pytest.mark.logs_errors("the upstream refused the configured credentials")
@pytest.mark.parametrize("status", [401, 403])
async def test_a_token_service_refusing_the_configured_password_is_a_credentials_fault(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, status: int
) -> None:
    """ghcr.io refuses a revoked or expired token with 403 DENIED: taken for 'no such
    repository', every pull of every image was a 404, and the upstream looked healthy."""
    upstream.auth = "bearer"
    upstream.credentials = ("bob", "right")
    upstream.add_image("private/app", "1")
    password = tmp_path / "password"
    password.write_text("wrong\n" if status == 401 else "right\n")
    if status == 403:
        upstream.fail_next(50, 403, paths=r"^/token")
    moorage = await start_moorage(upstream_settings={"username": "bob", "password_file": str(password)})
    response = await moorage.get("/v2/private/app/manifests/1", headers=ALL)
    assert response.status == 502
    assert "credentials" in (await response.json())["errors"][0]["message"]


async def test_a_registry_refusing_the_tokens_its_token_service_gives_is_no_missing_repository(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """invalid_token for a token just given (clocks apart, a signing key rotated) was read as
    'no such repository': every pull a 404, logged at info, the upstream looking healthy."""
    upstream.auth = "bearer"
    upstream.token_expires_in = 0  # dead on arrival
    upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage()
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert response.status == 502, await response.text()
    assert "invalid_token" in (await response.json())["errors"][0]["message"]


@pytest.mark.logs_errors("the upstream refused the configured credentials")
async def test_a_basic_auth_upstream_refusing_the_password_is_a_credentials_fault(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A registry behind htpasswd (Harbor, Artifactory, Distribution) answers a wrong password
    with its Basic challenge again: that is the cache's settings, not a missing repository."""
    upstream.auth = "basic"
    upstream.credentials = ("bob", "right")
    upstream.add_image("private/app", "1")
    password = tmp_path / "password"
    password.write_text("wrong\n")
    moorage = await start_moorage(upstream_settings={"username": "bob", "password_file": str(password)})
    response = await moorage.get("/v2/private/app/manifests/1", headers=ALL)
    assert response.status == 502
    assert "credentials" in (await response.json())["errors"][0]["message"]
    # The operator reads where to look too, not only "access refused (HTTP 401)".
    (failed,) = [r for r in caplog.records if getattr(r, "event", "") == "upstream_failed"]
    assert "check this upstream's credentials" in getattr(failed, "error", "")


async def test_a_slow_upstream_gets_a_stale_answer_within_the_deadline_then_backs_off(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    moorage = await start_moorage(tag_ttl="1s", revalidate_timeout="0.5s", stale_backoff="30s")
    image = upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    await asyncio.sleep(1.1)
    upstream.delay_next(1, 3.0, paths=r"/manifests/")
    started = time.monotonic()
    slow = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert time.monotonic() - started < 2.0
    assert slow.headers["Warning"] == '110 - "stale"' and await slow.read() == image.manifest
    upstream.reset_requests()
    await upstream.stop_listening()
    backed_off = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert backed_off.headers["Warning"] == '110 - "stale"'
    assert upstream.requests == [], "within the back-off the upstream is not asked again"


async def test_a_hung_revalidation_stalls_one_pull_not_one_per_back_off(
    start_moorage: StartMoorage, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """The HEAD never answers. After the back-off the next pull finds it still running: it is
    answered stale at once, not made to wait the whole deadline again."""
    moorage = await start_moorage(
        tag_ttl="1s",
        revalidate_timeout="2s",
        stale_backoff="0.2s",
        upstream_settings={"timeouts": {"connect": "2s", "read": "60s"}},
    )
    image = upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    await asyncio.sleep(1.1)
    upstream.reset_requests()
    upstream.delay_next(1, 30.0, paths=r"/manifests/")
    firsts = await asyncio.gather(*(moorage.get("/v2/alpine/manifests/3.19", headers=ALL) for _ in range(3)))
    for first in firsts:
        assert first.headers["Warning"] == '110 - "stale"' and await first.read() == image.manifest

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", "") == "revalidation_failed"]

    assert len(failures()) == 1, "three clients waited on one failed revalidation: one warning"
    await asyncio.sleep(0.3)  # the back-off is over, the HEAD still hangs
    started = time.monotonic()
    second = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert time.monotonic() - started < 1.0, "not another wait for the 2 s deadline"
    assert second.headers["Warning"] == '110 - "stale"' and await second.read() == image.manifest
    assert [r.method for r in upstream.requests if "/manifests/" in r.path] == ["HEAD"]
    failed = failures()
    assert len(failed) == 2 and failed[0].levelname == "WARNING"
    fields = failed[0].__dict__
    assert (fields["upstream"], fields["repository"], fields["tag"]) == ("docker.io", "library/alpine", "3.19")
    assert "no answer within 2 s" in fields["error"]


async def test_hung_revalidations_hold_a_few_of_the_upstreams_connections_not_all(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revalidation goes on after its clients were answered stale: 80 hung HEADs took every
    connection to the upstream for three minutes, and pulls of images with no fault waited 54 s.
    Revalidations of one upstream in flight are bounded; the tags beyond are answered stale."""
    monkeypatch.setattr("moorage.cache._cache.MAX_REVALIDATIONS", 4)
    moorage = await start_moorage(
        tag_ttl="1s", revalidate_timeout="0.5s", upstream_settings={"timeouts": {"read": "60s"}}
    )
    images = [upstream.add_image("library/alpine", str(number), [str(number).encode()]) for number in range(12)]
    for number in range(12):
        assert (await moorage.get(f"/v2/alpine/manifests/{number}", headers=ALL)).status == 200
    await asyncio.sleep(1.1)
    upstream.reset_requests()
    upstream.delay_next(12, 30.0, paths=r"/manifests/", methods=["HEAD"])
    answers = await asyncio.gather(*(moorage.get(f"/v2/alpine/manifests/{n}", headers=ALL) for n in range(12)))
    for answer, image in zip(answers, images, strict=True):
        assert answer.headers["Warning"] == '110 - "stale"' and await answer.read() == image.manifest
    await asyncio.sleep(0.5)
    assert upstream.count("HEAD", "/manifests/") == 4, "four in flight, the rest waiting their turn"


async def test_a_429_with_retry_after_keeps_the_stale_answer_without_asking_that_long(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """Asking again before the upstream's Retry-After would only meet another 429."""
    moorage = await start_moorage(tag_ttl="1s", stale_backoff="0.2s")
    upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)).status == 200
    await asyncio.sleep(1.1)
    upstream.reset_requests()
    upstream.fail_next(10, 429, retry_after=60)
    limited = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert limited.headers["Warning"] == '110 - "stale"'
    asked = len(upstream.requests)
    await asyncio.sleep(0.4)  # past stale_backoff, well within Retry-After
    again = await moorage.get("/v2/alpine/manifests/3.19", headers=ALL)
    assert again.headers["Warning"] == '110 - "stale"'
    assert len(upstream.requests) == asked == 1, "not asked again before Retry-After"


@pytest.mark.logs_errors("the upstream refused the configured credentials")
@pytest.mark.parametrize("auth", ["basic", "bearer"])
async def test_refused_credentials_are_not_sent_again_until_a_while_passes_or_the_password_changes(
    start_moorage: StartMoorage,
    upstream: FakeRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    auth: Literal["basic", "bearer"],
) -> None:
    """Every pull signed in again with the refused password: 200 pulls, 200 failed sign-ins,
    and a registry that locks an account after some (Harbor or Artifactory over LDAP) locked
    the cache's. One line says what was refused, for whom, and where the password comes from."""
    monkeypatch.setattr("moorage.upstreams._auth.PASSWORD_CHECK_SECONDS", 0.0)
    password = tmp_path / "password"
    password.write_text("wrong\n")
    upstream.auth = auth
    upstream.credentials = ("bob", "right")
    upstream.add_image("private/app", "1")
    moorage = await start_moorage(upstream_settings={"username": "bob", "password_file": str(password)})
    signed_in = "/token" if auth == "bearer" else "/manifests/"
    answers = [await moorage.get("/v2/private/app/manifests/1", headers=ALL) for _ in range(5)]
    assert {answer.status for answer in answers} == {502}
    assert upstream.count("GET", signed_in) == (1 if auth == "bearer" else 2), "one sign-in, not five"
    assert "not sent again for 30 s" in (await answers[-1].json())["errors"][0]["message"]
    (refused,) = [r for r in caplog.records if getattr(r, "event", "") == "upstream_credentials_refused"]
    assert getattr(refused, "username", None) == "bob" and getattr(refused, "password_file", None) == str(password)
    password.write_text("right\n")  # the operator mends it: the next pull signs in at once
    response = await moorage.get("/v2/private/app/manifests/1", headers=ALL)
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("rotation", ["rewritten", "replaced_alike"])
async def test_a_rotated_upstream_password_is_used_without_a_restart(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rotation: str
) -> None:
    """The file rewritten (a new size and time), or swapped for a new one (as a Secret's update
    does) of the same length within one tick of a coarse file-system clock: told apart by time
    and size alone, the old password was used until the next change, every pull refused."""
    monkeypatch.setattr("moorage.upstreams._auth.PASSWORD_CHECK_SECONDS", 0.0)
    password = tmp_path / "password"
    password.write_text("first\n")
    upstream.auth = "bearer"
    upstream.credentials = ("bob", "first")
    for tag in ("1", "2"):
        upstream.add_image("private/app", tag, [tag.encode()])
    moorage = await start_moorage(upstream_settings={"username": "bob", "password_file": str(password)})
    assert (await moorage.get("/v2/private/app/manifests/1", headers=ALL)).status == 200
    if rotation == "rewritten":
        rotated_password = "second-and-longer"
        password.write_text(f"{rotated_password}\n")
    else:
        rotated_password = "other"
        rotated = tmp_path / "password.new"
        rotated.write_text(f"{rotated_password}\n")
        before = password.stat()
        os.utime(rotated, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(rotated, password)
    upstream.credentials = ("bob", rotated_password)  # the registry rotated it too
    upstream.expire_tokens()
    response = await moorage.get("/v2/private/app/manifests/2", headers=ALL)
    assert response.status == 200, await response.text()


async def test_tokens_fetched_with_a_rotated_password_are_not_used_again(
    start_moorage: StartMoorage,
    upstream: FakeRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A password rotated because it leaked: the tokens the old one got stay valid at the
    registry until they expire, but the cache no longer pulls with them."""
    caplog.set_level("INFO")
    monkeypatch.setattr("moorage.upstreams._auth.PASSWORD_CHECK_SECONDS", 0.0)
    password = tmp_path / "password"
    password.write_text("first\n")
    upstream.auth = "bearer"
    upstream.credentials = ("bob", "first")
    for tag in ("1", "2", "3", "4", "5"):
        upstream.add_image("private/app", tag, [tag.encode()])
    moorage = await start_moorage(upstream_settings={"username": "bob", "password_file": str(password)})
    assert (await moorage.get("/v2/private/app/manifests/1", headers=ALL)).status == 200
    issued = upstream.tokens_issued
    password.write_text("second-and-longer\n")  # a new size: seen at once, whatever the mtime
    upstream.credentials = ("bob", "second-and-longer")
    assert (await moorage.get("/v2/private/app/manifests/2", headers=ALL)).status == 200
    assert upstream.tokens_issued == issued + 1, "a token of the new password's"
    # The operator sees the change, and a file that cannot be read, once, not at every pull.
    events = [getattr(r, "event", "") for r in caplog.records]
    assert events.count("upstream_password_reloaded") == 1
    password.unlink()
    for tag in ("3", "4", "5"):  # each asks the upstream
        assert (await moorage.get(f"/v2/private/app/manifests/{tag}", headers=ALL)).status == 200, "the last one read"
    events = [getattr(r, "event", "") for r in caplog.records]
    assert events.count("upstream_password_unreadable") == 1
    assert "second-and-longer" not in caplog.text


async def test_a_body_nested_past_the_json_parsers_depth_is_served_as_given(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """Parsing it (its media type, what it names for the prefetch) raised RecursionError,
    which nothing caught: a traceback in the log for what an upstream chose to send."""
    body = b"[" * 100_000 + b"]" * 100_000
    upstream.add_manifest("owner/app", "deep", body, OCI_MANIFEST)
    response = await moorage.get("/v2/owner/app/manifests/deep", headers=ALL)
    assert response.status == 200
    assert await response.read() == body


@pytest.mark.parametrize(
    ("body", "named"),
    [
        pytest.param(b'{"name":"library/alpine","tags":["3"]}', b'{"name":"alpine","tags":["3"]}', id="name_first"),
        pytest.param(b' {"name" : "a\\"b", "tags": []}', b'{"name":"alpine", "tags": []}', id="spaced_escaped"),
        pytest.param(b'{"tags":["3"],"name":"library/alpine"}', b'{"tags": ["3"], "name": "alpine"}', id="name_last"),
        pytest.param(b"not json", b"not json", id="no_json"),
    ],
)
async def test_a_tag_list_is_named_as_the_client_named_the_repository(body: bytes, named: bytes) -> None:
    """The leading name is replaced in the bytes: a list of megabytes was parsed at every
    answer, hits too, taking some ten times its size and the event loop meanwhile."""
    assert await _named(body, "alpine") == named
