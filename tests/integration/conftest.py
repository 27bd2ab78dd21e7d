"""Fixtures shared by the integration tests: a real registry and a private containerd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness.clients import Containerd
from .harness.registry import RealRegistry


@pytest.fixture
def real_registry(tmp_path: Path) -> Iterator[RealRegistry]:
    """A running ``docker-registry`` with storage and logs under ``tmp_path/registry``."""
    with RealRegistry(tmp_path / "registry") as registry:
        yield registry


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A private containerd daemon (namespace ``test``), stopped after the test."""
    with Containerd(tmp_path / "containerd") as daemon:
        yield daemon
