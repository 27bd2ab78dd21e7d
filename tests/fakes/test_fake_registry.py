"""Tests of the fake registry and CDN themselves, driven by httpx over loopback.

These check that the fake speaks the protocol the way a real upstream does (token dance,
307 to a CDN on another host, Range, pagination, Accept-dependent answers) and that each
fault knob produces the wire behaviour it promises, so Moorage's tests can trust it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio

from .registry import (
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeRegistry,
    digest_of,
    image_manifest,
    index_manifest,
)

REPO = "library/alpine"
ALL_MANIFEST_TYPES = f"{DOCKER_MANIFEST_V2}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {OCI_INDEX}"
BLOB = bytes(range(256)) * 40  # 10,240 bytes


@pytest_asyncio.fixture
async def reg() -> AsyncIterator[FakeRegistry]:
    async with FakeRegistry() as registry:
        yield registry


@pytest_asyncio.fixture
async def client(reg: FakeRegistry) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=reg.url, timeout=5.0) as http:
        yield http


async def _stream_into(
    client: httpx.AsyncClient,
    url: str,
    body: bytearray,
    headers: dict[str, str] | None = None,
) -> None:
    """GET ``url`` as a stream, keeping what arrives even when the body breaks off."""
    async with client.stream("GET", url) as response:
        if headers is not None:
            headers.update(response.headers)
        async for chunk in response.aiter_raw():
            body.extend(chunk)


def _parse_challenge(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


# --- basics


@pytest.mark.asyncio
async def test_address_uses_loopback_and_real_port(reg: FakeRegistry) -> None:
    assert reg.url == f"http://127.0.0.1:{reg.port}"
    assert reg.host == f"127.0.0.1:{reg.port}"
    assert reg.port > 0


@pytest.mark.asyncio
async def test_ping_and_manifest_headers(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    image = reg.add_image(REPO, "3.19", [b"layer-one"])

    ping = await client.get("/v2/")
    assert ping.status_code == 200
    assert ping.headers["docker-distribution-api-version"] == "registry/2.0"

    head = await client.head(f"/v2/{REPO}/manifests/3.19")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(image.manifest))
    assert head.headers["docker-content-digest"] == image.digest
    assert head.headers["content-type"] == DOCKER_MANIFEST_V2

    got = await client.get(f"/v2/{REPO}/manifests/{image.digest}")
    assert got.status_code == 200
    assert got.content == image.manifest
    assert "sha256:" + hashlib.sha256(got.content).hexdigest() == image.digest


@pytest.mark.asyncio
async def test_unknown_manifest_and_blob_have_oci_errors(
    client: httpx.AsyncClient,
) -> None:
    manifest = await client.get(f"/v2/{REPO}/manifests/nope")
    assert manifest.status_code == 404
    assert manifest.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"

    blob = await client.get(f"/v2/{REPO}/blobs/{digest_of(b'missing')}")
    assert blob.status_code == 404
    assert blob.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


@pytest.mark.asyncio
async def test_manifest_by_digest_is_per_repository(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    image = reg.add_image(REPO, None)
    assert (await client.get(f"/v2/{REPO}/manifests/{image.digest}")).status_code == 200
    assert (await client.get(f"/v2/other/manifests/{image.digest}")).status_code == 404


@pytest.mark.asyncio
async def test_count_and_request_log(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    reg.add_image(REPO, "3.19")
    await client.head(f"/v2/{REPO}/manifests/3.19", headers={"X-Probe": "1"})
    await client.get(f"/v2/{REPO}/manifests/3.19?ns=docker.io")
    await client.get(f"/v2/{REPO}/manifests/3.19")

    assert reg.count("GET", "/manifests/") == 2
    assert reg.count("HEAD", "/manifests/") == 1
    assert reg.count(None, "/manifests/3.19") == 3
    assert reg.count("*", re.compile(r"^/v2/library/.+/manifests/")) == 3
    assert reg.count("GET", "/blobs/") == 0

    first = reg.requests[0]
    assert (first.method, first.path, first.host) == (
        "HEAD",
        f"/v2/{REPO}/manifests/3.19",
        reg.host,
    )
    assert first.headers["x-probe"] == "1"
    assert reg.requests[1].query == {"ns": "docker.io"}
    reg.reset_requests()
    assert reg.requests == []


# --- auth


@pytest.mark.asyncio
async def test_bearer_token_dance_is_scope_bound(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    reg.auth = "bearer"
    reg.add_image(REPO, "3.19")
    reg.add_image("library/nginx", "1")
    url = f"/v2/{REPO}/manifests/3.19"

    challenged = await client.get(url)
    assert challenged.status_code == 401
    assert challenged.json()["errors"][0]["code"] == "UNAUTHORIZED"
    challenge = _parse_challenge(challenged.headers["www-authenticate"])
    assert challenge == {
        "realm": f"{reg.url}/token",
        "service": "fake-registry",
        "scope": f"repository:{REPO}:pull",
    }

    answer = await client.get(
        challenge["realm"],
        params={"service": challenge["service"], "scope": challenge["scope"]},
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"].endswith("Z")
    assert reg.tokens_issued == 1

    bearer = {"Authorization": f"Bearer {body['token']}"}
    assert (await client.get(url, headers=bearer)).status_code == 200
    assert (await client.get("/v2/", headers=bearer)).status_code == 200

    other = await client.get("/v2/library/nginx/manifests/1", headers=bearer)
    assert other.status_code == 401
    assert 'error="insufficient_scope"' in other.headers["www-authenticate"]

    reg.expire_tokens()
    expired = await client.get(url, headers=bearer)
    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["www-authenticate"]

    # every request was recorded, the 401s and the token request included
    assert reg.count("GET", "/token") == 1
    assert reg.count("GET", url) == 3


@pytest.mark.asyncio
async def test_token_endpoint_credentials_fields_and_post(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    reg.auth = "bearer"
    reg.credentials = ("alice", "s3cret")
    reg.token_field = "access_token"
    reg.token_expires_in = None
    params = {"service": "fake-registry", "scope": f"repository:{REPO}:pull"}

    assert (await client.get("/token", params=params)).status_code == 401
    wrong = await client.get("/token", params=params, auth=("alice", "nope"))
    assert wrong.status_code == 401

    ok = await client.get("/token", params=params, auth=("alice", "s3cret"))
    assert ok.status_code == 200
    assert set(ok.json()) == {"access_token", "issued_at"}

    form = {
        "grant_type": "password",
        "username": "alice",
        "password": "s3cret",
        "service": "fake-registry",
        "scope": f"repository:{REPO}:pull repository:library/nginx:pull",
        "client_id": "containerd-client",
    }
    posted = await client.post("/token", data=form)
    assert posted.status_code == 200
    token = posted.json()["access_token"]
    reg.add_image("library/nginx", "1")
    nginx = await client.get("/v2/library/nginx/manifests/1", headers={"Authorization": f"Bearer {token}"})
    assert nginx.status_code == 200
    assert reg.tokens_issued == 2
    assert reg.requests[-2].body.startswith(b"grant_type=password")

    reg.token_post = False
    assert (await client.post("/token", data=form)).status_code == 405


@pytest.mark.asyncio
async def test_basic_auth(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    reg.auth = "basic"
    reg.credentials = ("bob", "pw")
    reg.add_image(REPO, "3.19")
    url = f"/v2/{REPO}/manifests/3.19"

    denied = await client.get(url)
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == 'Basic realm="fake"'
    assert (await client.get(url, auth=("bob", "wrong"))).status_code == 401
    assert (await client.get(url, auth=("bob", "pw"))).status_code == 200


# --- CDN


@pytest.mark.asyncio
async def test_cdn_redirect_goes_to_localhost_and_rejects_authorization(
    reg: FakeRegistry, client: httpx.AsyncClient
) -> None:
    cdn = await reg.start_cdn()
    digest = reg.add_blob(BLOB)
    url = f"/v2/{REPO}/blobs/{digest}"

    redirect = await client.get(url)
    assert redirect.status_code == 307
    location = urlsplit(redirect.headers["location"])
    assert location.hostname == "localhost"
    assert location.port == cdn.port != reg.port
    assert location.path == f"/blobs/{digest}"
    assert "sig=" in location.query

    # httpx drops Authorization when a redirect changes origin: the CDN sees none
    followed = await client.get(url, headers={"Authorization": "Bearer abc"}, follow_redirects=True)
    assert followed.status_code == 200
    assert followed.content == BLOB
    assert followed.headers["docker-content-digest"] == digest
    assert cdn.leaked_authorization == 0

    # a client that carries it over is caught
    async with httpx.AsyncClient(timeout=5.0) as direct:
        leaked = await direct.get(redirect.headers["location"], headers={"Authorization": "Bearer abc"})
        assert leaked.status_code == 400
        assert cdn.leaked_authorization == 1

        ranged = await direct.get(redirect.headers["location"], headers={"Range": "bytes=5-"})
        assert ranged.status_code == 206
        assert ranged.content == BLOB[5:]

        cdn.expire_signatures()
        assert (await direct.get(redirect.headers["location"])).status_code == 403

    assert cdn.count("GET", f"/blobs/{digest}") == 4
    assert cdn.requests[0].host == f"localhost:{cdn.port}"
    assert reg.count("GET", "/blobs/") == 2

    head = await client.head(url)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(BLOB))


# --- request faults


@pytest.mark.asyncio
async def test_fail_next_429_with_retry_after_then_recovers(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    reg.add_image(REPO, "3.19")
    url = f"/v2/{REPO}/manifests/3.19"
    reg.fail_next(1, 429, retry_after=7)

    assert (await client.get("/v2/")).status_code == 200  # not a /v2/<name>/ path
    limited = await client.get(url)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    assert limited.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert (await client.get(url)).status_code == 200
    assert reg.count("GET", url) == 2


@pytest.mark.asyncio
async def test_fail_next_5xx_by_path_and_method(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    image = reg.add_image(REPO, "3.19")
    reg.fail_next(2, 503, paths=r"/blobs/", methods=["GET"])

    assert (await client.get(f"/v2/{REPO}/manifests/3.19")).status_code == 200
    assert (await client.head(f"/v2/{REPO}/blobs/{image.config_digest}")).status_code == 200
    for _ in range(2):
        failed = await client.get(f"/v2/{REPO}/blobs/{image.config_digest}")
        assert failed.status_code == 503
        assert failed.json()["errors"][0]["code"] == "UNKNOWN"
    assert (await client.get(f"/v2/{REPO}/blobs/{image.config_digest}")).status_code == 200


@pytest.mark.asyncio
async def test_delay_next_holds_the_answer(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    reg.delay_next(1, 0.2, paths=r"^/v2/$")
    started = time.monotonic()
    assert (await client.get("/v2/")).status_code == 200
    assert time.monotonic() - started >= 0.2


@pytest.mark.asyncio
async def test_down_drops_connections_without_answer(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    reg.down = True
    with pytest.raises(httpx.TransportError):
        await client.get("/v2/")
    assert reg.count("GET", "/v2/") == 1
    reg.down = False
    assert (await client.get("/v2/")).status_code == 200


@pytest.mark.asyncio
async def test_stop_listening_refuses_then_resume_on_same_port(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/")).status_code == 200  # leaves a pooled connection
    port = reg.port
    await reg.stop_listening()
    with pytest.raises(httpx.TransportError):
        await client.get("/v2/")
    async with httpx.AsyncClient(timeout=2.0) as fresh:
        with pytest.raises(httpx.ConnectError):
            await fresh.get(f"{reg.url}/v2/")
    await reg.resume()
    assert reg.port == port
    assert (await client.get("/v2/")).status_code == 200


# --- blob bodies


@pytest.mark.asyncio
async def test_blob_get_and_head(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    digest = reg.add_blob(BLOB)
    got = await client.get(f"/v2/{REPO}/blobs/{digest}")
    assert got.status_code == 200
    assert got.content == BLOB
    assert got.headers["accept-ranges"] == "bytes"
    assert got.headers["docker-content-digest"] == digest

    head = await client.head(f"/v2/{REPO}/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(BLOB))
    assert head.content == b""


@pytest.mark.parametrize(
    ("range_header", "first", "last"),
    [
        pytest.param("bytes=10-19", 10, 19, id="closed"),
        pytest.param("bytes=10000-", 10000, len(BLOB) - 1, id="open"),
        pytest.param("bytes=-100", len(BLOB) - 100, len(BLOB) - 1, id="suffix"),
        pytest.param("bytes=10200-99999", 10200, len(BLOB) - 1, id="past_end"),
    ],
)
@pytest.mark.asyncio
async def test_range_answers_206(
    reg: FakeRegistry,
    client: httpx.AsyncClient,
    range_header: str,
    first: int,
    last: int,
) -> None:
    digest = reg.add_blob(BLOB)
    got = await client.get(f"/v2/{REPO}/blobs/{digest}", headers={"Range": range_header})
    assert got.status_code == 206
    assert got.headers["content-range"] == f"bytes {first}-{last}/{len(BLOB)}"
    assert got.content == BLOB[first : last + 1]


@pytest.mark.asyncio
async def test_range_unsatisfiable_and_ranges_off(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    digest = reg.add_blob(BLOB)
    url = f"/v2/{REPO}/blobs/{digest}"
    beyond = await client.get(url, headers={"Range": f"bytes={len(BLOB)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(BLOB)}"

    reg.support_ranges = False
    whole = await client.get(url, headers={"Range": "bytes=10-19"})
    assert whole.status_code == 200
    assert whole.content == BLOB
    assert "accept-ranges" not in whole.headers


@pytest.mark.asyncio
async def test_cut_body_is_short_then_resume_with_range(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    digest = reg.add_blob(BLOB)
    url = f"/v2/{REPO}/blobs/{digest}"
    reg.cut_blob(digest, 1000)

    received = bytearray()
    headers: dict[str, str] = {}
    with pytest.raises(httpx.RemoteProtocolError):
        await _stream_into(client, url, received, headers)
    assert headers["content-length"] == str(len(BLOB))
    assert bytes(received) == BLOB[:1000]

    rest = await client.get(url, headers={"Range": f"bytes={len(received)}-"})
    assert rest.status_code == 206
    assert rest.headers["content-range"].startswith(f"bytes {len(received)}-")
    assert bytes(received) + rest.content == BLOB
    assert (await client.get(url)).content == BLOB  # the cut was for one GET only


@pytest.mark.asyncio
async def test_cut_applies_on_cdn_too(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    await reg.start_cdn()
    digest = reg.add_blob(BLOB)
    reg.cut_blob(digest, 0)
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get(f"/v2/{REPO}/blobs/{digest}", follow_redirects=True)
    ok = await client.get(f"/v2/{REPO}/blobs/{digest}", follow_redirects=True)
    assert ok.content == BLOB


@pytest.mark.asyncio
async def test_stall_then_continue(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    digest = reg.add_blob(BLOB)
    reg.stall_blob(digest, 100, 0.3)
    started = time.monotonic()
    got = await client.get(f"/v2/{REPO}/blobs/{digest}")
    assert got.content == BLOB
    assert time.monotonic() - started >= 0.3


@pytest.mark.asyncio
async def test_stall_forever_trips_read_timeout(reg: FakeRegistry) -> None:
    digest = reg.add_blob(BLOB)
    reg.stall_blob(digest, 100, None)
    timeout = httpx.Timeout(5.0, read=0.2)
    async with httpx.AsyncClient(base_url=reg.url, timeout=timeout) as http:
        received = bytearray()
        with pytest.raises(httpx.ReadTimeout):
            await _stream_into(http, f"/v2/{REPO}/blobs/{digest}", received)
        assert bytes(received) == BLOB[:100]


@pytest.mark.asyncio
async def test_a_stall_for_good_ends_when_released(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    digest = reg.add_blob(BLOB)
    reg.stall_blob(digest, 100, None)
    pulling = asyncio.ensure_future(client.get(f"/v2/{REPO}/blobs/{digest}"))
    await asyncio.sleep(0.3)
    assert not pulling.done(), "the body waits"
    reg.release_stalls()
    got = await asyncio.wait_for(pulling, 10)
    assert got.content == BLOB


@pytest.mark.asyncio
async def test_corrupt_keeps_length_and_headers(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    digest = reg.add_blob(BLOB)
    reg.corrupt_blob(digest, times=1)
    bad = await client.get(f"/v2/{REPO}/blobs/{digest}")
    assert bad.status_code == 200
    assert bad.headers["docker-content-digest"] == digest
    assert len(bad.content) == len(BLOB)
    assert digest_of(bad.content) != digest
    assert (await client.get(f"/v2/{REPO}/blobs/{digest}")).content == BLOB


@pytest.mark.asyncio
async def test_slow_blob_can_be_joined_mid_flight(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    digest = reg.add_blob(BLOB)
    reg.slow_blob(digest, chunk=1024, delay=0.02)
    started = asyncio.Event()

    async def fetch() -> bytes:
        body = bytearray()
        async with client.stream("GET", f"/v2/{REPO}/blobs/{digest}") as response:
            async for chunk in response.aiter_raw():
                body.extend(chunk)
                started.set()
        return bytes(body)

    task = asyncio.create_task(fetch())
    await asyncio.wait_for(started.wait(), 2.0)
    assert not task.done()  # the body is still flowing
    assert await task == BLOB


# --- manifests


@pytest.mark.asyncio
async def test_platform_resolution_depends_on_accept(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    amd64 = reg.add_image(REPO, None, [b"amd64"], architecture="amd64")
    arm64 = reg.add_image(REPO, None, [b"arm64"], architecture="arm64")
    index = reg.add_index(
        REPO,
        "3.19",
        [(arm64.digest, "linux", "arm64/v8"), (amd64.digest, "linux", "amd64")],
    )
    url = f"/v2/{REPO}/manifests/3.19"

    plain = await client.get(url, headers={"Accept": DOCKER_MANIFEST_V2})
    assert plain.headers["docker-content-digest"] == amd64.digest
    assert plain.headers["content-type"] == DOCKER_MANIFEST_V2

    listed = await client.get(url, headers={"Accept": ALL_MANIFEST_TYPES})
    assert listed.headers["docker-content-digest"] == index
    assert listed.headers["content-type"] == DOCKER_MANIFEST_LIST

    head = await client.head(url, headers={"Accept": DOCKER_MANIFEST_V2})
    assert head.headers["docker-content-digest"] == amd64.digest

    by_digest = await client.get(f"/v2/{REPO}/manifests/{index}")
    assert by_digest.headers["docker-content-digest"] == index

    reg.platform_resolution = False
    assert (await client.get(url)).headers["docker-content-digest"] == index


@pytest.mark.asyncio
async def test_helpers_build_consistent_documents() -> None:
    layer = digest_of(b"l")
    oci = image_manifest(digest_of(b"c"), 1, [(layer, 1)], OCI_MANIFEST)
    assert b"application/vnd.oci.image.layer.v1.tar+gzip" in oci
    index = index_manifest([(digest_of(oci), len(oci), OCI_MANIFEST, "linux", "arm/v7")], OCI_INDEX)
    assert b'"variant": "v7"' in index
    with pytest.raises(ValueError, match="not an index type"):
        index_manifest([], DOCKER_MANIFEST_V2)


@pytest.mark.asyncio
async def test_tags_pagination_with_link(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    image = reg.add_image(REPO, "a")
    for tag in ["e", "c", "b", "d"]:
        reg.add_manifest(REPO, tag, image.manifest)

    seen: list[str] = []
    url: str | None = f"/v2/{REPO}/tags/list?n=2"
    pages = 0
    while url is not None:
        page = await client.get(url)
        assert page.status_code == 200
        assert page.json()["name"] == REPO
        seen.extend(page.json()["tags"])
        pages += 1
        link = page.headers.get("link")
        if link is None:
            url = None
        else:
            match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
            assert match is not None
            url = match[1]
    assert seen == ["a", "b", "c", "d", "e"]
    assert pages == 3

    everything = await client.get(f"/v2/{REPO}/tags/list")
    assert everything.json()["tags"] == seen
    assert "link" not in everything.headers
    assert (await client.get("/v2/nobody/tags/list")).status_code == 404


@pytest.mark.asyncio
async def test_ratelimit_headers_and_countdown(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    reg.add_image(REPO, "3.19")
    reg.ratelimit = (100, 2)
    reg.ratelimit_countdown = True
    url = f"/v2/{REPO}/manifests/3.19"

    head = await client.head(url)
    assert head.headers["ratelimit-limit"] == "100;w=21600"
    assert head.headers["ratelimit-remaining"] == "2;w=21600"
    assert head.headers["docker-ratelimit-source"] == "127.0.0.1"

    assert (await client.get(url)).headers["ratelimit-remaining"] == "1;w=21600"
    assert (await client.get(url)).headers["ratelimit-remaining"] == "0;w=21600"
    exhausted = await client.get(url)
    assert exhausted.status_code == 429
    assert exhausted.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert (await client.head(url)).status_code == 200  # HEAD does not count


@pytest.mark.asyncio
async def test_referrers(reg: FakeRegistry, client: httpx.AsyncClient) -> None:
    image = reg.add_image(REPO, "3.19", media_type=OCI_MANIFEST)
    config = reg.add_blob(b"{}")
    signature = image_manifest(
        config,
        2,
        [],
        OCI_MANIFEST,
        subject=(image.digest, len(image.manifest), OCI_MANIFEST),
        artifact_type="application/vnd.dev.cosign.artifact.sig.v1+json",
    )
    sig_digest = reg.add_manifest(REPO, None, signature)

    got = await client.get(f"/v2/{REPO}/referrers/{image.digest}")
    assert got.status_code == 200
    assert got.headers["content-type"] == OCI_INDEX
    assert [m["digest"] for m in got.json()["manifests"]] == [sig_digest]

    reg.referrers_api = False
    assert (await client.get(f"/v2/{REPO}/referrers/{image.digest}")).status_code == 404
