"""The environment's outbound proxy (``upstreams/_proxies.py``): the variables read as curl reads
them and ``NO_PROXY`` as Go does, CIDR ranges included; an exempted upstream reached directly,
on the wide-read path; a proxy that cannot be used refused at start, and by ``check-config``,
naming the variable; a proxy's failures named as the proxy's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path
from typing import Self

import httpx
import pytest
from click.testing import CliRunner

from moorage.config import ConfigError, UpstreamSettings
from moorage.proxy.cli import main
from moorage.upstreams import UpstreamUnavailable, open_upstreams
from moorage.upstreams._proxies import ProxyEnvironment
from moorage.upstreams.reference import parse_digest
from tests.fakes import FakeRegistry
from tests.integration.harness.tools import self_signed_certificate

from .clients import KiB, MiB, client_for, read_blob

PROXY = "http://proxy.internal:3128"


def proxy_for(environ: dict[str, str], url: str) -> str | None:
    proxy = ProxyEnvironment.read(environ).proxy_for(httpx.URL(url))
    return None if proxy is None else str(proxy.url)


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
        ("example.com.", "https://example.com/v2/", True),
        ("example.com", "https://example.com./v2/", True),
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
def test_no_proxy_entries_exempt_what_go_exempts(no_proxy: str, url: str, direct: bool) -> None:
    environ = {"HTTP_PROXY": PROXY, "HTTPS_PROXY": PROXY, "NO_PROXY": no_proxy}
    assert proxy_for(environ, url) == (None if direct else PROXY)


def test_entries_no_proxy_does_not_take_are_listed_to_be_warned_of() -> None:
    environ = {"HTTPS_PROXY": PROXY, "NO_PROXY": "10.0.0.0/33,10.0.0.0/8:5000,host:port,ok.internal,[::1]x"}
    environment = ProxyEnvironment.read(environ)
    assert environment.ignored == ("10.0.0.0/33", "10.0.0.0/8:5000", "host:port", "[::1]x")
    assert environment.proxy_for(httpx.URL("https://ok.internal/v2/")) is None


@pytest.mark.parametrize(
    ("environ", "url", "proxy"),
    [
        pytest.param({"HTTPS_PROXY": "secure:3128"}, "https://ghcr.io/v2/", "http://secure:3128", id="no_scheme"),
        pytest.param({"ALL_PROXY": "http://any:8080"}, "http://r.internal/v2/", "http://any:8080", id="all"),
        pytest.param({"HTTPS_PROXY": PROXY}, "http://plain/v2/", None, id="https_only"),
        pytest.param(
            {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"},
            "https://a/",
            "http://lower:1",
            id="lower",
        ),
        # An empty one is passed over: a CI job that blanks one spelling kept the other.
        pytest.param({"https_proxy": " ", "HTTPS_PROXY": PROXY}, "https://a/", PROXY, id="empty_lower"),
        pytest.param(
            {"HTTPS_PROXY": PROXY, "no_proxy": "", "NO_PROXY": "a.internal"}, "https://a.internal/", None, id="no_empty"
        ),
        # An ALL_PROXY the others leave unused is not read: a developer's socks5 one stopped the start.
        pytest.param(
            {"HTTP_PROXY": PROXY, "HTTPS_PROXY": PROXY, "all_proxy": "socks5://127.0.0.1:1080"},
            "https://a/",
            PROXY,
            id="all_unused",
        ),
    ],
)
def test_proxy_variables_are_read_as_curl_reads_them(environ: dict[str, str], url: str, proxy: str | None) -> None:
    assert proxy_for(environ, url) == proxy


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HTTPS_PROXY": "socks5://u:s3cret@127.0.0.1:1080"}, "HTTPS_PROXY: only HTTP proxies"),
        ({"https_proxy": "socks5://u:s3cret@h:1", "HTTPS_PROXY": PROXY}, "https_proxy: only HTTP proxies"),
        ({"HTTP_PROXY": "http://u:s3cret@[::1"}, "HTTP_PROXY: not a proxy URL"),
        ({"HTTP_PROXY": "http://u:s3cret@127.0.0.1:99999"}, "HTTP_PROXY: not a proxy URL: port 99999 is out of range"),
        ({"HTTP_PROXY": "http://u:s3cret@:3128"}, "HTTP_PROXY: not a proxy URL: it names no host"),
        ({"ALL_PROXY": "socks5://u:s3cret@h:1"}, "ALL_PROXY: only HTTP proxies"),
        (
            {"HTTPS_PROXY": PROXY, "ALL_PROXY": "socks5://u:s3cret@h:1"},
            "ALL_PROXY: only HTTP proxies (http:// or https://) are supported, not socks5://"
            " (read for http:// URLs: HTTP_PROXY is unset)",
        ),
    ],
)
def test_a_proxy_that_cannot_be_used_is_refused_naming_the_variable_read(environ: dict[str, str], message: str) -> None:
    """A port past 65535 passed, and failed every upstream request with a 500 and a traceback,
    stale answers too."""
    with pytest.raises(ConfigError) as raised:
        ProxyEnvironment.read(environ)
    assert raised.value.source == "the environment"
    assert raised.value.problems[0].startswith(message), raised.value.problems
    assert "s3cret" not in str(raised.value)  # a proxy URL may carry credentials


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


class SocketProxy:
    """A proxy on a real socket of 127.0.0.1 (over TLS with ``tls``); the tasks serving its
    connections end with it."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.port = 0
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


