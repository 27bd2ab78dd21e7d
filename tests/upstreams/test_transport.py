"""How an upstream's answers become the client's errors (``upstreams/_transport.py``): a 429's
``Retry-After`` in any form an upstream may send, which 401 or 403 is whose fault, and which
redirects are not followed."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from moorage.config import UpstreamSettings
from moorage.upstreams import (
    RegistryClient,
    UpstreamAuthFailed,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRefused,
)
from moorage.upstreams._ratelimit import MAX_RETRY_AFTER, retry_after_seconds
from moorage.upstreams._transport import mapped_errors, raise_for_status
from moorage.upstreams.errors import RedirectRefused
from moorage.upstreams.reference import RepositoryName, Tag


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("-5", 0.0),
        ("1e400", MAX_RETRY_AFTER),  # a float too: it once reached math.ceil as infinity, a 500
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_is_a_bounded_number_of_seconds(value: str, seconds: float | None) -> None:
    assert retry_after_seconds(value) == seconds


@pytest.mark.parametrize("form", ["%a %b %d %H:%M:%S %Y", "%a, %d %b %Y %H:%M:%S -0000"])
def test_a_retry_after_date_without_a_zone_is_gmt(form: str) -> None:
    """asctime's form (RFC 9110 still takes it) and ``-0000`` carry no zone: read as local time,
    100 s came out as five hours west of GMT (past any wait, so a 429 held a tag stale for an
    hour) and as nothing east of it (a rate-limited upstream asked again at once)."""
    original = os.environ.get("TZ")
    try:
        for zone in ("America/New_York", "Asia/Tokyo"):
            os.environ["TZ"] = zone
            time.tzset()
            seconds = retry_after_seconds(time.strftime(form, time.gmtime(time.time() + 100)))
            assert seconds is not None and 95 <= seconds <= 100, (zone, seconds)
    finally:
        if original is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = original
        time.tzset()


def answer(
    status: int, headers: dict[str, str] | None = None, redirected: bool = False, sent: str | None = None
) -> httpx.Response:
    """An answer to a manifest GET; ``sent``: the request's Authorization."""
    request = httpx.Request(
        "GET", "https://registry.test/v2/library/alpine/manifests/1", headers={"Authorization": sent} if sent else {}
    )
    history = [httpx.Response(307, headers={"Location": "https://cdn.test/x"}, request=request)] if redirected else []
    return httpx.Response(status, headers=headers, request=request, history=history)


