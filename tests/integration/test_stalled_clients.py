"""A client that stops reading mid-blob, against the real server process: once
``client_send_timeout`` passes with nothing acknowledged, its connection is closed, and with it
the blob file it held open (after an eviction, disk space no one else could use), whether the
blob was stored or was being fetched for it."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.polling import until_sync

from .harness import images
from .harness.moorage import MoorageProcess
from .harness.registry import RealRegistry

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def files_open(pid: int, path: Path) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
        except OSError:
            continue  # closed meanwhile
    return count


@pytest.mark.parametrize(
    ("asked", "stored_first"),
    [("", True), ('If-None-Match: "sha256:0"\r\n', True), ("", False)],
    ids=["plain", "conditional", "while_filled"],
)
def test_a_client_that_stops_reading_is_closed_after_the_send_timeout(
    tmp_path: Path, asked: str, stored_first: bool
) -> None:
    """The kernel's cut surfaces as a timeout (ETIMEDOUT), which the cache took for a fault
    of its own: an error with a traceback and, for a conditional request, a 500 on the
    access line of a 200 already under way. A client that stalls on a blob it made the cache
    fetch is read to from the growing file, and cut the same way; the fill goes on."""
    with RealRegistry(tmp_path / "registry") as registry:
        source = tmp_path / "layer.bin"
        digest = images.write_random_file(source, 64 * MiB, seed=5)
        images.push_blob(registry.url, "library/big", source)
        upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
        with MoorageProcess(tmp_path / "moorage", upstreams, client_send_timeout="2s") as moorage:
            path = f"/v2/big/blobs/{digest}"
            stored = moorage.store / "blobs" / "sha256" / digest[7:9] / digest[7:]
            if stored_first:
                with urllib.request.urlopen(moorage.url + path, timeout=60) as response:
                    assert len(response.read()) == 64 * MiB
                until_sync(stored.exists, within=10, what="the blob stored")

            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect: the window
            stalled.connect(("127.0.0.1", moorage.port))
            try:
                stalled.sendall(f"GET {path} HTTP/1.1\r\nHost: cache\r\n{asked}\r\n".encode())
                asked_at = time.monotonic()
                assert stalled.recv(1024).startswith(b"HTTP/1.1 200")  # then it reads no more
                until_sync(stored.exists, within=30, what="the blob stored, the stalled client's fill too")
                until_sync(lambda: files_open(moorage.pid, stored) >= 1, within=5, what="the send holding the file")
                time.sleep(max(0.0, asked_at + 1 - time.monotonic()))
                assert files_open(moorage.pid, stored) >= 1, "closed before the timeout"
                until_sync(lambda: files_open(moorage.pid, stored) == 0, within=30, what="the stalled send closed")
            finally:
                stalled.close()
            # The cache serves on: the next client gets the blob whole.
            with urllib.request.urlopen(moorage.url + path, timeout=60) as response:
                assert len(response.read()) == 64 * MiB
            lines = moorage.log_lines()
            assert not [line for line in lines if line.get("level") in ("error", "critical")], lines
            cut = [line for line in lines if line.get("event") == "request" and line.get("error") == "CLIENT_GONE"]
            assert [(line["status"], line["path"]) for line in cut] == [(200, path)]
