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
from typing import Any, Final, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging"]

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


class TextFormatter(JsonFormatter):
    """The same fields for a person at a terminal: ``time level event key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        line = json.loads(super().format(record))
        head = f"{line.pop('time')} {line.pop('level'):<7} {line.pop('event')}"
        line.pop("logger", None)
        traceback = line.pop("traceback", None)
        fields = " ".join(f"{key}={_text(value)}" for key, value in line.items() if value is not None)
        return f"{head} {fields}".rstrip() + (f"\n{traceback}" if traceback else "")


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return json.dumps(text) if (" " in text or not text) else text


def _flush(listener: logging.handlers.QueueListener) -> None:
    if listener._thread is not None:  # not stopped already
        listener.stop()


def configure_logging(
    level: str = "info", log_format: str = "auto", stream: TextIO | None = None
) -> logging.handlers.QueueListener:
    """Lines on ``stream`` (stderr; JSON, or text on a terminal), written by a background
    thread so the event loop never blocks on a slow terminal or pipe. Returns the writer
    thread's listener; ``stop()`` flushes it."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    text = log_format == "text" or (log_format == "auto" and stream.isatty())
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    listener.start()
    atexit.register(_flush, listener)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return listener
