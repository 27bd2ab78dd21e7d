"""Limits that keep one client or one upstream from taking the cache down: fills per upstream
wait their turn (and a queued one whose clients all left is dropped), idle and byte-by-byte
clients are dropped, oversized requests are refused."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from moorage.proxy._serve import running
from moorage.proxy._state import CACHE
from tests.fakes import FakeRegistry
from tests.polling import until, until_async

from .conftest import StartMoorage, metric, settings_for, until_settled


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


def _filling(moorage: TestClient[web.Request, web.Application]) -> list[str]:
    return [str(digest) for digest in moorage.app[CACHE].fills.digests]


async def _asked(
    moorage: TestClient[web.Request, web.Application], path: str, method: str = "GET"
) -> asyncio.StreamWriter:
    """Send a request on a connection of its own, reading no answer; close the writer to leave."""
    server = moorage.server
    _, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return writer


async def _left(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()
        await writer.wait_closed()


async def _slot_held(
    moorage: TestClient[web.Request, web.Application], upstream: FakeRegistry
) -> tuple[asyncio.Future[bytes], bytes]:
    """A pull whose body stalls (until ``release_stalls``) while holding the only download slot."""
    data = os.urandom(200_000)
    digest = upstream.add_blob(data)
    upstream.stall_blob(digest, 50_000, None)

    async def pull() -> bytes:
        response = await moorage.get(f"/v2/alpine/blobs/{digest}")
        return await response.read()

    pulling = asyncio.ensure_future(pull())
    await until(lambda: _filling(moorage) == [digest])
    return pulling, data


async def test_a_queued_download_whose_clients_all_left_is_dropped(
    start_moorage: StartMoorage, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="moorage.cache")
    moorage = await start_moorage(upstream_settings={"max_concurrent_fills": 1, "prefetch_blobs": 0})
    holding, held_data = await _slot_held(moorage, upstream)
    data = os.urandom(100_000)
    queued = upstream.add_blob(data)
    pulling = await _asked(moorage, f"/v2/alpine/blobs/{queued}")
    await until(lambda: queued in _filling(moorage))
    asking_size = await _asked(moorage, f"/v2/alpine/blobs/{queued}", "HEAD")  # shares the download
    await until(lambda: moorage.app[CACHE].fills.readers == 3)  # the stalled pull's client and both
    await _left(pulling, asking_size)
    await until(lambda: any(getattr(r, "event", "") == "fill_abandoned" for r in caplog.records))
    (dropped,) = [r for r in caplog.records if getattr(r, "event", "") == "fill_abandoned"]
    assert getattr(dropped, "digest", "") == queued and queued not in _filling(moorage)
    await until_async(lambda: _answered(moorage, "499", 2))  # recorded as clients gone, GET and HEAD

    upstream.release_stalls()
    assert await holding == held_data
    await until_settled(moorage)
    assert upstream.count("GET", f"/blobs/{queued}") == 0, "nobody waits for it: it is not fetched"
    response = await moorage.get(f"/v2/alpine/blobs/{queued}")
    assert response.status == 200
    assert await response.read() == data, "a client asking later gets it"
    assert upstream.count("GET", f"/blobs/{queued}") == 1


async def test_a_download_waiting_for_the_upstreams_first_answer_is_dropped_when_its_client_left(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    moorage = await start_moorage(upstream_settings={"prefetch_blobs": 0})
    data = os.urandom(100_000)
    digest = upstream.add_blob(data)
    upstream.delay_next(1, 1.5, paths=f"/blobs/{digest}")
    pulling = await _asked(moorage, f"/v2/alpine/blobs/{digest}")
    await until(lambda: upstream.count("GET", f"/blobs/{digest}") == 1)  # asked, no answer yet
    await _left(pulling)
    await until(lambda: digest not in _filling(moorage))
    await until_settled(moorage)
    stored = {p.name for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()}
    assert digest.split(":")[1] not in stored, "its answer was not read into the store"
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert await response.read() == data
    assert upstream.count("GET", f"/blobs/{digest}") == 2


async def _answered(moorage: TestClient[web.Request, web.Application], status: str, count: int) -> bool:
    return await metric(moorage, "moorage_requests_total", kind="blob", status=status) == count


async def test_a_queued_download_goes_on_while_one_of_its_clients_waits(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    moorage = await start_moorage(upstream_settings={"max_concurrent_fills": 1, "prefetch_blobs": 0})
    holding, held_data = await _slot_held(moorage, upstream)
    data = os.urandom(100_000)
    queued = upstream.add_blob(data)
    staying = asyncio.ensure_future(moorage.get(f"/v2/alpine/blobs/{queued}"))
    await until(lambda: queued in _filling(moorage))
    leaving = await _asked(moorage, f"/v2/alpine/blobs/{queued}")
    await until(lambda: moorage.app[CACHE].fills.readers == 3)  # the stalled pull's client and both
    await _left(leaving)
    await asyncio.sleep(1.5)  # three looks at whether the clients left
    assert queued in _filling(moorage), "one client still waits for it"

    upstream.release_stalls()
    assert await holding == held_data
    response = await staying
    assert response.status == 200
    assert await response.read() == data
    assert upstream.count("GET", f"/blobs/{queued}") == 1


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
