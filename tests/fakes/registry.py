"""A fake OCI registry upstream (and its CDN) on a real loopback socket.

For wire-fault tests. A real registry cannot be told to answer 429 to the next request,
to cut a layer after 1,000 bytes, to stall half-way, to serve wrong bytes, or to vanish
and come back on the same port. `FakeRegistry` can. It is an in-process aiohttp
server bound to ``127.0.0.1:0`` that speaks the pull side of the OCI distribution API
(``/v2/``, manifests, blobs, tags, referrers) well enough for Moorage's upstream
client, and records every request it receives, so a test can assert how often upstream
was hit ("fetch once" tests count with `count()`).

`FakeCDN` is a second small server that serves the registry's blobs behind a 307
redirect, reached by the host name ``localhost`` (the registry is ``127.0.0.1``), so a
client that carries ``Authorization`` across hosts is caught: the CDN answers such a
request with 400.

Typical use::

    async with FakeRegistry(auth="bearer") as reg:
        layer = reg.add_blob(b"layer bytes")
        config = reg.add_blob(b"{}")
        body = image_manifest(config, 2, [(layer, 11)])
        reg.add_manifest("library/alpine", "3.19", body, DOCKER_MANIFEST_V2)
        reg.fail_next(1, 429, retry_after=2)
        ...  # drive the code under test against reg.url
        assert reg.count("GET", "/blobs/") == 1

Every knob is a plain attribute (or a method that arms a fault) and may be changed
between requests. Every request, including token, CDN, HEAD, 401, 307 and faulted ones,
is appended to ``requests`` before any fault is applied.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import secrets
import ssl
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, Self

from aiohttp import web

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "DOCKER_MANIFEST_LIST",
    "DOCKER_MANIFEST_V2",
    "INDEX_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_MANIFEST",
    "FakeCDN",
    "FakeImage",
    "FakeRegistry",
    "RecordedRequest",
    "digest_of",
    "image_manifest",
    "index_manifest",
]

DOCKER_MANIFEST_V2: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER: Final = "application/vnd.oci.image.layer.v1.tar+gzip"

INDEX_MEDIA_TYPES: Final = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
MANIFEST_MEDIA_TYPES: Final = frozenset({DOCKER_MANIFEST_V2, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX})

REGISTRY_SERVICE: Final = "fake-registry"
# Seconds a token lives when the answer has no expires_in, as the token spec says.
DEFAULT_TOKEN_LIFETIME: Final = 60

_DIGEST_RE: Final = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_REPO_ROUTE_RE: Final = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs|tags|referrers)/(?P<ref>[^/]+)$")
_CDN_ROUTE_RE: Final = re.compile(r"^/blobs/(?P<digest>[^/]+)$")
_RANGE_RE: Final = re.compile(r"^bytes=(\d*)-(\d*)$")
_DEFAULT_FAULT_PATHS: Final = r"^/v2/.+/"
_BODY_CHUNK: Final = 64 * 1024

Descriptor = tuple[str, int]  # (digest, size)


# --- content helpers


def digest_of(data: bytes, algorithm: Literal["sha256", "sha512"] = "sha256") -> str:
    """The OCI digest (``algorithm:hex``) of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=3).encode()


def image_manifest(
    config_digest: str,
    config_size: int,
    layers: Sequence[Descriptor],
    media_type: str = DOCKER_MANIFEST_V2,
    *,
    subject: tuple[str, int, str] | None = None,
    artifact_type: str | None = None,
    annotations: dict[str, str] | None = None,
) -> bytes:
    """Bytes of an image manifest (Docker v2 schema 2 or OCI, by ``media_type``).

    Layer and config media types follow the manifest flavour. ``subject`` is
    ``(digest, size, media_type)``; it and ``artifact_type`` only make sense for OCI.
    """
    docker = media_type == DOCKER_MANIFEST_V2
    if not docker and media_type != OCI_MANIFEST:
        raise ValueError(f"media_type {media_type!r} is not an image manifest type")
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
    }
    if artifact_type is not None:
        document["artifactType"] = artifact_type
    document["config"] = {
        "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
        "size": config_size,
        "digest": config_digest,
    }
    document["layers"] = [
        {
            "mediaType": DOCKER_LAYER if docker else OCI_LAYER,
            "size": size,
            "digest": digest,
        }
        for digest, size in layers
    ]
    if subject is not None:
        s_digest, s_size, s_type = subject
        document["subject"] = {"mediaType": s_type, "size": s_size, "digest": s_digest}
    if annotations:
        document["annotations"] = dict(annotations)
    return _dump(document)


def index_manifest(
    entries: Sequence[tuple[str, int, str, str, str]],
    media_type: str = DOCKER_MANIFEST_LIST,
) -> bytes:
    """Bytes of a manifest list / image index.

    Each entry is ``(digest, size, media_type, os, architecture)``; an architecture
    written ``arm64/v8`` becomes ``architecture: arm64, variant: v8``.
    """
    if media_type not in INDEX_MEDIA_TYPES:
        raise ValueError(f"media_type {media_type!r} is not an index type")
    manifests: list[dict[str, Any]] = []
    for digest, size, entry_type, os_name, arch in entries:
        architecture, _, variant = arch.partition("/")
        platform: dict[str, str] = {"architecture": architecture, "os": os_name}
        if variant:
            platform["variant"] = variant
        manifests.append(
            {
                "mediaType": entry_type,
                "size": size,
                "digest": digest,
                "platform": platform,
            }
        )
    return _dump({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests})


@dataclass(frozen=True)
class FakeImage:
    """What `FakeRegistry.add_image` stored: the manifest and the blobs it points to."""

    digest: str
    manifest: bytes
    media_type: str
    config_digest: str
    layer_digests: tuple[str, ...]


