"""Prefetch: an image manifest from the upstream arms a prefetch, and the client's first layer
request fires it: the image's other blobs are fetched ahead of the client, a few at a time.
Each blob is still fetched once, and the client's first answer for each says ``prefetched``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from moorage.cache import _prefetch, _store
from moorage.cache._prefetch import MAX_ARMED_MANIFEST
from moorage.proxy._state import CACHE
from tests.fakes import FakeImage, FakeRegistry
from tests.fakes.registry import DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2, digest_of
from tests.polling import until

from .conftest import StartMoorage, metric

Client = TestClient[web.Request, web.Application]
BLOB_PATHS = r"/blobs/"
# For tests whose upstream holds a body back for seconds: a read timeout would resume the
# download, a second GET.
PATIENT = {"connect": "2s", "read": "10s"}


async def blob(moorage: Client, repository: str, digest: str) -> str:
    """GET a blob, check its bytes against the digest; the X-Moorage-Cache answer."""
    response = await moorage.get(f"/v2/{repository}/blobs/{digest}")
    assert response.status == 200, await response.text()
    assert digest_of(await response.read()) == digest
    return response.headers["X-Moorage-Cache"]


async def test_a_pull_finds_the_rest_of_its_image_fetched_once_and_ahead_of_it(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    image = upstream.add_image("team/app", "1", [os.urandom(200_000) for _ in range(4)])
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3})
    cache = moorage.app[CACHE]

    assert (await moorage.get("/v2/team/app/manifests/1")).status == 200
    assert cache.prefetches.armed == 4 and upstream.count("GET", BLOB_PATHS) == 0
    # The config alone is what inspecting tools read: it fires nothing.
    assert await blob(moorage, "team/app", image.config_digest) == "miss"
    assert cache.prefetches.armed == 4 and len(cache.prefetches) == 0

    assert await blob(moorage, "team/app", image.layer_digests[0]) == "miss"
    assert cache.prefetches.armed == 0
    # Before the client asks for them, the other layers are fetched, each once.
    await until(lambda: upstream.count("GET", BLOB_PATHS) == 5 and not cache.fills.digests)
    for digest in image.layer_digests[1:]:
        assert await blob(moorage, "team/app", digest) == "prefetched"
    # The client's own fetch, not the prefetch's (it may still be storing it: "coalesced").
    assert await blob(moorage, "team/app", image.layer_digests[1]) in {"hit", "coalesced"}
    assert upstream.count("GET", BLOB_PATHS) == 5
    assert await metric(moorage, "moorage_cache_results_total", kind="blob", result="prefetched") == 3


async def test_a_client_asking_during_a_prefetch_joins_it(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    image = upstream.add_image("team/app", "1", [os.urandom(1000), os.urandom(2 * 1024 * 1024)])
    # The prefetch's body stops half-way: the client arrives while it runs.
    upstream.stall_blob(image.layer_digests[1], after_bytes=1024 * 1024, seconds=3.0)
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 2, "timeouts": PATIENT})

    assert (await moorage.get("/v2/team/app/manifests/1")).status == 200
    assert await blob(moorage, "team/app", image.layer_digests[0]) == "miss"
    fills = moorage.app[CACHE].fills
    await until(lambda: [str(digest) for digest in fills.digests] == [image.layer_digests[1]])
    assert fills.readers == 0  # a prefetch is no client following a fill (moorage_fill_readers)
    response = await moorage.get(f"/v2/team/app/blobs/{image.layer_digests[1]}")
    assert response.status == 200 and response.headers["X-Moorage-Cache"] == "prefetched"
    assert fills.readers == 1 and [str(digest) for digest in fills.digests] == [image.layer_digests[1]]
    assert digest_of(await response.read()) == image.layer_digests[1]
    assert upstream.count("GET", image.layer_digests[1]) == 1


async def test_at_most_prefetch_blobs_fetches_run_for_an_image(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    image = upstream.add_image("team/app", "1", [os.urandom(1000) for _ in range(5)])
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 2, "timeouts": PATIENT})
    assert (await moorage.get("/v2/team/app/manifests/1")).status == 200
    upstream.delay_next(6, 3.0, paths=BLOB_PATHS)  # every blob answers late

    first = asyncio.ensure_future(blob(moorage, "team/app", image.layer_digests[0]))
    await until(lambda: upstream.count("GET", BLOB_PATHS) == 3)  # the client's, and two
    await asyncio.sleep(0.3)  # a fourth would have been asked for by now
    assert upstream.count("GET", BLOB_PATHS) == 3
    # In the manifest's order: the config, then (its download slow) the next layer.
    asked = {r.path.rsplit("/", 1)[1] for r in upstream.requests if "/blobs/" in r.path}
    assert asked == {image.layer_digests[0], image.config_digest, image.layer_digests[1]}
    assert await first == "miss"


async def test_the_next_prefetch_download_runs_while_the_last_blob_is_made_durable(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making a blob durable (fsync, rename) needs no download slot: with the commits of the
    image's blobs held up, the one-at-a-time prefetch still fetches all of them."""
    image = upstream.add_image("team/app", "1", [os.urandom(1000) for _ in range(3)])
    blobs = {image.config_digest, *image.layer_digests}
    release = threading.Event()
    commit = _store._PendingFile.commit

    def held_commit(pending: _store._PendingFile) -> _store.Fingerprint:
        if str(pending._digest) in blobs:
            release.wait(10)
        return commit(pending)

    monkeypatch.setattr(_store._PendingFile, "commit", held_commit)
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3})
    try:
        assert (await moorage.get("/v2/team/app/manifests/1")).status == 200
        assert await blob(moorage, "team/app", image.layer_digests[0]) == "miss"
        await until(lambda: upstream.count("GET", BLOB_PATHS) == 4, within=5)
    finally:
        release.set()
    for digest in image.layer_digests[1:]:
        assert await blob(moorage, "team/app", digest) == "prefetched"
    assert upstream.count("GET", BLOB_PATHS) == 4


