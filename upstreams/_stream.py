"""Upstream connections on asyncio's own transports, as httpcore network streams.

httpcore's default backend goes through anyio, whose TLS layer hands over one TLS record (at
most 16 KiB) per read, each read passing through anyio's cancel scopes and httpcore's
exception maps: reading a 39 MB blob over TLS took about 290 ms of CPU here, at most 135 MB/s
per core, for a cache whose upstreams are HTTPS almost always. asyncio's own TLS transport
decrypts every record that has arrived in one go and hands them over together, and its plain
TCP transport delivers each socket read (up to 256 KiB) to a protocol without a task switch.

:class:`AsyncioStream` is one connection: a :class:`_Receiver` protocol gathers what arrives
(pausing the transport above ``_HIGH_WATER`` bytes, so a slow consumer never buffers a whole
blob), reads take what is gathered, writes wait for the transport to drain, and
:meth:`AsyncioStream.start_tls` upgrades it with ``loop.start_tls``. Errors are httpcore's
(``ConnectError``, ``ReadTimeout`` …), as its own backends raise them, so httpx maps them as
before. :func:`connect_tcp` opens one (with asyncio's Happy Eyeballs between addresses).
"""

# The methods' ``timeout`` parameters are httpcore's interface, not ours to change.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import select
import ssl
import typing
from collections import deque
from collections.abc import Iterable
from typing import Final

import httpcore

__all__ = ["AsyncioStream", "connect_tcp"]

#: Above this many bytes received and not yet read, the transport stops reading the socket;
#: the kernel's socket buffer holds what comes meanwhile. Over eight concurrent cold pulls the
#: peak memory measured 4 MiB above anyio's one read at a time with this, 10 MiB with 4 MiB…
_HIGH_WATER: Final = 1024 * 1024
#: … and below this many it reads again.
_LOW_WATER: Final = 256 * 1024
#: How long asyncio waits for the first address before trying the next (RFC 8305's advice).
_HAPPY_EYEBALLS_DELAY: Final = 0.25


class _Receiver(asyncio.Protocol):
    """What a connection received and has not handed over yet, and whether it ended. One
    reader waits at a time (httpcore reads an HTTP/1.1 connection from one task)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.ended = False
        self.error: BaseException | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # close the transport: HTTP/1.1 never half-closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take(self, max_bytes: int) -> bytes:
        """The oldest received piece, at most ``max_bytes`` of it; b"" when none is left."""
        if not self.chunks:
            return b""
        chunk = self.chunks.popleft()
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            self.chunks.appendleft(rest)
        self.buffered -= len(chunk)
        if self._paused and self.buffered < _LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    async def arrival(self) -> None:
        """Until something arrives or the connection ends."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def drained(self) -> None:
        """Until the transport's write buffer is below its limit again."""
        if self._write_paused and not self.ended:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One upstream connection, plain or TLS, on an asyncio transport."""

    def __init__(self, transport: asyncio.Transport, receiver: _Receiver) -> None:
        self._transport = transport
        self._receiver = receiver

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        receiver = self._receiver
        if not receiver.chunks and not receiver.ended:
            try:
                async with asyncio.timeout(timeout):
                    while not receiver.chunks and not receiver.ended:
                        await receiver.arrival()
            except TimeoutError:
                raise httpcore.ReadTimeout("timed out") from None
        if receiver.chunks:
            return receiver.take(max_bytes)
        if receiver.error is not None:
            raise httpcore.ReadError(str(receiver.error) or type(receiver.error).__name__)
        return b""  # the server closed the connection

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(buffer)
        try:
            async with asyncio.timeout(timeout):
                await self._receiver.drained()
        except TimeoutError:
            raise httpcore.WriteTimeout("timed out") from None
        if self._receiver.error is not None:
            raise httpcore.WriteError(str(self._receiver.error))

    async def aclose(self) -> None:
        if self._transport.get_extra_info("ssl_object") is not None:
            # Not close(): asyncio's TLS transport would send close_notify and wait up to 30 s
            # for the server's, holding the socket, and a reader would wait as long.
            self._transport.abort()
        else:
            self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._receiver.ended or self._transport.is_closing():
            self._transport.abort()
            raise httpcore.ConnectError("the server closed the connection before the TLS handshake")
        if self._receiver.chunks:  # else read later as if it had come over TLS
            self._transport.abort()
            raise httpcore.ConnectError("the server sent data before the TLS handshake")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport, self._receiver, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            self._transport.abort()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        if transport is None:  # the connection ended during the handshake
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        self._receiver.transport = transport
        return AsyncioStream(transport, self._receiver)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        if info == "is_readable":  # httpcore asks before reusing an idle connection
            return self._readable()
        return None

    def _readable(self) -> bool:
        """Whether an idle connection has something to read, which for HTTP/1.1 means the
        server closed it (or broke the protocol): either way it must not be reused."""
        receiver = self._receiver
        if receiver.chunks or receiver.ended or self._transport.is_closing():
            return True
        sock = self._transport.get_extra_info("socket")
        if sock is None or sock.fileno() < 0:
            return True
        poller = select.poll()  # not select(): it cannot take descriptors above 1023
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))


async def connect_tcp(
    host: str,
    port: int,
    timeout: float | None = None,
    local_address: str | None = None,
    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
) -> AsyncioStream:
    """A TCP connection to ``host:port``, with httpcore's errors."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            transport, receiver = await loop.create_connection(
                _Receiver,
                host,
                port,
                local_addr=(local_address, 0) if local_address else None,
                happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY,
            )
    except TimeoutError:
        raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
    sock = transport.get_extra_info("socket")
    try:
        for option in socket_options or ():
            sock.setsockopt(*option)  # asyncio has already set TCP_NODELAY
    except OSError as exc:
        transport.abort()
        raise httpcore.ConnectError(f"socket option refused: {exc}") from exc
    return AsyncioStream(transport, receiver)
