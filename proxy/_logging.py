"""JSON-lines logging: every line a JSON object, for the access log and for events.

Every line is a JSON object with ``time``, ``level``, ``event`` and the fields the code put
in ``extra``. Nothing here logs a header, a query string or a URL from upstream (CDN URLs
carry signatures); httpx and httpcore are held at WARNING because they log request URLs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final

__all__ = ["JsonFormatter", "configure_logging"]

_STANDARD_ATTRS: Final = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or record.getMessage(),
        }
        message = record.getMessage()
        if getattr(record, "event", None) and message != line["event"]:
            line["message"] = message
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key != "event":
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
