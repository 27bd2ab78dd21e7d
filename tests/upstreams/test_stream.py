"""Upstream connections on asyncio's transports (``upstreams/_stream.py``), against small
servers on real sockets: a slow reader never has a whole body buffered in memory and still
gets every byte in order; a server that accepts but never finishes the TLS handshake is a
connect timeout, one that already closed the connection or spoke first a connect error at
once; a server
that closes an idle connection makes it unreadable for reuse, also on descriptors above 1023;
closing a TLS connection frees its socket without waiting for the server's close_notify."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpcore
import pytest

from moorage.upstreams._stream import _HIGH_WATER, AsyncioStream, connect_tcp
from tests.integration.harness.tools import self_signed_certificate

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


async def test_readability_is_checked_on_descriptors_above_1023(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    """A busy cache holds more than a thousand sockets and files; ``select()`` cannot take a
    descriptor above 1023, and httpcore asks before every reuse of a connection."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    port = await serve(hold)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        stream = await connect_tcp("127.0.0.1", port, timeout=5)
        try:
            assert stream.get_extra_info("socket").fileno() > 1023
            assert stream.get_extra_info("is_readable") is False, "an open idle connection is reusable"
        finally:
            await stream.aclose()
    finally:
        for descriptor in fillers:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _tls_server_that_never_closes(cert: Path, key: Path, ready: threading.Event, stop: threading.Event) -> int:
    """A TLS server (a thread, plain sockets) that completes handshakes, then neither reads
    nor answers: a close_notify sent to it is never answered."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])

    def run() -> None:
        with listener:
            connection, _ = listener.accept()
            with context.wrap_socket(connection, server_side=True) as secured:
                ready.set()
                stop.wait(10)
                secured.close()

    threading.Thread(target=run, daemon=True).start()
    return port


async def test_closing_a_tls_connection_frees_its_socket_at_once(tmp_path: Path) -> None:
    cert, key = await asyncio.to_thread(self_signed_certificate, tmp_path)
    ready, stop = threading.Event(), threading.Event()
    port = _tls_server_that_never_closes(cert, key, ready, stop)
    try:
        plain = await connect_tcp("127.0.0.1", port, timeout=5)
        stream = await plain.start_tls(ssl.create_default_context(cafile=str(cert)), "127.0.0.1", timeout=5)
        assert await asyncio.to_thread(ready.wait, 5)
        raw = stream.get_extra_info("socket")
        await stream.aclose()
        for _ in range(50):
            if raw.fileno() < 0:
                break
            await asyncio.sleep(0.01)
        assert raw.fileno() < 0, "the socket waits for the server's close_notify"
    finally:
        stop.set()


async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def speak_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!")
    await writer.drain()
    await reader.read()  # until the client has given up
    writer.close()


@pytest.mark.parametrize(
    ("server", "arrived", "refusal"),
    [
        (close_at_once, lambda stream: stream._receiver.ended, "closed the connection"),
        (speak_first, lambda stream: bool(stream._receiver.chunks), "before the TLS handshake"),
    ],
    ids=["server closed", "server spoke first"],
)
async def test_a_tls_handshake_on_a_connection_that_is_not_clean_fails_at_once(
    serve: Callable[[Handler], Awaitable[int]],
    server: Handler,
    arrived: Callable[[AsyncioStream], bool],
    refusal: str,
) -> None:
    """A server that already closed: not a wait for the whole handshake timeout (asyncio would
    send the ClientHello into a closed transport and never hear back). One that spoke first:
    bytes that arrived in the clear must never be read later as if TLS had protected them."""
    port = await serve(server)
    stream = await connect_tcp("127.0.0.1", port, timeout=5)
    for _ in range(50):  # until the event loop has seen what the server did
        if arrived(stream):
            break
        await asyncio.sleep(0.01)
    with pytest.raises(httpcore.ConnectError, match=refusal):
        await stream.start_tls(ssl.create_default_context(), "registry.example", timeout=2)
