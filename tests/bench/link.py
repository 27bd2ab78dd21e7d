"""A long link in front of the upstream, for the benchmark: a TCP relay whose every connection
gets its own rate towards the client and a round-trip delay.

A registry across the internet serves each connection at a rate of its own (a CDN edge, a
long fat pipe), and every request waits a round trip. On one machine neither is true, so the
cold-pull figures there measure CPU, not the link. This relay makes the link the limit:
``rate`` bytes per second per connection downstream, ``rtt`` seconds added to connecting and
to every answer. It runs its own event loop in a thread; ``close`` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

__all__ = ["Link"]

READ_SIZE = 64 * 1024


class Link:
    def __init__(self, target_host: str, target_port: int, rate: float, rtt: float) -> None:
        self.target = (target_host, target_port)
        self.rate = rate
        self.delay = rtt / 2
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="link", daemon=True)
        self._thread.start()
        started.wait()
        assert self._server is not None
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        started.set()
        self._loop.run_forever()

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2 * self.delay)  # the TCP handshake's round trip
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._relay(client_reader, upstream_writer, rate=None),
            self._relay(upstream_reader, client_writer, rate=self.rate),
            return_exceptions=True,
        )

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None) -> None:
        """Copy one direction; each piece arrives ``delay`` after it was sent, no faster than
        ``rate`` bytes per second (None: as fast as it comes)."""
        pieces: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def receive() -> None:
            while data := await reader.read(READ_SIZE):
                await pieces.put((time.monotonic() + self.delay, data))
            await pieces.put(None)

        async def deliver() -> None:
            line_free = 0.0
            while (piece := await pieces.get()) is not None:
                due, data = piece
                start = max(due, line_free, time.monotonic())
                line_free = start + (len(data) / rate if rate else 0.0)
                await asyncio.sleep(max(0.0, line_free - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(receive(), deliver())
        finally:
            with contextlib.suppress(Exception):
                writer.close()
