"""Blob bodies read straight off the upstream connection, past h11's copies.

httpx hands a body over through httpcore and h11, and h11 copies each byte four times on the
way: appending it to its receive buffer, twice slicing it out again, and once more in
httpcore's ``bytes()``. For a blob of hundreds of megabytes
that was a quarter of the cache's CPU on a cold pull, and on a machine whose cores the client
shares it is time the client waits for (measured: the cache's CPU for a cold pull of 315 MB
1.33 → 1.00 s, the pull 2.29 → 2.06 s).

So once h11 has parsed an answer's head and handed over what it had already buffered,
:class:`DirectBody` reads the rest of a ``Content-Length`` body from the network stream itself
and, with every byte in, tells h11's reader that nothing remains. h11 then ends the message as
if it had read it, and httpcore puts the connection back in its pool for the next blob. A body
cut short, a timeout or a cancel leaves h11 short of the end, so httpcore closes that
connection instead of reusing it.

This relies on names that are not public in httpx, httpcore or h11: the chain from an httpx
response to its h11 connection, and h11's Content-Length reader. pyproject.toml pins their
versions; each name is checked before use, and where one is missing (another version, a
proxied connection, a chunked body, HTTP/2) the body goes through h11 as before. The tests fail
if the direct way stops being taken.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import h11
import httpcore
import httpx

try:
    from h11._readers import ContentLengthReader
except ImportError:  # another h11: every body goes through h11
    ContentLengthReader = None  # type: ignore[assignment,misc]

from ._network import WideReadStream

__all__ = ["DirectBody"]

#: From an httpx response to its h11 connection: httpx's bound stream, httpx's wrapper of the
#: httpcore stream, httpcore's pool stream, its HTTP/1.1 stream, the connection, h11's state.
_TO_H11: Final = ("_stream", "_httpcore_stream", "_stream", "_connection", "_h11_state")

#: The most one read asks for: it only caps the ask, as a read hands over one piece the event
#: loop received (at most 256 KiB per socket read, or the records decrypted from one).
_READ_AT_MOST: Final = 4 * 1024 * 1024


class DirectBody:
    """The rest of one answer's body, read from its connection instead of through h11."""

    def __init__(self, connection: h11.Connection, reader: ContentLengthReader, stream: WideReadStream) -> None:
        self._connection = connection
        self._reader = reader
        self._stream = stream

    @classmethod
    def of(cls, response: httpx.Response) -> DirectBody | None:
        """The direct way for ``response``'s body, or None where only h11 can read it."""
        node: object = response.stream
        for name in _TO_H11:
            node = getattr(node, name, None)
        if not isinstance(node, h11.Connection) or node.their_state is not h11.SEND_BODY:
            return None
        reader = getattr(node, "_reader", None)
        stream = response.extensions.get("network_stream")
        if ContentLengthReader is None or type(reader) is not ContentLengthReader:
            return None
        if not isinstance(stream, WideReadStream):
            return None
        if not isinstance(getattr(reader, "_remaining", None), int) or getattr(node, "_receive_buffer", None) is None:
            return None
        return cls(node, reader, stream)

    async def rest(self, timeout: float | None) -> AsyncIterator[bytes]:  # noqa: ASYNC109
        """What the body still lacks, as it comes off the socket; nothing while h11 still holds
        buffered bytes of it (hand those over first). ``timeout`` is the read timeout. Raises
        httpx's exceptions, as reading through httpx would."""
        if len(self._connection._receive_buffer):
            return
        remaining: int = self._reader._remaining
        try:
            while remaining > 0:
                data = await self._stream.read_at_most(min(remaining, _READ_AT_MOST), timeout)
                if not data:
                    raise httpx.RemoteProtocolError(
                        f"peer closed connection without sending complete message body ({remaining} bytes short)"
                    )
                if len(data) > remaining:  # a stream that ignored its limit: the body's end is lost
                    raise httpx.RemoteProtocolError(f"read {len(data) - remaining} bytes past the body's end")
                remaining -= len(data)
                yield data
        except httpcore.TimeoutException as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out") from exc
        except httpcore.NetworkError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        self._reader._remaining = 0  # all in: h11's next event ends the message
