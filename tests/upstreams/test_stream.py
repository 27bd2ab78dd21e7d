"""Upstream connections on asyncio's transports (``upstreams/_stream.py``), against small
servers on real sockets: a slow reader never has a whole body buffered in memory and still
gets every byte in order; a server that accepts but never finishes the TLS handshake is a
connect timeout; a server that closes an idle connection makes it unreadable for reuse."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httpcore
import pytest

from moorage.upstreams._stream import _HIGH_WATER, AsyncioStream, connect_tcp

MiB = 1024 * 1024

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_all(stream: AsyncioStream) -> bytes:
    pieces = []
    while piece := await stream.read(MiB, timeout=5):
        pieces.append(piece)
    return b"".join(pieces)


async def test_a_slow_reader_never_holds_more_than_the_high_water_mark(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    body = os.urandom(64 * MiB)

    async def send_fast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(body)
        await writer.drain()
        writer.close()

    port = await serve(send_fast)
    stream = await connect_tcp("127.0.0.1", port, timeout=5)
    try:
        first = await stream.read(MiB, timeout=5)
        await asyncio.sleep(0.5)  # a busy consumer: the server keeps sending meanwhile
        held = stream._receiver.buffered
        rest = await read_all(stream)
    finally:
        await stream.aclose()
    assert held <= _HIGH_WATER + 256 * 1024, f"{held} bytes held in memory for a reader that had paused"
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(body).digest()


async def test_a_tls_handshake_that_never_finishes_is_a_connect_timeout(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the ClientHello, answers nothing
        writer.close()

    port = await serve(silent)
    stream = await connect_tcp("127.0.0.1", port, timeout=5)
    with pytest.raises(httpcore.ConnectTimeout):
        await stream.start_tls(ssl.create_default_context(), "registry.example", timeout=0.3)


async def test_an_idle_connection_the_server_closed_reads_as_not_reusable(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    closed = asyncio.Event()

    async def close_soon(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        closed.set()

    port = await serve(close_soon)
    stream = await connect_tcp("127.0.0.1", port, timeout=5)
    try:
        await closed.wait()
        for _ in range(50):  # until the FIN has reached this side
            if stream.get_extra_info("is_readable"):
                break
            await asyncio.sleep(0.01)
        assert stream.get_extra_info("is_readable"), "a closed connection looks reusable"
        assert await stream.read(MiB, timeout=1) == b""
    finally:
        await stream.aclose()


async def test_a_refused_connection_is_a_connect_error() -> None:
    with pytest.raises(httpcore.ConnectError):
        await connect_tcp("127.0.0.1", 1, timeout=2)
