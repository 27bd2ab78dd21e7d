"""The socket layer under the upstream client (``upstreams/_network.py``): reads ask for
``READ_SIZE``, and over real sockets against the fake upstream bodies arrive whole and in large
pieces, over plain HTTP and verified TLS; a connection the server closed is not reused; a body
the server cuts, a server that stalls, and a port nobody listens on are the upstream errors
the cache knows how to handle; an upstream behind the environment's HTTP proxy is reached
through it; and no request has to import or search for a module."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpcore
import httpx
import pytest

from moorage.config import ConfigError, UpstreamSettings
from moorage.upstreams import RegistryClient, UpstreamUnavailable, trust_for
from moorage.upstreams._client import NullObserver
from moorage.upstreams._network import READ_SIZE, WideReadStream
from moorage.upstreams._transport import _mapped
from moorage.upstreams.errors import UpstreamError
from moorage.upstreams.reference import parse_digest
from tests.fakes import FakeRegistry
from tests.integration.harness.tools import self_signed_certificate

from .clients import KiB, MiB, client_for, read_blob


class RecordingStream(httpcore.AsyncNetworkStream):
    """A network stream that records what it was asked for."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.tls: list[str | None] = []

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        self.asked.append(max_bytes)
        return b"x"

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        self.tls.append(server_hostname)
        return self


async def test_reads_ask_for_read_size_and_tls_streams_stay_wide() -> None:
    inner = RecordingStream()
    stream = WideReadStream(inner)
    await stream.read(64 * KiB)
    await stream.read(4 * MiB)
    assert inner.asked == [READ_SIZE, 4 * MiB], "at least READ_SIZE; a larger ask is kept"
    secured = await stream.start_tls(ssl.create_default_context(), "registry.example")
    assert isinstance(secured, WideReadStream) and inner.tls == ["registry.example"]
    await secured.read(16 * KiB)
    assert inner.asked[-1] == READ_SIZE


async def test_a_blob_body_arrives_whole_and_in_pieces_larger_than_64_kib(upstream: FakeRegistry) -> None:
    data = os.urandom(8 * MiB)
    digest = parse_digest(upstream.add_blob(data))
    client = client_for(upstream)
    try:
        received, sizes = await read_blob(client, digest, pause=0.01)
        again, _ = await read_blob(client, digest)
    finally:
        await client.aclose()
    assert hashlib.sha256(received).hexdigest() == digest.encoded and again == data
    assert max(sizes) > 64 * KiB, f"pieces of at most {max(sizes)} bytes: reads are still 64 KiB"
    assert upstream.count("GET", "/blobs/") == 2


async def test_a_connection_the_server_closed_is_not_reused(upstream: FakeRegistry) -> None:
    data = os.urandom(300 * KiB)
    digest = parse_digest(upstream.add_blob(data))
    client = client_for(upstream)
    try:
        assert (await read_blob(client, digest))[0] == data
        await upstream.stop_listening()  # drops the kept-alive connection
        await upstream.resume()
        assert (await read_blob(client, digest))[0] == data, "a fresh connection, not the dead one"
    finally:
        await client.aclose()


async def test_a_cut_body_a_stall_and_a_closed_port_are_upstream_errors(upstream: FakeRegistry) -> None:
    data = os.urandom(2 * MiB)
    digest = parse_digest(upstream.add_blob(data))
    client = client_for(upstream, timeouts={"read": "0.5s", "connect": "1s"})
    try:
        upstream.cut_blob(str(digest), after_bytes=MiB)
        with pytest.raises(UpstreamUnavailable):
            await read_blob(client, digest)
        upstream.stall_blob(str(digest), after_bytes=1000, seconds=None)
        with pytest.raises(UpstreamUnavailable, match="timed out"):
            await read_blob(client, digest)
        upstream.clear_faults()
        assert (await read_blob(client, digest))[0] == data, "the client recovers"
        await upstream.stop_listening()
        with pytest.raises(UpstreamUnavailable):
            await read_blob(client, digest)
    finally:
        await client.aclose()


