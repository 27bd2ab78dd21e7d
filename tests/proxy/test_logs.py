"""Logs: one JSON line per request, an audit line per manifest pulled, a text form for people,
and no secret anywhere: not the upstream password, a token, or a signed CDN URL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import web

from moorage.proxy import _handlers
from moorage.proxy._logging import BackgroundWriter, TextFormatter, configure_logging, log_fields
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS
from tests.fakes import FakeRegistry
from tests.polling import until_async

from .conftest import StartMoorage, metric

PASSWORD = "s3cr3t-Upstream-Passw0rd"
CLIENT_PASSWORD = "Cl1ent-Passw0rd-of-ci"
WRONG_PASSWORD = "a-Wrong-Guess-by-ci"


class Captured:
    """What the server's own logging setup wrote (at debug level, the most talkative)."""

    def __init__(self, log_format: str) -> None:
        self.stream = io.StringIO()
        self.handler = configure_logging("debug", log_format, self.stream)

    def getvalue(self) -> str:
        self.handler.close()  # writes what is waiting
        return self.stream.getvalue()


#: The process-wide switches configure_logging turns off.
LOOKUPS = ("logThreads", "logProcesses", "logMultiprocessing", "logAsyncioTasks", "_srcfile")


@contextlib.contextmanager
def server_logging(log_format: str = "json") -> Iterator[Captured]:
    """The server's logging setup for one test, undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    switches = {name: getattr(logging, name) for name in LOOKUPS if hasattr(logging, name)}
    excepthook = threading.excepthook
    captured = Captured(log_format)
    try:
        yield captured
    finally:
        captured.handler.close()
        logging.captureWarnings(False)
        threading.excepthook = excepthook
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in switches.items():
            setattr(logging, name, value)
        for name in ("httpx", "httpcore", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.fixture
def log_lines() -> Iterator[Captured]:
    with server_logging() as captured:
        yield captured


async def test_no_secret_reaches_a_log_line_a_metric_or_a_response(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, log_lines: Captured
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    upstream.auth = "bearer"
    upstream.credentials = ("robot", PASSWORD)
    cdn = await upstream.start_cdn()
    image = upstream.add_image("private/app", "1", [b"layer bytes" * 1000])
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ci:" + bcrypt.hashpw(CLIENT_PASSWORD.encode(), bcrypt.gensalt(4)).decode() + "\n")
    moorage = await start_moorage(
        upstream_settings={"username": "robot", "password_file": str(password_file)},
        auth={"htpasswd_file": str(htpasswd)},
    )
    client_basic = "Basic " + base64.b64encode(f"ci:{CLIENT_PASSWORD}".encode()).decode()
    issued = await moorage.get(
        "/token", params={"scope": "repository:private/app:pull"}, headers={"Authorization": client_basic}
    )
    client_token = (await issued.json())["token"]  # that answer is the one place it may appear
    wrong = await moorage.get(
        "/token", headers={"Authorization": "Basic " + base64.b64encode(b"ci:" + WRONG_PASSWORD.encode()).decode()}
    )
    assert wrong.status == 401
    seen: list[str] = [str(wrong.headers), await wrong.text()]
    bearer = {"Accept": ACCEPT_ALL_MANIFESTS, "Authorization": f"Bearer {client_token}"}
    manifest = await moorage.get("/v2/private/app/manifests/1", headers=bearer)
    seen += [str(manifest.headers), (await manifest.read()).decode()]
    for blob in (image.config_digest, *image.layer_digests):
        response = await moorage.get(f"/v2/private/app/blobs/{blob}", headers={"Authorization": client_basic})
        seen += [str(response.headers), repr(await response.read())]
    failing = await moorage.get("/v2/private/app/manifests/nope", headers=bearer)
    seen += [str(failing.headers), await failing.text()]
    metrics = await (await moorage.get("/metrics")).text()
    readiness = await (await moorage.get("/readyz")).text()
    assert cdn.count("GET", "/blobs/") == 2, "the blobs went through the CDN"
    secrets = [
        PASSWORD,
        CLIENT_PASSWORD,
        WRONG_PASSWORD,
        client_token,
        *upstream.issued_tokens,
        *(cdn.signed_url(d).split("?")[1] for d in image.layer_digests),
    ]
    assert len(secrets) >= 6
    logged = log_lines.getvalue()
    events = {json.loads(line)["event"] for line in logged.splitlines()}
    assert {"request", "pull"} <= events, "the log was captured"
    for secret in secrets:
        for where, text in (("log", logged), ("metrics", metrics), ("readyz", readiness), ("responses", "".join(seen))):
            assert secret not in text, f"a secret reached the {where}"
    assert "Bearer " not in logged and "Basic " not in logged


async def test_one_json_line_per_request_and_an_audit_line_per_pull(
    moorage: object, upstream: FakeRegistry, log_lines: Captured
) -> None:
    from aiohttp.test_utils import TestClient

    assert isinstance(moorage, TestClient)
    image = upstream.add_image("library/alpine", "3.19")
    await moorage.get("/v2/alpine/manifests/3.19", headers={"X-Request-Id": "job-7"})
    await moorage.head("/v2/alpine/manifests/3.19")
    await moorage.get("/v2/alpine%2Fx/manifests/3.19")
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    requests = [line for line in lines if line["event"] == "request"]
    assert len(requests) == 3
    assert requests[2]["path"] == "/v2/alpine%2Fx/manifests/3.19", "logged as asked, not decoded"
    first = requests[0]
    assert first["request_id"] == "job-7" and first["client"] == "127.0.0.1" and first["method"] == "GET"
    assert first["path"] == "/v2/alpine/manifests/3.19" and first["status"] == 200
    assert first["upstream"] == "docker.io" and first["repository"] == "library/alpine"
    assert first["reference"] == "3.19" and first["result"] == "miss" and first["bytes"] == len(image.manifest)
    assert first["duration_ms"] >= 0 and first["time"].endswith("Z")
    pulls = [line for line in lines if line["event"] == "pull"]
    assert len(pulls) == 1, "HEAD is not a pull"
    assert pulls[0]["logger"] == "moorage.audit"
    assert pulls[0]["digest"] == image.digest and pulls[0]["upstream"] == "docker.io"
    assert pulls[0]["repository"] == "library/alpine" and pulls[0]["client"] == "127.0.0.1"


async def test_every_request_line_names_the_kind_its_metric_counts_it_under(
    moorage: object, upstream: FakeRegistry, log_lines: Captured
) -> None:
    """A dashboard's breakdown by kind and a log query by kind must find the same requests."""
    from aiohttp.test_utils import TestClient

    assert isinstance(moorage, TestClient)
    image = upstream.add_image("library/alpine", "3.19")
    for path in ("/v2/", "/healthz", "/v2/alpine/manifests/3.19", f"/v2/alpine/blobs/{image.layer_digests[0]}"):
        response = await moorage.get(path)
        assert response.status == 200
        await response.read()

    # A blob's line is written once its body is sent, a moment after the client has it.
    async def blob_counted() -> bool:
        return await metric(moorage, "moorage_requests_total", kind="blob", method="GET", status="200") == 1

    await until_async(blob_counted)
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    kinds = [
        (line["path"].split("/")[-2] if "/v2/alpine" in line["path"] else line["path"], line["kind"])
        for line in lines
        if line["event"] == "request" and line["path"] != "/metrics"
    ]
    assert kinds == [("/v2/", "other"), ("/healthz", "other"), ("manifests", "manifest"), ("blobs", "blob")]
    metrics_lines = [line for line in lines if line["event"] == "request" and line["path"] == "/metrics"]
    assert metrics_lines and all(line["kind"] == "other" for line in metrics_lines)


