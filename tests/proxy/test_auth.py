"""Client authentication with an htpasswd file: Basic credentials, anonymous pulls as a
policy, 401 with a challenge, the user in the logs, and the password nowhere."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from moorage.config import ConfigError, Settings
from moorage.proxy import build_app
from moorage.proxy._auth import USERS, Htpasswd
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS
from tests.fakes import FakeRegistry

from .conftest import StartMoorage

PASSWORD = "correct horse battery staple"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Accept": ACCEPT_ALL_MANIFESTS}


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
    path.write_text(f"# CI robots\nci:{hashed}\n")
    return path


async def test_users_pull_and_strangers_get_a_challenge(
    start_moorage: StartMoorage, upstream: FakeRegistry, htpasswd: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage(auth={"htpasswd_file": str(htpasswd)})
    anonymous = await moorage.get("/v2/alpine/manifests/3.19")
    assert anonymous.status == 401
    realm = f"http://{moorage.host}:{moorage.port}/token"
    assert anonymous.headers["WWW-Authenticate"] == (
        f'Bearer realm="{realm}",service="moorage",scope="repository:alpine:pull"'
    ), "the token service's challenge, as a registry's own"
    assert (await anonymous.json())["errors"][0]["code"] == "UNAUTHORIZED"
    assert (await moorage.get("/v2/")).status == 401, "docker login probes /v2/ first"
    wrong = await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", "guess"))
    assert wrong.status == 401
    too_long = await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", "x" * 100))
    assert too_long.status == 401, "a password bcrypt cannot take is a mismatch, not a 500"
    caplog.set_level("INFO")
    for _ in range(3):  # the first check runs bcrypt; the others are remembered
        ok = await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", PASSWORD))
        assert ok.status == 200
    assert (await moorage.get("/v2/", headers=basic("ci", PASSWORD))).status == 200
    assert (await moorage.get("/healthz")).status == 200, "health stays open for probes"
    users = {getattr(r, "user", None) for r in caplog.records if getattr(r, "event", "") in ("request", "pull")}
    assert "ci" in users
    assert not any(PASSWORD in r.getMessage() or PASSWORD in str(r.__dict__) for r in caplog.records)


async def test_a_password_longer_than_bcrypt_reads_signs_in_as_htpasswd_hashed_it(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """htpasswd -B hashes the first 72 bytes. Refusing longer passwords at once also told a
    known user from an unknown one by the time the answer took."""
    upstream.add_image("library/alpine", "3.19")
    long_password = "a passphrase of more than seventy-two bytes, as a password manager makes them"
    path = tmp_path / "htpasswd"
    path.write_text("ops:" + bcrypt.hashpw(long_password.encode()[:72], bcrypt.gensalt(4)).decode() + "\n")
    moorage = await start_moorage(auth={"htpasswd_file": str(path)})
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ops", long_password))).status == 200
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ops", "x" * 100))).status == 401


async def test_anonymous_pulls_can_be_allowed_beside_users(
    start_moorage: StartMoorage, upstream: FakeRegistry, htpasswd: Path
) -> None:
    upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage(auth={"htpasswd_file": str(htpasswd), "anonymous": "pull"})
    assert (await moorage.get("/v2/alpine/manifests/3.19")).status == 200
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", "guess"))).status == 401
    # Without a policy users may pull nothing more, so the API check asks no one to sign in:
    # a docker daemon logged in to Docker Hub would send that login to its mirror, have it
    # refused, and pull past the cache.
    api_check = await moorage.get("/v2/")
    assert api_check.status == 200 and "WWW-Authenticate" not in api_check.headers


async def test_without_an_htpasswd_file_everyone_pulls_and_credentials_are_ignored(
    moorage: TestClient[web.Request, web.Application], upstream: FakeRegistry
) -> None:
    upstream.add_image("library/alpine", "3.19")
    assert (await moorage.get("/v2/alpine/manifests/3.19")).status == 200
    # A client that sends credentials up front (a containerd hosts.toml header, a daemon's
    # Docker Hub login) is served from the cache, not refused and sent past it.
    with_credentials = await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", PASSWORD))
    assert with_credentials.status == 200 and with_credentials.headers["X-Moorage-Cache"] == "hit"
    api_check = await moorage.get("/v2/", headers=basic("ci", "anything"))
    assert api_check.status == 200 and "WWW-Authenticate" not in api_check.headers


async def test_the_file_is_reloaded_when_it_changes(
    start_moorage: StartMoorage, upstream: FakeRegistry, htpasswd: Path
) -> None:
    upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage(auth={"htpasswd_file": str(htpasswd)})
    hashed = bcrypt.hashpw(b"new secret", bcrypt.gensalt(4)).decode()
    htpasswd.write_text(f"ops:{hashed}\n")
    moorage.app[USERS].reload_if_changed()  # what the watcher does every 10 s
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ops", "new secret"))).status == 200
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", PASSWORD))).status == 401


async def serving_users(
    start_moorage: StartMoorage, upstream: FakeRegistry, htpasswd: Path
) -> tuple[TestClient[web.Request, web.Application], Htpasswd]:
    """A cache whose users are ``htpasswd``'s, with alpine:3.19 to pull; its users file."""
    upstream.add_image("library/alpine", "3.19")
    moorage = await start_moorage(auth={"htpasswd_file": str(htpasswd)})
    return moorage, moorage.app[USERS]


