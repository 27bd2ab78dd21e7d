"""The registry client: one pooled httpx client per upstream, speaking the pull API.

It asks, it does not judge: bodies come back with the upstream's own media type and digest
header, and ``cache/`` verifies them. Requests are retried (tenacity, exponential backoff,
``Retry-After`` honoured up to ``retries.max_wait``) on network errors, 5xx and 429 only (not a
429 whose rate-limit headers say the pull budget is spent) until a response is in hand; a body
cut later is the caller's to resume with :meth:`RegistryClient.open_blob` and an offset.
Redirects are followed here, and httpx drops ``Authorization`` when a redirect leaves the
upstream's origin.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, NamedTuple, Protocol, TypedDict
from urllib.parse import parse_qsl

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from moorage.config import UpstreamSettings

from ._auth import RegistryAuth
from ._body import DirectBody
from ._network import wide_read_transport
from ._pages import ReferrersPage, TagsPage, error_codes, error_message, referrers_page, tags_page
from ._proxies import ProxyEnvironment, routed_transport
from ._ratelimit import RateLimitState, parse_ratelimit
from ._transport import mapped_errors, raise_for_status
from ._trust import trust_for
from .errors import (
    HeadRefused,
    ManifestTooLarge,
    NoReferrersApi,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamUnavailable,
)
from .reference import (
    ACCEPT_ALL_MANIFESTS,
    ACCEPT_IMAGE_MANIFESTS,
    MAX_MANIFEST_BYTES,
    OCI_IMAGE_INDEX,
    SCHEMA1_MEDIA_TYPES,
    AcceptClass,
    Digest,
    InvalidReference,
    Reference,
    RepositoryName,
    parse_digest,
    sniff_media_type,
)

__all__ = [
    "BlobBody",
    "FetchedManifest",
    "ManifestHead",
    "NullObserver",
    "ReferrersPage",
    "RegistryClient",
    "TagsPage",
    "UpstreamObserver",
]

CHUNK_SIZE: Final = 1024 * 1024
#: What registries without the referrers API answer it: Distribution 2.x 404, Quay 400, others
#: 405 or 406. Not 401 or 403: those may be the cache's own credentials, refused.
NO_REFERRERS_API: Final = frozenset({400, 404, 405, 406})
#: A tag or referrers list, whole: gcr.io lists every digest of a repository in one answer, with
#: its tags and times (some 290 bytes a digest), past the 4 MiB a manifest may take. Bounded
#: still: anyone may push a repository with a million tags, and ask for its list many times.
MAX_LISTING_BYTES: Final = 8 * 1024 * 1024
#: Connections beyond ``max_concurrent_fills`` for everything that is no blob body: manifests,
#: HEADs, listings (and the token fetches they lead to). As many such requests are in flight at
#: once, the rest wait their turn here, never in httpcore's pool: there, each waiting request cost
#: CPU at every pool event (60 % of the daemon's under a burst of 1,000), and one whose pool
#: timeout ran out while it was handed a new connection left that connection stuck for good
#: (encode/httpcore#1093): after a burst of 2,000 HEADs every connection was, and every pull of
#: something not cached failed until a restart.
OTHER_CONNECTIONS: Final = 32
#: A 404's body is read for what it says up to this size; a larger one is no error body.
MAX_ERROR_BODY_BYTES: Final = 4096
log = logging.getLogger("moorage.upstreams")


class FailureReport(TypedDict):
    at: str
    error: str


class UpstreamHealth(TypedDict):
    #: None until the upstream was asked anything.
    reachable: bool | None
    last_answer: str | None
    last_failure: FailureReport | None


def _failure_kind(error: UpstreamError) -> str:
    """What went wrong, for the unauthenticated ``/readyz``: the kind and status only, never
    the repository or tag the failed request named."""
    if isinstance(error, UpstreamRateLimited):
        return "rate limited (HTTP 429)"
    if isinstance(error, UpstreamAuthFailed):
        return f"credentials refused (HTTP {error.status})"
    if isinstance(error, UpstreamUnavailable) and error.status is not None:
        return f"HTTP {error.status}"
    return "no answer (a network error or a timeout)"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


class _Moment(NamedTuple):
    """A time to show (``wall``) and to order by (``monotonic``)."""

    wall: float
    monotonic: float

    @classmethod
    def now(cls) -> _Moment:
        return cls(time.time(), time.monotonic())


USER_AGENT: Final = "moorage/0.1"
RequestKind = Literal["manifest", "blob", "tags", "referrers", "token", "other"]


class UpstreamObserver(Protocol):
    """What the client reports as it works; proxy turns it into metrics."""

    def on_response(self, upstream: str, method: str, kind: RequestKind, status: int, seconds: float) -> None: ...
    def on_no_response(self, upstream: str, method: str, kind: RequestKind) -> None:
        """A request that got no answer: refused, reset, timed out."""

    def on_token_fetch(self, upstream: str) -> None: ...
    def on_token_rate_limited(self, upstream: str) -> None:
        """The upstream's token service answered 429 (auth.docker.io limits there too)."""

    def on_retry(self, upstream: str, error: UpstreamError) -> None: ...
    def on_ratelimit(self, upstream: str, state: RateLimitState) -> None: ...


