"""Fixtures for every test: a clean environment (no MOORAGE_* or proxy variables leak in), no
unexpected error logged by the server, and no seconds-long pause between resumes of a cut body
(a test of the pause sets its own)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

import moorage.cache._fill as fill_module

_HONOURED = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(autouse=True)
def no_error_logs(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A test fails when the server logged an error it did not expect: a traceback in
    aiohttp or Moorage is a bug even when the client saw the right answer, and so is asyncio's
    word of a task's error nobody retrieved (a leak). This fixture is set up first and torn
    down last, so what the server logs while it starts and stops counts too."""
    marker = request.node.get_closest_marker("logs_errors")
    expected = tuple(marker.args) if marker is not None else ()
    yield
    errors = [
        f"{r.name}: {r.getMessage()}"
        for phase in ("setup", "call", "teardown")
        for r in caplog.get_records(phase)
        if r.levelno >= logging.ERROR
        and r.name.startswith(("aiohttp", "moorage", "asyncio"))
        and not r.getMessage().startswith(expected)
    ]
    assert not errors, "errors logged during the test:\n" + "\n".join(errors)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("MOORAGE_") or name.upper() in _HONOURED:
            monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture(autouse=True)
def short_resume_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fill_module, "RESUME_PAUSE", 0.01)
