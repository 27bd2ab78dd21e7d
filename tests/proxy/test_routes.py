"""Content is read only through routes it is known under.

The store is shared by digest, so without this a client the access policy confines to some
repositories could read any cached blob or manifest by digest through one it may pull,
including content of a private upstream. These tests cache a private image through one
upstream, then ask for its content through another route as a confined client: the upstream
of that route decides (404 when it lacks the digest), confirmation costs one HEAD once, and a
client with no confinement (no policy) never causes one."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from moorage.proxy._state import CACHE
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS
from tests.fakes import DOCKER_MANIFEST_LIST, FakeImage, FakeRegistry, index_manifest
from tests.polling import until

from .conftest import StartMoorage, until_settled

Client = TestClient[web.Request, web.Application]
PASSWORD = "a long enough passphrase"
SHARED_LAYER = b"a base layer both registries serve" * 1000
SECRET_LAYER = b"a layer only the private registry has" * 1000
POLICY = [
    {"effect": "allow", "description": "admins pull everything", "users": ["admin"], "repositories": ["*"]},
    {"effect": "allow", "description": "ci pulls from docker.io", "users": ["ci"], "repositories": ["docker.io/*"]},
    {"effect": "deny", "description": "nobody else", "repositories": ["*"]},
]


def basic(user: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Accept": ACCEPT_ALL_MANIFESTS}


@pytest.fixture
async def private() -> AsyncIterator[FakeRegistry]:
    async with FakeRegistry() as registry:
        yield registry


@pytest.fixture
def htpasswd(tmp_path: Path) -> str:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    path.write_text(f"admin:{hashed}\nci:{hashed}\n")
    return str(path)


def two_upstreams(upstream: FakeRegistry, private: FakeRegistry) -> list[dict[str, Any]]:
    return [
        {"host": "docker.io", "url": upstream.url, "default": True, "retries": {"attempts": 1}},
        {"host": "registry.example.com", "url": private.url, "prefixes": ["private"], "retries": {"attempts": 1}},
    ]


def confined(upstream: FakeRegistry, private: FakeRegistry, htpasswd: str) -> dict[str, Any]:
    """Settings with both upstreams, the users and the access policy."""
    return {"upstreams": two_upstreams(upstream, private), "auth": {"htpasswd_file": htpasswd, "policy": POLICY}}


async def private_image_cached(
    start_moorage: StartMoorage, upstream: FakeRegistry, private: FakeRegistry, htpasswd: str
) -> tuple[Client, FakeImage]:
    """A confined cache holding the private image, whose first layer docker.io's alpine shares."""
    image = private.add_image("team/secret", "1", [SHARED_LAYER, SECRET_LAYER])
    upstream.add_image("library/alpine", "3.19", [SHARED_LAYER])
    moorage = await start_moorage(**confined(upstream, private, htpasswd))
    await cache_private_image(moorage, image)
    return moorage, image


async def cache_private_image(moorage: Client, image: FakeImage) -> None:
    """The admin pulls the private image: manifest and every blob are in the store after."""
    base = "/v2/private/team/secret"
    assert (await moorage.get(f"{base}/manifests/1", headers=basic("admin"))).status == 200
    for digest in (image.config_digest, *image.layer_digests):
        response = await moorage.get(f"{base}/blobs/{digest}", headers=basic("admin"))
        assert response.status == 200
        await response.read()
    await until_settled(moorage)  # stored: a client has its last byte before the blob is put in place


