"""Logging for the access log and for events: JSON lines, or text lines (``log_format``).

A JSON line is an object with ``time``, ``level``, ``event`` and the fields the code put in
``extra``; a text line gives the same fields as ``name=value``, a value quoted where it could
pass for a field or a line. Nothing here logs a header, a query string or a URL from upstream (CDN URLs
carry signatures); httpx and httpcore are held at WARNING because they log request URLs.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from collections import deque
from typing import Any, Final, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["BackgroundWriter", "JsonFormatter", "MalformedRequests", "TextFormatter", "configure_logging", "log_fields"]

_STANDARD_ATTRS: Final = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_NOT_FIELDS: Final = frozenset(_STANDARD_ATTRS | {"event"})
_LEVELS: Final = {level: logging.getLevelName(level).lower() for level in (10, 20, 30, 40, 50)}
#: The per-record lookups configure_logging turns off (no line carries them).
_LOOKUPS: Final = ("logThreads", "logProcesses", "logMultiprocessing", "logAsyncioTasks")


def log_fields(logger: logging.Logger, event: str, fields: dict[str, Any]) -> None:
    """``logger.info(event, extra={"event": event, **fields})``, for the lines written on
    every request (access and audit).

    Where the server's own writer is the only handler such a record reaches and no filter
    stands on the way (the server's setup, configure_logging), the line is formatted from the
    fields at once: a LogRecord and logging's handler chain would change nothing in it, and
    cost two fifths of a manifest GET's logging. Otherwise (a test's capture, a library
    user's handlers, any filter, another record factory) this is ``logger.info`` itself, and
    filters and handlers see the usual record. A field may not reuse a record attribute's
    name (as with ``extra``)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    writer = _sole_writer(logger)
    if writer is None:
        logger.info(event, extra={"event": event, **fields}, stacklevel=2)
        return
    if not _NOT_FIELDS.isdisjoint(fields):
        raise KeyError(f"fields overwrite record attributes: {sorted(_NOT_FIELDS.intersection(fields))}")
    writer.write_fields(logger.name, event, fields)


def _sole_writer(logger: logging.Logger) -> BackgroundWriter | None:
    """The BackgroundWriter (with one of Moorage's formatters, not a subclass that may format
    otherwise) that is the only handler an INFO record of ``logger`` reaches, with no filter on
    any logger or handler on the way."""
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found: BackgroundWriter | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or not isinstance(handler, BackgroundWriter) or handler.filters:
                return None
            if handler.level > logging.INFO or type(handler.formatter) not in _OWN_FORMATTERS:
                return None
            found = handler
        current = current.parent if current.propagate else None
    return found


class MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (too long a line, a bad header) as an error with
    a traceback. That is the client's mistake, and anyone can send such requests by the
    thousand (scanners, a load balancer's probe): one info line without traceback, naming the
    client and the problem, below the level alerts watch."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            client = record.args[0] if isinstance(record.args, tuple) and record.args else None
            if record.levelno > logging.INFO:  # aiohttp's debug lines (a TLS hello on plain HTTP) stay debug
                record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args, record.exc_info, record.exc_text = "malformed request refused", (), None, None
            record.event = "malformed_request"
            record.client = client
            # The parser's message quotes the offending line, which may be a credential: only
            # the kind of problem and the status go to the log.
            record.error = f"{type(exc).__name__} ({getattr(exc, 'code', 400)})"
        return True

    @classmethod
    def install(cls) -> None:
        server = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, cls) for f in server.filters):
            server.addFilter(cls())


class JsonFormatter(logging.Formatter):
    """One JSON object per record. This runs for every request's access line, so it avoids
    what the generic formatter repeats: the time text is built once per second, and the
    record's ``extra`` fields are copied in one pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._second: tuple[int, str] = (-1, "")

    def _stamp(self, created: float) -> str:
        second = int(created)
        cached = self._second  # one tuple: safe when records come from several threads
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = cached
        return cached[1]

    def _time(self, created: float) -> str:
        return f"{self._stamp(created)}.{int((created - int(created)) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        message = record.getMessage()
        event = fields.get("event") or message
        line: dict[str, Any] = {
            "time": self._time(record.created),
            "level": _LEVELS.get(record.levelno) or record.levelname.lower(),
            "logger": record.name,
            "event": event,
        }
        if message != event:
            line["message"] = message
        line.update({key: value for key, value in fields.items() if key not in _NOT_FIELDS})
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return _json_line(line)

    def format_fields(self, created: float, name: str, event: str, fields: dict[str, Any]) -> str:
        """The line ``format`` writes for an INFO record of ``event`` with ``fields`` as
        its extra, made from them directly (log_fields)."""
        line: dict[str, Any] = {"time": self._time(created), "level": "info", "logger": name, "event": event}
        line.update(fields)
        return _json_line(line)


def _json_line(line: dict[str, Any]) -> str:
    try:
        return orjson.dumps(line, default=str).decode()
    except orjson.JSONEncodeError:  # what orjson refuses (an int beyond 64 bits): the slow way
        return json.dumps(line, default=str)


class TextFormatter(JsonFormatter):
    """The same fields for a person at a terminal: ``time level event key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        return _as_text(super().format(record))

    def format_fields(self, created: float, name: str, event: str, fields: dict[str, Any]) -> str:
        return _as_text(super().format_fields(created, name, event, fields))


#: The formatters whose lines log_fields may write without a record.
_OWN_FORMATTERS: Final = (JsonFormatter, TextFormatter)


