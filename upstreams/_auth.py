"""The registry token dance, as an ``httpx.Auth``.

A request goes out with the cached Bearer token for its scope (``repository:<name>:pull``);
or, for a scope whose token expired, with one fetched first from the token service its
challenge named; or bare. On a 401 from the upstream's own host the challenge is read:

- ``Bearer realm=…,service=…[,scope=…]``: a token is fetched from the realm (anonymously or
  with Basic credentials), cached per scope until shortly before it expires (``expires_in``,
  60 s when absent), and the request is sent once more. Concurrent requests that need the same
  scope share one token fetch.
- ``Basic``: the configured credentials are sent, and from then on sent up front.

A rotated ``password_file`` is picked up (checked at most every 10 s) and drops the cached
tokens. A 401 from another host (a CDN after a redirect) is not ours to answer. httpx drops the
``Authorization`` header itself when a redirect leaves the upstream's origin.
Of several challenges Bearer is taken, else Basic. Limits: no token refresh grants.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Final

import httpx

from moorage.config import FileStamp, UnreadableFile, file_stamp, read_text

from ._challenge import parse_challenge
from ._ratelimit import retry_after_seconds
from ._transport import mapped_errors
from .errors import (
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamUnavailable,
)

__all__ = ["RegistryAuth", "parse_challenge", "scope_for_path"]

DEFAULT_EXPIRES_IN: Final = 60
#: Kept no longer than this, whatever the token service says.
MAX_TOKEN_LIFETIME: Final = 24 * 3600
#: A token answer is a few kilobytes (Docker Hub's about 2,000 bytes).
MAX_TOKEN_RESPONSE_BYTES: Final = 64 * 1024
MAX_CACHED_SCOPES: Final = 4096
PASSWORD_CHECK_SECONDS: Final = 10.0
#: Seconds the configured credentials are not sent again after the upstream refused them,
#: doubling at each refusal in a row up to ``REFUSED_HOLD_MAX``: every pull had signed in
#: again with the refused password, and registries that lock an account after some failed
#: sign-ins (Harbor or Artifactory over LDAP) lock the cache's. A changed password file ends
#: the hold at once.
REFUSED_HOLD: Final = 30.0
REFUSED_HOLD_MAX: Final = 900.0
#: What a token must be to go in a header: visible ASCII (RFC 6750's b64token and more).
_TOKEN_RE: Final = re.compile(r"[\x21-\x7e]+")
#: Anchored at the end, as the routes are: a name may hold a component ``blobs`` or ``tags``
#: (an upstream's URL may have a path before ``/v2/``).
_SCOPE_PATH_RE: Final = re.compile(r"/v2/(.+)/(?:manifests/[^/]+|blobs/[^/]+|tags/list|referrers/[^/]+)$")


log = logging.getLogger("moorage.upstreams")


def _stamp(path: Path) -> FileStamp | None:
    try:
        return file_stamp(path)
    except OSError:
        return None


def scope_for_path(path: str) -> str | None:
    match = _SCOPE_PATH_RE.search(path)
    return f"repository:{match.group(1)}:pull" if match else None


class RegistryAuth(httpx.Auth):
    def __init__(
        self,
        upstream: str,
        origin: httpx.URL,
        token_client: httpx.AsyncClient,
        credentials: tuple[str, str] | None = None,
        on_token_fetch: Callable[[], None] | None = None,
        password_file: Path | None = None,
    ) -> None:
        self._upstream = upstream
        self._origin = (origin.scheme, origin.host, origin.port)
        self._token_client = token_client
        self._credentials = credentials
        # The password is read again when its file changes (rotation without a restart).
        self._password_file = password_file
        self._password_stamp = _stamp(password_file) if password_file is not None else None
        self._password_checked = time.monotonic()
        #: The password file could not be read at its last change: said once, until it can.
        self._password_unreadable = False
        self._on_token_fetch = on_token_fetch
        self._tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: The scope the registry's challenges name when it is not a repository's (see
        #: ``async_auth_flow``): its token serves every path, and once it expires the next
        #: request of any path gets another first, from the token service it came from.
        self._registry_scope: str | None = None
        self._registry_service: tuple[dict[str, str], str] | None = None
        #: For each path's scope that was challenged: the token service its challenge named
        #: (realm, service), and the scope a token was asked for (the challenge's, which may be
        #: another: public.ecr.aws names "aws"). Once that token expires, the next request gets
        #: another before it goes, not after a 401. A scope never challenged (a repository
        #: served without a token) goes bare.
        self._token_services: OrderedDict[str, tuple[dict[str, str], str]] = OrderedDict()
        self._fetching: dict[str, asyncio.Task[str]] = {}
        self._basic_up_front = False
        #: Refusals of the configured credentials held: by the scope a token service refused
        #: them for (a token service answers per repository), None for the registry's own
        #: (Basic). Each: (until, monotonic; the message; the status).
        self._held: dict[str | None, tuple[float, str, int]] = {}
        #: The next hold of each, doubling at each refusal in a row.
        self._next_hold: dict[str | None, float] = {}
        #: Counts refusals: a success of a request sent before the last one ends no hold.
        self._refusals = 0

    def _is_ours(self, url: httpx.URL) -> bool:
        return (url.scheme, url.host, url.port) == self._origin

    def _cached(self, scope: str) -> str | None:
        entry = self._tokens.get(scope)
        if entry is None:
            return None
        token, expires_at = entry
        if time.monotonic() >= expires_at:
            del self._tokens[scope]
            return None
        return token

    async def _refresh_credentials(self) -> None:
        """Reread the password file if it changed (looked at most every PASSWORD_CHECK s)."""
        if self._password_file is None or self._credentials is None:
            return
        if time.monotonic() - self._password_checked < PASSWORD_CHECK_SECONDS:
            return
        self._password_checked = time.monotonic()
        path = self._password_file
        stamp = await asyncio.to_thread(_stamp, path)
        if stamp == self._password_stamp:
            return
        try:
            if stamp is None:
                raise UnreadableFile("it is gone")
            password = (await asyncio.to_thread(read_text, path)).strip()
        except UnreadableFile as exc:  # keep the password we have; the next change is picked up
            if not self._password_unreadable:
                self._password_unreadable = True
                log.warning(
                    "the upstream's password file cannot be read: the password read last is used",
                    extra={
                        "event": "upstream_password_unreadable",
                        "upstream": self._upstream,
                        "path": str(path),
                        "error": str(exc),
                    },
                )
            return
        self._credentials = (self._credentials[0], password)
        self._password_stamp = stamp
        self._password_unreadable = False
        self._tokens.clear()  # tokens fetched with the old password may outlive it
        self._held.clear()
        self._next_hold.clear()
        log.info(
            "the upstream's password file changed: its new password is used",
            extra={"event": "upstream_password_reloaded", "upstream": self._upstream, "path": str(path)},
        )

    def _basic_header(self) -> str:
        assert self._credentials is not None
        raw = f"{self._credentials[0]}:{self._credentials[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _holding(self, key: str | None) -> UpstreamAuthFailed | None:
        """A fresh error for a request the hold of ``key`` answers (one shared error would
        gather every request's traceback), or None."""
        held = self._held.get(key)
        if held is None or time.monotonic() >= held[0]:
            return None
        until, message, status = held
        return UpstreamAuthFailed(
            self._upstream,
            f"{message}; check this upstream's credentials in the cache's configuration (not sent again for"
            f" {until - time.monotonic():.0f} s, or until the password file changes)",
            status=status,
        )

    def _refused(self, key: str | None, message: str, status: int) -> UpstreamAuthFailed:
        """The configured credentials were refused (for the scope ``key``, or by the registry):
        not sent again for a while (see ``REFUSED_HOLD``), said once for the while. Refusals of
        requests already in flight when the hold began neither lengthen it nor log again."""
        self._refusals += 1
        held = self._holding(key)
        if held is not None:
            return held
        hold = self._next_hold.get(key, REFUSED_HOLD)
        self._next_hold[key] = min(hold * 2, REFUSED_HOLD_MAX)
        self._held[key] = (time.monotonic() + hold, message, status)
        if len(self._held) > MAX_CACHED_SCOPES:  # scopes refused by the thousand: the oldest go
            oldest = next(iter(self._held))
            self._held.pop(oldest)
            self._next_hold.pop(oldest, None)
        log.error(
            "the upstream refused the configured credentials",
            extra={
                "event": "upstream_credentials_refused",
                "upstream": self._upstream,
                "username": self._credentials[0] if self._credentials else None,
                "password_file": str(self._password_file) if self._password_file else None,
                "scope": key,
                "hold_seconds": hold,
                "error": message,
            },
        )
        held = self._holding(key)
        assert held is not None
        return held

    def _accepted(self, key: str | None, refusals_before: int) -> None:
        """A request sent after the last refusal succeeded: the doubling of ``key`` starts again."""
        if refusals_before == self._refusals:
            self._held.pop(key, None)
            self._next_hold.pop(key, None)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await self._refresh_credentials()
        refusals_before = self._refusals
        scope = scope_for_path(request.url.path)
        held = self._holding(None) or (self._holding(scope) if scope else None)
        if held is not None:
            raise held
        token = self._cached(scope) if scope else None
        if token is None and self._registry_scope is not None:
            token = self._cached(self._registry_scope)
        failed_ahead: tuple[tuple[str, str, str], UpstreamError] | None = None
        fetched_ahead: tuple[str, str, str] | None = None
        if token is None and scope:
            token, fetched_ahead, failed_ahead = await self._token_ahead(scope)
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._basic_up_front and self._credentials:
            request.headers["Authorization"] = self._basic_header()
        response = yield request
        if response.status_code != 401 or not self._is_ours(response.url):
            self._unchallenged(response, scope, failed_ahead, refusals_before)
            return
        scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
        if scheme == "bearer" and params.get("realm"):
            path_scope, scope = scope, params.get("scope") or scope
            if path_scope and scope:
                self._learn_token_service(path_scope, params, scope)
            fresh = self._cached(scope) if scope else None
            asked = (params.get("realm", ""), params.get("service", ""), scope or "")
            if fresh is not None and fresh == token and fetched_ahead == asked:
                return  # fetched for this request from this very service, and refused: no other
            if fresh is None or fresh == token:
                # No token yet, or the one we sent was refused: fetch one. A token another
                # request fetched while this one waited for its 401 is used as it is.
                if failed_ahead is not None and failed_ahead[0] == asked:
                    failure = failed_ahead[1]
                    raise self._refusal(failure, scope) if isinstance(failure, _RefusedAhead) else failure
                if scope:
                    self._tokens.pop(scope, None)
                fresh = await self._token(params, scope)
            if scope and scope != path_scope and not scope.startswith("repository:"):
                # A registry whose challenge names a scope of its own (public.ecr.aws: "aws"):
                # its token is sent up front next time, not after another 401.
                self._registry_scope = scope
                self._registry_service = ({key: params[key] for key in ("realm", "service") if params.get(key)}, scope)
            token = fresh
            request.headers["Authorization"] = f"Bearer {token}"
            yield request
        elif scheme == "basic" and self._credentials and not self._basic_up_front:
            self._basic_up_front = True
            request.headers["Authorization"] = self._basic_header()
            response = yield request
        if scheme == "basic" and self._credentials and response.status_code == 401:
            if parse_challenge(response.headers.get("www-authenticate", ""))[0] == "basic":
                # The registry's Basic challenge again, to the credentials: refused.
                self._refused(None, "the registry refused the configured credentials (HTTP 401)", 401)
        elif response.status_code < 400 and self._credentials:
            self._accepted(None, refusals_before)

    def _unchallenged(
        self,
        response: httpx.Response,
        scope: str | None,
        failed_ahead: tuple[tuple[str, str, str], UpstreamError] | None,
        refusals_before: int,
    ) -> None:
        """An answer that is no challenge of the registry's own."""
        if response.status_code >= 400:
            return
        if failed_ahead is not None and scope and self._is_ours(response.url):
            self._token_services.pop(scope, None)  # served bare: it asks no token any more
            if failed_ahead[0][2] == self._registry_scope:
                self._registry_service = None
        if self._credentials:
            self._accepted(None, refusals_before)

    async def _token_ahead(
        self, scope: str
    ) -> tuple[str | None, tuple[str, str, str] | None, tuple[tuple[str, str, str], UpstreamError] | None]:
        """A token for a path's scope that was challenged before, fetched before its request
        goes: sent bare, the request would be refused and sent again, at every token's expiry
        (5 minutes on Docker Hub) one more request to the registry and a round trip more. A
        token service that fails, or refuses, leaves the request to go bare, as before (a
        registry that no longer asks for tokens serves it, and is no longer asked for one),
        with the failure and what it was asked: the registry's challenge raises it, not the
        same service asked again. A refusal ahead holds nothing and logs nothing until the
        registry's challenge says a token is needed. A path never challenged goes with the
        registry's own scope's token where its challenges name one (public.ecr.aws: every
        repository served with one token, each had gone bare at its expiry).

        Returns the token, what was asked for it when fetched now (realm, service, scope), and
        a failure with what was asked."""
        known = self._token_services.get(scope)
        if known is None:
            known = self._registry_service
            if known is None:
                return None, None, None
        else:
            self._token_services.move_to_end(scope)
        service, scope_asked = known
        token = self._cached(scope_asked)
        if token is not None:
            return token, None, None
        asked = (service.get("realm", ""), service.get("service", ""), scope_asked)
        try:
            return await self._token(service, scope_asked, ahead=True), asked, None
        except UpstreamError as exc:
            return None, None, (asked, exc)

    def _learn_token_service(self, path_scope: str, challenge: dict[str, str], scope: str) -> None:
        service = {key: challenge[key] for key in ("realm", "service") if challenge.get(key)}
        self._token_services[path_scope] = (service, scope)
        self._token_services.move_to_end(path_scope)
        while len(self._token_services) > MAX_CACHED_SCOPES:
            self._token_services.popitem(last=False)

    async def _token(self, challenge: dict[str, str], scope: str | None, *, ahead: bool = False) -> str:
        held = self._holding(scope)
        if held is not None:
            raise held
        key = f"{challenge.get('realm')}|{challenge.get('service')}|{scope}"
        task = self._fetching.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_token(challenge, scope))
            self._fetching[key] = task
            task.add_done_callback(lambda _: self._fetching.pop(key, None))
        try:
            return await asyncio.shield(task)
        except _RefusedAhead as refused:
            if ahead:
                raise
            raise self._refusal(refused, scope) from None

    def _refusal(self, refused: _RefusedAhead, scope: str | None) -> UpstreamError:
        """The token service's refusal, once a token is known to be needed: held and logged
        once for every request that shared the fetch."""
        if refused.converted is None:
            refused.converted = self._token_refused(refused.status, scope)
        return refused.converted

    def _token_refused(self, status: int, scope: str | None) -> UpstreamError:
        """The token service's 401 or 403. A repository not granted is no outage: ghcr.io,
        gcr.io and others answer an anonymous token request for a name they do not have (or
        a private one) so, as Docker Hub's registry answers its token with 401
        insufficient_scope. The configured credentials refused (a revoked or expired token: ghcr.io
        says 403 DENIED) are the cache's settings, whatever the status."""
        who = "the configured credentials" if self._credentials else "anonymous access"
        refusal = f"token service refused {who} for {scope or 'the registry'} (HTTP {status})"
        if not self._credentials and scope and scope.startswith("repository:"):
            return UpstreamRefused(
                self._upstream,
                f"{refusal}: no such repository there, or a private one; the cache pulls from it anonymously:"
                " set credentials if private",
                status=status,
            )
        if self._credentials:
            return self._refused(scope, refusal, status)
        return UpstreamAuthFailed(self._upstream, refusal, status=status)

    async def _fetch_token(self, challenge: dict[str, str], scope: str | None) -> str:
        try:
            realm = httpx.URL(challenge["realm"])
        except httpx.InvalidURL:
            raise UpstreamProtocolError(self._upstream, "token service realm is not a URL") from None
        if self._credentials and self._origin[0] == "https" and realm.scheme != "https":
            # The registry's own word for where to send the credentials: not in clear text.
            raise UpstreamAuthFailed(
                self._upstream, f"token service at a plain {realm.scheme or '?'} URL: credentials not sent"
            )
        params = {"service": challenge["service"]} if challenge.get("service") else {}
        if scope:
            params["scope"] = scope
        headers = {"Authorization": self._basic_header()} if self._credentials else {}
        if self._on_token_fetch:
            self._on_token_fetch()
        # A failure names the token service's host and what failed (a name that does not
        # resolve, a refused connection, TLS): Docker Hub's is another host than its registry.
        try:
            with mapped_errors(self._upstream, f"token service at {realm.host}"):
                async with self._token_client.stream("GET", realm, params=params, headers=headers) as response:
                    status = response.status_code
                    data = await _read_at_most(response, MAX_TOKEN_RESPONSE_BYTES) if status < 400 else b""
        except httpx.HTTPError as exc:  # what is not the network's (a body it cannot decode)
            raise UpstreamUnavailable(self._upstream, f"token service at {realm.host}: {type(exc).__name__}") from None
        if status in (401, 403):
            # Held and logged by ``_refusal`` once a token is known to be needed: a fetch
            # ahead may be for a registry that asks for none any more.
            raise _RefusedAhead(self._upstream, f"token service answered HTTP {status}", status=status)
        if status == 429:  # the registry's rate limit, at its token service (auth.docker.io)
            raise UpstreamRateLimited(
                self._upstream,
                "token service answered HTTP 429",
                retry_after=retry_after_seconds(response.headers.get("retry-after")),
            )
        if status >= 400:
            raise UpstreamUnavailable(self._upstream, f"token service answered HTTP {status}", status=status)
        if data is None:
            raise UpstreamProtocolError(
                self._upstream, f"token service answered more than {MAX_TOKEN_RESPONSE_BYTES} bytes"
            )
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
            raise UpstreamProtocolError(self._upstream, "token service answered something other than JSON") from None
        if not isinstance(body, dict):
            raise UpstreamProtocolError(self._upstream, "token service answered something other than a JSON object")
        token = body.get("token") or body.get("access_token")
        if not token or not isinstance(token, str):
            raise UpstreamProtocolError(self._upstream, "token service answered without a token")
        if _TOKEN_RE.fullmatch(token) is None:  # (never quoted: it may be a credential all the same)
            raise UpstreamProtocolError(self._upstream, "token service answered a token no header can carry")
        lifetime = min(_expires_in(body.get("expires_in")), MAX_TOKEN_LIFETIME)
        if scope:
            self._tokens[scope] = (token, time.monotonic() + lifetime - min(10.0, lifetime * 0.1))
            self._tokens.move_to_end(scope)
            while len(self._tokens) > MAX_CACHED_SCOPES:
                self._tokens.popitem(last=False)
        self._next_hold.pop(scope, None)  # granted: a later refusal of this scope holds 30 s again
        return token


class _RefusedAhead(UpstreamAuthFailed):
    """The token service's 401 or 403, before it is known whether a token is needed (see
    ``RegistryAuth._refusal``)."""

    converted: UpstreamError | None = None


def _expires_in(value: object) -> float:
    """A token answer's ``expires_in`` in seconds: as given, a number in a string too; the
    spec's 60 s when absent, no number or not above 0. A token service should give at least
    60 s, but one that gives less means it: kept 60 s, such a token was sent expired."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return DEFAULT_EXPIRES_IN
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return DEFAULT_EXPIRES_IN
    return float(value)


async def _read_at_most(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (the rest is not read)."""
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)
