"""The OCI pull routes: ``/v2/``, manifests, blobs, tag lists, referrers; and health and metrics.

Handlers parse at the door (path, name, reference, digest), ask the router for an upstream
and the cache for an answer, and turn the answer into headers and bytes. They raise errors
and never build error JSON (``errors.error_middleware`` does). Warm blobs go out through
aiohttp's FileResponse (sendfile, Range; an unsatisfiable range is the OCI 416 decided here);
a request with a condition or a Range this cache ignores (which FileResponse would read
otherwise) is sent by the handler with sendfile; over TLS, which rules out sendfile, in 512 KiB
reads on a thread. Blobs being filled are sent from the growing file, and a fill that fails
cuts the connection so no client ever takes a short body for a whole one.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import BinaryIO, Final

from aiohttp import ETag, web
from aiohttp.abc import AbstractStreamWriter
from prometheus_client import CONTENT_TYPE_LATEST

from moorage.cache import FillAborted, FillingBlob, FillReader, ManifestAnswer, MayRead, error_text
from moorage.upstreams import RegistryClient, Route
from moorage.upstreams.reference import (
    MAX_QUERY_LENGTH,
    MAX_QUERY_PARAMETERS,
    OCI_IMAGE_INDEX,
    accept_class,
    is_page_size,
    page_query,
    parse_digest,
    parse_reference,
)

from ._auth import authorize_pull
from ._logging import log_fields
from ._paths import V2Path, parse_v2_path
from ._state import CACHE, LEAVING, METRICS, ROUTER, SETTINGS, notes
from ._token_service import token_endpoint
from .errors import (
    BlobUnknown,
    OCIError,
    PaginationInvalid,
    RangeInvalid,
    RouteUnknown,
    Unsupported,
    client_left,
    connection_dead,
)

__all__ = ["add_routes"]

log = logging.getLogger("moorage.proxy")
#: One line per manifest pulled: who pulled which digest from which upstream.
audit = logging.getLogger("moorage.audit")
CHUNK_SIZE: Final = 1024 * 1024
#: Reads of a stored blob sent over TLS: as fast as 1 MiB here (about 1 GB/s a stream), and
#: 16 streams peak some 30 MiB lower.
TLS_READ_SIZE: Final = 512 * 1024
STALE_WARNING: Final = '110 - "stale"'
API_VERSION: Final = {"Docker-Distribution-API-Version": "registry/2.0"}
READ_ONLY: Final = "this cache is read-only: push, delete and upload are not supported"


class ReferrersUnsupported(OCIError):
    """404 is how the spec says "no referrers API"; clients then use the tag schema."""

    code, status = "UNSUPPORTED", 404
    cached_answer = True


class QueryInvalid(OCIError):
    """The spec's code for "an invalid set of parameters" (a referrers or tag-list query
    beyond what is passed on); its status for a bad request."""

    code, status = "UNSUPPORTED", 400


async def api_base(request: web.Request) -> web.Response:
    return web.json_response({}, headers=API_VERSION)


async def v2(request: web.Request) -> web.StreamResponse:
    target = parse_v2_path(request.raw_path)
    if target is None:
        if request.path == "/v2/":  # only GET and HEAD reach api_base
            raise Unsupported(READ_ONLY, headers={"Allow": "GET, HEAD"})
        raise RouteUnknown(f"no such route: {request.method} {request.path[:200]}")
    if target.kind == "upload":  # no method at all: an empty Allow says so (RFC 9110, 10.2.1)
        raise Unsupported(READ_ONLY, headers={"Allow": ""})
    if request.method not in ("GET", "HEAD"):
        raise Unsupported(READ_ONLY, headers={"Allow": "GET" if target.kind in ("tags", "referrers") else "GET, HEAD"})
    note = notes(request)
    note.kind = target.kind
    route = request.app[ROUTER].resolve(target.name, request.query.get("ns"))
    note.upstream = route.upstream.host
    note.repository = repository = str(route.repository)
    may_read = authorize_pull(request, target.name, route.upstream.host, repository)
    if target.kind == "manifest":
        return await manifest(request, route, target, may_read)
    if target.kind == "blob":
        return await blob(request, route, target, may_read)
    if target.kind == "tags":
        if request.method != "GET":
            raise Unsupported("tags/list answers GET only", headers={"Allow": "GET"})
        return await tags(request, route, target)
    if request.method != "GET":
        raise Unsupported("referrers answer GET only", headers={"Allow": "GET"})
    return await referrers(request, route, target)


# -- manifests ------------------------------------------------------------------------------------


async def manifest(
    request: web.Request, route: Route[RegistryClient], target: V2Path, may_read: MayRead
) -> web.Response:
    reference = parse_reference(target.reference)
    note = notes(request)
    note.reference = str(reference)
    settings = request.app[SETTINGS]
    answer = await request.app[CACHE].manifest(
        route.upstream,
        route.repository,
        reference,
        accept_class(request.headers.getall("Accept", [])),
        settings.tag_ttl_of(route.upstream.settings),
        may_read,
        reading=request.method == "GET",
    )
    note.result, note.stale_reason = answer.result, answer.stale_reason
    headers = _manifest_headers(answer)
    condition = _precondition(request, headers["ETag"])
    if condition is not None:
        del headers["Content-Length"]
        return web.Response(status=condition, headers=headers)
    if request.method == "HEAD":
        return web.Response(headers=headers)
    log_fields(
        audit,
        "pull",
        {
            "request_id": note.request_id,
            "client": request.remote,
            "user": note.user,
            "upstream": note.upstream,
            "repository": note.repository,
            "reference": note.reference,
            "digest": str(answer.digest),
            "media_type": answer.media_type,
            "result": answer.result,
        },
    )
    return web.Response(body=answer.body, headers=headers)


def _manifest_headers(answer: ManifestAnswer) -> dict[str, str]:
    headers = {
        **API_VERSION,
        "Content-Type": answer.media_type,
        "Content-Length": str(len(answer.body)),
        "Docker-Content-Digest": str(answer.digest),
        "ETag": f'"{answer.digest}"',
    }
    if answer.result == "stale":
        headers["Warning"] = STALE_WARNING
    return headers


# -- blobs ----------------------------------------------------------------------------------------


async def blob(
    request: web.Request, route: Route[RegistryClient], target: V2Path, may_read: MayRead
) -> web.StreamResponse:
    digest = parse_digest(target.reference)
    note = notes(request)
    note.reference = str(digest)
    cache = request.app[CACHE]
    gone = functools.partial(client_left, request)  # asked while a download waits to begin
    etag = f'"{digest}"'
    headers = {
        **API_VERSION,
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "ETag": etag,
    }
    # The validator is the digest, so a condition is decided before the blob is looked at:
    # one that ends in 304 or 412 only asks whether the blob is there, and starts no download.
    condition = _precondition(request, etag)
    if request.method == "HEAD" or condition is not None:
        size, result = await cache.blob_size(route.upstream, route.repository, digest, may_read, gone)
        note.result = result
        if condition is not None:
            return web.Response(status=condition, headers=headers)
        return web.Response(headers={**headers, "Content-Length": str(size), "Accept-Ranges": "bytes"})
    _asked_range(request, etag)  # a malformed one is refused before it costs a download
    answer = await cache.blob(route.upstream, route.repository, digest, may_read, gone)
    note.result = answer.result
    if isinstance(answer, FillingBlob):
        return await _stream_fill(request, answer, headers)
    if answer.path is None:
        raise AssertionError("stores without local files are not served yet")
    wanted = _byte_range(request, answer.size, etag)  # an unsatisfiable range gets the OCI 416, as for fills
    # FileResponse reads Range itself, so one this cache ignores goes the other way; so does a
    # request with a condition, which FileResponse would judge by the file's mtime.
    ignored_range = wanted is None and "Range" in request.headers
    if _is_tls(request) or ignored_range or any(name in request.headers for name in CONDITIONAL_HEADERS):
        return await _stream_file(request, answer.path, answer.size, wanted, headers)
    return BlobFileResponse(answer.path, chunk_size=CHUNK_SIZE, headers=headers)


def _is_tls(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


class BlobFileResponse(web.FileResponse):
    """aiohttp's FileResponse (sendfile, Range, 206), sent once, with the digest as its
    validator.

    The access middleware sends every response before it records it; aiohttp then calls
    ``prepare`` again, which a FileResponse would take as a request to send the file twice.
    FileResponse sets an ``ETag`` and ``Last-Modified`` of the file's mtime, which the cache's
    bookkeeping moves at reads: the ``ETag`` given in the headers stays, and no date goes out.
    """

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)

    @property
    def etag(self) -> ETag | None:
        return super().etag

    @etag.setter
    def etag(self, value: ETag | str | None) -> None:
        pass

    @property
    def last_modified(self) -> datetime.datetime | None:
        return None

    @last_modified.setter
    def last_modified(self, value: float | datetime.datetime | str | None) -> None:
        pass


#: Headers that make a request conditional (RFC 9110, section 13.1).
CONDITIONAL_HEADERS: Final = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range")


def _precondition(request: web.Request, etag: str) -> int | None:
    """The status a conditional request gets instead of its content (412 or 304), or None to
    answer it, as RFC 9110 (section 13.2.2) orders the conditions. Content by digest has one
    strong validator, ``etag`` (the quoted digest), and no modification date, so
    ``If-Unmodified-Since`` and ``If-Modified-Since`` are ignored (section 13.1.3 and 13.1.4)."""
    if (asked := request.if_match) is not None and not _etag_matches(asked, etag, weak=False):
        return 412
    if (asked := request.if_none_match) is not None and _etag_matches(asked, etag, weak=True):
        return 304
    return None


def _etag_matches(asked: tuple[ETag, ...], etag: str, *, weak: bool) -> bool:
    return any(tag.value == "*" or (f'"{tag.value}"' == etag and (weak or not tag.is_weak)) for tag in asked)


def _byte_range(request: web.Request, size: int, etag: str) -> tuple[int, int] | None:
    """``[start, end)`` asked by a Range header, None for the whole blob.

    As RFC 9110 (section 14.2) has it, a unit other than bytes is ignored, and so is a request
    for several ranges (the whole blob, 200, is an answer every client takes; a multipart body
    is not worth its cost for blobs). A malformed byte range is 416, as Distribution answers.
    """
    wanted = _asked_range(request, etag)
    if wanted is None:
        return None
    start, stop = wanted.start, wanted.stop
    if start == 0 and stop is None and request.headers["Range"].lower().startswith("bytes=-"):
        start = size  # the last 0 bytes (aiohttp reads ``-0`` as 0-): never satisfiable
    if start is None:
        start = 0
    if start < 0:  # a suffix, bytes=-N
        start = max(0, size + start)
        stop = size
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise RangeInvalid(
            f"range {request.headers['Range'][:100]!r} not satisfiable for {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, stop


def _asked_range(request: web.Request, etag: str) -> slice | None:
    """The one byte range a Range header asks for, as aiohttp reads it; None where the whole
    blob is the answer (no header, another unit, several ranges, an ``If-Range`` other than
    the blob's ``ETag``: a date, which no blob answer carries, or another validator).
    RangeInvalid when malformed."""
    if "Range" not in request.headers:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:
        return None
    unit, _, ranges = request.headers["Range"].partition("=")
    if unit.strip().lower() != "bytes" or "," in ranges:
        return None
    try:
        wanted = request.http_range
    except ValueError:
        raise RangeInvalid(f"unreadable Range header: {request.headers['Range'][:100]!r}") from None
    return None if wanted.start is None and wanted.stop is None else wanted


def _body_response(size: int, wanted: tuple[int, int] | None, headers: dict[str, str]) -> web.StreamResponse:
    """The head of a blob's body sent by the handler: 200, or 206 for ``wanted``."""
    start, end = wanted if wanted is not None else (0, size)
    response = web.StreamResponse(status=206 if wanted is not None else 200, headers=headers)
    response.headers["Accept-Ranges"] = "bytes"
    if wanted is not None:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    response.content_length = end - start
    return response


async def _stream_file(
    request: web.Request, path: Path, size: int, wanted: tuple[int, int] | None, headers: dict[str, str]
) -> web.StreamResponse:
    """A stored blob the handler sends itself: over TLS, and for a request FileResponse would
    read otherwise (a condition, a Range this cache ignores). With sendfile where the transport
    allows it (copied through Python, a slow reader held a megabyte or more of the blob); over
    TLS in 512 KiB reads on a thread (asyncio's own fallback for ``loop.sendfile`` reads 16 KiB
    per thread hand-over, which held a stream to about 80 MB/s)."""
    digest = headers["Docker-Content-Digest"]
    file = _FileReads(path)
    try:
        try:
            await file.open()
        except FileNotFoundError:  # evicted since the lookup
            raise BlobUnknown(f"blob {digest} is no longer stored; retry") from None
        start, end = wanted if wanted is not None else (0, size)
        response = _body_response(size, wanted, headers)
        await response.prepare(request)
        try:
            sent = await _sendfile(request, file, start, end) if not _is_tls(request) else None
            if sent is None:
                sent = await _send_reads(request, response, file, start, end)
        except ConnectionError:
            _cut(request, "CLIENT_GONE")
            return response
        if sent < end - start:  # shorter than its size: the client must see a short body
            log.error(
                "cutting response: stored blob is short",
                extra={
                    "event": "response_cut",
                    "request_id": notes(request).request_id,
                    "digest": digest,
                    "offset": start + sent,
                },
            )
            _cut(request, "STORE_SHORT")
            return response
        await response.write_eof()
        return response
    finally:
        file.close()


async def _sendfile(request: web.Request, file: _FileReads, start: int, end: int) -> int | None:
    """Send ``[start, end)`` of an open stored file with sendfile: the bytes sent (fewer than
    asked where the file is short), or None where the loop cannot sendfile. Never over TLS
    (the caller checks: asyncio answers that with a RuntimeError)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client gone")
    with io.FileIO(file.fileno(), "rb", closefd=False) as view:  # the descriptor stays file's
        try:
            return await _sendfile_span(request, view, start, end - start)
        except (asyncio.SendfileNotAvailableError, NotImplementedError):
            return None


async def _sendfile_span(request: web.Request, file: BinaryIO, offset: int, count: int) -> int:
    """``loop.sendfile`` to the request's client without its fallback: the bytes sent. Where
    the client is the cause (it left, or client_send_timeout cut it for reading nothing),
    ConnectionResetError; a store that timed out is a fault."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client gone")
    try:
        return await asyncio.get_running_loop().sendfile(transport, file, offset, count, fallback=False)
    except TimeoutError:
        if connection_dead(request):  # client_send_timeout cut a client that stopped reading
            raise ConnectionResetError("client stalled") from None
        raise
    except RuntimeError:
        if transport.is_closing():  # asyncio's word for "the client left"
            raise ConnectionResetError("client gone") from None
        raise