def reload_reported_once(users: Htpasswd, caplog: pytest.LogCaptureFixture) -> str:
    """The watcher's two looks at one version it cannot load: reported once; the error's text."""
    users.reload_if_changed()
    users.reload_if_changed()
    [failed] = [r for r in caplog.records if getattr(r, "event", "") == "htpasswd_reload_failed"]
    caplog.clear()  # the one error the test expects
    return str(failed.__dict__["error"])


async def test_a_file_saved_in_latin_1_is_not_loaded_and_the_next_good_one_is(
    start_moorage: StartMoorage, upstream: FakeRegistry, htpasswd: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An editor that saved a non-UTF-8 byte stopped every later reload, with nothing logged."""
    moorage, users = await serving_users(start_moorage, upstream, htpasswd)
    hashed = bcrypt.hashpw(b"new secret", bcrypt.gensalt(4)).decode()
    htpasswd.write_bytes(htpasswd.read_bytes() + f"b\xe9b:{hashed}\n".encode("latin-1"))
    assert "line 3 is not UTF-8 (byte 0xe9)" in reload_reported_once(users, caplog)
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", PASSWORD))).status == 200, "kept"
    htpasswd.write_text(f"ops:{hashed}\n")
    users.reload_if_changed()
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ops", "new secret"))).status == 200


async def test_a_wrong_password_takes_as_long_as_an_unknown_name(
    start_moorage: StartMoorage, upstream: FakeRegistry, htpasswd: Path
) -> None:
    """Users hashed at different costs: a wrong password for the cheap one had failed in
    3 ms, an unknown name in 120, so timing told which names exist. Every failure now lasts
    at least one check at the highest cost. (A lower bound: a slow machine cannot break it.)"""
    costly = bcrypt.hashpw(b"another", bcrypt.gensalt(10)).decode()
    htpasswd.write_text(htpasswd.read_text() + f"admin:{costly}\n")
    moorage = await start_moorage(auth={"htpasswd_file": str(htpasswd)})
    slowest = moorage.app[USERS].slowest_check
    for user in ("ci", "nobody"):
        started = time.perf_counter()
        assert (await moorage.get("/v2/", headers=basic(user, "wrong"))).status == 401
        assert time.perf_counter() - started >= slowest, user


async def test_a_users_file_that_is_gone_is_said_once_and_the_users_stay(
    start_moorage: StartMoorage, upstream: FakeRegistry, htpasswd: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Moved away (a Secret being replaced), it had been passed over without a word."""
    moorage, users = await serving_users(start_moorage, upstream, htpasswd)
    kept = htpasswd.with_name("kept")
    htpasswd.rename(kept)
    assert "No such file" in reload_reported_once(users, caplog)
    assert (await moorage.get("/v2/alpine/manifests/3.19", headers=basic("ci", PASSWORD))).status == 200, "kept"
    kept.rename(htpasswd)
    users.reload_if_changed()
    htpasswd.rename(kept)
    users.reload_if_changed()  # gone again: said again
    assert [r for r in caplog.records if getattr(r, "event", "") == "htpasswd_reload_failed"]
    caplog.clear()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("ci:plaintext\n", "line 1: expected user:bcrypt-hash"),
        ("ci:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "line 1: expected user:bcrypt-hash"),
        # A cost bcrypt refuses: a traceback at start, naming neither the file nor the line.
        (
            "ok:" + bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode() + "\nci:$2b$99$" + "a" * 53 + "\n",
            "line 2: expected",
        ),
        ("ci:$2b$04$short\n", "line 1: expected user:bcrypt-hash"),
    ],
)
def test_a_bad_htpasswd_file_is_a_configuration_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(content)
    settings = Settings.model_validate({"storage": {"path": str(tmp_path / "s")}, "auth": {"htpasswd_file": str(path)}})
    with pytest.raises(ConfigError, match=message):
        build_app(settings)