class TroubledProxy(SocketProxy):
    """A forwarding proxy in trouble: one that wants credentials no request has (407), or one
    that takes connections and never answers; it counts what it was asked."""

    def __init__(self, answers: bool) -> None:
        super().__init__()
        self.answers = answers
        self.asked = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.asked += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.answers:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
            else:
                await asyncio.Event().wait()  # no answer: the client's read timeout ends it
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


class ForwardingProxy(SocketProxy):
    """A forwarding proxy that clients reach over TLS (an ``https://`` proxy URL): each
    connection's requests go, as sent (absolute-form), to the host and port the first one
    names; it counts the connections it forwarded."""

    def __init__(self, cert: Path, key: Path) -> None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        super().__init__(tls)
        self.forwarded = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = httpx.URL(head.split(b" ", 2)[1].decode())
            assert target.host and target.port
            upstream_reader, upstream_writer = await asyncio.open_connection(target.host, target.port)
            self.forwarded += 1
            upstream_writer.write(head)

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
                sink.close()

            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            for opened in (writer, upstream_writer):
                if opened is not None:
                    opened.close()
                    with contextlib.suppress(Exception):
                        await opened.wait_closed()
            self._handlers.discard(task)


@pytest.mark.parametrize("trusted", [True, False], ids=["ca_file", "unknown_ca"])
async def test_an_https_proxy_is_trusted_as_the_upstream_is(
    trusted: bool, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An ``https://`` proxy's certificate is checked against the CAs the upstream trusts (its
    ``ca_file`` beside the system's), as a company's TLS proxy is signed by the company's CA;
    one signed by no CA the upstream trusts is refused, and the error names the proxy."""
    data = os.urandom(2 * MiB)
    digest = parse_digest(upstream.add_blob(data))
    cert, key = self_signed_certificate(tmp_path / "proxy")
    for name in ("http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with ForwardingProxy(cert, key) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"https://127.0.0.1:{proxy.port}")
        client = client_for(upstream, **({"ca_file": str(cert)} if trusted else {}))
        try:
            if trusted:
                body, _ = await read_blob(client, digest)
            else:
                with pytest.raises(UpstreamUnavailable) as raised:
                    await read_blob(client, digest)
        finally:
            await client.aclose()
    if trusted:
        assert body == data and proxy.forwarded >= 1
        assert upstream.count("GET", f"/blobs/{digest}") == 1
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in str(raised.value) or "certificate" in str(raised.value).lower()
        assert "(through the proxy HTTP_PROXY names)" in str(raised.value)
        assert proxy.forwarded == 0 and upstream.count("GET") == 0


@pytest.mark.parametrize("where", ["refusing", "silent", "down"])
async def test_a_failing_proxy_is_named_in_the_upstream_error(
    where: str, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy's 407 came out as the upstream's "unexpected HTTP 407", retried, and a proxy
    that was down, or never answered, as the upstream failing: an operator looked at the
    registry."""
    digest = parse_digest(upstream.add_blob(b"x"))
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with TroubledProxy(answers=where == "refusing") as proxy:
        port = proxy.port if where != "down" else 9
        monkeypatch.setenv("HTTP_PROXY", f"http://user:s3cret@127.0.0.1:{port}")
        client = client_for(upstream, retries={"attempts": 3, "max_wait": 0.01}, timeouts={"read": 0.3})
        try:
            with pytest.raises(UpstreamUnavailable) as raised:
                await read_blob(client, digest)
        finally:
            await client.aclose()
    text = str(raised.value)
    said = {
        "refusing": "the proxy HTTP_PROXY names asked for credentials",
        "silent": "timed out (ReadTimeout) (through the proxy HTTP_PROXY names)",
        "down": "(through the proxy HTTP_PROXY names)",
    }
    assert said[where] in text, text
    assert "s3cret" not in text and "127.0.0.1" not in text
    assert upstream.count("GET") == 0
    if where == "refusing":
        assert proxy.asked == 1, "credentials that are missing do not come with a retry"


async def test_a_proxy_that_cannot_be_used_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    monkeypatch.delenv("https_proxy", raising=False)
    settings = UpstreamSettings.model_validate({"host": "docker.io", "url": "https://registry-1.docker.io"})
    with pytest.raises(ConfigError, match="HTTPS_PROXY: only HTTP proxies"):
        async with open_upstreams([settings]):
            pass


def test_check_config_refuses_the_proxy_serve_would(tmp_path: Path) -> None:
    """It said ok, and the start then failed."""
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{path: {tmp_path / 'store'}}}\n")
    environ = {"MOORAGE_CONFIG": "", "HTTPS_PROXY": "socks5://127.0.0.1:1080", "https_proxy": ""}
    result = CliRunner().invoke(main, ["check-config", str(config)], env=environ)
    assert result.exit_code == 2, result.output
    assert "HTTPS_PROXY: only HTTP proxies" in result.output


async def test_no_proxy_entries_not_understood_are_warned_of_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A range written with a port, or a mask past 32, sent its hosts to the proxy in silence."""
    monkeypatch.setenv("HTTPS_PROXY", PROXY)
    monkeypatch.setenv("NO_PROXY", "10.0.0.0/8:5000,.svc")
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    settings = UpstreamSettings.model_validate({"host": "docker.io", "url": "https://registry-1.docker.io"})
    async with open_upstreams([settings]):
        pass
    (warned,) = [r for r in caplog.records if getattr(r, "event", None) == "no_proxy_ignored"]
    assert warned.levelname == "WARNING" and getattr(warned, "entries", None) == ["10.0.0.0/8:5000"]
