"""Client authentication: an htpasswd file of bcrypt entries, bearer tokens, Basic credentials.

:class:`Htpasswd` holds the users (and their groups, from ``auth.groups_file``); both files are
read at start and again when either changes (checked every 10 s). bcrypt is slow on purpose
(tens of milliseconds per check), so a successful check is remembered for a few minutes by a
keyed hash of user and password (never the password itself), and checks run on two threads of
their own, at most two at a time for each client. A password may also be a login token of its
user (``moorage login-password``).

:func:`auth_middleware` guards ``/v2/``. With users configured, a request without credentials
gets the token service's challenge (``Bearer realm=".../token",service="moorage"``, with the
repository's ``scope``), as a registry's own; a bearer token is verified, Basic credentials are
accepted directly. Anonymous requests pass when ``auth.anonymous`` allows pulls. Which
repositories a token grants, and the access policy, are checked once the route is known
(:func:`authorize_pull`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Middleware

from moorage.cache import MayRead
from moorage.config import NO_FILE, AuthSettings, ConfigError, FileStamp, UnreadableFile, file_stamp, read_text
from moorage.upstreams.reference import InvalidReference, parse_repository

from ._paths import parse_v2_path
from ._policy import AccessDenied, Requester, allows, authorize
from ._sign_in_limits import RATE_LIMITER, CheckSlots
from ._state import FAILURE_LINES, METRICS, notes
from ._tokens import SERVICE, Grant, TokenExpired, TokenInvalid, TokenKeys
from .errors import Handler, OCIError, TooManyRequests

__all__ = [
    "AUTHENTICATOR",
    "USERS",
    "Authenticator",
    "Htpasswd",
    "Unauthorized",
    "auth_middleware",
    "authorize_pull",
    "sign_in_refusal",
]

log = logging.getLogger("moorage")
REMEMBER_SECONDS: Final = 300.0
CHECK_SECONDS: Final = 10.0
REALM: Final = "moorage"
#: A bcrypt hash as htpasswd -B writes it: variant, a cost bcrypt takes (4 to 31), salt and hash.
_BCRYPT_HASH: Final = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
#: A Host header fit for the token realm's URL: a name (a compose service's may hold "_") or
#: an IPv4 address, or an IPv6 address in brackets, and a port. Anything else (a header
#: injection, a bracket left open) is answered with the address the client connected to.
_SAFE_HOST: Final = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


class Unauthorized(OCIError):
    code, status = "UNAUTHORIZED", 401


#: ``_failed`` while a file cannot be read: logged once, until it can again.
_UNREADABLE: Final[tuple[FileStamp, FileStamp]] = ((-1, -1, -1), (-1, -1, -1))


class Htpasswd:
    def __init__(self, path: Path, groups_path: Path | None = None) -> None:
        self.path = path
        self.groups_path = groups_path
        self._users: dict[str, bytes] = {}
        self._groups: dict[str, frozenset[str]] = {}
        self._mtime: tuple[FileStamp, FileStamp] = (NO_FILE, NO_FILE)
        #: The files' times when a reload last failed: not tried again until they change.
        self._failed: tuple[FileStamp, FileStamp] | None = None
        self._remembered: dict[bytes, float] = {}
        self._key = secrets.token_bytes(32)
        self._generation = 0
        self._dummy = _DUMMY
        #: bcrypt checks get threads of their own: a flood of bad passwords must not starve
        #: the pool that serves files and the index.
        self.executor = ThreadPoolExecutor(max_workers=CHECK_THREADS, thread_name_prefix="moorage-bcrypt")
        self.load()

    def load(self) -> None:
        """Read the file; a bad file is a configuration error naming the key and the line."""
        try:
            mtime = file_stamp(self.path)
            text = read_text(self.path)
        except (OSError, UnreadableFile) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else exc
            raise ConfigError(None, [f"auth.htpasswd_file: cannot read {self.path}: {reason}"]) from None
        users: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, hashed = line.strip().partition(":")
            if not sep or not _BCRYPT_HASH.fullmatch(hashed):  # a cost bcrypt refuses failed every sign-in
                raise ConfigError(
                    None,
                    [
                        f"auth.htpasswd_file: {self.path} line {number}: expected user:bcrypt-hash "
                        "(htpasswd -B, cost 4 to 31)"
                    ],
                )
            users[user] = hashed.encode()
        groups, groups_mtime = self._load_groups()
        costs = {int(h[4:6]) for h in users.values() if h[4:6].isdigit()}
        # An unknown user costs what the costliest known one does, and every failed check is
        # made to last as long (``slowest_check``): timing tells no names apart, also where
        # users were hashed at different costs.
        self._dummy = bcrypt.hashpw(b"dummy", bcrypt.gensalt(max(costs))) if costs else _DUMMY
        started = time.perf_counter()
        bcrypt.checkpw(b"timing", self._dummy)
        self.slowest_check = time.perf_counter() - started
        self._users, self._groups, self._remembered = users, groups, {}
        self._mtime = (mtime, groups_mtime)
        self._generation += 1

    def _load_groups(self) -> tuple[dict[str, frozenset[str]], FileStamp]:
        """``group: user1 user2`` lines, as user → groups."""
        if self.groups_path is None:
            return {}, NO_FILE
        try:
            mtime = file_stamp(self.groups_path)
            text = read_text(self.groups_path)
        except (OSError, UnreadableFile) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else exc
            raise ConfigError(None, [f"auth.groups_file: cannot read {self.groups_path}: {reason}"]) from None
        members: dict[str, set[str]] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            group, sep, names = line.partition(":")
            if not sep or not group.strip():
                raise ConfigError(
                    None,
                    [f"auth.groups_file: {self.groups_path} line {number}: expected 'group: user1 user2'"],
                )
            for user in names.split():
                members.setdefault(user, set()).add(group.strip())
        return {user: frozenset(groups) for user, groups in members.items()}, mtime

    def password_version(self, user: str) -> str | None:
        """A short fingerprint of the user's password hash; None for no such user. Tokens carry
        it, so a changed password or a removed user ends the tokens issued before."""
        hashed = self._users.get(user)
        return hashlib.sha256(hashed).hexdigest()[:16] if hashed is not None else None

    def groups_of(self, user: str | None) -> frozenset[str]:
        return self._groups.get(user, frozenset()) if user is not None else frozenset()

    def names(self) -> tuple[frozenset[str], frozenset[str]]:
        """(the users, the groups with a member) the files name."""
        return frozenset(self._users), frozenset(group for groups in self._groups.values() for group in groups)

    def _mtimes(self) -> tuple[FileStamp, FileStamp]:
        groups = file_stamp(self.groups_path) if self.groups_path is not None else NO_FILE
        return file_stamp(self.path), groups

    def reload_if_changed(self) -> None:
        """Load the files again when they changed; a version that fails is logged once, and the
        users stay as they were until the next change."""
        try:
            mtimes = self._mtimes()
        except OSError as error:  # gone (moved away, a Secret being replaced) or unreadable
            if self._failed != _UNREADABLE:
                self._failed = _UNREADABLE
                log.error(
                    "htpasswd not reloaded: the file cannot be read; the users read last stay",
                    extra={"event": "htpasswd_reload_failed", "error": error.strerror or str(error)},
                )
            return
        if mtimes == self._mtime and self._failed == _UNREADABLE:
            self._failed = None  # back as it was
        if mtimes in (self._mtime, self._failed):
            return
        try:
            self.load()
        except Exception as error:  # a bad line, a byte that is not UTF-8, anything else
            self._failed = mtimes
            log.error(
                "htpasswd not reloaded",
                exc_info=not isinstance(error, ConfigError),
                extra={"event": "htpasswd_reload_failed", "error": str(error)},
            )
            return
        self._failed = None
        log.info("htpasswd reloaded", extra={"event": "htpasswd_reloaded", "users": len(self._users)})

    @property
    def generation(self) -> int:
        """Changes with every reload of the file."""
        return self._generation

    def _token(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()

    def remembered(self, user: str, password: str) -> bool:
        expires = self._remembered.get(self._token(user, password))
        return expires is not None and expires > time.monotonic()

    def check(self, user: str, password: str) -> bool:
        """bcrypt check (slow: call from a thread); remembers a success."""
        generation = self._generation
        hashed = self._users.get(user)
        # bcrypt reads the first 72 bytes, as htpasswd wrote the hash from them; the library
        # refuses more, at once, which would tell a known user from an unknown one by time.
        given = password.encode()[:72]
        if hashed is None:
            bcrypt.checkpw(b"timing", self._dummy)  # the same cost for an unknown user
            return False
        try:
            if not bcrypt.checkpw(given, hashed.replace(b"$2y$", b"$2b$", 1)):
                return False
        except ValueError:  # a hash bcrypt cannot read (the file is checked at load): no match
            return False
        if generation == self._generation:  # not if the file was reloaded meanwhile
            self._remembered[self._token(user, password)] = time.monotonic() + REMEMBER_SECONDS
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            await asyncio.to_thread(self.reload_if_changed)


_DUMMY: Final = bcrypt.hashpw(b"dummy", bcrypt.gensalt(10))
#: Threads for bcrypt checks, and the checks each client may have in flight: a client never has
#: more queued than there are threads, so another's check waits behind two checks of each
#: client bursting at once, not behind every guess of one.
CHECK_THREADS: Final = 2
#: The htpasswd users on the application, when client authentication is on.
USERS: Final = web.AppKey("users", Htpasswd)


def basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class Authenticator:
    """Who a request is: from a bearer token, Basic credentials, or nobody."""

    def __init__(self, settings: AuthSettings, users: Htpasswd | None, tokens: TokenKeys | None) -> None:
        self.settings = settings
        self.users = users
        self.tokens = tokens
        #: Password checks running, by a keyed hash of user and password: the same sign-in
        #: sent many times at once (a fleet starting) is checked, and charged, once.
        self._checks: dict[bytes, asyncio.Task[bool]] = {}
        self._check_key = secrets.token_bytes(32)
        self.check_slots = CheckSlots(CHECK_THREADS)

    def _check_of(self, user: str, password: str) -> bytes:
        """The sign-in, against the users file as loaded now (a check begun before a reload
        must not answer for the new file)."""
        generation = self.users.generation if self.users is not None else 0
        text = f"{generation}:{len(user)}:{user}{password}"
        return hmac.new(self._check_key, text.encode(), hashlib.sha256).digest()

    def check_running(self, user: str, password: str) -> asyncio.Task[bool] | None:
        """The check of this very sign-in already running, if one is."""
        return self._checks.get(self._check_of(user, password))

    def start_check(self, user: str, password: str, client: str) -> asyncio.Task[bool]:
        key = self._check_of(user, password)
        task = asyncio.get_running_loop().create_task(self.password_ok(user, password, client))
        self._checks[key] = task

        def done(finished: asyncio.Task[bool]) -> None:
            self._checks.pop(key, None)
            if not finished.cancelled():
                finished.exception()  # retrieved even when every waiter has left

        task.add_done_callback(done)
        return task

    async def password_ok(self, user: str, password: str, client: str) -> bool:
        """An htpasswd user's password, or a login token of that user; a bcrypt check takes
        one of ``client``'s slots."""
        users = self.users
        if users is None:
            return False
        grant = self.login_grant(password)
        if grant is not None:
            return grant.user == user and self.still_valid(grant)
        if users.remembered(user, password):
            return True
        started = time.perf_counter()
        async with self.check_slots.held(client):
            if await asyncio.get_running_loop().run_in_executor(users.executor, users.check, user, password):
                return True
        # A wrong password for a user hashed at a lower cost fails sooner than an unknown name.
        await asyncio.sleep(max(0.0, users.slowest_check - (time.perf_counter() - started)))
        return False

    def login_grant(self, password: str) -> Grant | None:
        """What a login token given as a password grants (``moorage login-password``); None
        for anything else, the user's real password among them."""
        if self.tokens is None or not _shaped_as_token(password):
            return None
        try:
            return self.tokens.verify(password, "login")
        except TokenInvalid:
            return None  # not one of ours: it may still be the user's real password

    def ended_login_token(self, user: str, password: str) -> str | None:
        """Why a login token of this cache, given as ``user``'s password, no longer signs in:
        it expired, or its user was removed or changed password since. None for anything
        else. Such a token cannot be a guess (its signature is this cache's): it was checked
        as a password, charged to the client's budget of failed sign-ins and answered "wrong
        password", and a CI fleet still holding yesterday's token throttled the jobs that
        had today's."""
        if self.tokens is None or not _shaped_as_token(password):
            return None
        try:
            grant = self.tokens.verify(password, "login")
        except TokenExpired as expired:
            when = datetime.fromtimestamp(expired.expired_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return f"the login token expired at {when}; get another with moorage login-password"
        except TokenInvalid:
            return None
        if grant.user == user and not self.still_valid(grant):
            return (
                f"the login token's user {user!r} was removed or changed password since it was issued;"
                " get another with moorage login-password"
            )
        return None

    def still_valid(self, grant: Grant) -> bool:
        """A token's user still exists with the same password; an anonymous token only while
        anonymous pulls are allowed."""
        if not grant.user:
            return self.settings.anonymous_may_pull
        version = self.users.password_version(grant.user) if self.users is not None else None
        return version is not None and version == grant.password_version

    def challenge(self, request: web.Request, error: str | None = None) -> dict[str, str]:
        if self.tokens is None:
            return {"WWW-Authenticate": f'Basic realm="{REALM}"'}
        realm = self.settings.token_realm or f"{request.scheme}://{_realm_host(request)}/token"
        value = f'Bearer realm="{realm}",service="{SERVICE}"'
        target = parse_v2_path(request.raw_path)
        if target is not None and target.name:
            with contextlib.suppress(InvalidReference):  # an invalid name gets NAME_INVALID, no scope
                value += f',scope="repository:{parse_repository(target.name)}:pull"'
        if error is not None:
            value += f',error="{error}"'
        return {"WWW-Authenticate": value}

    def refuse(self, request: web.Request, message: str, error: str | None = None) -> Unauthorized:
        _note_kind(request)
        return Unauthorized(message, headers=self.challenge(request, error))


def _realm_host(request: web.Request) -> str:
    """The host and port of the token realm the challenge names: the request's own Host, or
    where that is unfit for a URL, the address the client connected to. ("localhost" had
    stood in, with no port: a client sent its credentials to its own port 80.)"""
    if _SAFE_HOST.fullmatch(request.host):
        return request.host
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return "localhost"
    address, port = str(sockname[0]).partition("%")[0], int(sockname[1])
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _shaped_as_token(password: str) -> bool:
    """Whether a password may be a token this cache signed (a JWT: three parts, a JSON header)."""
    return password.count(".") == 2 and password.startswith("eyJ")


def _note_kind(request: web.Request) -> None:
    """A pull refused before its handler is counted under its route's kind (a manifest's 401
    among manifests), not as ``other``; as the handler does, pushes and other methods stay
    ``other``, and a path that names nothing valid is left to the refusal."""
    if request.method not in ("GET", "HEAD"):
        return
    with contextlib.suppress(InvalidReference):
        target = parse_v2_path(request.raw_path)
        if target is not None and target.kind != "upload":
            notes(request).kind = target.kind


async def sign_in_refusal(request: web.Request, user: str, password: str) -> str | None:
    """Why a sign-in is refused, or None when it succeeds. Its password is charged to the
    client's budget of failures (``/token`` and ``/v2/`` alike) before the check and refunded
    when it succeeds; 429 once that budget is spent. A success already remembered costs
    nothing, a sign-in being checked for another request is waited for, not charged again,
    and a login token of this cache that ended is refused, saying so, and not charged."""
    authenticator = request.app[AUTHENTICATOR]
    if authenticator.users is not None and authenticator.users.remembered(user, password):
        return None
    ended = authenticator.ended_login_token(user, password)
    if ended is not None:
        _log_auth_failed(request, user, ended)
        return ended
    limiter, client = request.app[RATE_LIMITER], request.remote or ""
    running = authenticator.check_running(user, password)
    charged = running is None
    if running is None:
        wait = limiter.allow(client, user)
        if wait is not None:
            _note_kind(request)
            # Password guessing, or a client with a stale password: worth a warning, once a
            # while for each client and user (each refusal has its access line, status 429).
            left_out = request.app[FAILURE_LINES].admit(("sign_in_throttled", client, user[:64]))
            if left_out is not None:
                log.warning(
                    "failed sign-ins throttled",
                    extra={
                        "event": "sign_in_throttled",
                        "user": user[:64],
                        "client": client,
                        "request_id": notes(request).request_id,
                        "left_out": left_out,
                    },
                )
            raise TooManyRequests("too many failed sign-ins; slow down", headers={"Retry-After": str(int(wait) + 1)})
        running = authenticator.start_check(user, password, client)
    if await asyncio.shield(running):  # a request that leaves does not end others' check
        if charged:
            limiter.refund(client, user)
        return None
    refusal = "unknown user or wrong password"
    _log_auth_failed(request, user, refusal)
    return refusal


def _log_auth_failed(request: web.Request, user: str, refusal: str) -> None:
    log.info(
        "authentication failed",
        extra={
            "event": "auth_failed",
            "user": user[:64],
            "client": request.remote,
            "request_id": notes(request).request_id,
            "path": request.path[:200],
            "error": refusal,
        },
    )


def auth_middleware(authenticator: Authenticator) -> Middleware:
    anonymous_may_pull = authenticator.settings.anonymous_may_pull
    # With users and a policy (which may keep repositories for users), the API check answers as
    # Docker Hub's does: a challenge, so that clients holding credentials sign in (docker,
    # containerd and containers/image send them only when challenged) and the others take an
    # anonymous token. Without a policy an anonymous request may pull all a user may, so the
    # check answers 200: a challenge would only make docker send its Docker Hub login to its
    # mirror, have it refused, and pull past the cache.
    challenge_api_check = authenticator.users is not None and bool(authenticator.settings.policy)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v2"):
            return await handler(request)
        if authenticator.users is None:
            # No users: everyone may pull, and credentials are nobody's to check (a containerd
            # hosts.toml header, a daemon's Docker Hub login): refusing them sent such clients
            # past the cache.
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is None:
            if anonymous_may_pull and not (challenge_api_check and request.path in ("/v2", "/v2/")):
                return await handler(request)
            raise authenticator.refuse(request, "authentication required")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and authenticator.tokens is not None:
            try:
                grant = authenticator.tokens.verify(value.strip())
            except TokenInvalid as exc:
                raise authenticator.refuse(request, str(exc), error="invalid_token") from None
            if not authenticator.still_valid(grant):
                raise authenticator.refuse(
                    request,
                    "the token's user was removed or changed password, or anonymous pulls ended",
                    error="invalid_token",
                )
            note = notes(request)
            if grant.user:
                note.user = grant.user
            note.granted = grant.repositories
            return await handler(request)
        credentials = basic_credentials(header)
        if credentials is None or authenticator.users is None:
            raise authenticator.refuse(request, "only credentials of a configured user are accepted")
        user, password = credentials
        refusal = await sign_in_refusal(request, user, password)
        if refusal is not None:
            raise authenticator.refuse(request, refusal)
        notes(request).user = user
        return await handler(request)

    return middleware


def authorize_pull(request: web.Request, name: str, upstream: str, repository: str) -> MayRead:
    """Once the route is known: the token must grant this repository, and the access policy
    must not deny it. Raises AccessDenied (403 DENIED) naming the reason.

    Returns which routes the requester may read content through, for the cache's check of
    content held under other routes; None (every route) when there is no policy. A token's
    grant narrows nothing further: the token service grants the repositories asked for, and the
    policy is checked here on every request."""
    note = notes(request)
    granted = note.granted
    if granted is not None and name not in granted:
        raise AccessDenied(
            f"the token grants no pull of {name}; ask the token service for scope repository:{name}:pull"
        )
    authenticator = request.app[AUTHENTICATOR]
    rules = authenticator.settings.policy
    if not rules:
        return None
    user = note.user
    groups = authenticator.users.groups_of(user) if authenticator.users is not None else frozenset()
    requester = Requester(user, groups, request.remote)
    try:
        authorize(rules, requester, upstream, repository)
    except AccessDenied as denied:
        note.denied_by = denied.rule
        challenged = user is None and authenticator.users is not None  # a user might be allowed: ask
        request.app[METRICS].on_policy_denial(upstream, denied.rule, "challenged" if challenged else "refused")
        if challenged:
            raise authenticator.refuse(request, f"{denied.message}; sign in") from None
        raise
    return lambda other_upstream, other_repository: allows(rules, requester, other_upstream, other_repository)


#: How the application tells who a request is.
AUTHENTICATOR: Final = web.AppKey("authenticator", Authenticator)
