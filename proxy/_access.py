"""What every request leaves behind: one access-log line and its metrics.

:func:`access_middleware` is the outermost middleware. It lets the handler (and the error
middleware) produce the response, sends it completely itself, and only then records status,
bytes and duration, so a FileResponse's sendfile and a streamed fill are included. Handlers
only note what they served (``RequestNote`` keys); this is the one place that turns notes
into a log line and counters.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from ._state import METRICS, RequestNote
from .errors import Handler

__all__ = ["access_middleware"]

log = logging.getLogger("moorage.access")
_FIELDS = {
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
    response = await handler(request)
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        request[RequestNote.ERROR] = request.get(RequestNote.ERROR) or "CLIENT_GONE"
    _record(request, response, time.monotonic() - started)
    return response


def _body_bytes(request: web.Request, response: web.StreamResponse) -> int:
    if request.method == "HEAD" or request.get(RequestNote.ERROR) or response.content_length is None:
        return 0
    return response.content_length


def _record(request: web.Request, response: web.StreamResponse, seconds: float) -> None:
    kind = request.get(RequestNote.KIND, "other")
    sent = _body_bytes(request, response)
    fields: dict[str, Any] = {
        "event": "request",
        "request_id": request.get(RequestNote.REQUEST_ID),
        "client": request.remote,
        "method": request.method,
        "path": request.path[:512],
        "status": response.status,
        "bytes": sent,
        "duration_ms": round(seconds * 1000, 2),
    }
    for name, note in _FIELDS.items():
        value = request.get(note)
        if value is not None:
            fields[name] = value
    log.info("request", extra=fields)
    metrics = request.app[METRICS]
    metrics.requests.labels(kind, request.method, str(response.status)).inc()
    metrics.request_latency.labels(kind).observe(seconds)
    result = request.get(RequestNote.RESULT)
    if result is not None:
        metrics.cache_results.labels(kind, request.get(RequestNote.UPSTREAM, ""), result).inc()
        metrics.served_bytes.labels(kind, result).inc(sent)
