"""The token service and the access policy: tokens as a registry's own (GET with Basic, the
OAuth2 POST containerd sends), scoped to repositories, short-lived, signed; login tokens as
passwords; policy rules by user, group, anonymous and client network, denials naming the rule."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import jwt
import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.test_utils import TestClient
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec

import moorage.proxy._tokens as tokens_module
from moorage.config import PolicyRule
from moorage.proxy._auth import AUTHENTICATOR, USERS
from moorage.proxy._logging import MalformedRequests
from moorage.proxy._policy import AccessDenied, Requester, authorize
from moorage.proxy._sign_in_limits import RATE_LIMITER, RateLimiter
from moorage.proxy._tokens import TokenExpired, TokenInvalid, TokenKeys
from moorage.proxy.cli import main
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS
from tests.fakes import FakeRegistry
from tests.polling import until

from .conftest import StartMoorage, metric

Client = TestClient[web.Request, web.Application]
PASSWORD = "correct horse battery staple"
OTHER_PASSWORD = "another long passphrase"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": ACCEPT_ALL_MANIFESTS}


@pytest.fixture
def auth_files(tmp_path: Path) -> dict[str, str]:
    def entry(user: str, password: str) -> str:
        return f"{user}:" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{entry('ci', PASSWORD)}\n{entry('alice', OTHER_PASSWORD)}\n")
    groups = tmp_path / "groups"
    groups.write_text("# teams\nml: alice\n")
    return {"htpasswd_file": str(htpasswd), "groups_file": str(groups)}


@pytest.fixture
def images(upstream: FakeRegistry) -> FakeRegistry:
    upstream.add_image("library/alpine", "3.19")
    upstream.add_image("library/busybox", "1")
    upstream.add_image("team/model", "v1")
    return upstream


async def fetch_token(
    moorage: Client, user: str, password: str, *scopes: str, lasting: int = 12 * 3600, at_most: int = 12 * 3600
) -> str:
    """A token from /token; its ``expires_in`` between ``lasting`` and ``at_most`` (ECR's 12
    hours by default)."""
    query = [("service", "moorage"), *(("scope", s) for s in scopes)]
    response = await moorage.get("/token", params=query, headers=basic(user, password))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["token"] == body["access_token"]
    assert lasting <= body["expires_in"] <= at_most, body["expires_in"]
    assert body["issued_at"].endswith("Z")
    return str(body["token"])


async def test_the_token_dance_of_docker_podman_and_skopeo(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    moorage = await start_moorage(auth=auth_files)
    probe = await moorage.get("/v2/")
    assert probe.status == 401
    assert probe.headers["WWW-Authenticate"].startswith("Bearer realm=")
    token = await fetch_token(moorage, "ci", PASSWORD, "repository:alpine:pull")
    assert (await moorage.get("/v2/", headers=bearer(token))).status == 200
    pulled = await moorage.get("/v2/alpine/manifests/3.19", headers=bearer(token))
    assert pulled.status == 200
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": "alpine", "actions": ["pull"]}]
    assert claims["sub"] == "ci" and claims["aud"] == "moorage"
    assert jwt.get_unverified_header(token)["alg"] == "ES256"


async def test_a_token_for_one_repository_is_denied_on_another(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    moorage = await start_moorage(auth=auth_files)
    token = await fetch_token(moorage, "ci", PASSWORD, "repository:alpine:pull")
    response = await moorage.get("/v2/busybox/manifests/1", headers=bearer(token))
    assert response.status == 403
    error = (await response.json())["errors"][0]
    assert error["code"] == "DENIED" and "busybox" in error["message"]


async def test_a_refused_sign_in_counts_under_its_routes_kind(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """A dashboard of manifest errors shows the pulls refused for their credentials: they were
    counted as ``other``."""
    moorage = await start_moorage(auth=auth_files)
    for headers in ({}, basic("ci", "guess")):
        assert (await moorage.get("/v2/alpine/manifests/3.19", headers=headers)).status == 401
    assert (await moorage.get("/v2/alpine/blobs/sha256:" + "0" * 64, headers=basic("ci", "guess"))).status == 401
    assert await metric(moorage, "moorage_requests_total", kind="manifest", status="401") == 2
    assert await metric(moorage, "moorage_requests_total", kind="blob", status="401") == 1
    assert await metric(moorage, "moorage_requests_total", kind="other", status="401") == 0
    # Their time, answered before any work, stays out of the routes' latency.
    assert await metric(moorage, "moorage_request_duration_seconds_count", kind="manifest") == 0
    # A push refused stays "other", as one signed in is; a path naming nothing valid is refused.
    assert (await moorage.post("/v2/alpine/blobs/uploads/", headers=basic("ci", "guess"))).status == 401
    assert await metric(moorage, "moorage_requests_total", kind="upload") == 0
    assert (await moorage.get("/v2/alp%69ne/manifests/1", headers=basic("ci", "guess"))).status == 401


async def test_credentials_are_no_one_s_to_check_without_users(
    start_moorage: StartMoorage, images: FakeRegistry
) -> None:
    """Without an htpasswd file everyone may pull: a client that sends credentials anyway (a
    containerd hosts.toml header, a daemon's Docker Hub login) was refused, and went past the
    cache."""
    moorage = await start_moorage()
    for headers in (basic("someone", "their Docker Hub token"), {"Authorization": "Bearer not-ours"}):
        response = await moorage.get("/v2/alpine/manifests/3.19", headers=headers)
        assert response.status == 200, await response.text()


async def test_push_is_never_granted(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    moorage = await start_moorage(auth=auth_files)
    token = await fetch_token(moorage, "ci", PASSWORD, "repository:alpine:push", "repository:busybox:pull,push")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": "busybox", "actions": ["pull"]}]


async def test_wrong_passwords_expired_and_forged_tokens_are_401(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str], tmp_path: Path
) -> None:
    moorage = await start_moorage(auth={**auth_files, "token_lifetime": "60s"})
    wrong = await moorage.get("/token", params={"scope": "repository:alpine:pull"}, headers=basic("ci", "guess"))
    assert wrong.status == 401, "a wrong password never gets an anonymous token"
    unknown = await moorage.get("/token", headers=basic("mallory", PASSWORD))
    assert unknown.status == 401
    assert (await moorage.get("/token")).status == 401, "anonymous pulls are off once users exist"

    key = (tmp_path / "store" / "auth" / "token-key.pem").read_bytes()
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "moorage",
        "sub": "ci",
        "aud": "moorage",
        "iat": now - 7200,
        "nbf": now - 7200,
        "exp": now - 3600,
        "access": [{"type": "repository", "name": "alpine", "actions": ["pull"]}],
    }
    expired = jwt.encode(claims, key, algorithm="ES256")
    response = await moorage.get("/v2/alpine/manifests/3.19", headers=bearer(expired))
    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert "expired" in (await response.json())["errors"][0]["message"]
    # Valid for its lifetime, not a minute longer: the clock skew allowed is a few seconds.
    just_expired = jwt.encode({**claims, "iat": now - 90, "nbf": now - 90, "exp": now - 30}, key, algorithm="ES256")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=bearer(just_expired))).status == 401
    forged = jwt.encode(
        {**claims, "exp": now + 3600}, "a guessed secret, at least thirty-two bytes long", algorithm="HS256"
    )
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=bearer(forged))).status == 401
    garbled = await moorage.get("/v2/alpine/manifests/3.19", headers=bearer("abc.def.ghi"))
    assert garbled.status == 401
    assert (await garbled.json())["errors"][0]["message"] == "the token is not one this cache issued"


async def test_containerd_oauth2_post(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    moorage = await start_moorage(auth=auth_files)
    form = {
        "grant_type": "password",
        "username": "ci",
        "password": PASSWORD,
        "service": "moorage",
        "client_id": "containerd-client",
        "scope": "repository:alpine:pull repository:busybox:pull",
    }
    response = await moorage.post("/token", data=form)
    assert response.status == 200
    token = (await response.json())["access_token"]
    for path in ("/v2/alpine/manifests/3.19", "/v2/busybox/manifests/1"):
        assert (await moorage.get(path, headers=bearer(token))).status == 200
    wrong = await moorage.post("/token", data={**form, "password": "guess"})
    assert wrong.status == 401
    refresh = await moorage.post("/token", data={"grant_type": "refresh_token", "refresh_token": "x"})
    assert refresh.status == 400, "containerd falls back to GET on 400"


async def test_login_password_prints_a_token_that_works_as_a_password(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str], tmp_path: Path
) -> None:
    moorage = await start_moorage(auth=auth_files)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"storage": {"path": str(tmp_path / "store")}, "auth": auth_files}))
    printed = CliRunner().invoke(main, ["login-password", "--user", "ci", "--config", str(config)])
    assert printed.exit_code == 0, printed.output
    login = printed.output.strip()
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", login))).status == 200
    token = await fetch_token(moorage, "ci", login, "repository:alpine:pull", lasting=12 * 3600 - 60)
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=bearer(token))).status == 200
    # A token got with a login token ends with it, not token_lifetime (12 h) after.
    short = CliRunner().invoke(main, ["login-password", "--user", "ci", "--lifetime", "2m", "--config", str(config)])
    assert short.exit_code == 0, short.output
    await fetch_token(moorage, "ci", short.output.strip(), "repository:alpine:pull", lasting=60, at_most=120)
    assert (await moorage.get("/v2/", headers=basic("alice", login))).status == 401, "it is ci's, not alice's"
    assert (await moorage.get("/v2/", headers=bearer(login))).status == 401, "a login token is no bearer"
    assert (await moorage.get("/v2/", headers=basic("ci", token))).status == 401, "an access token is no password"
    stranger = CliRunner().invoke(main, ["login-password", "--user", "mallory", "--config", str(config)])
    assert stranger.exit_code == 2 and "mallory" in stranger.output


def test_login_password_away_from_the_store_mints_nothing(auth_files: dict[str, str], tmp_path: Path) -> None:
    """Run where the settings' store is not (another directory, another machine), it made a
    new signing key there and printed a token the daemon refused."""
    store = tmp_path / "not-here"
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"storage": {"path": str(store)}, "auth": auth_files}))
    printed = CliRunner().invoke(main, ["login-password", "--user", "ci", "--config", str(config)])
    assert printed.exit_code == 2 and "no Moorage store at" in printed.output, printed.output
    assert not store.exists(), "no key made"


def test_login_password_on_a_store_with_no_key_yet_makes_none(auth_files: dict[str, str], tmp_path: Path) -> None:
    """A store served before users were set has no key: one made here, as whoever runs the
    command (root), was one the daemon's user could not read at its next start."""
    store = tmp_path / "store"
    (store / "index").mkdir(parents=True)
    (store / "blobs").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"storage": {"path": str(store)}, "auth": auth_files}))
    printed = CliRunner().invoke(main, ["login-password", "--user", "ci", "--config", str(config)])
    assert printed.exit_code == 2 and "no token signing key in the store yet" in printed.output, printed.output
    assert not (store / "auth").exists(), "no key made"


