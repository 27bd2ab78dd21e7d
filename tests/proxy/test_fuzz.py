"""Ten thousand generated bad requests at a running server, over raw sockets (no client library
to tidy them up): random paths, traversal in every encoding, odd methods, ranges, headers and
huge values. None may get a 5xx, none may create or read a file outside the store (a canary
directory beside it stays as it was), and a real pull works afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections import Counter
from pathlib import Path

from moorage.proxy._serve import running
from tests.fakes import FakeRegistry

from .conftest import settings_for

REQUESTS = 10_000
WORKERS = 8
SEED = 20261123

TRAVERSALS = [
    "..",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%252e%252e",
    "..%2f",
    "..%5c",
    "%c0%ae%c0%ae",
    "..;",
    "\\..\\",
    "%00",
    "%2f",
    "%2F",
    "//",
    "/./",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "GeT", "X" * 40]


def _text(rng: random.Random, size: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789._-/:@%+~!$&'()*,;=?#[] \t\\\"<>^`{|}" + "é☃\x7f"
    return "".join(rng.choice(alphabet) for _ in range(size))


def _path(rng: random.Random, canary: str) -> tuple[str, str]:
    """A (class, request target) pair."""
    kind = rng.choice(["traversal", "random", "digest", "reference", "long", "encoded", "absolute", "query"])
    name = rng.choice(["alpine", "library/alpine", "docker.io/library/alpine", "docker-hub/alpine", "a" * 300])
    if kind == "traversal":
        hops = "/".join(rng.choice(TRAVERSALS) for _ in range(rng.randint(1, 6)))
        where = rng.choice(["manifests", "blobs", "tags/list"])
        return kind, f"/v2/{name}/{hops}/{canary}/{where}/{rng.choice(['latest', 'secret', 'sha256:' + '0' * 64])}"
    if kind == "random":
        return kind, "/" + _text(rng, rng.randint(0, 120)).replace(" ", "%20").replace("#", "%23")
    if kind == "digest":
        digest = rng.choice(
            [
                "sha256:" + _text(rng, 64),
                "sha256:" + "g" * 64,
                "sha512:" + "0" * 64,
                "md5:" + "0" * 32,
                "sha256:" + "0" * rng.randint(0, 200),
                "sha256:../../" + canary,
                ":" * rng.randint(1, 5),
            ]
        )
        return kind, f"/v2/{name}/{rng.choice(['blobs', 'manifests'])}/{digest}"
    if kind == "reference":
        tag = rng.choice(["-bad", "." * 3, "a" * 129, "UPPER/../x", "t@g", "", "%00", _text(rng, 20)])
        return kind, f"/v2/{name}/manifests/{tag.replace(' ', '%20').replace('#', '%23')}"
    if kind == "long":
        return kind, "/v2/" + "a/" * rng.randint(100, 4000) + "manifests/latest"
    if kind == "encoded":
        encoded = "".join(f"%{b:02x}" for b in os.urandom(rng.randint(1, 40)))
        return kind, f"/v2/{encoded}/manifests/{encoded}"
    if kind == "absolute":
        return kind, rng.choice(["http://evil.example/v2/", "*", f"file:///{canary}", "//evil.example/v2/alpine"])
    query = "&".join(
        f"{rng.choice(['ns', 'n', 'last', 'scope', 'x'])}={_text(rng, rng.randint(0, 60))}" for _ in range(4)
    )
    return kind, f"/v2/{name}/tags/list?{query.replace(' ', '%20').replace('#', '%23')}"


def _headers(rng: random.Random) -> tuple[str, list[str]]:
    if rng.random() < 0.4:  # most requests reach routing and the handlers with ordinary headers
        return "none", []
    kind = rng.choice(["range", "accept", "authorization", "huge", "junk", "host"])
    if kind == "range":
        fixed = ["bytes=-1", "bytes=0-", "bytes=5-1", "bytes=99999999999999999999-", "bytes=-0", "bytes=0-0,1-1"]
        value = rng.choice([*fixed, "items=0-1", f"bytes={rng.randint(-5, 10**12)}-{rng.randint(-5, 10**12)}"])
        return kind, [f"Range: {value}"]
    if kind == "accept":
        return kind, [f"Accept: {_text(rng, rng.randint(0, 300))}"]
    if kind == "authorization":
        value = rng.choice(["Basic !!!", "Bearer x.y.z", "Basic " + "A" * 5000, "Negotiate", _text(rng, 50)])
        return kind, [f"Authorization: {value}"]
    if kind == "huge":
        return kind, [f"X-Huge: {'h' * rng.choice([9000, 20000, 70000])}"]
    if kind == "junk":
        return kind, [_text(rng, rng.randint(1, 60)) for _ in range(rng.randint(1, 5))]
    if kind == "host":
        return kind, [f"Host: {_text(rng, rng.randint(0, 300))}"]
    return kind, []


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


async def _send(host: str, port: int, request: bytes) -> int | None:
    """The response's status, or None when the server closed the connection without one."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        while await asyncio.wait_for(reader.readline(), 10) not in (b"\r\n", b""):
            pass
        await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return None
    finally:
        writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def test_ten_thousand_bad_requests(upstream: FakeRegistry, tmp_path: Path) -> None:
    image = upstream.add_image("library/alpine", "3.19", [os.urandom(4096)])
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret").write_text("never served")
    (canary / "latest").write_text("never served either")
    before = _snapshot(canary)
    settings = settings_for(upstream, tmp_path / "store", upstream_settings={}, tags_list_ttl="1h")
    settings = settings.model_copy(update={"upstreams": settings.upstreams[:1]})  # the one that answers
    rng = random.Random(SEED)
    classes: Counter[str] = Counter()
    statuses: Counter[int | None] = Counter()
    server_errors: list[tuple[int, bytes]] = []
    generated: list[tuple[str, bytes]] = []
    for _ in range(REQUESTS):
        path_kind, target = _path(rng, "../canary")
        header_kind, headers = _headers(rng)
        method = rng.choice(["GET", "HEAD"]) if rng.random() < 0.6 else rng.choice(METHODS)
        head = f"{method} {target} HTTP/1.1\r\nHost: cache\r\n" + "".join(h + "\r\n" for h in headers)
        request = (head + "Connection: close\r\n\r\n").encode("utf-8", "surrogateescape")
        generated.append((f"path:{path_kind}", request))
        classes[f"path:{path_kind}"] += 1
        classes[f"headers:{header_kind}"] += 1
        classes[f"method:{method if len(method) < 10 else 'long'}"] += 1

    async with running(settings) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        for item in generated:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                _, request = queue.get_nowait()
                status = await _send(host, int(port), request)
                statuses[status] += 1
                if status is not None and status >= 500:
                    server_errors.append((status, request[:300]))

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        pulled = await _pull(host, int(port), image.layer_digests[0])

    print(f"\nbad requests by class: {dict(sorted(classes.items()))}")
    print(f"statuses: {dict(sorted(statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))}")
    assert sum(statuses.values()) == REQUESTS
    assert server_errors == [], f"{len(server_errors)} 5xx answers, first: {server_errors[:3]}"
    assert _snapshot(canary) == before, "nothing outside the store was touched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary", "store"], "no file created beside the store"
    assert pulled == image.layer_digests[0], "the server still serves a real pull"


async def _pull(host: str, port: int, digest: str) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /v2/alpine/blobs/{digest} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    _, _, body = response.partition(b"\r\n\r\n")
    return "sha256:" + hashlib.sha256(body).hexdigest()
