"""Blob bodies read past h11 (``upstreams/_body.py``), over real sockets against the fake
upstream: the bulk of a body never goes through h11, the kept-alive connection is reused for
the next blob, over plain HTTP and TLS, and a body that was cut, stalled or abandoned half-read
leaves a connection that is never reused (a reused one would hand the next blob the old one's
bytes)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from pathlib import Path

import h11
import pytest

from moorage.upstreams import RegistryClient, UpstreamUnavailable
from moorage.upstreams._network import READ_SIZE
from moorage.upstreams.reference import Digest, parse_digest
from tests.fakes import FakeRegistry
from tests.integration.harness.tools import self_signed_certificate

from .clients import REPO, MiB, client_for, read_blob


@pytest.fixture
def fed_to_h11(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of what h11 is given to parse, from now on."""
    fed: list[int] = []
    receive_data = h11.Connection.receive_data

    def counting(self: h11.Connection, data: bytes) -> None:
        fed.append(len(data))
        receive_data(self, data)

    monkeypatch.setattr(h11.Connection, "receive_data", counting)
    return fed


def connections(upstream: FakeRegistry) -> int:
    return len({request.peer for request in upstream.requests})


async def test_the_bulk_of_a_body_bypasses_h11_and_the_connection_is_reused(
    upstream: FakeRegistry, fed_to_h11: list[int]
) -> None:
    data = os.urandom(16 * MiB + 3)
    digest = parse_digest(upstream.add_blob(data))
    client = client_for(upstream)
    try:
        first, _ = await read_blob(client, digest, pause=0.005)
        second, _ = await read_blob(client, digest)
    finally:
        await client.aclose()
    assert hashlib.sha256(first).hexdigest() == digest.encoded and second == data
    # Each answer's head and what came with it, at most one read each: not 32 MiB of bodies.
    assert sum(fed_to_h11) <= 2 * READ_SIZE, f"h11 parsed {sum(fed_to_h11)} bytes of two 16 MiB bodies"
    assert connections(upstream) == 1, "the connection went back to the pool after each body"


async def test_a_body_cut_past_h11_is_an_upstream_error_and_the_next_gets_a_new_connection(
    upstream: FakeRegistry, fed_to_h11: list[int]
) -> None:
    data = os.urandom(8 * MiB)
    digest = parse_digest(upstream.add_blob(data))
    client = client_for(upstream, timeouts={"read": "0.5s", "connect": "1s"})
    try:
        assert (await read_blob(client, digest))[0] == data
        upstream.cut_blob(str(digest), after_bytes=5 * MiB)  # past the first read, which h11 parses
        with pytest.raises(UpstreamUnavailable, match="blob body"):
            await read_blob(client, digest)
        assert connections(upstream) == 1, "the cut came on the kept-alive connection"
        upstream.stall_blob(str(digest), after_bytes=5 * MiB, seconds=None)
        with pytest.raises(UpstreamUnavailable, match="timed out"):
            await read_blob(client, digest)
        upstream.clear_faults()
        assert (await read_blob(client, digest))[0] == data
    finally:
        await client.aclose()
    assert connections(upstream) == 3, "neither the cut nor the stalled connection was reused"
    assert sum(fed_to_h11) <= 4 * READ_SIZE, "the cuts and the stall came while reading past h11"


async def half_read(client: RegistryClient, digest: Digest, wanted: int) -> int:
    """Read about ``wanted`` bytes of a blob's body, then drop the rest (a cancelled fill)."""
    got = 0
    async with client.open_blob(REPO, digest) as body:
        async for chunk in body.chunks():
            got += len(chunk)
            if got >= wanted:
                break
    return got


async def test_a_body_left_half_read_never_leaks_into_the_next_answer(
    upstream: FakeRegistry, fed_to_h11: list[int]
) -> None:
    one, other = os.urandom(8 * MiB), os.urandom(8 * MiB)
    one_digest, other_digest = parse_digest(upstream.add_blob(one)), parse_digest(upstream.add_blob(other))
    client = client_for(upstream)
    try:
        assert 3 * MiB <= await half_read(client, one_digest, 3 * MiB) < len(one)
        received, _ = await read_blob(client, other_digest)
        assert received == other, "the next blob's bytes are its own"
        assert (await read_blob(client, one_digest))[0] == one
    finally:
        await client.aclose()
    assert connections(upstream) == 2, "the half-read connection was closed, the next one kept"
    assert sum(fed_to_h11) <= 3 * READ_SIZE, "the half-read body was being read past h11"


async def test_over_tls_the_bulk_of_a_body_bypasses_h11_and_the_connection_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fed_to_h11: list[int]
) -> None:
    cert, key = await asyncio.to_thread(self_signed_certificate, tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    registry = FakeRegistry()
    registry.ssl_context = server_context
    data = os.urandom(6 * MiB + 1)
    async with registry:
        digest = parse_digest(registry.add_blob(data))
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        client = client_for(registry)
        try:
            assert (await read_blob(client, digest))[0] == data
            assert (await read_blob(client, digest))[0] == data
        finally:
            await client.aclose()
        assert connections(registry) == 1
    assert sum(fed_to_h11) <= 2 * READ_SIZE, f"h11 parsed {sum(fed_to_h11)} bytes of two 6 MiB bodies"
