"""The environment's outbound proxy (``upstreams/_proxies.py``): ``NO_PROXY`` read as curl and
Go read it, CIDR ranges included; an exempted upstream reached directly, on the wide-read
path; a proxy that cannot be used refused at start, naming the variable."""

from __future__ import annotations

import os

import httpx
import pytest

from moorage.config import ConfigError, UpstreamSettings
from moorage.upstreams import open_upstreams
from moorage.upstreams._proxies import ProxyEnvironment
from moorage.upstreams.reference import parse_digest
from tests.fakes import FakeRegistry

from .clients import KiB, MiB, client_for, read_blob

PROXY = "http://proxy.internal:3128"


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("10.0.0.0/8", "https://10.96.4.20:5000/v2/", True),
        ("10.0.0.0/8", "https://11.0.0.1/v2/", False),
        ("10.0.0.0/8", "https://registry.svc/v2/", False),
        ("fd00::/8", "https://[fd12::1]/v2/", True),
        ("fd00::/8", "https://10.0.0.1/v2/", False),
        ("192.168.1.5", "http://192.168.1.5:5000/v2/", True),
        ("192.168.1.5", "http://192.168.1.6/v2/", False),
        ("::1", "http://[::1]:5000/v2/", True),
        ("[::1]:5000", "http://[::1]:5000/v2/", True),
        ("[::1]:5000", "http://[::1]:5001/v2/", False),
        ("example.com", "https://example.com/v2/", True),
        ("example.com", "https://registry.example.com/v2/", True),
        ("example.com", "https://notexample.com/v2/", False),
        ("*example.com", "https://a.example.com/v2/", True),
        (".example.com", "https://registry.example.com/v2/", True),
        (".example.com", "https://example.com/v2/", False),
        ("*.example.com", "https://example.com/v2/", False),
        ("Registry.Internal:5000", "https://registry.internal:5000/v2/", True),
        ("registry.internal:5000", "https://registry.internal/v2/", False),
        ("registry.internal:443", "https://registry.internal/v2/", True),
        (" .svc , .cluster.local ", "http://registry.ns.svc/v2/", True),
        ("localhost", "http://localhost:5000/v2/", True),
        ("*", "https://ghcr.io/v2/", True),
        ("a.com,*", "https://ghcr.io/v2/", True),
        ("", "https://ghcr.io/v2/", False),
        ("not a/range", "https://ghcr.io/v2/", False),
    ],
)
def test_no_proxy_entries_exempt_what_curl_and_go_exempt(no_proxy: str, url: str, direct: bool) -> None:
    environment = ProxyEnvironment.read({"http": PROXY, "https": PROXY, "no": no_proxy})
    assert environment.proxy_for(httpx.URL(url)) == (None if direct else httpx.URL(PROXY))


def test_each_scheme_has_its_proxy_and_all_proxy_serves_the_rest() -> None:
    environment = ProxyEnvironment.read({"https": "secure:3128", "all": "http://any:8080"})
    assert environment.proxy_for(httpx.URL("https://ghcr.io/v2/")) == httpx.URL("http://secure:3128")
    assert environment.proxy_for(httpx.URL("http://registry.internal/v2/")) == httpx.URL("http://any:8080")
    assert ProxyEnvironment.read({"https": PROXY}).proxy_for(httpx.URL("http://plain/v2/")) is None


async def test_an_upstream_in_a_no_proxy_range_is_reached_directly_on_the_wide_read_path(
    upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster's ``NO_PROXY=10.0.0.0/8,…`` exempts its own registries: httpx read the range as
    its first address and sent them to the proxy, where the pull failed. The proxy here listens
    nowhere, so a request sent to it fails."""
    data = os.urandom(3 * MiB)
    digest = parse_digest(upstream.add_blob(data))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.0/8")
    monkeypatch.delenv("no_proxy", raising=False)
    client = client_for(upstream)
    try:
        body, sizes = await read_blob(client, digest)
    finally:
        await client.aclose()
    assert body == data
    assert max(sizes) > 64 * KiB, "an exempted upstream's body came through httpx's 64 KiB reads"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "HTTPS_PROXY",
            "socks5://127.0.0.1:1080",
            "HTTPS_PROXY: only HTTP proxies (http:// or https://) are supported, not socks5://",
        ),
        ("HTTP_PROXY", "http://[::1", "HTTP_PROXY: not a proxy URL"),
    ],
)
async def test_a_proxy_that_cannot_be_used_is_a_configuration_error_naming_its_variable(
    variable: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SOCKS proxy made the cache fail to start with httpx's traceback."""
    monkeypatch.setenv(variable, value)
    settings = UpstreamSettings.model_validate({"host": "docker.io", "url": "https://registry-1.docker.io"})
    with pytest.raises(ConfigError) as raised:
        async with open_upstreams([settings]):
            pass
    assert raised.value.source == "the environment"
    assert raised.value.problems[0].startswith(message)
    assert "127.0.0.1:1080" not in str(raised.value)  # a proxy URL may carry credentials
