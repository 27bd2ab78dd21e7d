"""The socket layer under the upstream client: httpcore's interface, asyncio's transports.

httpcore asks its network stream for 64 KiB per read (``READ_NUM_BYTES``, a constant), and
anyio, its default backend, hands over at most that much, splitting (and so copying) each
larger piece the event loop received, and over TLS one record of at most 16 KiB per read. A
blob body of hundreds of megabytes then costs thousands of trips through h11, httpcore and
anyio on the event loop, which a cold pull waits for: measured on a 315 MB image, the reads
took 1.7 CPU seconds at 64 KiB and 1.3 at 1 MiB; a 39 MB blob over TLS took 290 ms of CPU.
:class:`WideReadBackend` connects over TCP with asyncio's own transports (``_stream``: all
records that arrived decrypted at once, 60 ms for that blob) and asks for at least
``READ_SIZE`` per read; h11 keeps whatever it is given, so nothing else changes. Unix sockets
still go through anyio. :func:`wide_read_transport` is the httpx transport that uses it, and
:func:`load_network_modules` imports at start what anyio (which httpcore still uses for its
locks and events) would import on the first request.
"""

# The methods' ``timeout`` parameters are httpcore's interface, not ours to change.
# ruff: noqa: ASYNC109

from __future__ import annotations

import ssl
import typing
from typing import Final

import anyio
import httpcore
import httpx

from ._stream import connect_tcp

__all__ = ["READ_SIZE", "WideReadBackend", "WideReadStream", "load_network_modules", "wide_read_transport"]

#: The least a read asks for: what asyncio receives at most per socket read, times four.
READ_SIZE: Final = 1024 * 1024


class WideReadStream(httpcore.AsyncNetworkStream):
    """A network stream whose reads ask for at least ``READ_SIZE`` bytes."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max(max_bytes, READ_SIZE), timeout)

    async def read_at_most(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """A read that never takes more than ``max_bytes``: for a body read past h11, whose
        end must stay where the answer said it is (``_body``)."""
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return WideReadStream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class WideReadBackend(httpcore.AsyncNetworkBackend):
    """TCP connections on asyncio's transports (``_stream``), Unix sockets on ``backend``
    (httpcore's anyio one by default), every stream wrapped in :class:`WideReadStream`."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._backend = backend or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await connect_tcp(host, port, timeout, local_address, socket_options)
        return WideReadStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return WideReadStream(await self._backend.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _WideReadTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (request and response mapping, exception mapping) over a
    connection pool on :class:`WideReadBackend`. httpx takes no network backend, so the
    pool is set here; its ``_pool`` is the one name of httpx's this relies on (pinned in
    pyproject.toml, and the tests fail if it changes)."""

    def __init__(self, limits: httpx.Limits, trust: ssl.SSLContext) -> None:
        # No super().__init__: its pool would go unused.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=trust,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=WideReadBackend(),
        )


def wide_read_transport(limits: httpx.Limits, trust: ssl.SSLContext) -> httpx.AsyncBaseTransport:
    """An httpx transport with ``limits`` whose reads ask for ``READ_SIZE`` bytes, checking
    servers' certificates with ``trust``. It goes straight to the server: the registry client
    sends through it the requests the environment's proxy does not take (``_proxies``)."""
    return _WideReadTransport(limits, trust)


#: What httpcore uses of anyio (its locks, events and cancel scopes, and for Unix sockets its
#: streams), each imported by anyio on first access. TCP and TLS go over asyncio (``_stream``).
_ANYIO_NAMES: Final = (
    "BrokenResourceError",
    "CancelScope",
    "ClosedResourceError",
    "EndOfStream",
    "Event",
    "Lock",
    "Semaphore",
    "connect_unix",
    "fail_after",
    "sleep",
)


async def load_network_modules() -> None:
    """Import what anyio, httpcore's backend, imports only on first use (its locks, events,
    sockets and timeouts, and its asyncio backend): about 35 ms that the first upstream
    request of a process, and the client waiting behind it, would otherwise pay."""
    for name in _ANYIO_NAMES:
        getattr(anyio, name, None)  # a name a later anyio drops is only not loaded early
    anyio.Event().set()  # the asyncio backend, imported for the first primitive made in a loop
