"""Typed keys for what the application holds, and what handlers note on each request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

import httpx
from aiohttp import web

from moorage.cache import Cache, CacheResult
from moorage.config import Settings
from moorage.upstreams import RegistryClient, Router

from ._logging import RepeatedLines
from ._metrics import Metrics
from ._paths import PathKind

__all__ = [
    "CACHE",
    "FAILURE_LINES",
    "IN_FLIGHT",
    "LEAVING",
    "METRICS",
    "NOTES",
    "ROUTER",
    "SETTINGS",
    "STOPPING",
    "UPSTREAM_TRANSPORT",
    "RequestNotes",
    "notes",
]

SETTINGS: Final = web.AppKey("settings", Settings)
METRICS: Final = web.AppKey("metrics", Metrics)
CACHE: Final = web.AppKey("cache", Cache)
ROUTER: Final = web.AppKey("router", Router[RegistryClient])
#: Set when a stop signal came: /readyz fails from then on, while requests are still taken
#: for ``shutdown_delay`` (load balancers stop sending new ones meanwhile).
LEAVING: Final = web.AppKey("leaving", asyncio.Event)
#: Set when the server stops taking requests: requests cut after that were cut by the stop.
STOPPING: Final = web.AppKey("stopping", asyncio.Event)
#: The tasks running a request's handlers now, each with its connection, for the stop to wait
#: for (and then cut) while it closes the connections that serve nothing.
IN_FLIGHT: Final = web.AppKey("in_flight", dict[asyncio.Task[Any], object])
#: upstream_failed and sign_in_throttled lines alike, logged once for a while (see
#: ``RepeatedLines``).
FAILURE_LINES: Final = web.AppKey("failure_lines", RepeatedLines)
#: Tests may plug an httpx transport in front of every upstream.
UPSTREAM_TRANSPORT: Final = web.AppKey("upstream_transport", httpx.AsyncBaseTransport)


@dataclass(slots=True)
class RequestNotes:
    """What handlers note on a request for its access line, audit line and metrics.

    Plain attributes, read and written on every request (a ``request[key]`` miss costs a
    KeyError raised and caught inside aiohttp's mapping)."""

    request_id: str = ""
    #: ``time.monotonic()`` when the access middleware took the request.
    started: float | None = None
    user: str | None = None
    #: The repositories a bearer token grants; None for Basic and anonymous requests.
    granted: frozenset[str] | None = None
    kind: PathKind | None = None
    upstream: str | None = None
    repository: str | None = None
    reference: str | None = None
    result: CacheResult | None = None
    #: Why a ``stale`` answer was served (the upstream's failure, or its back-off).
    stale_reason: str | None = None
    error: str | None = None
    #: The access policy rule (1-based) that denied the request.
    denied_by: int | None = None
    #: The body was cut short (the client left, the fill failed, the server stopped): how
    #: many bytes went out is not known. An error answer sent whole is not cut.
    cut: bool = False


#: Set by the access middleware; read through notes().
NOTES: Final = web.RequestKey("moorage_notes", RequestNotes)


def notes(request: web.BaseRequest) -> RequestNotes:
    """The request's notes. The access middleware gives every request its own; one it never
    saw (a request aiohttp refused before routing) gets fresh ones here."""
    try:
        return request[NOTES]
    except KeyError:
        made = request[NOTES] = RequestNotes()
        return made
