"""Client authentication: HTTP Basic against an htpasswd file of bcrypt entries.

:class:`Htpasswd` holds the users; it is read at start and again when the file changes
(checked every 10 s). bcrypt is slow on purpose (tens of milliseconds per check), and clients
send their credentials with every request, so a successful check is remembered for a few
minutes by a keyed hash of user and password (never the password itself), and checks run in a
thread. :func:`auth_middleware` guards ``/v2/``: anonymous requests pass when
``auth.anonymous`` allows pulls, a valid user passes and is noted for the access and audit
logs, anything else gets 401 UNAUTHORIZED with a Basic challenge.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Middleware

from moorage.config import AuthSettings, ConfigError

from ._state import RequestNote
from .errors import Handler, OCIError

__all__ = ["USERS", "Htpasswd", "Unauthorized", "auth_middleware"]

log = logging.getLogger("moorage")
REMEMBER_SECONDS: Final = 300.0
CHECK_SECONDS: Final = 10.0
REALM: Final = "moorage"
_BCRYPT_PREFIXES: Final = (b"$2y$", b"$2a$", b"$2b$")


class Unauthorized(OCIError):
    code, status = "UNAUTHORIZED", 401


class Htpasswd:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, bytes] = {}
        self._mtime = 0.0
        self._remembered: dict[bytes, float] = {}
        self._key = secrets.token_bytes(32)
        self._generation = 0
        self._dummy = _DUMMY
        #: bcrypt checks get threads of their own: a flood of bad passwords must not starve
        #: the pool that serves files and the index.
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moorage-bcrypt")
        self.load()

    def load(self) -> None:
        """Read the file; a bad file is a configuration error naming the key and the line."""
        try:
            text = self.path.read_text(encoding="utf-8")
            mtime = self.path.stat().st_mtime
        except OSError as exc:
            raise ConfigError(
                "the configuration", [f"auth.htpasswd_file: cannot read {self.path}: {exc.strerror}"]
            ) from None
        users: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, hashed = line.strip().partition(":")
            if not sep or not hashed.encode().startswith(_BCRYPT_PREFIXES):
                raise ConfigError(
                    "the configuration",
                    [f"auth.htpasswd_file: {self.path} line {number}: expected user:bcrypt-hash (htpasswd -B)"],
                )
            users[user] = hashed.encode()
        costs = {int(h[4:6]) for h in users.values() if h[4:6].isdigit()}
        # An unknown user costs what a known one does, so timing does not tell names apart.
        self._dummy = bcrypt.hashpw(b"dummy", bcrypt.gensalt(max(costs))) if costs else _DUMMY
        self._users, self._mtime, self._remembered = users, mtime, {}
        self._generation += 1

    def reload_if_changed(self) -> None:
        try:
            changed = self.path.stat().st_mtime != self._mtime
        except OSError:
            return
        if changed:
            try:
                self.load()
            except ConfigError as error:
                log.error("htpasswd not reloaded", extra={"event": "htpasswd_reload_failed", "error": str(error)})
                return
            log.info("htpasswd reloaded", extra={"event": "htpasswd_reloaded", "users": len(self._users)})

    def _token(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()

    def remembered(self, user: str, password: str) -> bool:
        expires = self._remembered.get(self._token(user, password))
        return expires is not None and expires > time.monotonic()

    def check(self, user: str, password: str) -> bool:
        """bcrypt check (slow: call from a thread); remembers a success."""
        generation = self._generation
        hashed = self._users.get(user)
        try:
            if hashed is None:
                bcrypt.checkpw(b"timing", self._dummy)  # the same cost for an unknown user
                return False
            if not bcrypt.checkpw(password.encode(), hashed.replace(b"$2y$", b"$2b$", 1)):
                return False
        except ValueError:  # a password bcrypt refuses (over 72 bytes): not a match
            return False
        if generation == self._generation:  # not if the file was reloaded meanwhile
            self._remembered[self._token(user, password)] = time.monotonic() + REMEMBER_SECONDS
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            await asyncio.to_thread(self.reload_if_changed)


_DUMMY: Final = bcrypt.hashpw(b"dummy", bcrypt.gensalt(10))
#: The htpasswd users on the application, when client authentication is on.
USERS: Final = web.AppKey("users", Htpasswd)


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def auth_middleware(settings: AuthSettings, users: Htpasswd | None) -> Middleware:
    anonymous_may_pull = settings.anonymous_may_pull
    challenge = {"WWW-Authenticate": f'Basic realm="{REALM}"'}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v2"):
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is None:
            if anonymous_may_pull:
                return await handler(request)
            raise Unauthorized("authentication required", headers=challenge)
        credentials = _basic_credentials(header)
        if credentials is None or users is None:
            raise Unauthorized("only Basic credentials of a configured user are accepted", headers=challenge)
        user, password = credentials
        known = users.remembered(user, password) or await asyncio.get_running_loop().run_in_executor(
            users.executor, users.check, user, password
        )
        if not known:
            log.info(
                "authentication failed", extra={"event": "auth_failed", "user": user[:64], "client": request.remote}
            )
            raise Unauthorized("unknown user or wrong password", headers=challenge)
        request[RequestNote.USER] = user
        return await handler(request)

    return middleware