@pytest.mark.parametrize(
    ("response", "error"),
    [
        pytest.param(
            answer(401, {"WWW-Authenticate": 'Bearer realm="https://a.test/token",error="insufficient_scope"'}),
            UpstreamRefused,
            id="docker_hub_name_it_does_not_have",
        ),
        pytest.param(answer(403), UpstreamRefused, id="registry_says_not_yours"),
        pytest.param(
            answer(401, {"WWW-Authenticate": 'Basic realm="harbor"'}), UpstreamAuthFailed, id="wrong_password"
        ),
        pytest.param(answer(403, redirected=True), RedirectRefused, id="expired_cdn_url"),
        pytest.param(
            answer(401, {"WWW-Authenticate": 'Bearer realm="https://a.test/token"'}, sent="Bearer t1"),
            UpstreamRefused,
            id="quay_plain_challenge_to_its_own_token",
        ),
        pytest.param(
            answer(401, {"WWW-Authenticate": 'Basic realm="harbor"'}, sent="Bearer t1"),
            UpstreamRefused,
            id="harbor_basic_challenge_to_its_own_token",
        ),
        pytest.param(
            answer(401, {"WWW-Authenticate": 'Basic realm="harbor"'}, sent="Basic Ym9iOndyb25n"),
            UpstreamAuthFailed,
            id="wrong_password_sent",
        ),
        pytest.param(answer(429, {"Retry-After": "1e400"}), UpstreamRateLimited, id="rate_limited"),
    ],
)
def test_each_refusal_is_told_by_who_refused_and_how(response: httpx.Response, error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        raise_for_status("registry.test", "manifest library/alpine:1", response)
    assert type(raised.value) is error
    if isinstance(raised.value, UpstreamRateLimited):
        assert raised.value.retry_after == MAX_RETRY_AFTER


@pytest.mark.parametrize(
    ("target", "followed"), [("https://cdn.test/m?sig=SIGNED", True), ("http://cdn.test/m?sig=SIGNED", False)]
)
async def test_a_redirect_from_https_to_plain_http_is_not_followed(target: str, followed: bool) -> None:
    """A signed URL, or a tag's manifest (which no digest vouches for), would cross the network
    in clear text; an https redirect is followed as before."""
    asked: list[httpx.URL] = []
    manifest = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url)
        if request.url.host == "cdn.test":
            return httpx.Response(
                200, content=manifest, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
            )
        return httpx.Response(307, headers={"Location": target})

    settings = UpstreamSettings.model_validate(
        {"host": "registry.test", "url": "https://registry.test", "retries": {"attempts": 1}}
    )
    client = RegistryClient(settings, transport=httpx.MockTransport(handler))
    try:
        if followed:
            assert (await client.get_manifest(RepositoryName("a/b"), Tag("1"), "index")).body == manifest
        else:
            with pytest.raises(UpstreamProtocolError, match="redirected from https to plain http"):
                await client.get_manifest(RepositoryName("a/b"), Tag("1"), "index")
            assert [url.host for url in asked] == ["registry.test"]
    finally:
        await client.aclose()


def test_a_request_h11_cannot_write_is_reported_without_quoting_its_headers() -> None:
    with pytest.raises(UpstreamProtocolError) as refused, mapped_errors("registry.test", "manifest a/b:1"):
        raise httpx.LocalProtocolError("Illegal header value b'Bearer s3cret\\n'")
    assert "s3cret" not in str(refused.value) and "LocalProtocolError" in str(refused.value)


async def test_a_token_service_redirected_to_plain_http_is_not_followed() -> None:
    """The token would come back in clear text, good for anyone on the way to pull with."""
    asked: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url)
        if request.url.host == "auth.test":
            return httpx.Response(307, headers={"Location": "http://auth.test/token"})
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.test/token",service="r"'})

    settings = UpstreamSettings.model_validate(
        {"host": "registry.test", "url": "https://registry.test", "retries": {"attempts": 1}}
    )
    client = RegistryClient(settings, transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(UpstreamProtocolError, match="redirected from https to plain http"):
            await client.get_manifest(RepositoryName("a/b"), Tag("1"), "index")
        assert all(url.scheme == "https" for url in asked), asked
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("body", "said"),
    [
        pytest.param(b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}', "manifest unknown"),
        pytest.param(b'{"errors":[{"message":"one\\r\\nlevel=error two"}]}', "onelevel=error two", id="control"),
        pytest.param(b'{"errors":[{"message":"' + b"x" * 300 + b'"}]}', "x" * 200, id="long"),
        pytest.param(b'{"errors":[{"message":"' + b"x" * 5000 + b'"}]}', None, id="no_error_body_size"),
        pytest.param(b"404 page not found", None, id="plain_text"),
        pytest.param(b'{"errors":[]}', None, id="no_error"),
    ],
)
async def test_a_not_found_carries_what_the_upstream_said_printable_and_bounded(body: bytes, said: str | None) -> None:
    settings = UpstreamSettings.model_validate({"host": "registry.test", "url": "https://registry.test"})
    client = RegistryClient(settings, transport=httpx.MockTransport(lambda request: httpx.Response(404, content=body)))
    try:
        with pytest.raises(UpstreamNotFound) as missing:
            await client.get_manifest(RepositoryName("a/b"), Tag("1"), "index")
    finally:
        await client.aclose()
    suffix = f" (the upstream says: {said})" if said else ""
    assert str(missing.value) == f"registry.test: manifest a/b:1: not found{suffix}"
