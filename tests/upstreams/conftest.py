"""Fixtures for the upstream client's tests: the fake upstream registry on a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes import FakeRegistry


@pytest.fixture
async def upstream() -> AsyncIterator[FakeRegistry]:
    async with FakeRegistry() as registry:
        yield registry