def _as_text(json_line: str) -> str:
    line = json.loads(json_line)
    head = f"{line.pop('time')} {line.pop('level'):<7} {line.pop('event')}"
    line.pop("logger", None)
    traceback = line.pop("traceback", None)
    fields = " ".join(f"{key}={_text(value)}" for key, value in line.items() if value is not None)
    return f"{head} {fields}".rstrip() + (f"\n{traceback}" if traceback else "")


def _text(value: Any) -> str:
    """A field's value, quoted (JSON-escaped) unless it is plain: a value with a newline, a tab
    or any other space, a quote or an ``=`` (a user name a client sent) had started a log line
    of its own, or a field, that read as the daemon's."""
    text = value if isinstance(value, str) else json.dumps(value)
    plain = text and all(character.isprintable() and not character.isspace() for character in text)
    return text if plain and '"' not in text and "=" not in text else json.dumps(text)


class BackgroundWriter(logging.Handler):
    """Formats each record where it is logged (cheap) and leaves the writing to a thread.

    The thread wakes every ``FLUSH_SECONDS`` and writes every waiting line in one call; it
    never competes with the event loop for the GIL per line. Should the stream stall, lines
    beyond ``MAX_WAITING`` are dropped and counted, so memory stays bounded.
    """

    FLUSH_SECONDS: Final = 0.05
    MAX_WAITING: Final = 100_000

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._waiting: deque[str] = deque()
        self.dropped = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moorage-log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._room():
                self._waiting.append(self.format(record))
        except Exception:
            self.handleError(record)

    def write_fields(self, name: str, event: str, fields: dict[str, Any]) -> None:
        """Queue the line of an INFO record of ``event`` with ``fields``, made without the
        record (log_fields; the formatter is Moorage's own). A failure is handled as
        ``emit``'s: reported on stderr, never raised to the request."""
        try:
            if self._room():
                formatter = self.formatter
                assert isinstance(formatter, JsonFormatter)
                self._waiting.append(formatter.format_fields(time.time(), name, event, fields))
        except Exception:
            self.handleError(logging.makeLogRecord({"name": name, "msg": event, "levelno": logging.INFO}))

    def _room(self) -> bool:
        """Whether another line may wait; one beyond ``MAX_WAITING`` is dropped and counted."""
        if len(self._waiting) >= self.MAX_WAITING:
            self.dropped += 1
            return False
        return True

    def _run(self) -> None:
        while not self._closing.wait(self.FLUSH_SECONDS):
            self._write_waiting()
        self._write_waiting()

    def _write_waiting(self) -> None:
        batch = []
        while self._waiting:
            batch.append(self._waiting.popleft())
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            record = logging.makeLogRecord(
                {"name": "moorage", "msg": "log lines dropped", "levelno": logging.WARNING, "levelname": "WARNING"}
            )
            record.__dict__.update(event="log_lines_dropped", count=dropped)
            batch.append(self.format(record))
        if batch:
            try:
                self._stream.write("\n".join(batch) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # a full pipe, a closed stream: count, go on
                self.dropped += len(batch)

    def close(self) -> None:
        """Write what is waiting, then stop the thread."""
        if self._thread.is_alive():
            self._closing.set()
            self._thread.join(timeout=5)
        super().close()


def configure_logging(level: str = "info", log_format: str = "auto", stream: TextIO | None = None) -> BackgroundWriter:
    """Lines on ``stream`` (stderr; JSON, or text on a terminal), written by a background
    thread so the event loop never blocks on a slow terminal or pipe. Returns the handler;
    ``close()`` flushes it."""
    stream = stream or sys.stderr
    handler = BackgroundWriter(stream)
    text = log_format == "text" or (log_format == "auto" and stream.isatty())
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    atexit.register(handler.close)
    # None of these reach a line, and each costs a lookup per record (the logging docs'
    # "Optimization" section names these switches).
    for switch in _LOOKUPS:  # logAsyncioTasks exists from Python 3.12 on
        setattr(logging, switch, False)
    logging._srcfile = None  # no caller frame walk: file and line are not logged
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python's own warnings and errors in threads are lines like every other, not raw text.
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_error
    return handler


def _log_thread_error(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    thread = args.thread.name if args.thread is not None else "?"
    logging.getLogger("moorage").error(
        "uncaught error in a thread", exc_info=exc_info, extra={"event": "internal_error", "thread_name": thread}
    )


#: Seconds during which lines alike are logged once (see ``RepeatedLines``).
REPEAT_SECONDS: Final = 10.0
#: Kinds of line remembered; the oldest is forgotten past it.
MAX_REPEAT_KINDS: Final = 1024


class RepeatedLines:
    """Lines alike (one kind, such as an upstream and how it failed) within ``REPEAT_SECONDS``
    of the first are left out, and counted: an upstream down answered 1,000 pulls with 1,000
    identical warnings. The next line of that kind, whenever it comes, says how many were left
    out since the last."""

    def __init__(self) -> None:
        self._seen: dict[tuple[object, ...], tuple[float, int]] = {}

    def admit(self, kind: tuple[object, ...]) -> int | None:
        """None to leave the line out; else how many alike were left out before it."""
        now = time.monotonic()
        seen = self._seen.pop(kind, None)
        if seen is not None and now - seen[0] < REPEAT_SECONDS:
            self._seen[kind] = (seen[0], seen[1] + 1)
            return None
        self._seen[kind] = (now, 0)
        if len(self._seen) > MAX_REPEAT_KINDS:
            del self._seen[next(iter(self._seen))]
        return seen[1] if seen is not None else 0
