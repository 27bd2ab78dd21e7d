"""The upstream client's connections: requests beyond them wait their turn in the cache, never
in httpcore's pool, where a burst left every connection stuck for good."""

from __future__ import annotations

import asyncio
import os

from moorage.config import UpstreamSettings
from moorage.upstreams import RegistryClient, UpstreamNotFound
from moorage.upstreams.reference import Digest, RepositoryName
from tests.fakes import FakeRegistry


async def test_a_burst_beyond_the_connections_waits_its_turn_and_leaves_them_usable(upstream: FakeRegistry) -> None:
    """2,000 HEADs of made-up digests at once, against a distant upstream: those waiting in
    httpcore's pool ran out of pool time (a 503 each), one handed a new connection as its time
    ran out left that connection stuck (encode/httpcore#1093), and once every connection was,
    every pull of something not cached failed until a restart. Here a pool time far shorter
    than the burst takes: no request may wait for a connection at all."""
    settings = UpstreamSettings.model_validate(
        {"host": "docker.io", "url": upstream.url, "timeouts": {"pool": "0.2s"}, "retries": {"attempts": 1}}
    )
    client = RegistryClient(settings)
    repository = RepositoryName("library/alpine")
    present = upstream.add_blob(b"present")
    upstream.delay_next(400, 0.1, paths=r"/blobs/", methods=["HEAD"])
    try:
        results = await asyncio.gather(
            *(client.head_blob(repository, Digest.of(os.urandom(8))) for _ in range(400)), return_exceptions=True
        )
        assert {type(result) for result in results} == {UpstreamNotFound}, {str(r) for r in results}
        assert await client.head_blob(repository, Digest("sha256", present[7:])) == len(b"present")
    finally:
        await client.aclose()
