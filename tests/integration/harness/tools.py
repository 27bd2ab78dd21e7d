"""Locating external tools, allocating loopback ports and making a test certificate.

``require_tool`` skips a test when a tool is missing on a developer machine, but fails
it under CI (``CI=true``), where the test command is expected to have installed it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ["closed_port", "free_port", "in_ci", "require_tool", "self_signed_certificate"]


def in_ci() -> bool:
    """True when running under CI (``CI`` is set to ``true``/``1``/``yes``)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _missing(message: str) -> NoReturn:
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Return the absolute path of executable ``name``.

    When it cannot be found on ``PATH`` (nor in the sbin directories, which root's
    ``PATH`` does not always include), the calling test is skipped, or failed under CI.
    """
    path = shutil.which(name)
    if path is None:
        extra = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        path = shutil.which(name, path=extra)
    if path is None:
        _missing(f"required tool {name!r} is not installed (not found on PATH)")
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The socket is closed before returning, so there is a small window in which another
    process could take the port; callers that start a server should be ready to retry.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def closed_port() -> int:
    """Return a loopback port nothing listens on, for "upstream" settings that must fail.

    Connecting to it is refused immediately, so a client pointed at it cannot fall back
    to anything real.
    """
    return free_port()


def self_signed_certificate(directory: Path, name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA): (cert.pem, key.pem) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            require_tool("openssl"),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
