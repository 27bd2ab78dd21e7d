"""Upstream clients on the fake registry, shared by the network layer's tests (sockets,
streams and bodies read past h11)."""

from __future__ import annotations

import asyncio

from moorage.config import UpstreamSettings
from moorage.upstreams import RegistryClient
from moorage.upstreams.reference import Digest, RepositoryName
from tests.fakes import FakeRegistry

__all__ = ["REPO", "KiB", "MiB", "client_for", "read_blob"]

KiB = 1024
MiB = 1024 * KiB
REPO = RepositoryName("library/x")


def client_for(upstream: FakeRegistry, **settings: object) -> RegistryClient:
    return RegistryClient(
        UpstreamSettings.model_validate(
            {"host": "docker.io", "url": upstream.url, "retries": {"attempts": 1}, **settings}
        )
    )


async def read_blob(client: RegistryClient, digest: Digest, pause: float = 0.0) -> tuple[bytes, list[int]]:
    pieces: list[bytes] = []
    async with client.open_blob(REPO, digest) as body:
        async for chunk in body.chunks():
            pieces.append(chunk)
            if pause:
                await asyncio.sleep(pause)  # a busy cache: the socket fills up meanwhile
    return b"".join(pieces), [len(p) for p in pieces]