async def pull_with_prefetch(start_moorage: StartMoorage, upstream: FakeRegistry, image: FakeImage) -> int:
    """Pull team/app:1 as skopeo does: its first layer fires the prefetch, which fetches every
    other blob once, and each later layer's first answer is ``prefetched``; how many blob
    bodies the upstream sent at once."""
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3})
    cache = moorage.app[CACHE]
    blobs = 1 + len(image.layer_digests)
    assert (await moorage.get("/v2/team/app/manifests/1")).status == 200
    assert await blob(moorage, "team/app", image.layer_digests[0]) == "miss"
    await until(lambda: upstream.count("GET", BLOB_PATHS) == blobs and not cache.fills.digests)
    for digest in image.layer_digests[1:]:
        assert await blob(moorage, "team/app", digest) == "prefetched"
    assert upstream.count("GET", BLOB_PATHS) == blobs
    return upstream.most_blob_bodies_in_flight


async def most_downloads_at_once(
    start_moorage: StartMoorage,
    upstream: FakeRegistry,
    monkeypatch: pytest.MonkeyPatch,
    fast_rate: int,
    *,
    layer_mib: int = 1,
    window: float = 0.05,
) -> int:
    """Pull an image of four ``layer_mib`` MiB layers the upstream sends at about 6.5 MB/s, with
    ``FAST_FILL_RATE`` at ``fast_rate`` and rates judged over ``window`` seconds; how many blob
    bodies the upstream sent at once."""
    monkeypatch.setattr(_prefetch, "FAST_FILL_RATE", fast_rate)
    monkeypatch.setattr(_prefetch, "RAMP_SECONDS", window)
    monkeypatch.setattr(_prefetch, "CLIENT_LOOK_SECONDS", window)
    image = upstream.add_image("team/app", "1", [os.urandom(layer_mib * 1024 * 1024) for _ in range(4)])
    for digest in image.layer_digests:
        upstream.slow_blob(digest, chunk=64 * 1024, delay=0.01)
    return await pull_with_prefetch(start_moorage, upstream, image)


