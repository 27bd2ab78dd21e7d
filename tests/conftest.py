"""Fixtures for every test: a clean environment (no MOORAGE_* or proxy variables leak in)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

_HONOURED = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("MOORAGE_") or name.upper() in _HONOURED:
            monkeypatch.delenv(name, raising=False)
    yield
