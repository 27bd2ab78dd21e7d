"""Minimal blocking HTTP client (``http.client``) used by the harness.

Kept free of third-party dependencies, and able to stream a request body from a file
object without reading it into memory.
"""

from __future__ import annotations

import http.client
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["HARNESS_USER_AGENT", "Response", "request"]

#: User-Agent of every request the harness itself sends; ``RealRegistry`` leaves
#: requests carrying it out of its counts.
HARNESS_USER_AGENT = "moorage-test-harness/1"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


def request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | BinaryIO | None = None,
    timeout: float = 30.0,
    read_body: bool = True,
    user_agent: str = HARNESS_USER_AGENT,
) -> Response:
    """Send one request (no redirects followed) and return status, headers and body.

    A file-object ``body`` is streamed in 1 MiB blocks; give a ``Content-Length`` header
    for it (otherwise ``http.client`` uses chunked transfer encoding).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported: {url}")
    conn = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1",
        parts.port or 80,
        timeout=timeout,
        blocksize=1 << 20,
    )
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    hdrs = {"User-Agent": user_agent}
    hdrs.update(headers or {})
    try:
        conn.request(method, target, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read() if read_body else b""
        return Response(
            status=resp.status,
            headers={k.lower(): v for k, v in resp.getheaders()},
            body=data,
        )
    finally:
        conn.close()
