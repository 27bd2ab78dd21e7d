"""What every request leaves behind: its request id, one access-log line and its metrics.

:func:`access_middleware` is the outermost middleware. It gives the request its id (the
client's own ``X-Request-Id`` when well formed), lets the handler (and the error
middleware) produce the response, sends it completely itself, and only then records status,
bytes and duration, so a FileResponse's sendfile and a streamed fill are included (an
HTTPException the error middleware passes on, a redirect, is recorded as raised: aiohttp
sends it). Handlers only note what they served (``RequestNotes``); this is the one place
that turns notes into a log line and counters. A client that leaves early is recorded with
``error`` CLIENT_GONE (and status 499 where the server cancels the handler); one the
server's stop cut, past ``shutdown_timeout``, with ``error`` SHUTDOWN and status 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from typing import Any, Final

from aiohttp import web

from moorage.cache import error_text

from ._logging import log_fields
from ._state import CACHE, IN_FLIGHT, METRICS, NOTES, STOPPING, RequestNotes
from .errors import CLIENT_CLOSED_REQUEST, Handler, connection_dead

__all__ = ["access_middleware"]

log = logging.getLogger("moorage.access")
faults = logging.getLogger("moorage.proxy")
#: Recorded for a request the server's stop cut (still running after ``shutdown_timeout``).
CUT_BY_SHUTDOWN = 503
_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Request ids: a random prefix per process (replicas differ) and a counter, 16 hex digits.
_PROCESS_PREFIX: Final = secrets.token_hex(4)
_request_numbers = itertools.count()


def _next_request_id() -> str:
    return f"{_PROCESS_PREFIX}{next(_request_numbers) & 0xFFFFFFFF:08x}"


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    task, in_flight = asyncio.current_task(), request.app[IN_FLIGHT]
    if task is None:
        return await _access(request, handler)
    in_flight[task] = request.protocol  # the stop waits for it, then cuts it
    try:
        return await _access(request, handler)
    finally:
        del in_flight[task]


async def _access(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID_RE.fullmatch(given) else _next_request_id()
    note = request[NOTES] = RequestNotes(request_id=request_id, started=started)
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        _record_cancelled(request, note, started)
        raise
    except web.HTTPException as passed_on:
        # One the error middleware lets through (a redirect): aiohttp sends it as it is.
        _record(request, note, passed_on.status, passed_on.content_length, time.monotonic() - started)
        raise
    try:
        await response.prepare(request)  # a stored blob's whole body goes out here (sendfile)
        await response.write_eof()
    except (ConnectionError, TimeoutError) as failed:
        note.cut = True
        if isinstance(failed, ConnectionError) or connection_dead(request):  # a reset; client_send_timeout's cut
            note.error = note.error or "CLIENT_GONE"
        else:
            note.error = "STORE_TIMEOUT"
            faults.error(
                "cutting response: reading the store timed out",
                extra={"event": "response_cut", "request_id": note.request_id, "error": error_text(failed)},
            )
        if request.transport is not None:  # the short body must show
            request.transport.close()
    except asyncio.CancelledError:
        _record_cancelled(request, note, started)
        raise
    _record(request, note, response.status, response.content_length, time.monotonic() - started)
    return response


def _record_cancelled(request: web.Request, note: RequestNotes, started: float) -> None:
    note.cut = True
    if request.app[STOPPING].is_set():  # past shutdown_timeout: the stop cut it
        note.error = "SHUTDOWN"
        _record(request, note, CUT_BY_SHUTDOWN, None, time.monotonic() - started)
        return
    # A server run with handler cancellation cancels the handler when the client leaves.
    note.error = "CLIENT_GONE"
    _record(request, note, CLIENT_CLOSED_REQUEST, None, time.monotonic() - started)


def _body_bytes(request: web.Request, note: RequestNotes, content_length: int | None) -> int:
    """The body's bytes, an error answer's included; 0 for a cut body (not known) or a HEAD."""
    if request.method == "HEAD" or note.cut or content_length is None:
        return 0
    return content_length


def _record(request: web.Request, note: RequestNotes, status: int, content_length: int | None, seconds: float) -> None:
    sent = _body_bytes(request, note, content_length)
    fields: dict[str, Any] = {
        "request_id": note.request_id,
        "client": request.remote,
        "method": request.method,
        "path": request.rel_url.raw_path[:512],  # as asked: %2F stays %2F
        "status": status,
        "bytes": sent,
        "duration_ms": round(seconds * 1000, 2),
    }
    kind = note.kind or "other"  # the same kind moorage_requests_total counts it under
    fields["kind"] = kind
    for name, value in (
        ("user", note.user),
        ("upstream", note.upstream),
        ("repository", note.repository),
        ("reference", note.reference),
        ("result", note.result),
        ("stale_reason", note.stale_reason),
        ("error", note.error),
        ("denied_by_rule", note.denied_by),
    ):
        if value is not None:
            fields[name] = value
    log_fields(log, "request", fields)
    result, upstream = note.result, note.upstream
    request.app[METRICS].on_request(kind, request.method, status, seconds, upstream, result, sent)
    if result is not None and upstream is not None:
        request.app[CACHE].record(upstream, result, sent)
