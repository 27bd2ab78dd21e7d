"""``moorage warm`` against the fake upstream, for what a real registry cannot be made to do:
a layer whose every transfer is cut."""

from __future__ import annotations

import os

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from moorage.proxy._warm import NotTheCache, WarmIncomplete, warm
from moorage.upstreams.reference import parse_image_reference
from tests.fakes import FakeRegistry

Client = TestClient[web.Request, web.Application]


async def test_a_transfer_the_cache_cuts_fails_that_image_and_warms_the_rest(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """The cache cuts a body when its upstream fails mid-blob: that ended the whole run, with
    a hint about TLS, and the images after it stayed cold."""
    upstream.add_image("owner/first", "1", [os.urandom(1000)])
    broken = upstream.add_image("owner/broken", "1", [os.urandom(200_000)])
    upstream.add_image("owner/last", "1", [os.urandom(1000)])
    upstream.cut_blob(broken.layer_digests[0], after_bytes=1000, times=100)
    names = [parse_image_reference(f"owner/{name}:1") for name in ("first", "broken", "last")]
    with pytest.raises(WarmIncomplete) as incomplete:
        await warm(str(moorage.make_url("")), names, None, None)
    assert [image.image for image in incomplete.value.warmed] == [
        "docker.io/owner/first:1",
        "docker.io/owner/last:1",
    ]
    (failure,) = incomplete.value.failures
    assert "docker.io/owner/broken:1: the cache cut a transfer" in str(failure)


async def test_a_url_that_names_the_registry_itself_is_refused_not_reported_warmed(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """Pointed at the upstream by mistake, warm pulled every image from it, cached nothing, and
    said each was warmed."""
    upstream.add_image("owner/app", "1", [os.urandom(1000)])
    names = [parse_image_reference(f"owner/app:{tag}") for tag in ("1", "2")]
    with pytest.raises(NotTheCache, match="--url must name the cache, not a registry"):
        await warm(upstream.url, names, None, None)
    assert upstream.count("GET", "/blobs/") == 0, "it stopped at the first answer"
    warmed = await warm(str(moorage.make_url("")), names[:1], None, None)
    assert [image.image for image in warmed] == ["docker.io/owner/app:1"]


async def test_a_failed_manifest_names_the_image_once(moorage: Client, upstream: FakeRegistry) -> None:
    upstream.add_image("owner/app", "1", [os.urandom(1000)])
    upstream.fail_next(10, 503, paths=r"/manifests/")
    with pytest.raises(WarmIncomplete) as incomplete:
        await warm(str(moorage.make_url("")), [parse_image_reference("owner/app:1")], None, None)
    (failure,) = incomplete.value.failures
    assert str(failure).startswith("docker.io/owner/app:1: HTTP 503"), str(failure)


async def test_an_error_from_the_server_named_by_url_reaches_the_terminal_printable() -> None:
    """``--url`` can name any server: its error message went to the terminal as it came, control
    characters and all (a screen cleared, a line forged), and at any length."""

    async def refuse(request: web.Request) -> web.Response:
        message = "\x1b[2J\nforged line " + "x" * 400
        return web.json_response({"errors": [{"code": "DENIED", "message": message}]}, status=403)

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", refuse)
    async with TestServer(app) as server:
        with pytest.raises(WarmIncomplete) as incomplete:
            await warm(str(server.make_url("")), [parse_image_reference("owner/app:1")], None, None)
    (failure,) = incomplete.value.failures
    text = str(failure)
    assert "HTTP 403 DENIED: [2Jforged line xxx" in text, text
    assert text.isprintable() and len(text) < 300, text
