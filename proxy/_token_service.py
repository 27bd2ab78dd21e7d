"""``/token``: the token service clients are sent to by the ``Bearer`` challenge.

As a registry's own (the distribution token spec, and its OAuth2 form): ``GET /token`` with
Basic credentials and ``service``, ``scope`` (repeatable, or space-separated) parameters, as
docker, podman and skopeo send it; ``POST /token`` with a form (``grant_type=password``,
``username``, ``password``, ``scope``), as containerd sends it. The answer is a signed token
(``token`` and ``access_token``, ``expires_in``, ``issued_at``) granting ``pull`` of the
repositories asked for; this cache is read-only, so other actions are never granted. Wrong
credentials are 401, never an anonymous token (a wrong password must not "log in"); no
credentials give an anonymous token only when anonymous pulls are allowed. Refresh tokens are
not issued, so clients keep sending their password; ``grant_type=refresh_token`` is 400, on
which containerd falls back to ``GET``. Failed sign-ins are limited per client address.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from moorage.upstreams.reference import InvalidReference, parse_repository

from ._auth import AUTHENTICATOR, basic_credentials, sign_in_refusal
from ._state import SETTINGS, notes
from .errors import OCIError

__all__ = ["token_endpoint"]

MAX_SCOPES: Final = 32


class TokenRefused(OCIError):
    code, status = "UNAUTHORIZED", 401


class GrantUnsupported(OCIError):
    code, status = "UNSUPPORTED", 400


class FormTooSlow(OCIError):
    code, status = "UNSUPPORTED", 408


def _pulls_asked(scopes: list[str]) -> frozenset[str]:
    """Repository names asked for with ``pull``; other resource types and actions are ignored."""
    names = set()
    for scope in (part for value in scopes for part in value.split()):
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind.split("(")[0] != "repository" or ("pull" not in actions.split(",") and "*" not in actions):
            continue
        try:
            parse_repository(name)
        except InvalidReference:
            continue
        names.add(name)
        if len(names) >= MAX_SCOPES:
            break
    return frozenset(names)


async def token_endpoint(request: web.Request) -> web.Response:
    authenticator = request.app[AUTHENTICATOR]
    tokens = authenticator.tokens
    if tokens is None:
        raise web.HTTPNotFound()
    user: str | None
    password: str | None
    if request.method == "POST":
        # The whole form within client_idle_timeout: one sent a byte at a time was never idle,
        # and 500 such held their connections (and a place among the requests a stop waits
        # for) for as long as their senders liked.
        allowed = request.app[SETTINGS].client_idle_timeout
        try:
            async with asyncio.timeout(allowed):
                form = await request.post()
        except TimeoutError:
            raise FormTooSlow(f"the form did not arrive within client_idle_timeout ({allowed:g}s)") from None
        grant_type = str(form.get("grant_type", ""))
        if grant_type != "password":
            raise GrantUnsupported(f"grant_type {grant_type[:40]!r} is not supported; use password, or GET with Basic")
        user, password = str(form.get("username", "")), str(form.get("password", ""))
        scopes = [str(value) for value in form.getall("scope", [])]
    else:
        header = request.headers.get("Authorization", "")
        credentials = basic_credentials(header)
        if credentials is None and header.partition(" ")[0].lower() == "basic":
            # A credential helper's broken output: an anonymous token instead would hide it.
            raise TokenRefused(
                "unreadable Basic credentials: base64 of user:password expected",
                headers={"WWW-Authenticate": 'Basic realm="moorage"'},
            )
        user, password = credentials if credentials is not None else (None, None)
        scopes = request.query.getall("scope", [])
    if user is None or password is None:
        if not authenticator.settings.anonymous_may_pull:
            raise TokenRefused("credentials required", headers={"WWW-Authenticate": 'Basic realm="moorage"'})
        subject = ""
    elif (refusal := await sign_in_refusal(request, user, password)) is None:
        subject = user
        notes(request).user = user
    else:
        raise TokenRefused(refusal, headers={"WWW-Authenticate": 'Basic realm="moorage"'})
    lifetime = authenticator.settings.token_lifetime
    login = authenticator.login_grant(password) if subject and password else None
    if login is not None:  # a token from a login token ends with it, not token_lifetime after
        lifetime = max(1.0, min(lifetime, login.expires_at - time.time()))
    version = authenticator.users.password_version(subject) if subject and authenticator.users else None
    token = tokens.issue(subject, _pulls_asked(scopes), lifetime, password_version=version or "")
    issued = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return web.json_response(
        {"token": token, "access_token": token, "expires_in": int(lifetime), "issued_at": issued},
        headers={"Cache-Control": "no-store"},
    )