class NullObserver:
    def on_response(self, upstream: str, method: str, kind: RequestKind, status: int, seconds: float) -> None:
        pass

    def on_no_response(self, upstream: str, method: str, kind: RequestKind) -> None:
        pass

    def on_token_fetch(self, upstream: str) -> None:
        pass

    def on_token_rate_limited(self, upstream: str) -> None:
        pass

    def on_retry(self, upstream: str, error: UpstreamError) -> None:
        pass

    def on_ratelimit(self, upstream: str, state: RateLimitState) -> None:
        pass


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    body: bytes
    media_type: str
    #: What the upstream's Docker-Content-Digest header claimed, if it sent a valid one.
    claimed_digest: Digest | None


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: Digest | None
    media_type: str | None
    size: int | None


class BlobBody:
    """An upstream blob answer whose body is being read."""

    def __init__(self, upstream: str, response: httpx.Response, offset: int, size: int | None) -> None:
        self._upstream = upstream
        self._response = response
        #: Position in the blob of the first byte ``chunks()`` yields.
        self.offset = offset
        #: Size of the whole blob, when the upstream said.
        self.size = size

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives off the socket (no re-chunking, no decoding: blobs are asked
        for with ``Accept-Encoding: identity``, so these are the digest's bytes). What h11
        buffered with the head comes through httpx, the rest straight from the connection
        where that is possible (``_body``)."""
        direct = DirectBody.of(self._response)
        timeout = self._response.request.extensions.get("timeout", {}).get("read")
        with mapped_errors(self._upstream, "blob body"):
            async for chunk in self._response.aiter_raw():
                yield chunk
                if direct is not None:
                    async for rest in direct.rest(timeout):
                        yield rest


def _media_type(headers: Mapping[str, str]) -> str | None:
    value = headers.get("content-type")
    if not value:
        return None
    value = value.split(";", 1)[0].strip()
    return value if value not in ("application/json", "text/plain", "application/octet-stream") else None


def _claimed_digest(headers: Mapping[str, str]) -> Digest | None:
    value = headers.get("docker-content-digest")
    if not value:
        return None
    try:
        return parse_digest(value.strip())
    except InvalidReference:
        return None


def _etag_digest(headers: Mapping[str, str]) -> Digest | None:
    """A strong ETag that is a digest (``"sha256:…"``, as Distribution, Quay and Harbor send):
    the manifest's digest from an upstream whose HEAD leaves out Docker-Content-Digest."""
    value = headers.get("etag", "").strip()
    if len(value) < 2 or not (value[0] == value[-1] == '"'):
        return None
    try:
        return parse_digest(value[1:-1])
    except InvalidReference:
        return None


def _to_plain_http(url: httpx.URL, response: httpx.Response) -> bool:
    try:
        return url.join(response.headers.get("location", "")).scheme == "http"
    except httpx.InvalidURL:  # httpx refuses it itself when it follows
        return False


_KIND_MARKERS: Final[tuple[tuple[str, RequestKind], ...]] = (
    ("/manifests/", "manifest"),
    ("/blobs/", "blob"),
    ("/tags/", "tags"),
    ("/referrers/", "referrers"),
)


def _kind(path: str) -> RequestKind:
    """What a request asks for, by the last marker in its path: a repository may have a
    component named ``manifests`` or ``blobs`` (``team/manifests/app``), the route's own comes after."""
    found, kind = max((path.rfind(marker), kind) for marker, kind in _KIND_MARKERS)
    return kind if found >= 0 else "other"


class RegistryClient:
    """Pull-side calls to one upstream registry."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        password: str | None = None,
        observer: UpstreamObserver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        trust: ssl.SSLContext | None = None,
        proxies: ProxyEnvironment | None = None,
    ) -> None:
        """``transport`` replaces the network (tests); ``proxies`` are the outbound proxies,
        by default as the environment names them."""
        self.settings = settings
        if trust is None:
            trust = trust_for(None, settings)
        self.host = settings.host
        self._observer: UpstreamObserver = observer or NullObserver()
        timeout = httpx.Timeout(
            connect=settings.timeouts.connect,
            read=settings.timeouts.read,
            write=settings.timeouts.write,
            pool=settings.timeouts.pool,
        )
        # Blob bodies take at most max_concurrent_fills connections, everything else at most
        # OTHER_CONNECTIONS: no request ever waits for a connection in the pool.
        self._fill_slots = asyncio.Semaphore(settings.max_concurrent_fills)
        self._other_slots = asyncio.Semaphore(OTHER_CONNECTIONS)
        limits = httpx.Limits(
            max_connections=settings.max_concurrent_fills + OTHER_CONNECTIONS,
            max_keepalive_connections=32,
            keepalive_expiry=30,
        )
        common = {
            "timeout": timeout,
            "limits": limits,
            "headers": {"User-Agent": USER_AGENT},
            "transport": transport,
            "verify": trust,
        }
        token_transport = transport
        if transport is None:
            environment = proxies or ProxyEnvironment.read()
            # Blob bodies come through this client: its reads ask for 1 MiB (``_network``), on
            # every connection that goes straight to its host (not through a proxy).
            common["transport"] = routed_transport(wide_read_transport(limits, trust), limits, trust, environment)
            token_transport = routed_transport(
                httpx.AsyncHTTPTransport(verify=trust, limits=limits), limits, trust, environment
            )
        self._http = httpx.AsyncClient(
            base_url=settings.url,
            follow_redirects=True,
            event_hooks={"response": [self._observe_response]},
            **common,  # type: ignore[arg-type]
        )
        common["transport"] = token_transport
        self._token_http = httpx.AsyncClient(
            follow_redirects=True,
            event_hooks={"response": [self._observe_token_response, self._refuse_downgrade]},
            **common,  # type: ignore[arg-type]
        )
        credentials = (settings.username, password) if settings.username and password is not None else None
        self._auth = RegistryAuth(
            self.host,
            httpx.URL(settings.url),
            self._token_http,
            credentials,
            on_token_fetch=lambda: self._observer.on_token_fetch(self.host),
            password_file=settings.password_file,
        )
        self._attempts = settings.retries.attempts
        self._max_wait = settings.retries.max_wait
        #: When the upstream last answered, and last failed (with how): wall-clock times to
        #: show, compared by the monotonic ones (a clock stepped back leaves their order).
        self._last_answer: _Moment | None = None
        self._last_failure: tuple[_Moment, str] | None = None

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._token_http.aclose()

    def health(self) -> UpstreamHealth:
        """When the upstream last answered, and the last failure (no probing: observed only)."""
        health: UpstreamHealth = {"reachable": None, "last_answer": None, "last_failure": None}
        if self._last_answer is not None:
            health["last_answer"] = _iso(self._last_answer.wall)
        if self._last_failure is not None:
            health["last_failure"] = {"at": _iso(self._last_failure[0].wall), "error": self._last_failure[1]}
        if self._last_answer is not None or self._last_failure is not None:
            health["reachable"] = self._last_failure is None or (
                self._last_answer is not None and self._last_answer.monotonic > self._last_failure[0].monotonic
            )
        return health

    async def _observe_response(self, response: httpx.Response) -> None:
        request = response.request
        started = request.extensions.get("moorage_started")
        elapsed = time.monotonic() - started if isinstance(started, float) else 0.0
        self._observer.on_response(self.host, request.method, _kind(request.url.path), response.status_code, elapsed)
        state = parse_ratelimit(response.headers)
        if state is not None:
            self._observer.on_ratelimit(self.host, state)
        await self._refuse_downgrade(response)

    async def _observe_token_response(self, response: httpx.Response) -> None:
        if response.status_code == 429:
            self._observer.on_token_rate_limited(self.host)

    async def _refuse_downgrade(self, response: httpx.Response) -> None:
        """A redirect from https to plain http is not followed: a signed URL, a tag's manifest
        (no digest vouches for it) or a token would cross the network in clear text."""
        request = response.request
        if response.is_redirect and request.url.scheme == "https" and _to_plain_http(request.url, response):
            what = _kind(request.url.path)
            raise UpstreamProtocolError(
                self.host,
                f"{'a' if what == 'other' else what} request redirected from https to plain http: not followed",
            )

    # -- retries -----------------------------------------------------------------------------

    def _retryable(self, error: BaseException) -> bool:
        if isinstance(error, UpstreamRateLimited):
            if error.budget_spent and error.retry_after is None:
                return False  # the window is hours long: asking again only adds to the count
            return error.retry_after is None or error.retry_after <= self._max_wait
        return isinstance(error, UpstreamUnavailable) and not error.lasting

    def _retryable_but_429(self, error: BaseException) -> bool:
        return self._retryable(error) and not isinstance(error, UpstreamRateLimited)

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, UpstreamRateLimited):
            if error.retry_after is not None:
                return float(error.retry_after)
            # A limit per second or so (public.ecr.aws allows anonymous clients one request a
            # second, and a cache puts a fleet behind one address): a wait of 0.1 s, then
            # 0.2 s, spent every attempt within the same second.
            return min(self._max_wait, 2.0 ** (state.attempt_number - 1) * random.uniform(1.0, 1.5))
        backoff: float = min(self._max_wait, 0.2 * 2.0 ** (state.attempt_number - 1))
        return backoff * random.uniform(0.5, 1.0)

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, UpstreamError):
            self._observer.on_retry(self.host, error)

    async def _send(
        self,
        method: str,
        path: str,
        what: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        answers: frozenset[int] = frozenset(),
        wait_out_429: bool = True,
    ) -> httpx.Response:
        """One answer below 400, or of a status in ``answers``, after retries (of a 429 too,
        unless ``wait_out_429`` is False); a streamed answer is the caller's to close."""
        response, _ = await self._exchange(
            method, path, what, headers, params, stream, answers, read=False, wait_out_429=wait_out_429
        )
        return response

    async def _send_small(
        self,
        path: str,
        what: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        answers: frozenset[int] = frozenset(),
        limit: int = MAX_MANIFEST_BYTES,
    ) -> tuple[httpx.Response, bytes]:
        """A GET as ``_send``, with its small body (a manifest; a tag or referrers list, up to
        ``limit`` bytes) read within each attempt: a body cut mid-way is tried again like a
        request that failed, where it had failed the pull at once."""
        response, body = await self._exchange("GET", path, what, headers, params, True, answers, read=True, limit=limit)
        assert body is not None
        return response, body

    async def _exchange(
        self,
        method: str,
        path: str,
        what: str,
        headers: dict[str, str] | None,
        params: dict[str, str] | None,
        stream: bool,
        answers: frozenset[int],
        *,
        read: bool,
        limit: int = MAX_MANIFEST_BYTES,
        wait_out_429: bool = True,
    ) -> tuple[httpx.Response, bytes | None]:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=self._wait,
            retry=retry_if_exception(self._retryable if wait_out_429 else self._retryable_but_429),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        # A streamed answer left open to the caller is a blob's: the caller holds its slot.
        slots: asyncio.Semaphore | nullcontext[None] = self._other_slots if read or not stream else nullcontext()
        try:
            async for attempt in retrying:
                with attempt:
                    async with slots:
                        return await self._attempt(method, path, what, headers, params, stream, answers, read, limit)
        except (UpstreamUnavailable, UpstreamRateLimited, UpstreamAuthFailed) as error:
            if not isinstance(error, UpstreamRefused):  # a repository refused is an answer
                self._last_failure = (_Moment.now(), _failure_kind(error))
            raise
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _attempt(
        self,
        method: str,
        path: str,
        what: str,
        headers: dict[str, str] | None,
        params: dict[str, str] | None,
        stream: bool,
        answers: frozenset[int],
        read: bool,
        limit: int,
    ) -> tuple[httpx.Response, bytes | None]:
        """One try of ``_exchange``."""
        with mapped_errors(self.host, what, origin=self._http.base_url.host):
            request = self._http.build_request(method, path, headers=headers, params=params)
            request.extensions["moorage_started"] = time.monotonic()
            try:
                response = await self._http.send(request, auth=self._auth, stream=stream)
            except httpx.TransportError:  # an outage shows in the request counts too
                self._observer.on_no_response(self.host, method, _kind(path))
                raise
        if response.status_code >= 400 and response.status_code not in answers:
            said = await self._not_found_says(response) if response.status_code == 404 else None
            await response.aclose()
            if response.status_code in (401, 403, 404, 405):  # an answer: the upstream is up
                self._last_answer = _Moment.now()
            raise_for_status(self.host, what, response, said)
        self._last_answer = _Moment.now()
        if not read:
            return response, None
        try:
            return response, await self._read_bounded(response, what, limit)
        finally:
            await response.aclose()

    # -- the pull API --------------------------------------------------------------------------

    async def get_manifest(
        self, repository: RepositoryName, reference: Reference, accept: AcceptClass
    ) -> FetchedManifest:
        what = (
            f"manifest {repository}:{reference}"
            if not isinstance(reference, Digest)
            else f"manifest {repository}@{reference}"
        )
        response, data = await self._send_small(
            f"/v2/{repository}/manifests/{reference}", what, headers=self._accept(accept)
        )
        media_type = _media_type(response.headers) or sniff_media_type(data)
        if media_type in SCHEMA1_MEDIA_TYPES:
            # Its digest is over the payload without its signatures, so it would read as
            # corrupt; and current clients (Docker 28, containerd 2) no longer pull schema 1.
            raise UpstreamNotFound(
                self.host, f"{what}: the upstream has only a schema 1 manifest, which this cache does not serve"
            )
        return FetchedManifest(data, media_type, _claimed_digest(response.headers))

    async def _not_found_says(self, response: httpx.Response) -> str | None:
        """What a 404's error body says, for the client's error: Distribution answers a client
        that takes no index, for a tag that holds one, "OCI index found, but accept header does
        not support OCI indexes", where the cache had said only "not found". None for a body
        that says nothing readable, or is larger than an error body is."""
        if response.request.method != "GET":
            return None
        try:
            return error_message(await self._read_bounded(response, "error body", MAX_ERROR_BODY_BYTES))
        except UpstreamError:
            return None

    async def _read_bounded(self, response: httpx.Response, what: str, limit: int) -> bytes:
        """A small body (manifest, tag list), refused above ``limit`` bytes."""
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ManifestTooLarge(self.host, f"{what}: {declared} bytes, above the {limit} limit")
        body = bytearray()
        with mapped_errors(self.host, what):
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise ManifestTooLarge(self.host, f"{what}: above the {limit} byte limit")
        return bytes(body)

    async def head_manifest(
        self, repository: RepositoryName, reference: Reference, accept: AcceptClass, *, wait_out_429: bool = True
    ) -> ManifestHead:
        """The manifest's digest, media type and size from a HEAD. ``wait_out_429`` False: a 429
        is raised at once, not retried (a caller with a stale answer on hand serves it)."""
        response = await self._send(
            "HEAD",
            f"/v2/{repository}/manifests/{reference}",
            f"manifest {repository}:{reference}",
            headers=self._accept(accept),
            wait_out_429=wait_out_429,
        )
        length = response.headers.get("content-length")
        return ManifestHead(
            _claimed_digest(response.headers) or _etag_digest(response.headers),
            _media_type(response.headers),
            int(length) if length and length.isdigit() else None,
        )

    async def head_blob(self, repository: RepositoryName, digest: Digest) -> int:
        """The blob's size, from a HEAD; from a GET of its first byte where the HEAD is
        refused (an upstream that takes only GET, a URL signed for GET alone) or tells no size
        (no Content-Length, as some front ends strip it from HEAD answers; 0 for a blob that is
        not empty; a compressed size)."""
        what = f"blob {repository}@{digest}"
        empty = Digest.of(b"", digest.algorithm)
        try:
            response = await self._send(
                "HEAD", f"/v2/{repository}/blobs/{digest}", what, headers={"Accept-Encoding": "identity"}
            )
            length = response.headers.get("content-length", "")
            if response.headers.get("content-encoding", "identity").lower() != "identity":
                length = ""  # the size of a compressed body, not the blob's
        except HeadRefused:  # an upstream that takes only GET, a redirect's URL signed for GET alone
            length = ""
        if not length.isdigit() or (int(length) == 0 and digest != empty):
            length = await self._blob_size_by_get(repository, digest, what)
        if not length.isdigit():
            raise UpstreamProtocolError(self.host, f"{what}: its answer told no size")
        if int(length) == 0 and digest != empty:
            # Only the empty blob is empty; containerd takes a size of 0 for a broken registry.
            raise UpstreamProtocolError(self.host, f"{what}: a length of 0 for a blob that is not empty")
        return int(length)

    async def _blob_size_by_get(self, repository: RepositoryName, digest: Digest, what: str) -> str:
        """A blob's size as a GET of its first byte tells it (the body is not read)."""
        headers = {"Range": "bytes=0-0", "Accept-Encoding": "identity"}
        async with self._other_slots:  # a streamed answer, closed unread: its slot is held here
            response = await self._send("GET", f"/v2/{repository}/blobs/{digest}", what, headers=headers, stream=True)
            await response.aclose()
        if response.status_code == 206:
            return str(response.headers.get("content-range", "")).rpartition("/")[2]
        return str(response.headers.get("content-length", ""))

    @asynccontextmanager
    async def open_blob(self, repository: RepositoryName, digest: Digest, offset: int = 0) -> AsyncIterator[BlobBody]:
        """The blob's body from ``offset`` (a Range request), or from 0 when the upstream ignores Range."""
        what = f"blob {repository}@{digest}"
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        # A body waits its turn for a slot rather than failing on a pool timeout.
        async with self._fill_slots, self._open_blob(what, repository, digest, headers, offset) as body:
            yield body

    @asynccontextmanager
    async def _open_blob(
        self, what: str, repository: RepositoryName, digest: Digest, headers: dict[str, str], offset: int
    ) -> AsyncIterator[BlobBody]:
        path = f"/v2/{repository}/blobs/{digest}"
        response = await self._send("GET", path, what, headers=headers, stream=True)
        try:
            start, size = 0, None
            length = response.headers.get("content-length")
            if response.status_code == 206:
                start, size = self._content_range(what, response.headers.get("content-range", ""))
                if start != offset:
                    raise UpstreamProtocolError(self.host, f"{what}: asked for bytes from {offset}, got from {start}")
            elif length and length.isdigit():
                size = int(length)
            yield BlobBody(self.host, response, start, size)
        finally:
            await response.aclose()

    def _content_range(self, what: str, value: str) -> tuple[int, int | None]:
        try:
            _, _, spec = value.partition(" ")
            span, _, total = spec.partition("/")
            start = int(span.split("-", 1)[0])
            return start, (int(total) if total.isdigit() else None)
        except ValueError:
            raise UpstreamProtocolError(self.host, f"{what}: unreadable Content-Range {value!r}") from None

    async def list_tags(self, repository: RepositoryName, query: str) -> TagsPage:
        """The tag list of ``repository``; ``query`` as ``reference.page_query`` writes it
        ("": the whole list), passed on as it is (``n``, ``last``, or a token the upstream
        gave in its own next-page link)."""
        what = f"tags of {repository}"
        response, body = await self._send_small(
            f"/v2/{repository}/tags/list",
            what,
            params=dict(parse_qsl(query, keep_blank_values=True)),
            limit=MAX_LISTING_BYTES,
        )
        # A list may be megabytes (gcr.io's), and a whole one is parsed to be sorted: off the loop.
        page = await asyncio.to_thread(tags_page, body, response.headers.get("link", ""), query)
        if page.next_dropped:
            log.warning(
                "the upstream's next page of tags is not offered: its query is out of bounds",
                extra={"event": "tags_page_dropped", "upstream": self.host, "repository": str(repository)},
            )
        return page

    async def list_referrers(self, repository: RepositoryName, digest: Digest, query: str) -> ReferrersPage:
        """The referrers of ``digest``; ``query`` as ``reference.page_query`` writes it ("": the
        whole list). An upstream with no referrers API (it answers one of ``NO_REFERRERS_API``,
        or with something that is no image index) raises :class:`NoReferrersApi`."""
        what = f"referrers of {repository}@{digest}"
        response, body = await self._send_small(
            f"/v2/{repository}/referrers/{digest}",
            what,
            headers={"Accept": OCI_IMAGE_INDEX},
            params=dict(parse_qsl(query)),
            answers=NO_REFERRERS_API,
            limit=MAX_LISTING_BYTES,
        )
        if response.status_code in NO_REFERRERS_API:
            # A registry with the API says NAME_UNKNOWN for a repository it does not hold:
            # that is no word on the API (oras-go takes it so too).
            if response.status_code == 404 and "NAME_UNKNOWN" in error_codes(body):
                raise UpstreamNotFound(self.host, f"{what}: no such repository")
            raise NoReferrersApi(self.host, f"{what}: HTTP {response.status_code}")
        filtered = "artifacttype" in response.headers.get("oci-filters-applied", "").lower()
        page = referrers_page(body, response.headers.get("link", ""), query, filtered)
        if page is None:
            raise NoReferrersApi(self.host, f"{what}: the answer is not an image index")
        if page.next_dropped:
            log.warning(
                "the upstream's next page of referrers is not offered: its query is out of bounds",
                extra={
                    "event": "referrers_page_dropped",
                    "upstream": self.host,
                    "repository": str(repository),
                    "digest": str(digest),
                },
            )
        return page

    @staticmethod
    def _accept(accept: AcceptClass) -> dict[str, str]:
        return {"Accept": ACCEPT_ALL_MANIFESTS if accept == "index" else ACCEPT_IMAGE_MANIFESTS}
