"""Client authentication with real clients, through the token service: skopeo with
--src-creds, podman after podman login (with the password, and with a token from
``moorage login-password``), containerd with --user (its OAuth2 POST); without credentials,
or with a wrong password, each is refused."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from .harness import images
from .harness.clients import ClientError, Containerd, Podman, skopeo_copy
from .harness.httpclient import request
from .harness.moorage import MoorageProcess
from .harness.registry import RealRegistry
from .harness.tools import require_tool

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-for-ci"


def test_skopeo_and_podman_pull_with_credentials_and_not_without(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()}\n")
    with RealRegistry(tmp_path / "registry") as registry:
        layout = tmp_path / "layout"
        images.write_oci_image(layout, "app", [images.random_layer(64 * 1024, 51)])
        images.push(layout, "app", registry.host, "library/app", "1")
        upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
        with MoorageProcess(tmp_path / "m", upstreams, auth={"htpasswd_file": str(htpasswd)}) as moorage:
            with pytest.raises(ClientError, match=r"authentication|unauthorized|401"):
                skopeo_copy(f"docker://{moorage.host}/app:1", f"dir:{tmp_path / 'denied'}")
            skopeo_copy(
                f"docker://{moorage.host}/app:1", f"dir:{tmp_path / 'ok'}", extra=["--src-creds", f"ci:{PASSWORD}"]
            )
            with Podman(tmp_path / "podman", moorage.host) as podman:
                refused = podman.run("pull", "docker.io/library/app:1", check=False, timeout=120)
                assert refused.returncode != 0
                podman.login(moorage.host, "ci", PASSWORD)
                podman.pull("docker.io/library/app:1")
                assert podman.image_exists("docker.io/library/app:1")
            login = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "moorage.proxy",
                    "login-password",
                    "--user",
                    "ci",
                    "--config",
                    str(moorage.config_path),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            with Podman(tmp_path / "podman-token", moorage.host) as podman:
                podman.login(moorage.host, "ci", login)
                podman.pull("docker.io/library/app:1")
            with Containerd(tmp_path / "containerd") as containerd:
                containerd.write_hosts("docker.io", moorage.url)
                refused_ctr = containerd.pull("docker.io/library/app:1", user="ci:wrong", check=False, timeout=120)
                assert refused_ctr.returncode != 0
                containerd.pull("docker.io/library/app:1", user=f"ci:{PASSWORD}")
            token_requests = [
                (line.get("method"), line.get("status"))
                for line in moorage.log_lines()
                if line.get("event") == "request" and str(line.get("path", "")).startswith("/token")
            ]
            assert ("GET", 200) in token_requests, "skopeo and podman fetch tokens with GET"
            assert ("POST", 200) in token_requests, "containerd fetches its token with the OAuth2 POST"
            users = {line.get("user") for line in moorage.log_lines() if line.get("event") == "pull"}
            assert users == {"ci"}
            assert PASSWORD not in moorage.log_path.read_text()
            grep = subprocess.run(["grep", "-r", PASSWORD, str(moorage.store)], capture_output=True, check=False)
            assert grep.returncode == 1, "the password is in no stored file"


def token_from(moorage: MoorageProcess, repository: str, user: str, password: str) -> str:
    """A pull token for ``repository``, signed in as a client does: challenged by ``/v2/``,
    then a GET to the realm it names with the password."""
    challenge = request("GET", f"{moorage.url}/v2/").header("WWW-Authenticate")
    realm = re.search(r'realm="([^"]+)"', challenge)
    service = re.search(r'service="([^"]+)"', challenge)
    assert realm and service, challenge
    query = urllib.parse.urlencode({"service": service[1], "scope": f"repository:{repository}:pull"})
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    answer = request("GET", f"{realm[1]}?{query}", headers={"Authorization": f"Basic {basic}"})
    assert answer.status == 200, answer.body
    token: str = json.loads(answer.body)["token"]
    return token


def test_replicas_sharing_a_signing_key_take_each_others_tokens(tmp_path: Path) -> None:
    """Replicas behind one Service (each a cache on its own store): a client signed in at one
    pulls through another with that token when they share ``token_signing_key_file``, made as
    the README says; with the key each store makes for itself, the other refuses it."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()}\n")
    key = tmp_path / "token-key.pem"
    openssl = require_tool("openssl")
    subprocess.run(
        [openssl, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)], check=True
    )
    shared = {"htpasswd_file": str(htpasswd), "token_signing_key_file": str(key)}
    with RealRegistry(tmp_path / "registry") as registry:
        layout = tmp_path / "layout"
        images.write_oci_image(layout, "app", [images.random_layer(64 * 1024, 53)])
        images.push(layout, "app", registry.host, "library/app", "1")
        upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
        with (
            MoorageProcess(tmp_path / "a", upstreams, auth=shared) as first,
            MoorageProcess(tmp_path / "b", upstreams, auth=shared) as second,
            MoorageProcess(tmp_path / "c", upstreams, auth={"htpasswd_file": str(htpasswd)}) as own_key,
        ):
            token = token_from(first, "app", "ci", PASSWORD)  # the name as the client writes it
            skopeo_copy(f"{second.host}/app:1", f"dir:{tmp_path / 'pulled'}", extra=["--src-registry-token", token])
            assert {path.name for path in (tmp_path / "pulled").iterdir()} >= {"manifest.json"}
            pulls = [line for line in second.log_lines() if line.get("event") == "pull"]
            assert pulls and {line.get("user") for line in pulls} == {"ci"}
            with pytest.raises(ClientError, match=r"authentication|unauthorized|401"):
                skopeo_copy(
                    f"{own_key.host}/app:1", f"dir:{tmp_path / 'refused'}", extra=["--src-registry-token", token]
                )
            assert (own_key.store / "auth" / "token-key.pem").exists(), "the key it made for itself"


