"""What every request leaves behind: one access-log line and its metrics.

:func:`access_middleware` is the outermost middleware. It lets the handler (and the error
middleware) produce the response, sends it completely itself, and only then records status,
bytes and duration, so a FileResponse's sendfile and a streamed fill are included. Handlers
only note what they served (``RequestNote`` keys); this is the one place that turns notes
into a log line and counters. A client that leaves early is recorded with ``error``
CLIENT_GONE (and status 499 where the server cancels the handler).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from ._state import CACHE, METRICS, RequestNote
from .errors import Handler

__all__ = ["access_middleware"]

log = logging.getLogger("moorage.access")
#: Recorded for a request whose client left before its answer was complete (nginx's 499).
CLIENT_CLOSED_REQUEST = 499
_FIELDS = {
    "user": RequestNote.USER,
    "kind": RequestNote.KIND,
    "upstream": RequestNote.UPSTREAM,
    "repository": RequestNote.REPOSITORY,
    "reference": RequestNote.REFERENCE,
    "result": RequestNote.RESULT,
    "error": RequestNote.ERROR,
}


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        # A server run with handler cancellation cancels the handler when the client leaves.
        request[RequestNote.ERROR] = "CLIENT_GONE"
        _record(request, CLIENT_CLOSED_REQUEST, None, time.monotonic() - started)
        raise
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        request[RequestNote.ERROR] = request.get(RequestNote.ERROR) or "CLIENT_GONE"
    _record(request, response.status, response.content_length, time.monotonic() - started)
    return response


def _body_bytes(request: web.Request, content_length: int | None) -> int:
    if request.method == "HEAD" or request.get(RequestNote.ERROR) or content_length is None:
        return 0
    return content_length


def _record(request: web.Request, status: int, content_length: int | None, seconds: float) -> None:
    kind = request.get(RequestNote.KIND, "other")
    sent = _body_bytes(request, content_length)
    fields: dict[str, Any] = {
        "event": "request",
        "request_id": request.get(RequestNote.REQUEST_ID),
        "client": request.remote,
        "method": request.method,
        "path": request.path[:512],
        "status": status,
        "bytes": sent,
        "duration_ms": round(seconds * 1000, 2),
    }
    for name, note in _FIELDS.items():
        value = request.get(note)
        if value is not None:
            fields[name] = value
    log.info("request", extra=fields)
    metrics = request.app[METRICS]
    metrics.requests.labels(kind, request.method, str(status)).inc()
    metrics.request_latency.labels(kind).observe(seconds)
    result = request.get(RequestNote.RESULT)
    upstream = request.get(RequestNote.UPSTREAM)
    if result is not None and upstream is not None:
        metrics.cache_results.labels(kind, upstream, result).inc()
        metrics.served_bytes.labels(kind, upstream, result).inc(sent)
        request.app[CACHE].record(upstream, result, sent)