async def test_one_prefetch_at_a_time_while_downloads_run_fast(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where one connection brings more than ``FAST_FILL_RATE``, more at once would only
    share the cache's and the client's CPU: the client's download, then one prefetch at a
    time. (Rates judged over 0.3 s, well below the upstream's: a busy machine's pause of a
    few tens of ms is no slow download.)"""
    most = await most_downloads_at_once(
        start_moorage, upstream, monkeypatch, fast_rate=500_000, layer_mib=4, window=0.3
    )
    assert most == 1


async def test_prefetch_blobs_at_once_while_downloads_run_slow(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where each connection is slow (across the internet), the prefetch widens to
    ``prefetch_blobs`` at once: here the client's download and more than one prefetch."""
    assert await most_downloads_at_once(start_moorage, upstream, monkeypatch, fast_rate=50_000_000) >= 3


async def test_a_slow_client_download_does_not_hold_the_prefetch_back(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """Only a client download that runs fast has the cores to itself first: from a far or slow
    upstream the prefetch starts beside it."""
    image = upstream.add_image("team/app", "1", [os.urandom(1000) for _ in range(3)])
    upstream.stall_blob(image.layer_digests[0], after_bytes=0, seconds=4.0)
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3, "timeouts": PATIENT})
    assert (await moorage.get("/v2/team/app/manifests/1")).status == 200
    pulling = asyncio.ensure_future(blob(moorage, "team/app", image.layer_digests[0]))
    await until(lambda: upstream.count("GET", image.config_digest) == 1, within=3.0)
    assert not pulling.done()
    assert await pulling == "miss"


async def most_downloads_at_once_with_late_bodies(
    start_moorage: StartMoorage,
    upstream: FakeRegistry,
    monkeypatch: pytest.MonkeyPatch,
    config_late: float,
    layers_late: float,
) -> int:
    """Pull an image of five small layers whose bodies start ``layers_late`` seconds after the
    request (the config's ``config_late``), as a far registry's do, with ``FAR_LATENCY`` at
    0.6 s (and no download running long enough to be judged by its rate); how many blob
    bodies the upstream sent at once."""
    monkeypatch.setattr(_prefetch, "FAR_LATENCY", 0.6)
    monkeypatch.setattr(_prefetch, "RAMP_SECONDS", 5.0)
    image = upstream.add_image("team/app", "1", [os.urandom(1000) for _ in range(5)])
    upstream.stall_blob(image.config_digest, after_bytes=0, seconds=config_late)
    for digest in image.layer_digests:
        upstream.stall_blob(digest, after_bytes=0, seconds=layers_late)
    return await pull_with_prefetch(start_moorage, upstream, image)