def seed_team_and_open(registry: RealRegistry, tmp_path: Path, seed: int) -> None:
    """``team/app:1``, which the tests' policies keep in, and ``library/open:1``: one small image."""
    layout = tmp_path / "layout"
    images.write_oci_image(layout, "app", [images.random_layer(64 * 1024, seed)])
    for repository in ("team/app", "library/open"):
        images.push(layout, "app", registry.host, repository, "1")


def test_with_anonymous_pulls_signed_in_clients_still_get_what_only_users_may(tmp_path: Path) -> None:
    """``anonymous: pull`` with a policy that keeps one repository for users: skopeo sends its
    credentials only when challenged, so the API check challenges (as Docker Hub's does), and
    a pull anonymous requests may not make asks for a sign-in rather than refusing."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()}\n")
    policy = [
        {"effect": "allow", "users": ["ci"], "repositories": ["*"]},
        {"effect": "deny", "anonymous": True, "repositories": ["docker.io/team/*"]},
        {"effect": "allow", "users": ["cii"], "repositories": ["docker.io/*"]},  # a typo: warned of at start
    ]
    with RealRegistry(tmp_path / "registry") as registry:
        seed_team_and_open(registry, tmp_path, 52)
        upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
        auth = {"htpasswd_file": str(htpasswd), "anonymous": "pull", "policy": policy}
        with MoorageProcess(tmp_path / "m", upstreams, auth=auth) as moorage:
            skopeo_copy(f"docker://{moorage.host}/open:1", f"dir:{tmp_path / 'open'}")  # anonymous
            with pytest.raises(ClientError, match=r"authentication|unauthorized|401"):
                skopeo_copy(f"docker://{moorage.host}/team/app:1", f"dir:{tmp_path / 'denied'}")
            skopeo_copy(
                f"docker://{moorage.host}/team/app:1", f"dir:{tmp_path / 'ok'}", extra=["--src-creds", f"ci:{PASSWORD}"]
            )
            pulls = {
                (line.get("repository"), line.get("user"))
                for line in moorage.log_lines()
                if line.get("event") == "pull"
            }
            assert pulls == {("library/open", None), ("team/app", "ci")}
            lines = moorage.log_lines()
            [warned] = [line for line in lines if line.get("event") == "policy_rule_unknown_name"]
            assert warned["level"] == "warning" and "'cii' is not in" in warned["message"]
            challenged = [line for line in lines if line.get("event") == "request" and line.get("denied_by_rule")]
            assert challenged and {line["denied_by_rule"] for line in challenged} == {2}
            metrics = urllib.request.urlopen(f"{moorage.url}/metrics", timeout=10).read().decode()
            assert 'moorage_policy_denials_total{answer="challenged",rule="2",upstream="docker.io"}' in metrics


def test_containerd_without_fallback_cannot_pull_past_the_policy(tmp_path: Path) -> None:
    """With the generated files' default, containerd pulls what the cache refuses from the
    upstream itself. With --no-fallback the cache is the registry's server: what the policy
    refuses is not pulled at all, and what it allows comes through the cache."""
    policy = [{"effect": "deny", "description": "team images stay in", "repositories": ["docker.io/team/*"]}]
    with RealRegistry(tmp_path / "registry") as registry:
        seed_team_and_open(registry, tmp_path, 53)
        upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
        with (
            MoorageProcess(tmp_path / "m", upstreams, auth={"policy": policy}) as moorage,
            Containerd(tmp_path / "ctr") as ctr,
        ):
            generated = subprocess.run(
                [
                    *(sys.executable, "-m", "moorage.proxy", "client-config", "containerd", "--no-fallback"),
                    *("--url", moorage.url, "--config", str(moorage.config_path), "--output-dir", str(ctr.hosts_dir)),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert generated.returncode == 0, generated.stderr
            assert "warning" not in generated.stderr, "nothing to warn of: refused pulls cannot go past"
            ctr.pull("docker.io/library/open:1")
            with pytest.raises(ClientError, match=r"403|denied|forbidden"):
                ctr.pull("docker.io/team/app:1")
            with pytest.raises(ClientError):  # the upstream by its own address: still not around the cache
                ctr.pull(f"{registry.host}/team/app:1")
            served = [line for line in moorage.log_lines() if line.get("event") == "request"]
            assert any(line.get("denied_by_rule") == 1 for line in served)
            assert any(line.get("repository") == "library/open" and line["status"] == 200 for line in served)


def test_a_client_that_leaves_while_posting_to_the_token_service_is_gone_not_an_error(tmp_path: Path) -> None:
    """The token service needs no credentials: a client cutting its form short must cost a
    499 line, not a 500 and an alert-worthy internal_error with a traceback (the served
    daemon, whose handlers are not cancelled when a client leaves)."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()}\n")
    upstreams = [{"host": "docker.io", "url": "http://127.0.0.1:9", "default": True}]
    with MoorageProcess(tmp_path / "m", upstreams, auth={"htpasswd_file": str(htpasswd)}) as moorage:
        with socket.create_connection(("127.0.0.1", moorage.port)) as client:
            client.sendall(
                b"POST /token HTTP/1.1\r\nHost: cache\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 100\r\n\r\ngrant_type"
            )
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        lines: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            lines = moorage.log_lines()
            if any(line.get("path") == "/token" for line in lines):
                break
            time.sleep(0.05)
        token_lines = [(line.get("status"), line.get("error")) for line in lines if line.get("path") == "/token"]
        assert token_lines == [(499, "CLIENT_GONE")]
        assert not [line for line in lines if line.get("event") == "internal_error"]
