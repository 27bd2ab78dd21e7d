"""Typed keys for what the application holds, and what handlers note on each request."""

from __future__ import annotations

from typing import Final

import httpx
from aiohttp import web

from moorage.cache import Cache
from moorage.config import Settings
from moorage.upstreams import RegistryClient, Router

from ._metrics import Metrics

__all__ = ["CACHE", "METRICS", "ROUTER", "SETTINGS", "UPSTREAM_TRANSPORT", "RequestNote"]

SETTINGS: Final = web.AppKey("settings", Settings)
METRICS: Final = web.AppKey("metrics", Metrics)
CACHE: Final = web.AppKey("cache", Cache)
ROUTER: Final = web.AppKey("router", Router[RegistryClient])
#: Tests may plug an httpx transport in front of every upstream.
UPSTREAM_TRANSPORT: Final = web.AppKey("upstream_transport", httpx.AsyncBaseTransport)


class RequestNote:
    """Names of the ``request[...]`` fields the access log and metrics read."""

    REQUEST_ID: Final = "moorage.request_id"
    KIND: Final = "moorage.kind"
    UPSTREAM: Final = "moorage.upstream"
    REPOSITORY: Final = "moorage.repository"
    REFERENCE: Final = "moorage.reference"
    RESULT: Final = "moorage.result"
    ERROR: Final = "moorage.error"