async def test_token_requests_are_rate_limited_per_client(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Guessing is one warning, once a while for each client and user (it was info lines
    alone), and each failed sign-in names its request, to join it to its access line."""
    caplog.set_level("INFO", logger="moorage")
    moorage = await start_moorage(auth={**auth_files, "token_requests_per_minute": 5})
    statuses = [(await moorage.get("/token", headers=basic("ci", "guess"))).status for _ in range(8)]
    assert statuses[:5] == [401] * 5
    assert statuses[5:] == [429] * 3
    limited = await moorage.get("/token", headers=basic("ci", PASSWORD))
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    (throttled,) = [r for r in caplog.records if getattr(r, "event", "") == "sign_in_throttled"]
    assert throttled.levelname == "WARNING" and (throttled.__dict__["user"], throttled.__dict__["client"]) == (
        "ci",
        "127.0.0.1",
    )
    failed = [r for r in caplog.records if getattr(r, "event", "") == "auth_failed"]
    assert len(failed) == 5 and all(r.__dict__["request_id"] and r.__dict__["path"] == "/token" for r in failed)


async def test_guesses_at_one_user_do_not_lock_the_others_out(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """Behind an ingress every client has its address: a daemon sending a stale login, or a
    guesser, spends the budget of the name it tries, and the client's budget across names
    (three times as large) bounds guessing at many names."""
    moorage = await start_moorage(auth={**auth_files, "token_requests_per_minute": 2})
    statuses = [(await moorage.get("/token", headers=basic("ci", "guess"))).status for _ in range(3)]
    assert statuses == [401, 401, 429]
    assert (await moorage.get("/token", headers=basic("alice", OTHER_PASSWORD))).status == 200
    assert (await moorage.get("/token", headers=basic("alice", "guess"))).status == 401, "alice's own budget"
    names = [(await moorage.get("/token", headers=basic(f"user{n}", "guess"))).status for n in range(6)]
    assert names == [401] * 3 + [429] * 3, "6 failures a minute from one client, whatever the names"


async def test_sign_ins_that_succeed_and_anonymous_tokens_are_never_limited(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """Behind a NAT or an ingress a whole fleet shares one address: only failures count."""
    moorage = await start_moorage(auth={**auth_files, "anonymous": "pull", "token_requests_per_minute": 2})
    for _ in range(6):
        assert (await moorage.get("/token", headers=basic("ci", PASSWORD))).status == 200
        assert (await moorage.get("/token", params={"scope": "repository:alpine:pull"})).status == 200
        assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", PASSWORD))).status == 200
    statuses = [(await moorage.get("/token", headers=basic("ci", "guess"))).status for _ in range(3)]
    assert statuses == [401, 401, 429]


def test_the_addresses_of_one_ipv6_64_share_one_budget() -> None:
    """A host usually holds a whole /64: keyed by address, it would guess passwords without
    end, one address per guess."""
    limiter = RateLimiter(2)
    allowed = [limiter.allow(f"2001:db8::{number:x}", "alice") is None for number in range(1, 50)]
    assert allowed.count(True) == 2
    assert limiter.allow("2001:db8:0:1::1", "alice") is None, "another /64 is another client"
    assert limiter.allow("::ffff:192.0.2.7", "alice") is None
    assert limiter.allow("192.0.2.7", "alice") is None
    assert limiter.allow("192.0.2.7", "alice") is not None, "an IPv4-mapped address is that IPv4 client"


async def test_a_fleet_signing_in_at_once_is_checked_once_and_not_limited(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many nodes behind one NAT address start together with the same credentials: while the
    first check runs (bcrypt, on two threads), the others wait for it instead of each spending
    from the budget of failures."""
    moorage = await start_moorage(auth={**auth_files, "token_requests_per_minute": 2})
    users = moorage.app[USERS]
    checks = []
    real_check = users.check

    def slow_check(user: str, password: str) -> bool:
        checks.append(user)
        time.sleep(0.3)  # a production bcrypt cost
        return real_check(user, password)

    monkeypatch.setattr(users, "check", slow_check)
    statuses = await asyncio.gather(*(moorage.get("/token", headers=basic("ci", PASSWORD)) for _ in range(6)))
    assert [response.status for response in statuses] == [200] * 6
    assert checks == ["ci"], "one bcrypt check for six sign-ins"


async def test_one_client_s_burst_of_guesses_does_not_queue_ahead_of_another_s_sign_in(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bcrypt checks run on two threads in the order they come. A client spending its budget of
    failures at once queued every guess ahead of another client's sign-in, which waited behind
    them all (14 to 22 s for a review's burst); now a client has at most two checks in flight."""
    moorage = await start_moorage(auth=auth_files)
    users = moorage.app[USERS]
    real_check, real_submit = users.check, users.executor.submit
    release = threading.Event()
    checked: list[str] = []
    queued: list[str] = []

    def held_check(user: str, password: str) -> bool:
        checked.append(user)
        release.wait(10)
        return real_check(user, password)

    def submit(function: Any, /, *args: Any) -> Any:
        queued.append(args[0])
        return real_submit(function, *args)

    limiter = moorage.app[RATE_LIMITER]
    real_allow, charged = limiter.allow, []

    def allow(address: str, user: str) -> float | None:
        charged.append(user)
        return real_allow(address, user)

    monkeypatch.setattr(users, "check", held_check)
    monkeypatch.setattr(users.executor, "submit", submit)
    monkeypatch.setattr(limiter, "allow", allow)
    guesses = [asyncio.ensure_future(moorage.get("/token", headers=basic("ci", f"guess {n}"))) for n in range(12)]
    await until(lambda: len(charged) == 12 and len(checked) == 2)  # all in; the first two hold both threads
    await asyncio.sleep(0.05)  # the other ten reach the executor's queue, or wait for a slot
    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=elsewhere) as other:
        token_url = moorage.make_url("/token")
        signing_in = asyncio.ensure_future(other.get(token_url, headers=basic("alice", OTHER_PASSWORD)))
        await until(lambda: "alice" in queued)
        release.set()
        assert (await signing_in).status == 200
    assert [response.status for response in await asyncio.gather(*guesses)] == [401] * 12
    assert checked.index("alice") == 2, f"checked after {checked.index('alice')} guesses"


async def test_a_sign_in_after_a_password_change_is_checked_anew(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It does not join a check of the same password begun against the old file."""
    moorage = await start_moorage(auth=auth_files)
    users = moorage.app[USERS]
    real_check = users.check
    checked = threading.Event()

    def slow_check(user: str, password: str) -> bool:
        verdict = real_check(user, password)  # against the file as it is when the check begins
        checked.set()
        time.sleep(0.3)
        return verdict

    monkeypatch.setattr(users, "check", slow_check)
    before = asyncio.ensure_future(moorage.get("/token", headers=basic("ci", PASSWORD)))
    assert await asyncio.to_thread(checked.wait, 10)  # its check has read the file and runs on
    htpasswd = Path(auth_files["htpasswd_file"])
    changed = bcrypt.hashpw(b"a new passphrase", bcrypt.gensalt(4)).decode()
    htpasswd.write_text(f"ci:{changed}\n")
    os.utime(htpasswd, (time.time() + 5, time.time() + 5))
    users.reload_if_changed()
    after = await moorage.get("/token", headers=basic("ci", PASSWORD))
    assert after.status == 401, "the old password no longer signs in"
    assert (await before).status == 200, "begun before the change, it is judged by the old file"


POLICY = [
    {
        "effect": "allow",
        "description": "CI pulls everything from docker.io",
        "users": ["ci"],
        "repositories": ["docker.io/*"],
    },
    {"effect": "allow", "description": "ml pulls the models", "groups": ["ml"], "repositories": ["docker.io/team/*"]},
    {"effect": "deny", "description": "nobody else", "repositories": ["*"]},
]


async def test_policy_rules_by_user_and_group_deny_naming_the_rule(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    moorage = await start_moorage(auth={**auth_files, "policy": POLICY})
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", PASSWORD))).status == 200
    assert (await moorage.get("/v2/team/model/manifests/v1", headers=basic("alice", OTHER_PASSWORD))).status == 200
    denied = await moorage.get("/v2/alpine/manifests/3.19", headers=basic("alice", OTHER_PASSWORD))
    assert denied.status == 403
    error = (await denied.json())["errors"][0]
    assert error["code"] == "DENIED"
    assert error["message"] == (
        "pull of docker.io/library/alpine by user 'alice' is denied by access policy rule 3 (nobody else)"
    )
    # An operator sees which rule refuses, in the access line and the metrics.
    [line] = [r for r in caplog.records if getattr(r, "event", "") == "request" and r.__dict__.get("status") == 403]
    assert line.__dict__["denied_by_rule"] == 3 and line.__dict__["user"] == "alice"
    assert await metric(moorage, "moorage_policy_denials_total", upstream="docker.io", rule="3", answer="refused") == 1
    token = await fetch_token(moorage, "alice", OTHER_PASSWORD, "repository:alpine:pull")
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=bearer(token))).status == 403, (
        "a token does not get round the policy"
    )


async def test_policy_rules_by_network_and_for_anonymous_pulls(
    start_moorage: StartMoorage, images: FakeRegistry
) -> None:
    policy = [
        {"effect": "deny", "description": "outside the office", "anonymous": True, "cidrs": ["10.0.0.0/8"]},
        {"effect": "allow", "anonymous": True, "cidrs": ["127.0.0.0/8"], "repositories": ["docker.io/library/*"]},
        {"effect": "deny", "description": "the rest", "anonymous": True},
    ]
    moorage = await start_moorage(auth={"anonymous": "pull", "policy": policy})
    assert (await moorage.get("/v2/alpine/manifests/3.19")).status == 200
    denied = await moorage.get("/v2/team/model/manifests/v1")
    assert denied.status == 403
    assert "rule 3 (the rest)" in (await denied.json())["errors"][0]["message"]


async def test_with_users_and_a_policy_the_api_check_asks_clients_to_sign_in(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """Clients send credentials only when challenged; a policy may keep repositories for users."""
    policy = [{"effect": "deny", "anonymous": True, "repositories": ["docker.io/team/*"]}]
    moorage = await start_moorage(auth={**auth_files, "anonymous": "pull", "policy": policy})
    api_check = await moorage.get("/v2/")
    assert api_check.status == 401
    assert api_check.headers["WWW-Authenticate"].startswith('Bearer realm="http://')
    assert (await moorage.get("/v2/alpine/manifests/3.19")).status == 200, "anonymous pulls go on"
    kept = await moorage.get("/v2/team/model/manifests/v1")
    assert kept.status == 401 and "scope=" in kept.headers["WWW-Authenticate"], "denied anonymously: sign in"
    token = await fetch_token(moorage, "ci", PASSWORD, "repository:team/model:pull")
    assert (await moorage.get("/v2/team/model/manifests/v1", headers=bearer(token))).status == 200


async def test_a_changed_password_or_a_removed_user_ends_their_tokens(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str], tmp_path: Path
) -> None:
    moorage = await start_moorage(auth=auth_files)
    token = await fetch_token(moorage, "ci", PASSWORD, "repository:alpine:pull")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"storage": {"path": str(tmp_path / "store")}, "auth": auth_files}))
    login = CliRunner().invoke(main, ["login-password", "--user", "ci", "--config", str(config)]).output.strip()
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=bearer(token))).status == 200
    htpasswd = Path(auth_files["htpasswd_file"])
    kept = [line for line in htpasswd.read_text().splitlines() if not line.startswith("ci:")]
    new_hash = bcrypt.hashpw(b"a brand new passphrase", bcrypt.gensalt(4)).decode()
    htpasswd.write_text("\n".join([*kept, f"ci:{new_hash}"]) + "\n")
    os.utime(htpasswd, (time.time() + 5, time.time() + 5))  # a visibly newer file
    moorage.app[USERS].reload_if_changed()
    revoked = await moorage.get("/v2/alpine/manifests/3.19", headers=bearer(token))
    assert revoked.status == 401 and 'error="invalid_token"' in revoked.headers["WWW-Authenticate"]
    assert (await moorage.get("/v2/", headers=basic("ci", login))).status == 401, "login tokens end too"
    assert (await moorage.get("/v2/", headers=basic("ci", "a brand new passphrase"))).status == 200


async def test_failed_basic_sign_ins_on_v2_share_the_token_budget(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    moorage = await start_moorage(auth={**auth_files, "token_requests_per_minute": 3})
    statuses = [(await moorage.get("/v2/", headers=basic("ci", f"guess {n}"))).status for n in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    assert (await moorage.get("/token", headers=basic("ci", PASSWORD))).status == 429


async def test_a_login_token_that_ended_says_so_and_costs_no_sign_in_budget(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """An expired login token was checked as a password, answered "unknown user or wrong
    password" and charged as a failed sign-in: a CI fleet behind one address still holding
    yesterday's token throttled the jobs that had today's with 429s."""
    moorage = await start_moorage(auth={**auth_files, "token_requests_per_minute": 3})
    authenticator = moorage.app[AUTHENTICATOR]
    assert authenticator.tokens is not None and authenticator.users is not None
    version = authenticator.users.password_version("ci") or ""
    expired = authenticator.tokens.issue("ci", frozenset(), -60, "login", password_version=version)
    revoked = authenticator.tokens.issue("ci", frozenset(), 3600, "login", password_version="an older password")
    for _ in range(5):
        on_api = await moorage.get("/v2/", headers=basic("ci", expired))
        assert on_api.status == 401 and "login token expired at" in await on_api.text()
        on_token = await moorage.get("/token", headers=basic("ci", revoked))
        assert on_token.status == 401 and "changed password since" in await on_token.text()
    today = authenticator.tokens.issue("ci", frozenset(), 3600, "login", password_version=version)
    assert (await moorage.get("/v2/", headers=basic("ci", today))).status == 200
    assert (await moorage.get("/token", headers=basic("ci", today))).status == 200
    guesses = [(await moorage.get("/v2/", headers=basic("ci", f"guess {n}"))).status for n in range(4)]
    assert guesses == [401, 401, 401, 429], "a password guess is charged as before"


async def test_the_challenge_takes_nothing_unchecked_from_the_request(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    moorage = await start_moorage(auth=auth_files)
    forged_host = await moorage.get("/v2/alpine/manifests/3.19", headers={"Host": 'x",realm="http://evil'})
    assert forged_host.headers["WWW-Authenticate"].count("realm=") == 1
    assert "evil" not in forged_host.headers["WWW-Authenticate"]
    bad_name = await moorage.get("/v2/Bad-Name/manifests/1")  # upper case: not a repository name
    assert bad_name.status == 401
    assert "scope=" not in bad_name.headers["WWW-Authenticate"], "no scope made of an invalid name"


async def test_the_token_realm_is_a_url_whatever_host_the_client_named(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """A Host with a bracket left open made the realm "http://[::1/token", no URL; one with a
    "_" (a compose service's name) or a zone made it "http://localhost/token", with no port:
    the client sent its credentials to its own port 80."""
    moorage = await start_moorage(auth=auth_files)
    served_at = f"127.0.0.1:{moorage.port}"

    async def realm(host: str) -> str:
        answer = await moorage.get("/v2/", headers={"Host": host})
        challenge = answer.headers["WWW-Authenticate"]
        return challenge.split('realm="', 1)[1].split('"', 1)[0]

    assert await realm("my_cache:5000") == "http://my_cache:5000/token"
    assert await realm("[fd00::2]:5000") == "http://[fd00::2]:5000/token"
    assert await realm("cache.example") == "http://cache.example/token"
    for unfit in ("[::1", "[fe80::1%eth0]:5000", 'x",realm="http://evil'):
        assert await realm(unfit) == f"http://{served_at}/token", unfit


def test_cidr_rules_see_ipv4_clients_of_a_dual_stack_listener() -> None:
    rule = PolicyRule(effect="deny", description="the lab", cidrs=(ipaddress.ip_network("10.0.0.0/8"),))
    with pytest.raises(AccessDenied, match="rule 1 \\(the lab\\)"):
        authorize((rule,), Requester(None, frozenset(), "::ffff:10.1.2.3"), "docker.io", "library/alpine")
    authorize((rule,), Requester(None, frozenset(), "192.168.1.1"), "docker.io", "library/alpine")


def test_a_cidr_written_as_ipv4_mapped_ipv6_matches_ipv4_clients() -> None:
    """::ffff:10.0.0.0/104 held no IPv4 address, so a deny written so denied nothing."""
    rule = PolicyRule.model_validate({"effect": "deny", "description": "the lab", "cidrs": ["::ffff:10.0.0.0/104"]})
    assert rule.cidrs == (ipaddress.ip_network("10.0.0.0/8"),)
    for client in ("10.1.2.3", "::ffff:10.1.2.3"):
        with pytest.raises(AccessDenied, match="rule 1 \\(the lab\\)"):
            authorize((rule,), Requester(None, frozenset(), client), "docker.io", "library/alpine")
    authorize((rule,), Requester(None, frozenset(), "192.168.1.1"), "docker.io", "library/alpine")


def test_a_malformed_request_logs_no_excerpt_of_it() -> None:
    record = logging.makeLogRecord(
        {
            "name": "aiohttp.server",
            "levelno": logging.ERROR,
            "msg": "Error handling request from %s",
            "args": ("10.0.0.9",),
        }
    )
    record.exc_info = (
        BadHttpMessage,
        BadHttpMessage("Invalid header value char: b'Authorization: Basic c2VjcmV0'"),
        None,
    )
    MalformedRequests().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None, "the client's mistake: no warning"
    assert "c2VjcmV0" not in str(record.__dict__)
    assert record.client == "10.0.0.9"


def test_a_tls_hello_on_plain_http_stays_a_debug_line() -> None:
    """skopeo tries https first on every pull: aiohttp logs the refused hello at debug, and a
    cache run at log_level debug must not show a warning per pull for it."""
    record = logging.makeLogRecord(
        {"name": "aiohttp.server", "levelno": logging.DEBUG, "msg": "Error handling request", "args": ()}
    )
    record.exc_info = (BadHttpMessage, BadHttpMessage("Invalid method encountered: b'\\x16\\x03\\x01'"), None)
    MalformedRequests().filter(record)
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert record.__dict__["event"] == "malformed_request"


def test_a_token_remembered_as_verified_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified tokens are remembered so that a pull's many requests cost one signature check:
    remembered without its expiry, a token used once would work for ever."""
    monkeypatch.setattr(tokens_module, "LEEWAY", 0)
    keys = TokenKeys(ec.generate_private_key(ec.SECP256R1()))
    token = keys.issue("ci", frozenset({"alpine"}), lifetime=1)
    assert keys.verify(token).user == "ci"
    time.sleep(2.1)  # past its expiry, whichever second it was issued in
    with pytest.raises(TokenInvalid, match="expired"):
        keys.verify(token)


def test_an_expired_token_of_the_other_kind_is_no_expired_token_of_this_one() -> None:
    """The signature is checked before the expiry, the expiry before the kind: an expired
    access token given as a password must not read as an expired login token."""
    keys = TokenKeys(ec.generate_private_key(ec.SECP256R1()))
    access = keys.issue("ci", frozenset({"alpine"}), lifetime=-60)
    login = keys.issue("ci", frozenset(), lifetime=-60, kind="login")
    with pytest.raises(TokenInvalid) as raised:
        keys.verify(access, "login")
    assert not isinstance(raised.value, TokenExpired)
    with pytest.raises(TokenExpired) as expired:
        keys.verify(login, "login")
    assert time.time() - 70 < expired.value.expired_at < time.time() - 50
    forged = TokenKeys(ec.generate_private_key(ec.SECP256R1())).issue("ci", frozenset(), -60, "login")
    with pytest.raises(TokenInvalid, match="not one this cache issued"):
        keys.verify(forged, "login")


def test_a_token_issued_by_a_clock_ahead_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica whose clock runs a minute ahead of another's, or a clock stepped back since
    the token was issued: the token's issue time is in the future. It was refused (\"not yet
    valid\"), a 401 in the middle of a pull."""
    keys = TokenKeys(ec.generate_private_key(ec.SECP256R1()))
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 60)
    token = keys.issue("ci", frozenset({"alpine"}), lifetime=3600)
    monkeypatch.setattr(time, "time", real_time)
    assert keys.verify(token).user == "ci"


async def test_anonymous_tokens_end_when_anonymous_pulls_are_turned_off(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """A token taken while anonymous pulls were allowed kept pulling after a restart with
    anonymous: none, for as long as it lived (12 hours by default)."""
    before = await start_moorage(auth={**auth_files, "anonymous": "pull"})
    answer = await before.get("/token", params={"service": "moorage", "scope": "repository:alpine:pull"})
    assert answer.status == 200
    token = (await answer.json())["token"]
    assert (await before.get("/v2/alpine/manifests/3.19", headers=bearer(token))).status == 200
    await before.close()
    after = await start_moorage(auth={**auth_files, "anonymous": "none"})  # restarted on the same store
    assert (await after.get("/v2/alpine/manifests/3.19", headers=bearer(token))).status == 401


async def test_a_rule_for_users_does_not_cover_anonymous_requests(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """users: ["*"] is every signed-in user, not everyone: the deny after it must stop an
    anonymous pull."""
    policy = [
        {"effect": "allow", "users": ["*"], "repositories": ["docker.io/library/*"]},
        {"effect": "deny", "repositories": ["docker.io/library/*"]},
    ]
    moorage = await start_moorage(auth={**auth_files, "anonymous": "pull", "policy": policy})
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers={"Accept": ACCEPT_ALL_MANIFESTS})).status == 401
    signed_in = {**basic("ci", PASSWORD), "Accept": ACCEPT_ALL_MANIFESTS}
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=signed_in)).status == 200


async def test_unreadable_basic_credentials_get_401_not_an_anonymous_token(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """A credential helper's broken output had pulled anonymously, hiding the fault."""
    moorage = await start_moorage(auth={**auth_files, "anonymous": "pull"})
    no_colon = base64.b64encode(b"ci").decode()
    for header in ("Basic !!!notbase64", f"Basic {no_colon}"):
        answer = await moorage.get(
            "/token", params={"scope": "repository:alpine:pull"}, headers={"Authorization": header}
        )
        assert answer.status == 401, header
        assert "unreadable Basic credentials" in (await answer.json())["errors"][0]["message"]
    anonymous = await moorage.get("/token", params={"scope": "repository:alpine:pull"})
    assert anonymous.status == 200, "no credentials at all: an anonymous token, as configured"


async def test_a_form_sent_a_byte_at_a_time_is_cut_at_the_idle_timeout(
    start_moorage: StartMoorage, images: FakeRegistry, auth_files: dict[str, str]
) -> None:
    """A client idle that long is cut; one trickling its form was never idle, and held its
    connection (and a place among the requests a stop waits for) for as long as it liked."""
    moorage = await start_moorage(auth=auth_files, client_idle_timeout="1s")
    sent = 0

    async def trickle() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b"grant_type=password&username=ci"
        for _ in range(100):  # 20 s at this pace
            await asyncio.sleep(0.2)
            sent += 1
            yield b"&scope=x"

    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    with contextlib.suppress(aiohttp.ClientError):
        response = await moorage.post("/token", data=trickle(), headers=headers)
        assert response.status == 408
        assert "client_idle_timeout (1s)" in (await response.json())["errors"][0]["message"]
    assert sent < 20, "cut within a few seconds, not after the whole form"