async def _send_reads(
    request: web.Request, response: web.StreamResponse, file: _FileReads, start: int, end: int
) -> int:
    """Send ``[start, end)`` of an open stored file in 512 KiB reads on a thread: the bytes
    sent (fewer than asked where the file is short)."""
    for offset in range(start, end, TLS_READ_SIZE):
        count = min(TLS_READ_SIZE, end - offset)
        chunk = await file.pread(count, offset)  # a store that times out is no client gone
        if chunk:
            await _write(request, response, chunk)
        if len(chunk) < count:
            return offset + len(chunk) - start
    return end - start


class _FileReads:
    """A file opened and read on threads, and closed only once no thread is still opening or
    reading it: a request cancelled mid-read leaves the read to finish, so the descriptor is
    neither leaked nor reused under it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._opening: asyncio.Future[int] | None = None
        self._reading: asyncio.Future[bytes] | None = None
        self._closed = False

    async def open(self) -> None:
        self._opening = asyncio.ensure_future(asyncio.to_thread(os.open, self._path, os.O_RDONLY))
        await asyncio.shield(self._opening)

    def fileno(self) -> int:
        """The descriptor, once opened (for sendfile, which reads it on the event loop)."""
        assert self._opening is not None
        return self._opening.result()

    async def pread(self, count: int, offset: int) -> bytes:
        assert self._opening is not None
        self._reading = asyncio.ensure_future(asyncio.to_thread(os.pread, self._opening.result(), count, offset))
        return await asyncio.shield(self._reading)

    def close(self) -> None:
        for running in (self._opening, self._reading):
            if running is not None and not running.done():
                running.add_done_callback(lambda _: self.close())
                return
        if self._closed:
            return
        self._closed = True
        if self._reading is not None and not self._reading.cancelled():
            self._reading.exception()  # retrieved: a read that failed after its request left
        opening = self._opening
        if opening is not None and not opening.cancelled() and opening.exception() is None:
            # On a thread: when the blob was evicted meanwhile, this close frees its blocks.
            closing = asyncio.get_running_loop().run_in_executor(None, os.close, opening.result())
            closing.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved


def _cut(request: web.Request, error: str) -> None:
    """End a response whose headers are out: the only honest signal left is a cut connection,
    which makes the body visibly short of its Content-Length."""
    note = notes(request)
    note.error, note.cut = error, True
    if request.transport is not None:
        request.transport.close()


async def _stream_fill(request: web.Request, answer: FillingBlob, headers: dict[str, str]) -> web.StreamResponse:
    reader, size = answer.reader, answer.size
    try:
        wanted = _byte_range(request, size, headers["ETag"])
        start, end = wanted if wanted is not None else (0, size)
        response = _body_response(size, wanted, headers)
        await response.prepare(request)
        try:
            await _send_growing(request, response, reader, start, end)
        except ConnectionError:
            _cut(request, "CLIENT_GONE")  # the fill goes on without this client
            return response
        except Exception as exc:
            # Headers are out: the only honest signal left is a cut connection, which makes the
            # body visibly short of its Content-Length. No error body may follow a 200.
            cut = {"event": "response_cut", "request_id": notes(request).request_id, "digest": str(reader.digest)}
            if isinstance(exc, FillAborted):
                log.warning("cutting response: fill failed", extra={**cut, "error": error_text(exc.__cause__ or exc)})
            else:
                log.exception("cutting response", extra=cut)
            _cut(request, "FILL_ABORTED" if isinstance(exc, FillAborted) else "INTERNAL")
            return response
        await response.write_eof()
        return response
    finally:
        reader.close()


async def _send_growing(
    request: web.Request, response: web.StreamResponse, reader: FillReader, start: int, end: int
) -> None:
    """Send ``[start, end)`` of a blob being filled: with sendfile span by span as the file
    grows (no copy through Python), or by reading and writing 1 MiB chunks where the
    transport cannot sendfile (TLS)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client gone")
    position = start
    if not _is_tls(request):  # TLS cannot sendfile
        with reader.open_file() as file:
            try:
                async for offset, count in reader.ranges(start, end):
                    position = offset
                    if transport.is_closing():
                        raise ConnectionResetError("client gone")
                    await _sendfile_span(request, file, offset, count)
                    position = offset + count
                return
            except (asyncio.SendfileNotAvailableError, NotImplementedError):  # a loop without sendfile
                pass
    async for chunk in reader.read(position, end):
        await _write(request, response, chunk)


