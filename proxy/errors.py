"""OCI error responses, and the one place where failures become HTTP.

Each :class:`OCIError` subclass fixes a spec code and a status. Handlers raise, they never
build error JSON. :func:`error_middleware` renders ``{"errors": [{code, message, detail}]}``
for OCI errors, and translates everything the lower rooms raise: grammar errors, routing
errors, upstream errors (429 → TOOMANYREQUESTS with ``Retry-After``; unreachable → 503;
a broken answer → 502) and cache errors. aiohttp's own 404/405/416 get OCI bodies too.
An unexpected exception is logged with its traceback and answered 500 without one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import ClassVar, NotRequired, TypedDict

from aiohttp import web

from moorage.cache import CacheError, ClientGone, DigestMismatch, FillAborted, StoreFailure
from moorage.upstreams import (
    NoRoute,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamUnavailable,
)
from moorage.upstreams.reference import InvalidReference

from ._paths import PathKind
from ._state import FAILURE_LINES, SETTINGS, notes

__all__ = [
    "BlobUnknown",
    "DigestInvalid",
    "ManifestInvalid",
    "ManifestUnknown",
    "NameInvalid",
    "NameUnknown",
    "OCIError",
    "PaginationInvalid",
    "RangeInvalid",
    "RequestTooLarge",
    "RouteUnknown",
    "TooManyRequests",
    "Unsupported",
    "client_left",
    "error_middleware",
]

log = logging.getLogger("moorage.proxy")


class OCIErrorEntry(TypedDict):
    code: str
    message: str
    detail: NotRequired[object]


class OCIErrorBody(TypedDict):
    errors: list[OCIErrorEntry]


class OCIError(Exception):
    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500
    #: The upstream's own answer, kept and served as any other (a registry without the
    #: referrers API): a cache result, counted as one, where other errors count as none.
    cached_answer: ClassVar[bool] = False

    def __init__(self, message: str, detail: object = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> OCIErrorBody:
        entry: OCIErrorEntry = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return {"errors": [entry]}

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.body()).encode(),
            content_type="application/json",
            headers=self.headers,
        )


class BlobUnknown(OCIError):
    code, status = "BLOB_UNKNOWN", 404


class ManifestUnknown(OCIError):
    code, status = "MANIFEST_UNKNOWN", 404


class NameUnknown(OCIError):
    code, status = "NAME_UNKNOWN", 404


class RouteUnknown(OCIError):
    """A path the cache has no route for (``_catalog`` too). The distribution spec lists the
    codes a 4xx error body may carry, and ``UNSUPPORTED`` is the one that fits."""

    code, status = "UNSUPPORTED", 404


class NameInvalid(OCIError):
    code, status = "NAME_INVALID", 400


class DigestInvalid(OCIError):
    code, status = "DIGEST_INVALID", 400


class ManifestInvalid(OCIError):
    code, status = "MANIFEST_INVALID", 400


class PaginationInvalid(OCIError):
    code, status = "PAGINATION_NUMBER_INVALID", 400


class RangeInvalid(OCIError):
    code, status = "RANGE_INVALID", 416


class RequestTooLarge(OCIError):
    code, status = "SIZE_INVALID", 413


class Unsupported(OCIError):
    code, status = "UNSUPPORTED", 405


class TooManyRequests(OCIError):
    code, status = "TOOMANYREQUESTS", 429


class Unavailable(OCIError):
    code, status = "UNAVAILABLE", 503


class BadGateway(OCIError):
    code, status = "UNKNOWN", 502


def _from_reference(error: InvalidReference) -> OCIError:
    if error.kind == "name":
        return NameInvalid(str(error), detail={"name": error.value[:300]})
    if error.kind == "digest":
        return DigestInvalid(str(error), detail={"digest": error.value[:300]})
    if error.kind == "tag":
        # No manifest can have such a tag: the spec answers a manifest not found with 404 and
        # no other code, and its conformance tests ask for a tag of that grammar's ``.INVALID``.
        return ManifestUnknown(f"manifest unknown: {error}", detail={"reference": error.value[:300]})
    return ManifestInvalid(str(error), detail={"reference": error.value[:300]})


def _from_upstream(error: UpstreamError, kind: PathKind | None) -> OCIError:
    detail = {"upstream": error.upstream}
    if isinstance(error, UpstreamNotFound):
        if kind == "blob":
            return BlobUnknown(str(error), detail)
        if kind == "manifest":
            return ManifestUnknown(str(error), detail)
        return NameUnknown(str(error), detail)
    if isinstance(error, UpstreamRateLimited):
        headers = {"Retry-After": str(math.ceil(error.retry_after))} if error.retry_after is not None else {}
        return TooManyRequests(f"{error} and nothing cached to answer with", detail, headers)
    if isinstance(error, UpstreamUnavailable):
        return Unavailable(f"{error} and nothing cached to answer with", detail)
    if isinstance(error, UpstreamRefused):  # what Docker Hub answers for a name it does not have
        return NameUnknown(str(error), detail)
    if isinstance(error, UpstreamAuthFailed):
        return BadGateway(f"{error}; check this upstream's credentials in the cache's configuration", detail)
    return BadGateway(str(error), detail)


def _signs_in(request: web.Request, upstream: str) -> bool:
    """Whether the cache has credentials for ``upstream``."""
    return any(u.host == upstream and u.username for u in request.app[SETTINGS].upstreams)


def _url_of(request: web.Request, upstream: str) -> str | None:
    """The URL the cache reaches ``upstream`` at (docker.io's is registry-1.docker.io): the
    operator's, for the log; settings refuse a URL with credentials in it."""
    return next((u.url for u in request.app[SETTINGS].upstreams if u.host == upstream), None)


def _from_cache(error: CacheError) -> OCIError:
    if isinstance(error, StoreFailure):
        return Unavailable(f"the cache's store failed: {error}")
    if isinstance(error, DigestMismatch | FillAborted):
        return BadGateway(str(error))
    return BadGateway(str(error))


def _from_http(error: web.HTTPException, request: web.Request) -> OCIError:
    if error.status == 404:
        return RouteUnknown(f"no such route: {request.method} {request.path[:200]}")
    if error.status == 405:
        return Unsupported(f"{request.method} is not supported: this cache is read-only")
    if error.status == 416:
        return RangeInvalid(f"range not satisfiable: {request.headers.get('Range', '')[:100]}")
    if error.status == 413:
        return RequestTooLarge("request body too large: this cache is read-only and takes no bodies")
    raise error


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Recorded for a request whose client left before its answer was complete (nginx's 499).
CLIENT_CLOSED_REQUEST = 499


def client_left(request: web.Request) -> bool:
    """The client's connection is gone (a reset raised by something else is a fault of ours)."""
    return request.transport is None or request.transport.is_closing()


def connection_dead(request: web.Request) -> bool:
    """The client's connection is gone as the kernel sees it, asyncio not knowing yet: a send
    that timed out was client_send_timeout's cut (the kernel ended the connection), not a store
    that timed out under it (an NFS mount with softerr, a FUSE store), when this holds."""
    if client_left(request):
        return True
    assert request.transport is not None
    sock = request.transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: the connection was ended
        return True
    return False


def _gone(request: web.Request) -> web.StreamResponse:
    """The answer, recorded and never sent, to a client that left before it began."""
    note = notes(request)
    note.error, note.cut = "CLIENT_GONE", True
    return web.Response(status=CLIENT_CLOSED_REQUEST)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OCIError as error:
        failure: OCIError = error
    except InvalidReference as error:
        failure = _from_reference(error)
    except NoRoute as error:
        failure = NameUnknown(str(error))
    except UpstreamError as error:
        failure = _from_upstream(error, notes(request).kind)
        if not isinstance(error, UpstreamNotFound):  # a 404 is an answer; the rest an outage
            # A refused repository is how Docker Hub says a name does not exist, which any
            # client can ask for: the line is kept, below the level alerts watch. Where the
            # cache signs in to that upstream, a refusal may be its credentials gone stale
            # (ECR answers an expired token with 403): a warning.
            anonymous = isinstance(error, UpstreamRefused) and not _signs_in(request, error.upstream)
            # An outage fails every pull alike: one warning line for a while, counting the
            # rest (each has its access line). A name refused, a client's typo, is each its own.
            left_out = (
                0
                if anonymous
                else request.app[FAILURE_LINES].admit((error.upstream, failure.status, type(error).__name__))
            )
            if left_out is not None:
                log.log(
                    logging.INFO if anonymous else logging.WARNING,
                    "upstream failed and nothing cached to answer with",
                    extra={
                        "event": "upstream_failed",
                        "request_id": notes(request).request_id,
                        "upstream": error.upstream,
                        "url": _url_of(request, error.upstream),
                        "path": request.path[:200],
                        "status": failure.status,
                        # The operator's line says what the client's answer says: for refused
                        # credentials, where to look.
                        "error": failure.message if isinstance(failure, BadGateway) else str(error),
                        "left_out": left_out,
                    },
                )
    except ClientGone:
        return _gone(request)  # it gave up its place in the download queue: no one to answer
    except CacheError as error:
        failure = _from_cache(error)
        if isinstance(error, DigestMismatch):  # a manifest's: a blob's is its fill's fill_failed
            log.warning(
                "the cache could not answer",
                extra={
                    "event": "cache_failed",
                    "request_id": notes(request).request_id,
                    "upstream": notes(request).upstream,
                    "path": request.path[:200],
                    "status": failure.status,
                    "error": str(error),
                },
            )
    except web.HTTPException as error:
        if error.status < 400:
            raise
        failure = _from_http(error, request)
    except Exception as error:
        if isinstance(error, ConnectionResetError) and client_left(request):
            return _gone(request)  # it left while its request was read: no one to answer
        log.exception(
            "unexpected error",
            extra={"event": "internal_error", "request_id": notes(request).request_id, "path": request.path[:200]},
        )
        failure = OCIError("internal error; the cache's log has the details")
    note = notes(request)
    note.error = failure.code
    if not failure.cached_answer:
        note.result = None  # an error answer is no cache result: its body counts toward no hit rate
    started = request.writer is not None and request.writer.output_size > 0
    if started and request.transport is not None:
        # A handler failed after its response started: an error body would land inside it.
        note.cut = True
        request.transport.close()
    return failure.response()
