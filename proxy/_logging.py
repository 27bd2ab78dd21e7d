"""JSON-lines logging: every line a JSON object, for the access log and for events.

Every line is a JSON object with ``time``, ``level``, ``event`` and the fields the code put
in ``extra``. Nothing here logs a header, a query string or a URL from upstream (CDN URLs
carry signatures); httpx and httpcore are held at WARNING because they log request URLs.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
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
    """JSON lines on stderr, written by a background thread so the event loop never blocks on
    a slow terminal or pipe."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    listener.start()
    atexit.register(listener.stop)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
