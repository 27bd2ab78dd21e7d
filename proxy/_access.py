"""What every finished request leaves behind: its access-log line and its metrics.

aiohttp calls :class:`AccessRecorder` after the response went out, when status and bytes
sent are final (a FileResponse's size included). Handlers only note what they served
(``RequestNote`` fields); this is the one place that turns notes into lines and counters.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ._state import METRICS, RequestNote

__all__ = ["AccessRecorder"]

log = logging.getLogger("moorage.access")
_FIELDS = {
    "kind": RequestNote.KIND,
    "upstream": RequestNote.UPSTREAM,
    "repository": RequestNote.REPOSITORY,
    "reference": RequestNote.REFERENCE,
    "result": RequestNote.RESULT,
    "error": RequestNote.ERROR,
}


class AccessRecorder(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields: dict[str, Any] = {
            "event": "request",
            "request_id": request.get(RequestNote.REQUEST_ID),
            "client": request.remote,
            "method": request.method,
            "path": request.path[:512],
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 2),
        }
        for name, note in _FIELDS.items():
            value = request.get(note)
            if value is not None:
                fields[name] = value
        log.info("request", extra=fields)
        if isinstance(request, web.Request) and METRICS in request.app:
            self._count(request, response, time)

    @staticmethod
    def _count(request: web.Request, response: web.StreamResponse, seconds: float) -> None:
        metrics = request.app[METRICS]
        kind = request.get(RequestNote.KIND, "other")
        metrics.requests.labels(kind, request.method, str(response.status)).inc()
        metrics.request_latency.labels(kind).observe(seconds)
        result = request.get(RequestNote.RESULT)
        if result is not None:
            metrics.cache_results.labels(kind, request.get(RequestNote.UPSTREAM, ""), result).inc()
            metrics.served_bytes.labels(kind, result).inc(response.body_length)

    @property
    def enabled(self) -> bool:
        return True
