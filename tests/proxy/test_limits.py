"""Limits that keep one client or one upstream from taking the cache down: fills per upstream
wait their turn, idle and byte-by-byte clients are dropped, oversized requests are refused."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

from moorage.proxy._serve import running
from tests.fakes import FakeRegistry

from .conftest import StartMoorage, settings_for


async def test_fills_per_upstream_wait_their_turn(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    moorage = await start_moorage(upstream_settings={"max_concurrent_fills": 2})
    blobs = [upstream.add_blob(os.urandom(200_000)) for _ in range(6)]
    for digest in blobs:
        upstream.slow_blob(digest, chunk=50_000, delay=0.05)

    async def pull(digest: str) -> bytes:
        response = await moorage.get(f"/v2/alpine/blobs/{digest}")
        assert response.status == 200
        return await response.read()

    bodies = await asyncio.gather(*(pull(d) for d in blobs))
    assert ["sha256:" + hashlib.sha256(b).hexdigest() for b in bodies] == blobs, "every pull completes"
    assert upstream.most_blob_bodies_in_flight == 2


async def test_idle_and_byte_by_byte_clients_are_dropped(upstream: FakeRegistry, tmp_path: Path) -> None:
    upstream.add_image("library/alpine", "3.19")
    settings = settings_for(upstream, tmp_path / "store", client_idle_timeout="1s")
    async with running(settings) as url:
        host, port = url.removeprefix("http://").split(":")
        idle_reader, idle_writer = await asyncio.open_connection(host, int(port))
        started = time.monotonic()
        assert await asyncio.wait_for(idle_reader.read(1), 10) == b"", "an idle connection is closed"
        assert time.monotonic() - started < 5
        idle_writer.close()

        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v2/alpine/manifests/3.19 HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 8:  # one header line every 0.3 s, never finishing
            await asyncio.sleep(0.3)
            if reader.at_eof():
                closed = True
                break
            try:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
        assert closed, "a client that never finishes its request head is dropped"
        assert time.monotonic() - started < 5
        writer.close()

        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v2/alpine/manifests/3.19 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200"), "others are still served"
        writer.close()


async def test_oversized_request_lines_and_headers_are_refused(upstream: FakeRegistry, tmp_path: Path) -> None:
    upstream.add_image("library/alpine", "3.19")
    async with running(settings_for(upstream, tmp_path / "store")) as url:
        host, port = url.removeprefix("http://").split(":")
        for request in (
            b"GET /v2/" + b"a/" * 5000 + b"manifests/1 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v2/alpine/manifests/3.19 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.split()[1] in (b"400", b"414", b"431"), status
            writer.close()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v2/alpine/manifests/3.19 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