async def test_an_error_answer_logs_the_bytes_of_its_body(moorage: object, log_lines: Captured) -> None:
    """An OCI error body is sent whole: its size is known, unlike a cut body's."""
    from aiohttp.test_utils import TestClient

    assert isinstance(moorage, TestClient)
    response = await moorage.get("/v2/Bad/manifests/1")
    body = await response.read()
    assert response.status == 400 and body
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (answered,) = [line for line in lines if line["event"] == "request"]
    assert answered["error"] == "NAME_INVALID" and answered["bytes"] == len(body)


async def test_an_answer_the_error_middleware_passes_on_is_logged_and_counted_too(
    start_moorage: StartMoorage, monkeypatch: pytest.MonkeyPatch, log_lines: Captured
) -> None:
    """aiohttp sends a raised redirect itself, past the access middleware's usual path."""

    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/readyz")

    monkeypatch.setattr(_handlers, "healthz", moved)
    moorage = await start_moorage()
    response = await moorage.get("/healthz", allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == "/readyz"
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    answered = [(line["path"], line["status"]) for line in lines if line["event"] == "request"]
    assert answered == [("/healthz", 302)]
    assert await metric(moorage, "moorage_requests_total", method="GET", status="302") == 1


def test_text_format_for_people() -> None:
    record = logging.makeLogRecord(
        {
            "name": "moorage.access",
            "levelname": "INFO",
            "msg": "request",
            "event": "request",
            "status": 200,
            "path": "/v2/a b",
            "result": "hit",
        }
    )
    line = TextFormatter().format(record)
    assert " info    request " in line
    assert "status=200" in line and 'path="/v2/a b"' in line and "result=hit" in line
    assert not line.startswith("{")


@pytest.mark.parametrize("user", ["x\nFAKE\terror\tstore_write_failed", "x user=admin", "x\u00a0y", 'x"y'])
def test_text_format_quotes_what_could_pass_for_a_line_or_a_field(user: str) -> None:
    """A client's user name with a newline and tabs made a line of its own in the text log."""
    record = logging.makeLogRecord(
        {"name": "moorage.audit", "levelname": "INFO", "msg": "pull", "event": "pull", "user": user}
    )
    line = TextFormatter().format(record)
    assert "\n" not in line and "\t" not in line and "\u00a0" not in line
    assert f"user={json.dumps(user)}" in line


@pytest.fixture
def direct_lines(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The events the server's writer took straight from log_fields, without a record."""
    events: list[str] = []
    write_fields = BackgroundWriter.write_fields

    def spy(self: BackgroundWriter, name: str, event: str, fields: dict[str, Any]) -> None:
        events.append(event)
        write_fields(self, name, event, fields)

    monkeypatch.setattr(BackgroundWriter, "write_fields", spy)
    return events


def test_per_request_lines_are_the_lines_logging_would_write(direct_lines: list[str]) -> None:
    """Under the server's setup the access and audit lines are made from their fields without
    a LogRecord; each must be the line ``logger.info(..., extra=...)`` writes, levels included.
    (Set up in the test itself: pytest adds its capturing handlers once a test has begun.)"""
    access = logging.getLogger("moorage.access")
    fields = {"request_id": "r1", "status": 200, "big": 2**70, "path": "/v2/a", "none": None}
    with server_logging() as captured:
        log_fields(access, "request", fields)
        access.info("request", extra={"event": "request", **fields})
        logging.getLogger("moorage").setLevel(logging.WARNING)
        try:
            log_fields(access, "request", {"request_id": "not-written"})
        finally:
            logging.getLogger("moorage").setLevel(logging.NOTSET)
        with pytest.raises(KeyError, match="msg"):
            log_fields(access, "request", {"msg": "a record attribute"})
    assert direct_lines == ["request"], "the line was written without a record"
    fast, usual = (json.loads(line) for line in captured.getvalue().splitlines())
    assert fast.pop("time")[:19] == usual.pop("time")[:19]
    assert fast == usual == {"level": "info", "logger": "moorage.access", "event": "request", **fields}
    assert list(fast) == list(usual), "the same field order"


def test_per_request_lines_in_text_form_too(direct_lines: list[str]) -> None:
    with server_logging("text") as captured:
        log_fields(logging.getLogger("moorage.access"), "request", {"status": 200, "path": "/v2/a b"})
    (line,) = captured.getvalue().splitlines()
    assert line.endswith(' info    request status=200 path="/v2/a b"') and not line.startswith("{")
    assert direct_lines == ["request"]


class Collecting(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_filters_levels_and_other_handlers_see_per_request_records(direct_lines: list[str]) -> None:
    """A filter may drop or rewrite an access line, a handler's level holds it back, and
    another handler gets the record: with any of them, the lines go through logging as any
    other."""
    access = logging.getLogger("moorage.access")

    def redact(record: logging.LogRecord) -> bool:
        record.path = "/redacted"
        return getattr(record, "request_id", "") != "dropped"

    with server_logging() as captured:
        access.addFilter(redact)
        try:
            log_fields(access, "request", {"request_id": "kept", "path": "/v2/secret-name/manifests/1"})
            log_fields(access, "request", {"request_id": "dropped", "path": "/v2/a"})
        finally:
            access.removeFilter(redact)
        other = Collecting()
        access.addHandler(other)
        try:
            log_fields(access, "request", {"request_id": "also elsewhere"})
        finally:
            access.removeHandler(other)
        captured.handler.setLevel(logging.WARNING)
        log_fields(access, "request", {"request_id": "below the handler's level"})
        captured.handler.setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [(line["request_id"], line.get("path")) for line in lines] == [
        ("kept", "/redacted"),
        ("also elsewhere", None),
    ]
    assert [getattr(r, "request_id", None) for r in other.records] == ["also elsewhere"]
    assert direct_lines == [], "none of these lines could skip logging's own handling"


def test_per_request_lines_are_usual_records_before_logging_is_configured(caplog: pytest.LogCaptureFixture) -> None:
    """Before configure_logging turns the lookups off (a library user, a test), log_fields is
    plain ``logger.info``, reporting its caller."""
    with caplog.at_level(logging.INFO, logger="moorage.access"):
        log_fields(logging.getLogger("moorage.access"), "request", {"status": 200})
    (record,) = caplog.records
    assert record.funcName == "test_per_request_lines_are_usual_records_before_logging_is_configured"
    assert record.filename == "test_logs.py" and getattr(record, "status", None) == 200


async def test_failures_name_their_upstream_and_request(
    moorage: object, upstream: FakeRegistry, log_lines: Captured
) -> None:
    """An operator reading a warning finds the upstream and what was asked, and a request id
    a user quotes leads to its failure's line: a manifest whose bytes do not match its digest
    gave a 502 that no line explained."""
    from aiohttp.test_utils import TestClient

    assert isinstance(moorage, TestClient)
    image = upstream.add_image("library/alpine", "3.19", [b"a layer"])
    upstream.corrupt_manifest(image.digest)
    upstream.corrupt_blob(image.layer_digests[0])
    refused = await moorage.get(f"/v2/alpine/manifests/{image.digest}", headers={"X-Request-Id": "job-8"})
    assert refused.status == 502
    cut = await moorage.get(f"/v2/alpine/blobs/{image.layer_digests[0]}")
    with contextlib.suppress(Exception):
        await cut.read()
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (failed,) = [line for line in lines if line["event"] == "cache_failed"]
    assert failed["request_id"] == "job-8" and failed["upstream"] == "docker.io" and failed["status"] == 502
    assert image.digest in failed["error"]
    (fill,) = [line for line in lines if line["event"] == "fill_failed"]
    assert (fill["upstream"], fill["repository"], fill["digest"]) == (
        "docker.io",
        "library/alpine",
        image.layer_digests[0],
    )


def test_a_count_of_dropped_lines_is_a_whole_line() -> None:
    """A log pipeline that maps ``time`` as the timestamp rejected the line without it."""
    stream = io.StringIO()
    with server_logging() as captured:
        writer = BackgroundWriter(stream)
        writer.setFormatter(captured.handler.formatter)
        writer.dropped = 3
        writer.close()
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert (line["event"], line["count"], line["level"], line["logger"]) == (
        "log_lines_dropped",
        3,
        "warning",
        "moorage",
    )
    assert line["time"].endswith("Z")


def test_warnings_and_errors_in_threads_are_lines_of_the_log() -> None:
    """Python's own warnings and an error in a thread were written raw, text among the JSON
    lines a log collector parses."""
    with server_logging() as captured, warnings.catch_warnings():
        warnings.simplefilter("always")  # not the suite's "error"
        warnings.warn("something is deprecated", DeprecationWarning, stacklevel=1)
        failing = threading.Thread(target=lambda: 1 / 0, name="a-worker")
        failing.start()
        failing.join()
        lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    (warned,) = [line for line in lines if line["logger"] == "py.warnings"]
    assert "something is deprecated" in warned["event"]
    (error,) = [line for line in lines if line["event"] == "internal_error"]
    assert error["thread_name"] == "a-worker" and "ZeroDivisionError" in error["traceback"]


async def test_an_outage_is_one_warning_for_a_while_counting_the_pulls_it_failed(
    start_moorage: StartMoorage,
    upstream: FakeRegistry,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream down answered 1,000 pulls with 1,000 identical warnings: the line that
    matters drowned. Each pull is still counted, and has its access line."""
    monkeypatch.setattr("moorage.proxy._logging.REPEAT_SECONDS", 0.5)
    moorage = await start_moorage(upstream_settings={"retries": {"attempts": 1}})
    await upstream.stop_listening()

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", "") == "upstream_failed"]

    for _ in range(5):
        response = await moorage.get("/v2/alpine/manifests/3.19", headers={"Accept": ACCEPT_ALL_MANIFESTS})
        assert response.status == 503
    assert len(failures()) == 1 and getattr(failures()[0], "left_out", None) == 0
    await asyncio.sleep(0.6)
    assert (await moorage.get("/v2/alpine/manifests/3.20", headers={"Accept": ACCEPT_ALL_MANIFESTS})).status == 503
    assert len(failures()) == 2 and getattr(failures()[1], "left_out", None) == 4, "it stands for the four left out"
    assert await metric(moorage, "moorage_requests_total", kind="manifest", method="GET", status="503") == 6