async def test_prefetch_blobs_at_once_from_a_far_upstream(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small blobs end before a download's rate is judged, but across the internet each one
    waits round trips: after two such downloads the rest go ``prefetch_blobs`` at once."""
    most = await most_downloads_at_once_with_late_bodies(
        start_moorage, upstream, monkeypatch, config_late=1.0, layers_late=1.0
    )
    assert most >= 3


async def test_one_late_download_leaves_the_prefetch_one_at_a_time(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh process's first download can be late on its own (connection, threads): the
    others answering at once, the prefetch stays at the client's download and one more."""
    most = await most_downloads_at_once_with_late_bodies(
        start_moorage, upstream, monkeypatch, config_late=1.0, layers_late=0.05
    )
    assert most <= 2


async def test_the_clients_own_late_download_counts_toward_a_far_upstream(
    start_moorage: StartMoorage, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's first layer, answered late, and the config, late too, are the two far
    downloads that widen the prefetch: the other layers, answered soon, then go at once."""
    monkeypatch.setattr(_prefetch, "FAR_LATENCY", 0.6)
    monkeypatch.setattr(_prefetch, "RAMP_SECONDS", 5.0)
    image = upstream.add_image("team/app", "1", [os.urandom(1000) for _ in range(5)])
    upstream.delay_next(1, 1.0, paths=image.layer_digests[0])
    upstream.stall_blob(image.config_digest, after_bytes=0, seconds=1.0)
    for digest in image.layer_digests[1:]:
        upstream.stall_blob(digest, after_bytes=0, seconds=0.1)
    assert await pull_with_prefetch(start_moorage, upstream, image) >= 3


async def test_prefetches_take_at_most_half_an_upstreams_download_slots(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    images = [upstream.add_image("team/app", tag, [os.urandom(1000) for _ in range(4)]) for tag in ("1", "2")]
    moorage = await start_moorage(
        upstream_settings={"prefetch_blobs": 3, "max_concurrent_fills": 6, "timeouts": PATIENT}
    )
    for tag in ("1", "2"):
        assert (await moorage.get(f"/v2/team/app/manifests/{tag}")).status == 200
    upstream.delay_next(20, 3.0, paths=BLOB_PATHS)  # every blob answers late

    # Two clients start two pulls: their own two fetches, and prefetches of both images.
    pulls = [asyncio.ensure_future(blob(moorage, "team/app", image.layer_digests[0])) for image in images]
    await until(lambda: upstream.count("GET", BLOB_PATHS) == 5)
    await asyncio.sleep(0.3)  # a sixth would have been asked for by now
    # Prefetches hold 3 of the 6 slots; without the limit they would hold the other 4, and a
    # third client's fetch would wait behind them.
    assert upstream.count("GET", BLOB_PATHS) == 5
    assert await asyncio.gather(*pulls) == ["miss", "miss"]


async def test_a_prefetched_blob_is_prefetched_only_for_its_own_upstreams_clients(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """The first answer under the prefetch's upstream label reports the fetch it cost; to a
    client of another upstream that shares the blob, it was already in store."""
    shared = os.urandom(3000)
    upstream.add_image("library/alpine", "3.19", [shared])
    async with FakeRegistry() as private:
        image = private.add_image("team/app", "1", [os.urandom(2000), shared])
        moorage = await start_moorage(
            upstreams=[
                {"host": "docker.io", "url": upstream.url, "default": True},
                {"host": "registry.example.com", "url": private.url, "prefixes": ["private"], "prefetch_blobs": 3},
            ]
        )
        cache = moorage.app[CACHE]
        assert (await moorage.get("/v2/private/team/app/manifests/1")).status == 200
        assert await blob(moorage, "private/team/app", image.layer_digests[0]) == "miss"
        await until(lambda: private.count("GET", BLOB_PATHS) == 3 and not cache.fills.digests)

        assert await blob(moorage, "library/alpine", image.layer_digests[1]) == "hit"
        assert await blob(moorage, "private/team/app", image.layer_digests[1]) == "prefetched"
        assert await blob(moorage, "private/team/app", image.layer_digests[1]) == "hit"
    assert upstream.count("GET", BLOB_PATHS) == 0
    assert await metric(moorage, "moorage_cache_results_total", upstream="docker.io", result="prefetched") == 0
    hits = await metric(moorage, "moorage_cache_results_total", upstream="docker.io", kind="blob", result="hit")
    assert hits == 1
    prefetched = await metric(
        moorage, "moorage_cache_results_total", upstream="registry.example.com", result="prefetched"
    )
    assert prefetched == 1


async def test_nothing_armed_for_an_index_a_stored_manifest_or_when_off(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    amd = upstream.add_image("team/multi", None, [os.urandom(1000)])
    upstream.add_index("team/multi", "1", [(amd.digest, "linux", "amd64")])
    plain = upstream.add_image("team/plain", "1", [os.urandom(1000)])
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3})
    prefetches = moorage.app[CACHE].prefetches

    index = await moorage.get("/v2/team/multi/manifests/1", headers={"Accept": DOCKER_MANIFEST_LIST})
    assert index.status == 200
    assert prefetches.armed == 0  # an index names manifests, not blobs
    assert (await moorage.get(f"/v2/team/multi/manifests/{amd.digest}")).status == 200
    assert prefetches.armed == 1  # the platform's manifest, fetched by digest, arms its own

    # Fetched from the upstream, a manifest arms its prefetch; answered from the store, not.
    assert (await moorage.get("/v2/team/plain/manifests/1")).status == 200
    assert prefetches.armed == 2
    await blob(moorage, "team/plain", plain.layer_digests[0])
    await until(lambda: len(prefetches) == 0)
    assert (await moorage.get("/v2/team/plain/manifests/1")).status == 200
    assert prefetches.armed == 1

    # A manifest too large to parse on the event loop (about 2,000 layers) is not armed.
    huge = upstream.add_image("team/plain", "huge", [i.to_bytes(4, "big") for i in range(2000)])
    assert len(huge.manifest) > MAX_ARMED_MANIFEST
    assert (await moorage.get("/v2/team/plain/manifests/huge")).status == 200
    assert prefetches.armed == 1

    off = await start_moorage(upstream_settings={"prefetch_blobs": 0})
    upstream.add_image("team/plain", "2", [os.urandom(1000)])
    assert (await off.get("/v2/team/plain/manifests/2")).status == 200
    assert off.app[CACHE].prefetches.armed == 0


async def test_only_the_route_that_fetched_the_manifest_fires_it(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    shared = os.urandom(1000)
    image = upstream.add_image("team/app", "1", [shared, os.urandom(1000)])
    upstream.add_image("team/other", "1", [shared])
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3})
    prefetches = moorage.app[CACHE].prefetches

    assert (await moorage.get("/v2/team/app/manifests/1")).status == 200
    # The same layer pulled through another repository is another image's pull.
    assert await blob(moorage, "team/other", image.layer_digests[0]) == "miss"
    assert prefetches.armed == 2 and len(prefetches) == 0


async def test_a_layer_two_armed_images_share_fires_neither(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    base = os.urandom(1000)
    v1, v2 = (
        upstream.add_image("team/app", tag, [base, os.urandom(1000)], config=json.dumps({"tag": tag}).encode())
        for tag in ("1", "2")
    )
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3})
    prefetches = moorage.app[CACHE].prefetches

    for tag in ("1", "2"):  # v2 only read, as a dependency bot does
        assert (await moorage.get(f"/v2/team/app/manifests/{tag}")).status == 200
    assert await blob(moorage, "team/app", v1.layer_digests[0]) == "miss"
    assert len(prefetches) == 0
    assert await blob(moorage, "team/app", v1.layer_digests[1]) == "miss"
    await until(lambda: len(prefetches) == 0 and upstream.count("GET", v1.config_digest) == 1)
    assert upstream.count("GET", v2.layer_digests[1]) == 0 and upstream.count("GET", v2.config_digest) == 0
    assert prefetches.armed == 1  # v2's own layer still fires v2's


async def test_foreign_layers_are_left_to_their_urls(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    config = json.dumps({"architecture": "amd64", "os": "windows"}).encode()
    layers = [os.urandom(1000), os.urandom(1000)]
    config_digest = upstream.add_blob(config)
    digests = [upstream.add_blob(layer) for layer in layers]
    foreign = "sha256:" + hashlib.sha256(b"a base layer from elsewhere").hexdigest()
    layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_V2,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config),
                "digest": config_digest,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                    "size": 27,
                    "digest": foreign,
                    "urls": ["https://example.invalid/base.tar.gz"],
                },
                *({"mediaType": layer_type, "size": 1000, "digest": digest} for digest in digests),
            ],
        }
    ).encode()
    upstream.add_manifest("team/win", "1", body)
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3})

    assert (await moorage.get("/v2/team/win/manifests/1")).status == 200
    assert moorage.app[CACHE].prefetches.armed == 2
    await blob(moorage, "team/win", digests[0])
    await until(lambda: upstream.count("GET", BLOB_PATHS) == 3 and len(moorage.app[CACHE].prefetches) == 0)
    assert upstream.count("GET", foreign) == 0


async def test_a_failed_prefetch_is_not_the_clients_answer(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    image = upstream.add_image("team/app", "1", [os.urandom(1000), os.urandom(1000)])
    upstream.fail_next(1, 404, paths=image.layer_digests[1])
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3})

    assert (await moorage.get("/v2/team/app/manifests/1")).status == 200
    await blob(moorage, "team/app", image.layer_digests[0])
    await until(lambda: len(moorage.app[CACHE].prefetches) == 0)
    assert upstream.count("GET", image.layer_digests[1]) == 1
    assert await blob(moorage, "team/app", image.layer_digests[1]) == "miss"
    assert upstream.count("GET", image.layer_digests[1]) == 2
    # The client's own fetch, not the prefetch's (it may still be storing it: "coalesced").
    assert await blob(moorage, "team/app", image.layer_digests[1]) in {"hit", "coalesced"}


async def test_shutdown_stops_prefetches_and_leaves_no_temporaries(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    image = upstream.add_image("team/app", "1", [os.urandom(1000), os.urandom(4 * 1024 * 1024)])
    upstream.slow_blob(image.layer_digests[1], chunk=64 * 1024, delay=0.05)
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 3})
    cache = moorage.app[CACHE]

    assert (await moorage.get("/v2/team/app/manifests/1")).status == 200
    await blob(moorage, "team/app", image.layer_digests[0])
    await until(lambda: image.layer_digests[1] in map(str, cache.fills.digests))
    await moorage.close()
    assert len(cache.prefetches) == 0 and not cache.fills.digests
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    hex_digest = image.layer_digests[1].split(":")[1]
    assert not (tmp_path / "store" / "blobs" / "sha256" / hex_digest[:2] / hex_digest).exists()