# --- request log


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it, before any fault was applied.

    ``query`` keeps the first value of each parameter (``query_string`` has them all);
    ``headers`` has lower-case names, repeated headers joined with ``", "``.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    host: str
    query_string: str = ""
    body: bytes = b""
    at: float = field(default_factory=time.monotonic)
    #: The client's ``address:port``: one per connection, so kept-alive reuse shows.
    peer: str = ""


@dataclass
class _Rule:
    remaining: int
    pattern: re.Pattern[str]
    methods: frozenset[str] | None
    status: int | None
    retry_after: int | None
    delay: float
    code: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return self.pattern.search(path) is not None


@dataclass
class _Cut:
    after: int
    remaining: int


@dataclass
class _Stall:
    after: int
    seconds: float | None
    remaining: int | None


@dataclass
class _Slow:
    chunk: int
    delay: float
    remaining: int | None


@dataclass
class _Token:
    repositories: dict[str, frozenset[str]]
    expires_at: float


@dataclass
class _BodyPlan:
    """How one blob body is to be sent, after the armed faults were consumed."""

    cut_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float | None = None
    chunk: int = _BODY_CHUNK
    delay: float = 0.0
    corrupt: bool = False


def _oci_error(
    status: int,
    code: str,
    message: str,
    *,
    detail: object = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": detail}]}
    return web.json_response(body, status=status, headers=headers)


def _default_code(status: int) -> str:
    return {
        400: "UNSUPPORTED",
        401: "UNAUTHORIZED",
        403: "DENIED",
        404: "NAME_UNKNOWN",
        429: "TOOMANYREQUESTS",
    }.get(status, "UNKNOWN")


async def _half_then_cut(request: web.Request, answer: web.Response) -> web.StreamResponse:
    """``answer``'s head and half its body, then the connection closed."""
    body = bytes(answer.body) if isinstance(answer.body, bytes) else b""
    cut = web.StreamResponse(status=answer.status, headers=answer.headers)
    await cut.prepare(request)
    await cut.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.abort()
    return cut


def _peer(request: web.Request) -> str:
    address = request.transport.get_extra_info("peername") if request.transport else None
    return f"{address[0]}:{address[1]}" if address else ""


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(first, last)`` inclusive, or None to ignore the header.

    Raises LookupError when the range cannot be satisfied (416).
    """
    match = _RANGE_RE.match(header.strip())
    if match is None:
        return None  # multiple ranges or another unit: answer the whole body
    first_s, last_s = match.groups()
    if not first_s and not last_s:
        return None
    if not first_s:  # suffix range: the last N bytes
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise LookupError(header)
        return max(0, size - suffix), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        raise LookupError(header)
    return first, min(last, size - 1)


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value.strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


# --- server base


class _RecordingServer:
    """Lifecycle, request log and request faults shared by the registry and the CDN."""

    #: Host name put into ``url``; the listening address is always 127.0.0.1.
    url_host: str = "127.0.0.1"
    #: Extra addresses to listen on with the same port when possible.
    extra_bind_hosts: tuple[str, ...] = ()
    #: Regex of the paths `fail_next` and `delay_next` match by default.
    default_fault_paths: str = r".*"

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.down: bool = False
        #: Serve HTTPS with this context (set before `start`); None: plain HTTP.
        self.ssl_context: ssl.SSLContext | None = None
        self._rules: list[_Rule] = []
        self._runner: web.AppRunner | None = None
        self._sites: list[web.TCPSite] = []
        self._port: int | None = None
        self._closing = asyncio.Event()
        self._released = asyncio.Event()

    # -- lifecycle

    async def start(self) -> None:
        """Bind ``127.0.0.1:0`` and serve until `close`."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._entry)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen()

    async def close(self) -> None:
        """Stop listening, wake stalled responses and drop every connection."""
        self._closing.set()
        runner, self._runner = self._runner, None
        self._sites = []
        if runner is not None:
            await runner.cleanup()

    async def stop_listening(self) -> None:
        """Close the port and every open connection: new connects are refused."""
        if self._runner is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        for site in self._sites:
            await site.stop()
        self._sites = []
        server = self._runner.server
        if server is not None:
            for handler in server.connections:
                handler.force_close()

    async def resume(self) -> None:
        """Listen again on the same port after `stop_listening`."""
        if self._runner is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        if not self._sites:
            await self._listen()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, "127.0.0.1", self._port or 0, ssl_context=self.ssl_context)
        await site.start()
        self._sites = [site]
        self._port = site.port
        for host in self.extra_bind_hosts:
            extra = web.TCPSite(self._runner, host, self._port, ssl_context=self.ssl_context)
            try:
                await extra.start()
            except OSError:  # no such address family here: 127.0.0.1 is enough
                await extra.stop()
                continue
            self._sites.append(extra)

    # -- addresses

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def host(self) -> str:
        """``host:port`` as a client writes it in an image reference."""
        return f"{self.url_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context is not None else 'http'}://{self.host}"

    # -- request log

    def count(self, method: str | None = None, path: str | re.Pattern[str] = "") -> int:
        """Requests with ``method`` (None or ``"*"``: any) whose path matches ``path``.

        A plain string matches as a substring; a compiled pattern with ``search``.
        """
        total = 0
        for recorded in self.requests:
            if method not in (None, "*") and recorded.method != method:
                continue
            if isinstance(path, re.Pattern):
                if path.search(recorded.path) is None:
                    continue
            elif path not in recorded.path:
                continue
            total += 1
        return total

    def reset_requests(self) -> None:
        self.requests.clear()

    # -- request-level faults

    def fail_next(
        self,
        n: int,
        status: int,
        *,
        retry_after: int | None = None,
        paths: str | None = None,
        methods: Collection[str] | None = None,
        code: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` and an OCI error.

        ``paths`` is a regex searched in the path (default: `default_fault_paths`);
        ``methods`` limits the methods. The error code is TOOMANYREQUESTS for 429,
        UNKNOWN for 5xx, or ``code``. Faults are checked before authentication, in the
        order they were armed; one request consumes at most one of them.
        """
        self._add_rule(
            n,
            status=status,
            retry_after=retry_after,
            paths=paths,
            methods=methods,
            delay=0.0,
            code=code,
        )

    def delay_next(
        self,
        n: int,
        seconds: float,
        *,
        paths: str | None = None,
        methods: Collection[str] | None = None,
    ) -> None:
        """Wait ``seconds`` before answering the next ``n`` matching requests."""
        self._add_rule(
            n,
            status=None,
            retry_after=None,
            paths=paths,
            methods=methods,
            delay=seconds,
            code=None,
        )

    def clear_faults(self) -> None:
        self._rules.clear()

    def _add_rule(
        self,
        n: int,
        *,
        status: int | None,
        retry_after: int | None,
        paths: str | None,
        methods: Collection[str] | None,
        delay: float,
        code: str | None,
    ) -> None:
        self._rules.append(
            _Rule(
                remaining=n,
                pattern=re.compile(paths if paths is not None else self.default_fault_paths),
                methods=frozenset(m.upper() for m in methods) if methods is not None else None,
                status=status,
                retry_after=retry_after,
                delay=delay,
                code=code,
            )
        )

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        body = await request.read() if request.can_read_body else b""
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query={key: request.query.getone(key) for key in request.query},
                headers=headers,
                host=request.host,
                query_string=request.query_string,
                body=body,
                peer=_peer(request),
            )
        )
        if self.down:
            return self._drop(request)
        for rule in self._rules:
            if rule.matches(request.method, request.path):
                rule.remaining -= 1
                if rule.delay and await self._pause(rule.delay):
                    return self._drop(request)
                if rule.status is not None:
                    return self._rule_response(rule)
                break
        self._rules = [rule for rule in self._rules if rule.remaining > 0]
        return await self._handle(request)

    @staticmethod
    def _rule_response(rule: _Rule) -> web.Response:
        assert rule.status is not None
        headers: dict[str, str] = {}
        if rule.retry_after is not None:
            headers["Retry-After"] = str(rule.retry_after)
        code = rule.code or _default_code(rule.status)
        return _oci_error(rule.status, code, f"injected fault {rule.status}", headers=headers)

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        """Close the connection without a response.

        aiohttp's attempt to send the returned response then fails quietly.
        """
        if request.transport is not None:
            request.transport.abort()
        return web.Response()

    def release_stalls(self) -> None:
        """Let every body stalled for good (``seconds=None``) go on now."""
        self._released.set()
        self._released = asyncio.Event()

    async def _pause(self, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None: until `release_stalls` or `close`); True if the server closed."""
        if seconds is None:
            waits = [asyncio.ensure_future(event.wait()) for event in (self._closing, self._released)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            return self._closing.is_set()
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    # -- blob bodies (shared by the registry and the CDN)

    async def _serve_blob(
        self,
        request: web.Request,
        registry: FakeRegistry,
        digest: str,
        data: bytes,
        *,
        support_ranges: bool,
    ) -> web.StreamResponse:
        size = len(data)
        headers = {
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": digest,
            "ETag": f'"{digest}"',
        }
        if support_ranges:
            headers["Accept-Ranges"] = "bytes"
        first, last = 0, size - 1
        status = 200
        range_header = request.headers.get("Range")
        if support_ranges and range_header is not None:
            try:
                wanted = _parse_range(range_header, size)
            except LookupError:
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            if wanted is not None:
                first, last = wanted
                status = 206
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        length = last - first + 1 if size else 0
        if request.method == "HEAD":
            return web.Response(status=status, headers={**headers, "Content-Length": str(length)})

        plan = registry._consume_body_faults(digest)
        payload = data
        if plan.corrupt and payload:
            payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
        body = memoryview(payload)[first : first + length]

        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        try:
            await response.prepare(request)
            outcome = await self._write_body(response, body, plan)
            if outcome == "done":
                await response.write_eof()
            elif request.transport is not None and outcome == "cut":
                request.transport.close()  # flushes what was written, then FIN
            elif request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            pass  # the client went away
        return response

    async def _write_body(
        self, response: web.StreamResponse, body: memoryview, plan: _BodyPlan
    ) -> Literal["done", "cut", "closed"]:
        """Write ``body`` as ``plan`` says; stop early for a cut or a server close."""
        sent, length = 0, len(body)
        while True:
            if plan.stall_after is not None and sent >= plan.stall_after:
                plan.stall_after = None
                if await self._pause(plan.stall_seconds):
                    return "closed"
            if plan.cut_after is not None and sent >= plan.cut_after:
                return "cut"
            if sent >= length:
                return "done"
            limits = (plan.stall_after, plan.cut_after)
            end = min(
                length,
                sent + plan.chunk,
                *(limit for limit in limits if limit is not None and limit > sent),
            )
            await response.write(body[sent:end])
            sent = end
            if plan.delay and sent < length and await self._pause(plan.delay):
                return "closed"


# --- CDN


class FakeCDN(_RecordingServer):
    """A blob CDN behind the registry's 307, reached as ``http://localhost:PORT``.

    Serves ``GET|HEAD /blobs/<digest>?sig=...`` from its registry's blobs, with Range
    support and the registry's body faults (cut, stall, slow, corrupt). Like a
    presigned-URL store it answers 400 to any request carrying ``Authorization``
    (counted in ``leaked_authorization``) and 403 to an unknown or expired ``sig``.

    Attributes:
        registry: whose blobs are served; set by ``FakeRegistry.cdn = cdn``.
        support_ranges: answer ``Range`` with 206 (else 200 with the whole body).
        check_signatures: require a ``sig`` issued by `signed_url` (False: any).
        issue_expired: how many of the next URLs `signed_url` issues are expired already
            (a clock skew, a long queue before the redirect was followed).
        leaked_authorization: requests that arrived with an ``Authorization`` header.
        down: close every connection without an answer.
        requests: every request received.
    """

    url_host = "localhost"
    extra_bind_hosts = ("::1",)

    def __init__(
        self,
        registry: FakeRegistry | None = None,
        *,
        support_ranges: bool = True,
        check_signatures: bool = True,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.support_ranges = support_ranges
        self.check_signatures = check_signatures
        self.leaked_authorization = 0
        self.issue_expired = 0
        #: Refuse HEAD with 403, as a URL signed for GET alone is (S3's SigV4 signs the method).
        self.refuse_head = False
        self._signatures: set[str] = set()

    def signed_url(self, digest: str) -> str:
        """A fresh presigned-style URL for ``digest`` on this CDN."""
        sig = secrets.token_hex(16)
        if self.issue_expired > 0:
            self.issue_expired -= 1
        else:
            self._signatures.add(sig)
        return f"{self.url}/blobs/{digest}?sig={sig}&expires={int(time.time()) + 1200}"

    def expire_signatures(self) -> None:
        """Make every URL issued so far answer 403, as an expired presigned URL does."""
        self._signatures.clear()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if "Authorization" in request.headers:
            self.leaked_authorization += 1
            return web.Response(
                status=400,
                content_type="application/xml",
                text="<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
            )
        match = _CDN_ROUTE_RE.match(request.path)
        if match is None or request.method not in ("GET", "HEAD"):
            return web.Response(status=404, text="not found")
        if self.refuse_head and request.method == "HEAD":
            return web.Response(status=403)
        if self.check_signatures and request.query.get("sig") not in self._signatures:
            return web.Response(
                status=403,
                content_type="application/xml",
                text="<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
            )
        digest = match["digest"]
        data = self.registry.blobs.get(digest) if self.registry is not None else None
        if self.registry is None or data is None:
            return web.Response(status=404, text="not found")
        return await self._serve_blob(request, self.registry, digest, data, support_ranges=self.support_ranges)


# --- registry


class FakeRegistry(_RecordingServer):
    """A fake upstream registry: the OCI pull API plus knobs real registries lack.

    Endpoints: ``GET /v2/``; ``GET|HEAD /v2/<name>/manifests/<tag|digest>``;
    ``GET|HEAD /v2/<name>/blobs/<digest>``; ``GET /v2/<name>/tags/list?n=&last=``;
    ``GET /v2/<name>/referrers/<digest>``; ``GET|POST /token`` (``auth == "bearer"``).
    Blobs are stored by digest for every repository; manifests per repository.

    Attributes (all may be changed between requests):
        auth: ``"none"``, ``"bearer"`` (token dance with ``/token``) or ``"basic"``.
        credentials: ``(user, password)``. Bearer: the token endpoint then requires
            them as Basic auth (or as an OAuth2 password grant on POST), else 401.
            Basic: every ``/v2`` request must carry them (None: any Basic ones pass).
        token_expires_in: ``expires_in`` in token answers; None omits the field.
            Tokens stop working after it (60 s when None), or at `expire_tokens`.
        token_field: ``"token"``, ``"access_token"`` or ``"both"``: what answers carry.
        token_post: accept the OAuth2 ``POST /token`` (False: 405, as some do).
        grant_unknown: the token service grants pulls of repositories it does not hold
            (False: it grants none, so their requests get 401 ``insufficient_scope``, as
            Docker Hub answers for a name that does not exist or is private).
        unknown_refusal: how a repository the token service does not grant is refused:
            ``"insufficient_scope"`` (Docker Hub's 401 with that error), ``"plain"`` (a
            Bearer challenge with no error, as Quay answers), or ``401``/``403`` from the token
            service itself (ghcr.io, gcr.io), for anonymous requests.
        tokens_issued: tokens handed out so far.
        platform_resolution: a TAG whose manifest is an index/list, asked for without
            a list or index type in ``Accept``, is answered with its linux/amd64
            manifest, as Docker Hub does.
        support_ranges: answer blob ``Range`` requests with 206 (False: 200, all).
        ratelimit: ``(limit, remaining)`` sent as ``ratelimit-*`` headers on manifest
            GET and HEAD; None sends none.
        ratelimit_window: the ``w=`` of those headers, in seconds.
        ratelimit_countdown: each manifest GET (never HEAD) takes one from
            ``remaining``; at 0 manifest GETs get 429 TOOMANYREQUESTS.
        referrers_api: serve ``/referrers/<digest>`` (False: a plain-text 404, as Distribution 2.x).
        referrers_filter: apply ``artifactType`` and say so in ``OCI-Filters-Applied``
            (False: list every type, as a registry that does not filter).
        referrers_page_size: list at most this many referrers per answer, with a ``Link``
            to the next page (``?n=&last=<digest>``); None: all in one.
        referrers_link: the ``Link`` header of every referrers answer instead of the
            fake's own (a broken or hostile upstream's next-page link).
        referrers_body: the body of every referrers answer (200) instead of the list.
        tags_link: the ``Link`` header of every tag list instead of the fake's own (a
            broken or hostile upstream's next-page link).
        tags_page_token: page tag lists as Quay did before 2024: ``n`` tags a page (50
            without it), the next page named by an opaque ``next_page`` token, ``last``
            ignored.
        cdn: a `FakeCDN`; blob GETs (and HEADs when ``cdn_redirect_head``) then
            answer 307 to ``http://localhost:<cdnport>/blobs/<digest>?sig=...``.
        down: drop every connection without an answer (`stop_listening`: no port).
        blobs: digest -> bytes.
        requests: every request received, token and faulted ones included.

    Body faults (`cut_blob`, `stall_blob`, `corrupt_blob`, `slow_blob`) apply wherever
    the blob body is sent, here or on the CDN; offsets count bytes of that response's
    body (so after a Range request they count from the range start).
    """

    default_fault_paths = _DEFAULT_FAULT_PATHS

    def __init__(
        self,
        *,
        auth: Literal["none", "bearer", "basic"] = "none",
        credentials: tuple[str, str] | None = None,
        token_expires_in: int | None = 300,
        token_field: Literal["token", "access_token", "both"] = "both",
        token_post: bool = True,
        grant_unknown: bool = True,
        platform_resolution: bool = True,
        support_ranges: bool = True,
        ratelimit: tuple[int, int] | None = None,
        ratelimit_window: int = 21600,
        ratelimit_countdown: bool = False,
        referrers_api: bool = True,
        cdn: FakeCDN | None = None,
        cdn_redirect_head: bool = False,
    ) -> None:
        super().__init__()
        self.auth = auth
        #: Where the Bearer challenge sends clients for a token (None: this server's /token).
        self.token_realm: str | None = None
        self.credentials = credentials
        self.token_expires_in = token_expires_in
        self.token_field = token_field
        self.token_post = token_post
        self.grant_unknown = grant_unknown
        self.platform_resolution = platform_resolution
        self.support_ranges = support_ranges
        self.ratelimit = ratelimit
        self.ratelimit_window = ratelimit_window
        self.ratelimit_countdown = ratelimit_countdown
        self.referrers_api = referrers_api
        self.referrers_filter = True
        self.referrers_page_size: int | None = None
        self.referrers_link: str | None = None
        self.referrers_body: bytes | None = None
        self.tags_link: str | None = None
        self.tags_page_token = False
        self.unknown_refusal: Literal["insufficient_scope", "plain"] | int = "insufficient_scope"
        #: How a blob HEAD is answered: as it should be, or as front ends that strip or garble
        #: its length do (no Content-Length; 0; the size of a gzipped body it was not sent).
        self.blob_head: Literal["right", "no_length", "zero", "gzip"] = "right"
        #: Headers a manifest HEAD leaves out (some registries send no Docker-Content-Digest).
        self.manifest_head_omits: frozenset[str] = frozenset()
        #: Manifest GETs still to be cut after half their body (a connection lost mid-answer).
        self.manifest_bodies_to_cut = 0
        self.cdn_redirect_head = cdn_redirect_head
        self.tokens_issued = 0
        self.blobs: dict[str, bytes] = {}
        self._manifests: dict[str, tuple[bytes, str]] = {}
        self._repo_manifests: dict[str, set[str]] = {}
        self._tags: dict[str, dict[str, str]] = {}
        self._tokens: dict[str, _Token] = {}
        self._cuts: dict[str, _Cut] = {}
        self._stalls: dict[str, _Stall] = {}
        self._slow: dict[str, _Slow] = {}
        #: Blob GETs being answered now, and the most at once (the cache's fill limit shows here).
        self.blob_bodies_in_flight = 0
        self.most_blob_bodies_in_flight = 0
        self._corrupt: dict[str, int | None] = {}
        self._cdn: FakeCDN | None = None
        self._owned_cdn: FakeCDN | None = None
        self.cdn = cdn

    # -- lifecycle

    @property
    def cdn(self) -> FakeCDN | None:
        return self._cdn

    @cdn.setter
    def cdn(self, value: FakeCDN | None) -> None:
        if value is not None:
            value.registry = self
        self._cdn = value

    async def start_cdn(self, **options: Any) -> FakeCDN:
        """Start a `FakeCDN` for this registry and set ``cdn``; `close` ends it."""
        cdn = FakeCDN(self, **options)
        await cdn.start()
        self._owned_cdn = cdn
        self.cdn = cdn
        return cdn

    async def close(self) -> None:
        if self._owned_cdn is not None:
            await self._owned_cdn.close()
            self._owned_cdn = None
        await super().close()

    # -- content

    def add_blob(self, data: bytes, algorithm: Literal["sha256", "sha512"] = "sha256") -> str:
        """Store ``data`` (for every repository) and return its digest."""
        digest = digest_of(data, algorithm)
        self.blobs[digest] = data
        return digest

    def add_manifest(
        self,
        repository: str,
        tag: str | None,
        body: bytes,
        media_type: str | None = None,
    ) -> str:
        """Store a manifest in ``repository`` by digest, and by ``tag`` (moving it).

        ``media_type`` defaults to the document's own ``mediaType``. Returns the digest.
        """
        if media_type is None:
            media_type = str(json.loads(body)["mediaType"])
        digest = digest_of(body)
        self._manifests[digest] = (body, media_type)
        self._repo_manifests.setdefault(repository, set()).add(digest)
        if tag is not None:
            self._tags.setdefault(repository, {})[tag] = digest
        return digest

    def add_image(
        self,
        repository: str,
        tag: str | None,
        layers: Sequence[bytes] = (b"layer",),
        *,
        config: bytes | None = None,
        media_type: str = DOCKER_MANIFEST_V2,
        os: str = "linux",
        architecture: str = "amd64",
    ) -> FakeImage:
        """Store config, layers and an image manifest; the usual one-call setup."""
        if config is None:
            config = json.dumps({"architecture": architecture, "os": os, "rootfs": {"type": "layers"}}).encode()
        config_digest = self.add_blob(config)
        layer_digests = tuple(self.add_blob(layer) for layer in layers)
        body = image_manifest(
            config_digest,
            len(config),
            [(d, len(layer)) for d, layer in zip(layer_digests, layers, strict=True)],
            media_type,
        )
        digest = self.add_manifest(repository, tag, body, media_type)
        return FakeImage(digest, body, media_type, config_digest, layer_digests)

    def add_index(
        self,
        repository: str,
        tag: str | None,
        platforms: Sequence[tuple[str, str, str]],
        media_type: str = DOCKER_MANIFEST_LIST,
    ) -> str:
        """Store an index over manifests already in ``repository``.

        ``platforms`` is ``(manifest_digest, os, architecture)``; sizes and media types
        are taken from the stored manifests. Returns the index digest.
        """
        entries = []
        for digest, os_name, arch in platforms:
            body, entry_type = self._manifests[digest]
            entries.append((digest, len(body), entry_type, os_name, arch))
        return self.add_manifest(repository, tag, index_manifest(entries, media_type), media_type)

    def manifest(self, digest: str) -> bytes:
        """The body of a manifest stored (to describe it in another)."""
        return self._manifests[digest][0]

    def add_tags(self, repository: str, tags: Iterable[str], digest: str) -> None:
        """Point each of ``tags`` at ``digest``, a manifest of ``repository``."""
        self._tags.setdefault(repository, {}).update(dict.fromkeys(tags, digest))

    def delete_tag(self, repository: str, tag: str) -> None:
        self._tags.get(repository, {}).pop(tag, None)

    def delete_manifest(self, repository: str, digest: str) -> None:
        self._repo_manifests.get(repository, set()).discard(digest)
        tags = self._tags.get(repository, {})
        for tag in [t for t, d in tags.items() if d == digest]:
            del tags[tag]

    def delete_blob(self, digest: str) -> None:
        self.blobs.pop(digest, None)

    def delete_repository(self, repository: str) -> None:
        """The repository gone: its tags and manifests answer 404 NAME_UNKNOWN."""
        self._tags.pop(repository, None)
        self._repo_manifests.pop(repository, None)

    def tags(self, repository: str) -> dict[str, str]:
        """Tag -> digest for ``repository`` (a copy)."""
        return dict(self._tags.get(repository, {}))

    # -- tokens

    @property
    def issued_tokens(self) -> list[str]:
        """Every token handed out and still known, for tests that grep for leaks."""
        return list(self._tokens)

    def expire_tokens(self) -> None:
        """Make every token issued so far invalid (401 ``invalid_token``)."""
        self._tokens.clear()

    # -- body faults

    def cut_blob(self, digest: str, after_bytes: int, times: int = 1) -> None:
        """Close the connection after ``after_bytes`` of body, for ``times`` GETs.

        Content-Length still announces the full length; the bytes written are flushed.
        """
        self._cuts[digest] = _Cut(after_bytes, times)

    def stall_blob(
        self,
        digest: str,
        after_bytes: int,
        seconds: float | None,
        times: int | None = 1,
    ) -> None:
        """Send ``after_bytes`` then go silent for ``seconds`` (None: until `release_stalls`
        or close)."""
        self._stalls[digest] = _Stall(after_bytes, seconds, times)

    def corrupt_manifest(self, digest: str) -> None:
        """Serve other bytes for the manifest ``digest`` names (a broken mirror, a bad disk)."""
        body, media_type = self._manifests[digest]
        self._manifests[digest] = (body + b" ", media_type)

    def corrupt_blob(self, digest: str, times: int | None = None) -> None:
        """Serve bytes of the same length but another digest (the last byte flipped)."""
        self._corrupt[digest] = times

    def slow_blob(
        self,
        digest: str,
        chunk: int = 65536,
        delay: float = 0.01,
        times: int | None = None,
    ) -> None:
        """Send the body in ``chunk``-byte writes, ``delay`` seconds apart."""
        self._slow[digest] = _Slow(max(1, chunk), delay, times)

    def clear_faults(self) -> None:
        """Disarm `fail_next`, `delay_next` and every body fault."""
        super().clear_faults()
        self._cuts.clear()
        self._stalls.clear()
        self._slow.clear()
        self._corrupt.clear()

    def _consume_body_faults(self, digest: str) -> _BodyPlan:
        plan = _BodyPlan()
        cut = self._cuts.get(digest)
        if cut is not None:
            plan.cut_after = cut.after
            cut.remaining -= 1
            if cut.remaining <= 0:
                del self._cuts[digest]
        stall = self._stalls.get(digest)
        if stall is not None:
            plan.stall_after, plan.stall_seconds = stall.after, stall.seconds
            if stall.remaining is not None:
                stall.remaining -= 1
                if stall.remaining <= 0:
                    del self._stalls[digest]
        slow = self._slow.get(digest)
        if slow is not None:
            plan.chunk, plan.delay = slow.chunk, slow.delay
            if slow.remaining is not None:
                slow.remaining -= 1
                if slow.remaining <= 0:
                    del self._slow[digest]
        if digest in self._corrupt:
            plan.corrupt = True
            left = self._corrupt[digest]
            if left is not None:
                if left <= 1:
                    del self._corrupt[digest]
                else:
                    self._corrupt[digest] = left - 1
        return plan

    # -- dispatch

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/token":
            return await self._token(request)
        if path in ("/v2", "/v2/"):
            denied = self._check_auth(request, None)
            if denied is not None:
                return denied
            return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})
        match = _REPO_ROUTE_RE.match(path)
        if match is None:
            return _oci_error(404, "NAME_UNKNOWN", f"no route for {path}")
        name, kind, ref = match["name"], match["kind"], match["ref"]
        denied = self._check_auth(request, name)
        if denied is not None:
            return denied
        if request.method not in ("GET", "HEAD"):
            return _oci_error(405, "UNSUPPORTED", f"{request.method} is not supported")
        if kind == "manifests":
            answer = self._manifest(request, name, ref)
            if self.manifest_bodies_to_cut and request.method == "GET" and answer.status == 200:
                self.manifest_bodies_to_cut -= 1
                return await _half_then_cut(request, answer)
            return answer
        if kind == "blobs":
            return await self._blob(request, ref)
        if kind == "tags" and ref == "list":
            return self._tags_list(request, name)
        if kind == "referrers" and self.referrers_api:
            if self.referrers_body is not None:
                return web.Response(body=self.referrers_body, headers={"Content-Type": OCI_INDEX})
            return self._referrers(request, name, ref)
        if kind == "referrers":  # as Distribution 2.x answers a route it does not know
            return web.Response(status=404, text="404 page not found")
        return _oci_error(404, "NAME_UNKNOWN", f"no route for {path}")

    # -- auth

    def _challenge(self, name: str | None, error: str | None) -> web.Response:
        if self.auth == "basic":
            header = 'Basic realm="fake"'
        else:
            header = f'Bearer realm="{self.token_realm or self.url + "/token"}",service="{REGISTRY_SERVICE}"'
            if name is not None:
                header += f',scope="repository:{name}:pull"'
            if error is not None:
                header += f',error="{error}"'
        detail = [{"Type": "repository", "Name": name, "Action": "pull"}] if name else None
        return _oci_error(
            401,
            "UNAUTHORIZED",
            "authentication required",
            detail=detail,
            headers={
                "WWW-Authenticate": header,
                "Docker-Distribution-API-Version": "registry/2.0",
            },
        )

    def _check_auth(self, request: web.Request, name: str | None) -> web.Response | None:
        if self.auth == "none":
            return None
        if self.auth == "basic":
            given = _basic_credentials(request)
            if given is None or (self.credentials is not None and given != self.credentials):
                return self._challenge(name, None)
            return None
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return self._challenge(name, None)
        token = self._tokens.get(value.strip())
        if token is None or token.expires_at <= time.monotonic():
            return self._challenge(name, "invalid_token")
        if name is not None and "pull" not in token.repositories.get(name, frozenset()):
            return self._challenge(name, "insufficient_scope" if self.unknown_refusal == "insufficient_scope" else None)
        return None

    async def _token(self, request: web.Request) -> web.Response:
        if self.auth != "bearer" or request.method not in ("GET", "POST"):
            return web.Response(status=404, text="not found")
        if request.method == "POST" and not self.token_post:
            return web.Response(status=405, text="method not allowed")
        given, scopes = await _token_request(request)
        if self.credentials is not None and given != self.credentials:
            return web.json_response({"details": "incorrect username or password"}, status=401)
        lifetime = self.token_expires_in
        token = secrets.token_urlsafe(24)
        granted = _granted_pulls(scopes)
        if not self.grant_unknown:
            unknown = [name for name in granted if name not in self._repo_manifests]
            if unknown and isinstance(self.unknown_refusal, int) and given is None:
                return _oci_error(self.unknown_refusal, "DENIED", "requested access to the resource is denied")
            granted = {name: actions for name, actions in granted.items() if name in self._repo_manifests}
        self._tokens[token] = _Token(
            granted,
            time.monotonic() + (lifetime if lifetime is not None else DEFAULT_TOKEN_LIFETIME),
        )
        self.tokens_issued += 1

        answer: dict[str, object] = {}
        if self.token_field in ("token", "both"):
            answer["token"] = token
        if self.token_field in ("access_token", "both"):
            answer["access_token"] = token
        if lifetime is not None:
            answer["expires_in"] = lifetime
        answer["issued_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        if request.method == "POST":
            answer["scope"] = " ".join(scopes)
        return web.json_response(answer)

    # -- manifests

    def _manifest(self, request: web.Request, name: str, ref: str) -> web.Response:
        in_repo = self._repo_manifests.get(name, set())
        by_digest = _DIGEST_RE.match(ref) is not None
        digest = (ref if ref in in_repo else None) if by_digest else self._tags.get(name, {}).get(ref)
        if digest is None:
            return _oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown", detail={"Tag": ref})
        body, media_type = self._manifests[digest]
        if (
            not by_digest
            and self.platform_resolution
            and media_type in INDEX_MEDIA_TYPES
            and not _accepts_index(request)
        ):
            child = _platform_entry(body, "linux", "amd64")
            if child is None or child not in in_repo:
                return _oci_error(
                    404,
                    "MANIFEST_UNKNOWN",
                    "no linux/amd64 manifest",
                    detail={"Tag": ref},
                )
            digest = child
            body, media_type = self._manifests[digest]

        headers = {
            "Content-Type": media_type,
            "Docker-Content-Digest": digest,
            "Content-Length": str(len(body)),
            "ETag": f'"{digest}"',
            "Docker-Distribution-API-Version": "registry/2.0",
        }
        if self.ratelimit is not None:
            limit, remaining = self.ratelimit
            exhausted = False
            if self.ratelimit_countdown and request.method == "GET":
                if remaining <= 0:
                    exhausted = True
                else:
                    remaining -= 1
                    self.ratelimit = (limit, remaining)
            window = self.ratelimit_window
            rate_headers = {
                "ratelimit-limit": f"{limit};w={window}",
                "ratelimit-remaining": f"{remaining};w={window}",
                "docker-ratelimit-source": request.remote or "127.0.0.1",
            }
            if exhausted:
                return _oci_error(
                    429,
                    "TOOMANYREQUESTS",
                    "You have reached your pull rate limit.",
                    headers=rate_headers,
                )
            headers.update(rate_headers)
        if request.method == "HEAD":
            return web.Response(headers={k: v for k, v in headers.items() if k not in self.manifest_head_omits})
        return web.Response(body=body, headers=headers)

    # -- blobs

    async def _blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        if _DIGEST_RE.match(digest) is None:
            return _oci_error(400, "DIGEST_INVALID", f"invalid digest {digest!r}")
        data = self.blobs.get(digest)
        if data is None:
            return _oci_error(404, "BLOB_UNKNOWN", "blob unknown to registry", detail=digest)
        cdn = self.cdn
        if cdn is not None and (request.method == "GET" or self.cdn_redirect_head):
            return web.Response(
                status=307,
                headers={
                    "Location": cdn.signed_url(digest),
                    "Docker-Distribution-API-Version": "registry/2.0",
                },
            )
        if request.method != "GET" and self.blob_head != "right":
            return self._odd_blob_head(digest, len(data))
        if request.method != "GET":
            return await self._serve_blob(request, self, digest, data, support_ranges=self.support_ranges)
        self.blob_bodies_in_flight += 1
        self.most_blob_bodies_in_flight = max(self.most_blob_bodies_in_flight, self.blob_bodies_in_flight)
        try:
            return await self._serve_blob(request, self, digest, data, support_ranges=self.support_ranges)
        finally:
            self.blob_bodies_in_flight -= 1

    def _odd_blob_head(self, digest: str, size: int) -> web.StreamResponse:
        headers = {"Docker-Content-Digest": digest, "Docker-Distribution-API-Version": "registry/2.0"}
        if self.blob_head == "gzip":
            headers.update({"Content-Encoding": "gzip", "Content-Length": str(max(1, size // 90))})
        elif self.blob_head == "zero":
            headers["Content-Length"] = "0"
        else:  # no length at all: chunked, as a proxy that strips it answers
            headers["Transfer-Encoding"] = "chunked"
        return web.Response(status=200, headers=headers)

    # -- tags and referrers

    def _tags_list(self, request: web.Request, name: str) -> web.Response:
        if name not in self._tags and name not in self._repo_manifests:
            return _oci_error(404, "NAME_UNKNOWN", "repository name not known to registry")
        tags = sorted(self._tags.get(name, {}))
        if self.tags_page_token:
            return self._tags_page_by_token(request, name, tags)
        last = request.query.get("last")
        if last is not None:
            tags = [tag for tag in tags if tag > last]
        headers: dict[str, str] = {}
        n_raw = request.query.get("n")
        if n_raw is not None:
            try:
                n = int(n_raw)
            except ValueError:
                return _oci_error(400, "PAGINATION_NUMBER_INVALID", f"invalid n {n_raw!r}")
            if n < 0:
                return _oci_error(400, "PAGINATION_NUMBER_INVALID", f"invalid n {n_raw!r}")
            if len(tags) > n:
                tags = tags[:n]
                if tags:
                    headers["Link"] = f'</v2/{name}/tags/list?last={tags[-1]}&n={n}>; rel="next"'
        if self.tags_link is not None:
            headers["Link"] = self.tags_link
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    def _tags_page_by_token(self, request: web.Request, name: str, tags: list[str]) -> web.Response:
        size = int(request.query.get("n", "50"))
        token = request.query.get("next_page", "")
        start = int(token.removeprefix("pos-")) if token.startswith("pos-") else 0
        headers: dict[str, str] = {}
        if start + size < len(tags):
            headers["Link"] = f'</v2/{name}/tags/list?n={size}&next_page=pos-{start + size}>; rel="next"'
        return web.json_response({"name": name, "tags": tags[start : start + size]}, headers=headers)

    def _referrers(self, request: web.Request, name: str, digest: str) -> web.Response:
        if _DIGEST_RE.match(digest) is None:
            return _oci_error(400, "DIGEST_INVALID", f"invalid digest {digest!r}")
        wanted_type = request.query.get("artifactType")
        manifests: list[dict[str, Any]] = []
        for candidate in sorted(self._repo_manifests.get(name, set())):
            body, media_type = self._manifests[candidate]
            document = json.loads(body)
            subject = document.get("subject") or {}
            if subject.get("digest") != digest:
                continue
            artifact_type = document.get("artifactType") or document.get("config", {}).get("mediaType")
            if self.referrers_filter and wanted_type is not None and artifact_type != wanted_type:
                continue
            entry: dict[str, Any] = {
                "mediaType": media_type,
                "digest": candidate,
                "size": len(body),
                "artifactType": artifact_type,
            }
            if document.get("annotations"):
                entry["annotations"] = document["annotations"]
            manifests.append(entry)
        headers = {"Content-Type": OCI_INDEX}
        if self.referrers_filter and wanted_type is not None:
            headers["OCI-Filters-Applied"] = "artifactType"
        last = request.query.get("last")
        if last is not None:
            manifests = [entry for entry in manifests if entry["digest"] > last]
        if self.referrers_page_size is not None and len(manifests) > self.referrers_page_size:
            manifests = manifests[: self.referrers_page_size]
            following = {"n": str(self.referrers_page_size), "last": manifests[-1]["digest"]}
            if self.referrers_filter and wanted_type is not None:
                following["artifactType"] = wanted_type
            query = "&".join(f"{name}={value}" for name, value in following.items())
            headers["Link"] = f'</v2/{name}/referrers/{digest}?{query}>; rel="next"'
        if self.referrers_link is not None:
            headers["Link"] = self.referrers_link
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return web.Response(body=json.dumps(index).encode(), headers=headers)


async def _token_request(
    request: web.Request,
) -> tuple[tuple[str, str] | None, list[str]]:
    """The credentials and scopes of a token request: GET query or OAuth2 POST form."""
    if request.method != "POST":
        scopes = [s for raw in request.query.getall("scope", []) for s in raw.split()]
        return _basic_credentials(request), scopes
    form = await request.post()
    scopes = [s for raw in form.getall("scope", []) for s in str(raw).split()]
    if form.get("grant_type") == "password":
        given = (str(form.get("username", "")), str(form.get("password", "")))
        return given, scopes
    return _basic_credentials(request), scopes


def _granted_pulls(scopes: Sequence[str]) -> dict[str, frozenset[str]]:
    """Repository -> granted actions for ``repository:<name>:<actions>`` scopes.

    The fake is read-only, so only ``pull`` is ever granted.
    """
    repositories: dict[str, frozenset[str]] = {}
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind == "repository" and name:
            granted = frozenset(actions.split(",")) & {"pull"}
            repositories[name] = repositories.get(name, frozenset()) | granted
    return repositories


def _accepts_index(request: web.Request) -> bool:
    for header in request.headers.getall("Accept", []):
        for item in header.split(","):
            if item.split(";", 1)[0].strip() in INDEX_MEDIA_TYPES:
                return True
    return False


def _platform_entry(index_body: bytes, os_name: str, architecture: str) -> str | None:
    for entry in json.loads(index_body).get("manifests", []):
        platform = entry.get("platform") or {}
        if platform.get("os") == os_name and platform.get("architecture") == architecture:
            return str(entry["digest"])
    return None
