"""Fixtures for proxy tests: Moorage in-process (aiohttp test server on a real socket, run with
the daemon's own server options) in front of the fake upstream registry, and a reader of its
/metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from moorage.config import Settings
from moorage.proxy import build_app
from moorage.proxy._serve import runner_options
from moorage.proxy._state import CACHE
from tests.fakes import FakeRegistry
from tests.polling import until

StartMoorage = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


class ServedAsTheDaemon(TestServer):
    """aiohttp's test server with ``moorage serve``'s options. Left as it is, it cancels a
    handler whose client leaves, which the daemon does not: tests of clients that leave would
    pass on behaviour no user has."""

    def __init__(self, app: web.Application, settings: Settings) -> None:
        super().__init__(app)
        self._options = runner_options(settings)

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, **{**kwargs, **self._options})


def settings_for(upstream: FakeRegistry, store: Path, **overrides: Any) -> Settings:
    upstream_overrides = overrides.pop("upstream_settings", {})
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "storage": {"path": str(store)},
        "tag_ttl": "15m",
        "upstreams": [
            {
                "host": "docker.io",
                "url": upstream.url,
                "default": True,
                "prefixes": ["docker-hub"],
                "retries": {"attempts": 3, "max_wait": "0.5s"},
                "timeouts": {"connect": "2s", "read": "2s"},
                # Tests here count each request's upstream fetches; prefetching has its own tests.
                "prefetch_blobs": 0,
                **upstream_overrides,
            },
            {"host": "ghcr.io", "url": "http://127.0.0.1:9", "prefixes": ["ghcr"], "retries": {"attempts": 1}},
        ],
        **overrides,
    }
    return Settings.model_validate(data)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeRegistry]:
    async with FakeRegistry() as registry:
        yield registry


@pytest.fixture
def start_moorage(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    upstream: FakeRegistry,
    tmp_path: Path,
) -> StartMoorage:
    async def start(**overrides: Any) -> TestClient[web.Request, web.Application]:
        settings = settings_for(upstream, tmp_path / "store", **overrides)
        return await aiohttp_client(ServedAsTheDaemon(build_app(settings), settings))

    return start


@pytest.fixture
async def moorage(start_moorage: StartMoorage) -> TestClient[web.Request, web.Application]:
    return await start_moorage()


async def metric(client: TestClient[web.Request, web.Application], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when absent)."""
    text = await (await client.get("/metrics")).text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def until_settled(client: TestClient[web.Request, web.Application], within: float = 10.0) -> None:
    """Wait for the cache's background work a request started: every fill committed (its
    client has the last byte before the blob is made durable and put in place) and the
    eviction pass, with the one it may ask for after it, ended."""
    cache = client.app[CACHE]
    await until(lambda: len(cache.fills) == 0 and cache.size_cap.running is None, within=within)


def advance_clock(client: TestClient[web.Request, web.Application], seconds: float) -> None:
    """Move the cache's clock ``seconds`` ahead: tags age past their freshness at once, and a
    test's later steps are not raced against a freshness of a second on a busy machine."""
    cache = client.app[CACHE]
    clock = cache._clock
    cache._clock = lambda: clock() + seconds
