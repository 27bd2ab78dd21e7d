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
    """Typed ``request[...]`` keys: what handlers note for the access log and metrics."""

    REQUEST_ID: Final = web.RequestKey("moorage_request_id", str)
    STARTED: Final = web.RequestKey("moorage_started", float)
    USER: Final = web.RequestKey("moorage_user", str)
    #: Groups of the signed-in user (``auth.groups_file``).
    GROUPS: Final = web.RequestKey("moorage_groups", frozenset)
    #: The repositories a bearer token grants; absent for Basic and anonymous requests.
    GRANTED: Final = web.RequestKey("moorage_granted", frozenset)
    KIND: Final = web.RequestKey("moorage_kind", str)
    UPSTREAM: Final = web.RequestKey("moorage_upstream", str)
    REPOSITORY: Final = web.RequestKey("moorage_repository", str)
    REFERENCE: Final = web.RequestKey("moorage_reference", str)
    RESULT: Final = web.RequestKey("moorage_result", str)
    ERROR: Final = web.RequestKey("moorage_error", str)
