"""Assembling the application: middlewares, routes, and each room's resources in order.

``build_app(settings)`` returns a fresh aiohttp application; nothing is global, so every test
builds its own. The cache (store, index, sweep of temporaries, fills) and the upstream clients
are opened in ``cleanup_ctx`` and closed in reverse order, each only if it opened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

import httpx
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from moorage.cache import open_cache
from moorage.config import ConfigError, Settings
from moorage.upstreams import open_upstreams

from ._access import access_middleware
from ._auth import AUTHENTICATOR, USERS, Authenticator, Htpasswd, auth_middleware
from ._handlers import add_routes
from ._logging import MalformedRequests, RepeatedLines
from ._metrics import Metrics
from ._sign_in_limits import RATE_LIMITER, RateLimiter
from ._state import (
    CACHE,
    FAILURE_LINES,
    IN_FLIGHT,
    LEAVING,
    METRICS,
    ROUTER,
    SETTINGS,
    STOPPING,
    UPSTREAM_TRANSPORT,
    notes,
)
from ._tls import client_certificate_middleware
from ._tokens import TokenKeys
from .errors import error_middleware

__all__ = ["build_app", "metrics_app"]

MAX_REQUEST_LINE: Final = 8190
MAX_HEADER_FIELD: Final = 8190


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, and the blob time-to-first-byte (headers going out)."""
    note = notes(request)
    if note.kind == "blob" and request.method == "GET" and response.status in (200, 206) and note.started is not None:
        request.app[METRICS].first_byte.labels(note.result or "miss").observe(time.monotonic() - note.started)
    response.headers["X-Request-Id"] = note.request_id
    if note.result is not None:
        response.headers["X-Moorage-Cache"] = note.result
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.setdefault("Docker-Distribution-API-Version", "registry/2.0")


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    transport = app.get(UPSTREAM_TRANSPORT)
    # The cache closes first: its fills and prefetches are cancelled while the upstream
    # clients they read from are still open, so every upstream connection is closed by its user.
    async with (
        open_upstreams(settings.upstreams, observer=metrics, transport=transport) as router,
        open_cache(
            settings.storage,
            revalidate_timeout=settings.revalidate_timeout,
            stale_backoff=settings.stale_backoff,
            observer=metrics,
            upstreams=settings.upstreams,
        ) as cache,
    ):
        app[CACHE] = cache
        app[ROUTER] = router
        metrics.track(
            fills=lambda: len(cache.fills),
            readers=lambda: cache.fills.readers,
            store_bytes=lambda: cache.store_bytes,
            store_entries=lambda: cache.store_entries,
            store_max_bytes=cache.max_size,
            upstreams=[upstream.host for upstream in settings.upstreams],
        )
        yield


def _watching(users: Htpasswd) -> Callable[[web.Application], AsyncIterator[None]]:
    async def watch(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(users.watch())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        users.executor.shutdown(wait=False, cancel_futures=True)

    return watch


def _token_keys(settings: Settings) -> TokenKeys:
    """The token signing key: the configured file, or one generated in the store."""
    try:
        return TokenKeys.for_settings(settings)
    except (ValueError, OSError) as exc:
        raise ConfigError(None, [f"auth.token_signing_key_file: {exc}"]) from None


def build_app(settings: Settings, *, upstream_transport: httpx.AsyncBaseTransport | None = None) -> web.Application:
    MalformedRequests.install()
    auth = settings.auth
    users = Htpasswd(auth.htpasswd_file, auth.groups_file) if auth.htpasswd_file is not None else None
    tokens = _token_keys(settings) if users is not None else None
    authenticator = Authenticator(auth, users, tokens)
    middlewares: list[Middleware] = [access_middleware, error_middleware, auth_middleware(authenticator)]
    if settings.tls is not None and settings.tls.client_ca_file is not None:
        middlewares.insert(2, client_certificate_middleware)
    app = web.Application(
        middlewares=middlewares,
        client_max_size=64 * 1024,
        handler_args={"max_line_size": MAX_REQUEST_LINE, "max_field_size": MAX_HEADER_FIELD},
    )
    app[SETTINGS] = settings
    app[LEAVING] = asyncio.Event()
    app[STOPPING] = asyncio.Event()
    app[IN_FLIGHT] = {}
    app[FAILURE_LINES] = RepeatedLines()
    app[METRICS] = Metrics()
    app[AUTHENTICATOR] = authenticator
    app[RATE_LIMITER] = RateLimiter(auth.token_requests_per_minute)
    if upstream_transport is not None:
        app[UPSTREAM_TRANSPORT] = upstream_transport
    app.on_response_prepare.append(_common_headers)
    app.cleanup_ctx.append(_resources)
    if users is not None:
        app[USERS] = users
        app.cleanup_ctx.append(_watching(users))
    add_routes(app, metrics_here=settings.metrics_listen is None)
    return app


def metrics_app(main: web.Application) -> web.Application:
    """``/metrics`` of ``main``, for a listener of its own (``metrics_listen``)."""
    app = web.Application()

    async def serve_metrics(request: web.Request) -> web.Response:
        return web.Response(body=main[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", serve_metrics)
    return app