async def _write(request: web.Request, response: web.StreamResponse, chunk: bytes) -> None:
    """Write to the client; client_send_timeout's cut (a timeout on a connection the kernel
    ended) is a client gone, as a reset is."""
    try:
        await response.write(chunk)
    except TimeoutError:
        if connection_dead(request):
            raise ConnectionResetError("client stalled") from None
        raise


# -- tag lists ------------------------------------------------------------------------------------


async def tags(request: web.Request, route: Route[RegistryClient], target: V2Path) -> web.Response:
    """The upstream's tag list; a page with ``n`` and ``last``, or with whatever query the
    upstream's own next-page link carried (a token), passed on as it is."""
    n = request.query.get("n")
    if n is not None and not is_page_size(n):
        raise PaginationInvalid(f"n must be a whole number of at most 6 digits, not {n[:20]!r}")
    query = page_query((name, value) for name, value in request.query.items() if name != "ns")
    if query is None:
        raise QueryInvalid(
            f"bad tag-list query {request.query_string[:200]!r}: at most {MAX_QUERY_PARAMETERS} parameters "
            f"of printable ASCII, {MAX_QUERY_LENGTH} characters in all, are passed on"
        )
    settings = request.app[SETTINGS]
    answer = await request.app[CACHE].tags(route.upstream, route.repository, query, settings.tags_list_ttl)
    note = notes(request)
    note.result, note.stale_reason = answer.result, answer.stale_reason
    body = await _named(answer.body, target.name)
    headers = {**API_VERSION, "Content-Type": "application/json"}
    if answer.next_query is not None:
        following = answer.next_query
        if "ns" in request.query:  # the upstream it named, as resolved: never the raw value
            following += f"&ns={route.upstream.host}"
        headers["Link"] = f'</v2/{target.name}/tags/list?{following}>; rel="next"'
    if answer.result == "stale":
        headers["Warning"] = STALE_WARNING
    return web.Response(body=body, headers=headers)