async def test_bodies_arrive_over_verified_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = await asyncio.to_thread(self_signed_certificate, tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    registry = FakeRegistry()
    registry.ssl_context = server_context
    data = os.urandom(3 * MiB + 5)
    async with registry:
        digest = parse_digest(registry.add_blob(data))
        assert registry.url.startswith("https://")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the upstream's certificate is trusted
        client = client_for(registry)
        try:
            assert (await read_blob(client, digest, pause=0.01))[0] == data
            assert (await read_blob(client, digest))[0] == data
        finally:
            await client.aclose()
        monkeypatch.delenv("SSL_CERT_FILE")
        untrusting = client_for(registry)
        try:
            with pytest.raises(UpstreamUnavailable, match="ConnectError"):
                await read_blob(untrusting, digest)
        finally:
            await untrusting.aclose()


async def test_an_upstream_signed_by_a_private_ca_is_trusted_through_its_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A company's registry: its CA named for that upstream alone, no variable replacing the
    public CAs (and the token service, on the same host, checked against it too)."""
    cert, key = await asyncio.to_thread(self_signed_certificate, tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    registry = FakeRegistry(auth="bearer")
    registry.ssl_context = server_context
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    data = os.urandom(MiB)
    async with registry:
        digest = parse_digest(registry.add_blob(data))
        trusting = client_for(registry, ca_file=str(cert))
        try:
            assert (await read_blob(trusting, digest))[0] == data
            assert registry.count(None, "/token") == 1, "the token came over the same trust"
        finally:
            await trusting.aclose()
        untrusting = client_for(registry)
        try:
            with pytest.raises(UpstreamUnavailable, match=r"CERTIFICATE_VERIFY_FAILED.*the upstream's ca_file"):
                await read_blob(untrusting, digest)
        finally:
            await untrusting.aclose()


async def test_an_https_url_for_a_plain_http_upstream_says_to_use_http_and_is_not_retried() -> None:
    """Each retry of a failure that stays met it again: a failing pull took three requests
    and half a second more, to the same error."""
    retried: list[UpstreamError] = []

    class Retries(NullObserver):
        def on_retry(self, upstream: str, error: UpstreamError) -> None:
            retried.append(error)

    async with FakeRegistry() as registry:
        digest = parse_digest(registry.add_blob(b"x"))
        client = RegistryClient(
            UpstreamSettings.model_validate(
                {"host": "docker.io", "url": registry.url.replace("http://", "https://"), "retries": {"attempts": 3}}
            ),
            observer=Retries(),
        )
        try:
            with pytest.raises(UpstreamUnavailable, match=r"WRONG_VERSION_NUMBER.*Use http:// in its url"):
                await read_blob(client, digest)
        finally:
            await client.aclose()
    assert retried == []


@pytest.mark.parametrize(("code", "lasting"), [(socket.EAI_NONAME, True), (socket.EAI_AGAIN, False)])
def test_a_name_the_dns_says_does_not_exist_is_not_retried_but_a_failed_lookup_is(code: int, lasting: bool) -> None:
    """EAI_AGAIN is what a lookup meets while a cluster's DNS restarts: asked again, it may answer."""
    try:
        try:
            raise socket.gaierror(code, "lookup")
        except socket.gaierror as cause:
            raise httpx.ConnectError("lookup") from cause
    except httpx.ConnectError as error:
        mapped = _mapped("docker.io", "manifest", error)
    assert isinstance(mapped, UpstreamUnavailable) and mapped.lasting is lasting


def test_a_ca_file_that_holds_no_certificate_is_refused_by_name(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    settings = UpstreamSettings.model_validate(
        {"host": "registry.corp", "url": "https://registry.corp", "ca_file": str(not_pem)}
    )
    with pytest.raises(ConfigError, match=r"upstreams\[2\]\.ca_file: cannot load .*ca\.pem: no PEM certificate in it"):
        trust_for(2, settings)
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.ca_file: cannot load .*absent\.pem: No such file"):
        trust_for(0, settings.model_copy(update={"ca_file": tmp_path / "absent.pem"}))


class ImportSearches:
    """A finder first on ``sys.meta_path``: counts the imports Python had to search for."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        self.names.append(name)


async def test_an_upstream_request_searches_for_no_module(upstream: FakeRegistry) -> None:
    """httpcore imports sniffio under every lock and event it sets up; without it installed
    (anyio 4.11 stopped bringing it) each request paid for failed import searches, about
    0.1 ms each, a third of an upstream request's CPU. sniffio is our dependency for that."""
    digest = parse_digest(upstream.add_blob(os.urandom(4 * KiB)))
    client = client_for(upstream)
    searches = ImportSearches()
    try:
        await read_blob(client, digest)  # the first request may import what it needs once
        sys.meta_path.insert(0, searches)
        try:
            for _ in range(3):
                await read_blob(client, digest)
        finally:
            sys.meta_path.remove(searches)
    finally:
        await client.aclose()
    assert searches.names == [], f"imports searched for on every request: {sorted(set(searches.names))}"


#: Run in a fresh process: the test process has long imported everything.
FIRST_REQUEST = """
import asyncio, os, sys
from moorage.config import UpstreamSettings
from moorage.upstreams import open_upstreams
from moorage.upstreams.reference import parse_digest
from tests.fakes import FakeRegistry
from tests.upstreams.test_network import ImportSearches


async def main() -> None:
    async with FakeRegistry() as upstream:
        digest = parse_digest(upstream.add_blob(os.urandom(4096)))
        settings = UpstreamSettings.model_validate({"host": "docker.io", "url": upstream.url})
        async with open_upstreams([settings]) as router:
            route = router.resolve("docker.io/library/x")
            searches = ImportSearches()
            sys.meta_path.insert(0, searches)
            try:
                async with route.upstream.open_blob(route.repository, digest) as body:
                    async for _ in body.chunks():
                        pass
            finally:
                sys.meta_path.remove(searches)
        print(" ".join(sorted(set(searches.names))))


asyncio.run(main())
"""


def test_the_first_upstream_request_of_a_process_imports_nothing() -> None:
    """anyio imports its parts on first use: the first upstream request of a fresh process
    paid about 35 ms for them, and the first client's pull with it. The upstream clients
    load them when they open."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", FIRST_REQUEST], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [], f"imported by the first request: {done.stdout.strip()}"


async def test_an_upstream_behind_the_environments_http_proxy_is_reached_through_it(
    upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a corporate proxy the upstream's name does not even resolve: every request,
    blobs included, must go through ``HTTP_PROXY``. The fake serves as that proxy (it answers
    absolute-form requests as if it were the registry named in them)."""
    data = os.urandom(3 * MiB)
    digest = parse_digest(upstream.add_blob(data))
    monkeypatch.setenv("HTTP_PROXY", upstream.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = RegistryClient(
        UpstreamSettings.model_validate(
            {"host": "docker.io", "url": "http://registry.invalid", "retries": {"attempts": 1}}
        )
    )
    try:
        assert (await read_blob(client, digest))[0] == data
    finally:
        await client.aclose()
    assert [request.host for request in upstream.requests] == ["registry.invalid"]
