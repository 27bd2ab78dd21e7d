"""The socket layer under the upstream client: reads ask for ``READ_SIZE``, not httpcore's 64 KiB,
so a blob body reaches the fill in the large pieces the socket holds (over real sockets, against
the fake upstream), byte for byte; TLS streams are wrapped the same way."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import typing

import httpcore

from moorage.config import UpstreamSettings
from moorage.upstreams import RegistryClient
from moorage.upstreams._network import READ_SIZE, WideReadStream
from moorage.upstreams.reference import RepositoryName, parse_digest
from tests.fakes import FakeRegistry

KiB = 1024
MiB = 1024 * KiB


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

    def get_extra_info(self, info: str) -> typing.Any:
        return f"extra:{info}"


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
    assert stream.get_extra_info("server_addr") == "extra:server_addr"


async def test_a_blob_body_arrives_in_pieces_larger_than_64_kib() -> None:
    data = os.urandom(8 * MiB)
    async with FakeRegistry() as upstream:
        digest = parse_digest(upstream.add_blob(data))
        settings = UpstreamSettings.model_validate({"host": "docker.io", "url": upstream.url})
        client = RegistryClient(settings)
        try:
            sizes: list[int] = []
            hasher = hashlib.sha256()
            async with client.open_blob(RepositoryName("library/x"), digest) as body:
                async for chunk in body.chunks():
                    sizes.append(len(chunk))
                    hasher.update(chunk)
                    await asyncio.sleep(0.01)  # a busy cache: the socket fills up meanwhile
        finally:
            await client.aclose()
    assert "sha256:" + hasher.hexdigest() == str(digest) and sum(sizes) == len(data)
    assert max(sizes) > 64 * KiB, f"pieces of at most {max(sizes)} bytes: reads are still 64 KiB"