#: A tag list's leading ``"name"`` member, as registries write it (``{"name":"library/alpine",``).
_LEADING_NAME: Final = re.compile(rb'\A\s*\{\s*"name"\s*:\s*"(?:[^"\\]|\\.)*"')


async def _named(body: bytes, name: str) -> bytes:
    """A tag list with ``name`` as the client named the repository (a prefix, ``library/``
    left out). The leading member is replaced in the bytes: parsing a list of megabytes for it
    took some ten times its size in memory, and the event loop, at every answer, hits too.
    Another shape is parsed, off the loop."""
    leading = _LEADING_NAME.match(body)
    if leading is not None:
        return b'{"name":' + json.dumps(name).encode() + body[leading.end() :]
    return await asyncio.to_thread(_renamed, body, name)


def _renamed(body: bytes, name: str) -> bytes:
    try:
        document = json.loads(body)
        document["name"] = name
        return json.dumps(document).encode()
    except (ValueError, TypeError, RecursionError):
        return body


async def referrers(request: web.Request, route: Route[RegistryClient], target: V2Path) -> web.Response:
    """The manifests whose ``subject`` is a digest (signatures, SBOMs, attestations), as the
    upstream lists them; 404 where it has no referrers API, so that clients use the tag
    schema. An upstream that fails with nothing kept is an error (503, 429), never that 404:
    a client told "no API" may keep to the tag schema for good, and find no signature there."""
    digest = parse_digest(target.reference)
    query = page_query((name, value) for name, value in request.query.items() if name != "ns")
    if query is None:
        raise QueryInvalid(
            f"bad referrers query {request.query_string[:200]!r}: artifactType takes a media type, "
            f"and at most {MAX_QUERY_PARAMETERS} parameters of printable ASCII, {MAX_QUERY_LENGTH} characters in all, "
            "are passed on"
        )
    note = notes(request)
    note.reference = str(digest)
    settings = request.app[SETTINGS]
    answer = await request.app[CACHE].referrers(route.upstream, route.repository, digest, query, settings.referrers_ttl)
    note.result, note.stale_reason = answer.result, answer.stale_reason
    if answer.body is None:
        raise ReferrersUnsupported(
            f"{route.upstream.host} does not serve the referrers API; use the sha256-<hex> tag schema",
            headers={"Warning": STALE_WARNING} if answer.result == "stale" else None,
        )
    headers = {**API_VERSION, "Content-Type": OCI_IMAGE_INDEX}
    if "artifactType" in request.query:
        headers["OCI-Filters-Applied"] = "artifactType"
    if answer.next_query is not None:
        following = answer.next_query + (f"&ns={route.upstream.host}" if "ns" in request.query else "")
        headers["Link"] = f'</v2/{target.name}/referrers/{digest}?{following}>; rel="next"'
    if answer.result == "stale":
        headers["Warning"] = STALE_WARNING
    return web.Response(body=answer.body, headers=headers)


# -- operations -----------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the store is writable and the index answers, and no stop has begun.
    Upstreams are reported, not required: a cache serves what it holds while they are down.
    A full disk is reported, not failed: what is stored is still served, and it starts an
    eviction pass (a pod taken out of its Service would get no traffic to start one)."""
    cache = request.app[CACHE]
    store, index = await asyncio.to_thread(cache.check)
    if store.full:
        cache.disk_full()
    upstreams = {client.host: client.health() for client in request.app[ROUTER].upstreams}
    leaving = request.app[LEAVING].is_set()
    ready = store.problem is None and index is None and not leaving
    body = {
        "status": "stopping" if leaving else "ok" if ready else "not ready",
        "store": store.problem or ("disk full" if store.full else "ok"),
        "index": index or "ok",
        "upstreams": upstreams,
    }
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application, *, metrics_here: bool = True) -> None:
    router = app.router
    router.add_get("/v2", api_base)
    router.add_get("/v2/", api_base)
    router.add_route("*", "/v2/{tail:.*}", v2)
    router.add_route("GET", "/token", token_endpoint)
    router.add_route("POST", "/token", token_endpoint)
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
    if metrics_here:
        router.add_get("/metrics", metrics)