async def test_a_confined_client_cannot_read_private_content_through_a_route_it_may_pull(
    start_moorage: StartMoorage, upstream: FakeRegistry, private: FakeRegistry, htpasswd: str
) -> None:
    moorage, image = await private_image_cached(start_moorage, upstream, private, htpasswd)
    secret_layer = image.layer_digests[1]

    # Through its own route the confined client is refused by the policy, naming the rule.
    denied = await moorage.get(f"/v2/private/team/secret/blobs/{secret_layer}", headers=basic("ci"))
    assert denied.status == 403
    assert "rule 3 (nobody else)" in (await denied.json())["errors"][0]["message"]

    # Through a route it may pull, the digest is held, but docker.io does not have it there.
    upstream.reset_requests()
    for method in ("GET", "HEAD"):
        response = await moorage.request(method, f"/v2/library/alpine/blobs/{secret_layer}", headers=basic("ci"))
        assert response.status == 404, method
        if method == "GET":
            assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    manifest = await moorage.get(f"/v2/library/alpine/manifests/{image.digest}", headers=basic("ci"))
    assert manifest.status == 404
    assert (await manifest.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert upstream.count("GET", "/blobs/") == 0, "the store's copy was not served, and none was fetched"
    assert upstream.count("HEAD", f"/blobs/{secret_layer}") == 2, "each question went to the route's upstream"
    assert upstream.count("HEAD", f"/manifests/{image.digest}") == 1


async def test_content_the_route_also_has_is_confirmed_once_with_a_head_and_then_served(
    start_moorage: StartMoorage, upstream: FakeRegistry, private: FakeRegistry, htpasswd: str
) -> None:
    moorage, image = await private_image_cached(start_moorage, upstream, private, htpasswd)
    shared = image.layer_digests[0]
    upstream.reset_requests()
    for _ in range(3):
        response = await moorage.get(f"/v2/library/alpine/blobs/{shared}", headers=basic("ci"))
        assert response.status == 200
        assert await response.read() == SHARED_LAYER
        assert response.headers["X-Moorage-Cache"] == "hit"
    head = await moorage.head(f"/v2/library/alpine/blobs/{shared}", headers=basic("ci"))
    assert head.status == 200
    assert upstream.count("HEAD", f"/blobs/{shared}") == 1, "one HEAD confirms the route, for good"
    assert upstream.count("GET") == 0, "the bytes came from the store"

    # The route is remembered across a restart.
    await moorage.close()
    upstream.reset_requests()
    again = await start_moorage(**confined(upstream, private, htpasswd))
    response = await again.get(f"/v2/library/alpine/blobs/{shared}", headers=basic("ci"))
    assert await response.read() == SHARED_LAYER
    assert upstream.requests == []


@pytest.mark.parametrize("status", [405, 501])
async def test_an_upstream_that_refuses_head_confirms_a_route_with_a_get(
    start_moorage: StartMoorage, upstream: FakeRegistry, private: FakeRegistry, htpasswd: str, status: int
) -> None:
    """A registry that takes only GET: the route is confirmed by a GET of the blob's first byte
    and of the manifest, where the HEAD's refusal was a 502 (or, for 501, an outage)."""
    moorage, image = await private_image_cached(start_moorage, upstream, private, htpasswd)
    shared = image.layer_digests[0]
    upstream.fail_next(10, status, methods={"HEAD"})
    upstream.reset_requests()
    response = await moorage.get(f"/v2/library/alpine/blobs/{shared}", headers=basic("ci"))
    assert response.status == 200, await response.text()
    assert await response.read() == SHARED_LAYER and response.headers["X-Moorage-Cache"] == "hit"
    confirming = [r for r in upstream.requests if r.method == "GET" and r.path.endswith(f"/blobs/{shared}")]
    assert [r.headers.get("range") for r in confirming] == ["bytes=0-0"], "one byte asked for, not the blob"
    # A HEAD by a client for a blob the store does not hold: its size from that first byte too.
    other = upstream.add_blob(b"x" * 5000)
    head = await moorage.head(f"/v2/library/alpine/blobs/{other}", headers=basic("ci"))
    assert head.status == 200 and head.headers["Content-Length"] == "5000"
    # A manifest by digest held under the private route only, which docker.io has too:
    # confirmed by its GET.
    upstream.add_manifest("library/alpine", None, image.manifest)
    upstream.reset_requests()
    held = await moorage.get(f"/v2/library/alpine/manifests/{image.digest}", headers=basic("ci"))
    assert held.status == 200 and await held.read() == image.manifest
    assert upstream.count("GET", f"/manifests/{image.digest}") == 1


async def test_a_client_allowed_on_the_origin_route_reads_without_asking(
    start_moorage: StartMoorage, upstream: FakeRegistry, private: FakeRegistry, htpasswd: str
) -> None:
    image = private.add_image("team/secret", "1", [SHARED_LAYER, SECRET_LAYER])
    moorage = await start_moorage(**confined(upstream, private, htpasswd))
    await cache_private_image(moorage, image)
    upstream.reset_requests()
    response = await moorage.get(f"/v2/library/alpine/blobs/{image.layer_digests[1]}", headers=basic("admin"))
    assert response.status == 200, "the admin may pull the origin route, so nothing is revealed"
    assert await response.read() == SECRET_LAYER
    assert upstream.requests == []


async def test_without_a_policy_content_is_shared_by_digest_at_no_upstream_cost(
    start_moorage: StartMoorage, upstream: FakeRegistry, private: FakeRegistry
) -> None:
    image = private.add_image("team/secret", "1", [SHARED_LAYER, SECRET_LAYER])
    moorage = await start_moorage(upstreams=two_upstreams(upstream, private))
    base = "/v2/private/team/secret"
    assert (await moorage.get(f"{base}/manifests/1", headers={"Accept": ACCEPT_ALL_MANIFESTS})).status == 200
    await (await moorage.get(f"{base}/blobs/{image.layer_digests[0]}")).read()
    upstream.reset_requests()
    response = await moorage.get(f"/v2/library/alpine/blobs/{image.layer_digests[0]}")
    assert response.status == 200
    assert await response.read() == SHARED_LAYER
    assert upstream.requests == [], "every client may read every route: no confirmation is asked"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_confined_client_joining_another_routes_fill_is_confirmed_first(
    start_moorage: StartMoorage, upstream: FakeRegistry, private: FakeRegistry, htpasswd: str, method: str
) -> None:
    """A HEAD too: it would tell the confined client that the private blob exists, and its size."""
    image = private.add_image("team/secret", "1", [SHARED_LAYER, SECRET_LAYER])
    moorage = await start_moorage(**confined(upstream, private, htpasswd))
    secret_layer = image.layer_digests[1]
    private.slow_blob(secret_layer, chunk=4096, delay=0.02)
    admin = await moorage.get(f"/v2/private/team/secret/blobs/{secret_layer}", headers=basic("admin"))
    assert admin.status == 200  # its fill is in flight now, sending slowly
    upstream.reset_requests()
    refused = await moorage.request(method, f"/v2/library/alpine/blobs/{secret_layer}", headers=basic("ci"))
    assert refused.status == 404, "the fill in flight is not shared with a route whose upstream lacks it"
    assert refused.headers.get("Content-Length") != str(len(SECRET_LAYER))
    assert upstream.count("HEAD", f"/blobs/{secret_layer}") == 1
    assert await admin.read() == SECRET_LAYER


async def test_an_index_naming_private_content_does_not_serve_it_stale_to_a_confined_client(
    start_moorage: StartMoorage, upstream: FakeRegistry, private: FakeRegistry, htpasswd: str
) -> None:
    """An index on a route the client may pull, naming a manifest held only from a route it may
    not: asked for one image, the client had that manifest from the store, served stale once
    the upstream failed, past the policy."""
    moorage, image = await private_image_cached(start_moorage, upstream, private, htpasswd)
    index = index_manifest([(image.digest, len(image.manifest), image.media_type, "linux", "amd64")])
    upstream.add_manifest("owner/app", "1", index, DOCKER_MANIFEST_LIST)
    assert (await moorage.get("/v2/owner/app/manifests/1", headers=basic("ci"))).status == 200  # the index
    await upstream.stop_listening()
    image_only = {**basic("ci"), "Accept": image.media_type}
    answer = await moorage.get("/v2/owner/app/manifests/1", headers=image_only)
    assert answer.status == 503, "nothing this client may read to answer with"
    assert image.manifest not in await answer.read()
    served = await moorage.get("/v2/owner/app/manifests/1", headers={**basic("admin"), "Accept": image.media_type})
    assert served.status == 200 and await served.read() == image.manifest, "the admin may read it: stale"


async def test_a_confined_client_whose_joined_fill_failed_is_checked_on_the_next_one(
    start_moorage: StartMoorage, upstream: FakeRegistry, private: FakeRegistry, htpasswd: str
) -> None:
    """Two clients follow a fill that fails before its first byte; the first to wake starts
    its own from its route, and the second joined that one unchecked: a confined client read
    private content through a route it may pull."""
    image = private.add_image("team/secret", "1", [SHARED_LAYER, SECRET_LAYER])
    moorage = await start_moorage(**confined(upstream, private, htpasswd))
    cache = moorage.app[CACHE]
    secret_layer = image.layer_digests[1]
    upstream.delay_next(1, 1.0, paths=f"/blobs/{secret_layer}")  # then 404: docker.io lacks it

    async def pull(path: str, user: str) -> tuple[int, bytes]:
        response = await moorage.get(f"{path}/blobs/{secret_layer}", headers=basic(user))
        return response.status, await response.read()

    failing = asyncio.ensure_future(pull("/v2/library/alpine", "admin"))
    await until(lambda: len(cache.fills) == 1)
    admin = asyncio.ensure_future(pull("/v2/private/team/secret", "admin"))
    await until(lambda: cache.fills.readers == 2)
    confined_client = asyncio.ensure_future(pull("/v2/library/busybox", "ci"))
    await until(lambda: cache.fills.readers == 3)
    assert (await failing)[0] == 404
    assert await admin == (200, SECRET_LAYER), "the admin's next try fetched it from its own route"
    status, body = await confined_client
    assert status == 404 and SECRET_LAYER not in body, "checked against its route, which lacks it"
