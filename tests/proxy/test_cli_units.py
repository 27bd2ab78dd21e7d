"""Command-line pieces that need no server: image names, platform choice, client snippets, the
stats table."""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import diskcache
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner

from moorage.cache import DirectoryStore
from moorage.cache._index import Index, TagEntry
from moorage.cache._keys import FORMAT_KEY, STORE_FORMAT
from moorage.config import DEFAULT_UPSTREAMS, UpstreamSettings
from moorage.proxy._client_config import ClientOptions, client_files, client_warnings
from moorage.proxy._serve import ListenFailed, _listen
from moorage.proxy._warm import platform_matches
from moorage.proxy.cli import StatsReport, _stats_table, main, url_problem
from moorage.upstreams.reference import OCI_IMAGE_MANIFEST, Digest, InvalidReference, parse_image_reference
from tests.integration.harness.tools import closed_port


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("ghcr.io/owner/app:1", "ghcr.io/owner/app:1"),
        ("localhost:5000/a/b:2", "localhost:5000/a/b:2"),
        ("registry.k8s.io/pause@sha256:" + "a" * 64, "registry.k8s.io/pause@sha256:" + "a" * 64),
    ],
)
def test_image_names_as_people_write_them(name: str, expected: str) -> None:
    assert str(parse_image_reference(name)) == expected


@pytest.mark.parametrize("name", ["Alpine:1", "alpine:-x", "alpine@sha256:abc", "a//b:1"])
def test_bad_image_names(name: str) -> None:
    with pytest.raises(InvalidReference):
        parse_image_reference(name)


@pytest.mark.parametrize(
    ("platform", "wanted", "matches"),
    [
        ({"os": "linux", "architecture": "arm64", "variant": "v8"}, "linux/arm64", True),
        ({"os": "linux", "architecture": "arm64", "variant": "v8"}, "linux/arm64/v8", True),
        ({"os": "linux", "architecture": "arm", "variant": "v7"}, "linux/arm/v6", False),
        ({"os": "linux", "architecture": "amd64"}, "linux/arm64", False),
        ({"os": "windows", "architecture": "amd64"}, "linux/amd64", False),
    ],
)
def test_platform_matches(platform: dict[str, str], wanted: str, matches: bool) -> None:
    assert platform_matches({"platform": platform}, wanted) is matches


URL = "http://moorage.example:5000"
HUB, GHCR = DEFAULT_UPSTREAMS[0], DEFAULT_UPSTREAMS[1]
REGISTRIES = [HUB, GHCR]
INTERNAL = UpstreamSettings(host="registry.internal:5000", url="http://10.0.0.7:5000", prefixes=("internal",))


def test_docker_snippet_is_json_with_insecure_for_http() -> None:
    (content,) = client_files("docker", URL, REGISTRIES, "docker.io").values()
    assert json.loads(content) == {"registry-mirrors": [URL], "insecure-registries": ["moorage.example:5000"]}
    (secure,) = client_files("docker", "https://moorage.example", REGISTRIES, "docker.io").values()
    assert "insecure-registries" not in json.loads(secure)


def test_containerd_snippets_per_registry_and_alias_and_default() -> None:
    files = client_files("containerd", URL, REGISTRIES)
    names = ["docker.io", *HUB.aliases, "ghcr.io", *GHCR.aliases, "_default"]
    assert set(files) == {f"/etc/containerd/certs.d/{r}/hosts.toml" for r in names}
    hub = tomllib.loads(files["/etc/containerd/certs.d/docker.io/hosts.toml"])
    assert hub["server"] == "https://registry-1.docker.io"
    assert hub["host"][URL]["capabilities"] == ["pull", "resolve"]
    alias = tomllib.loads(files[f"/etc/containerd/certs.d/{HUB.aliases[-1]}/hosts.toml"])
    assert alias == hub, "an image named by an alias goes through the cache as its upstream's do"


def test_only_the_registries_asked_for_are_sent_to_the_cache() -> None:
    """--registries names some upstreams: no catch-all then, for containerd, kind or k3s."""
    containerd = client_files("containerd", URL, [GHCR], options=ClientOptions(catch_all=False))
    assert set(containerd) == {"/etc/containerd/certs.d/ghcr.io/hosts.toml"}
    k3s = yaml.safe_load(
        client_files("k3s", URL, [GHCR], options=ClientOptions(catch_all=False))["/etc/rancher/k3s/registries.yaml"]
    )
    assert set(k3s["mirrors"]) == {"ghcr.io"}


def test_without_fallback_pulls_go_nowhere_but_the_cache() -> None:
    """The upstream stays the server for pushes only; every other name (another spelling of a
    registry among them) has the cache as its server too."""
    secure = "https://moorage.example:5000"
    files = client_files("containerd", secure, [HUB, INTERNAL], "docker.io", ClientOptions(ca="PEM", fallback=False))
    cache = {"capabilities": ["pull", "resolve"], "ca": "../moorage-ca.crt"}
    for registry, upstream in (("docker.io", HUB), (HUB.aliases[0], HUB), ("registry.internal:5000", INTERNAL)):
        assert tomllib.loads(files[f"/etc/containerd/certs.d/{registry}/hosts.toml"]) == {
            "server": upstream.url,
            "capabilities": ["push"],
            "host": {secure: cache},
        }, registry
    other = tomllib.loads(files["/etc/containerd/certs.d/_default/hosts.toml"])
    assert other == {"server": secure, **cache, "host": {secure: cache}}
    with pytest.raises(ValueError, match="disable-default-registry-endpoint"):
        client_files("k3s", URL, REGISTRIES, "docker.io", ClientOptions(fallback=False))
    with pytest.raises(ValueError, match="leave out --registries"):
        client_files("containerd", URL, [HUB], "docker.io", ClientOptions(catch_all=False, fallback=False))


def test_every_client_is_warned_that_a_refused_pull_goes_past_the_cache() -> None:
    for client in ("docker", "containerd", "podman", "k3s", "kind"):
        warned = " ".join(client_warnings(client, "http://172.18.0.1:5000", REGISTRIES, "docker.io", refuses=True))
        assert "pulls from the upstream itself" in warned, client


@pytest.mark.parametrize(("anonymous", "warned"), [("none", True), ("pull", False)])
def test_docker_is_warned_when_the_cache_refuses_pulls_without_credentials(
    tmp_path: Path, anonymous: str, warned: bool
) -> None:
    """dockerd never signs in to its mirror with credentials of the cache's, so with users and
    no anonymous pulls every pull of it was refused and went to Docker Hub, past the cache,
    while client-config printed a daemon.json as if it would work."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ci:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode() + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"auth: {{htpasswd_file: {htpasswd}, anonymous: {anonymous}}}\n")
    for client in ("docker", "containerd"):
        result = CliRunner().invoke(main, ["client-config", client, "--url", URL, "--config", str(config)])
        assert result.exit_code == 0, result.output
        said = ("auth.anonymous: pull" in result.output) and "go to Docker Hub past the cache" in result.output
        assert said is (warned and client == "docker"), (client, result.output)


def test_containerd_falls_back_to_the_upstreams_own_url() -> None:
    """Not to https://<host>, which for an internal registry may not even resolve."""
    files = client_files("containerd", URL, [HUB, INTERNAL])
    internal = tomllib.loads(files["/etc/containerd/certs.d/registry.internal:5000/hosts.toml"])
    assert internal["server"] == "http://10.0.0.7:5000"


def test_podman_snippet_names_every_registry_by_path_prefix() -> None:
    """Docker Hub's too: with bare paths a Hub namespace named like a prefix (``ghcr/app``)
    would be routed to that other upstream."""
    (content,) = client_files("podman", URL, REGISTRIES, "docker.io").values()
    config = tomllib.loads(content)
    mirrors = {r["prefix"]: r["mirror"][0] for r in config["registry"]}
    assert mirrors["docker.io"] == {"location": "moorage.example:5000/docker.io", "insecure": True}
    assert mirrors["ghcr.io"]["location"] == "moorage.example:5000/ghcr.io"
    assert mirrors["index.docker.io"]["location"] == "moorage.example:5000/docker.io", "aliases too"
    assert config["unqualified-search-registries"] == ["docker.io"]


def test_a_ca_goes_where_each_client_trusts_it() -> None:
    secure, ca = "https://moorage.example:5000", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    docker = client_files("docker", secure, REGISTRIES, "docker.io", ClientOptions(ca=ca))
    assert docker["/etc/docker/certs.d/moorage.example:5000/ca.crt"] == ca
    podman = client_files("podman", secure, REGISTRIES, "docker.io", ClientOptions(ca=ca))
    assert podman["/etc/containers/certs.d/moorage.example:5000/ca.crt"] == ca
    containerd = client_files("containerd", secure, REGISTRIES, None, ClientOptions(ca=ca))
    assert containerd["/etc/containerd/certs.d/moorage-ca.crt"] == ca
    hub = tomllib.loads(containerd["/etc/containerd/certs.d/docker.io/hosts.toml"])
    assert hub["host"][secure]["ca"] == "../moorage-ca.crt", "relative to hosts.toml: kind's nodes mount certs.d"
    k3s = client_files("k3s", secure, REGISTRIES, None, ClientOptions(ca=ca))
    registries = yaml.safe_load(k3s["/etc/rancher/k3s/registries.yaml"])
    assert registries["configs"] == {"moorage.example:5000": {"tls": {"ca_file": "/etc/rancher/k3s/moorage-ca.crt"}}}
    assert k3s["/etc/rancher/k3s/moorage-ca.crt"] == ca
    assert client_files("kind", secure, REGISTRIES, None, ClientOptions(ca=ca))["certs.d/moorage-ca.crt"] == ca
    with pytest.raises(ValueError, match="plain http"):
        client_files("containerd", URL, REGISTRIES, None, ClientOptions(ca=ca))


def test_podman_reaches_a_host_with_a_port_by_its_prefix_and_short_names_the_default() -> None:
    (content,) = client_files("podman", URL, [INTERNAL, GHCR], "registry.internal:5000").values()
    config = tomllib.loads(content)
    mirrors = {r["prefix"]: r["mirror"][0]["location"] for r in config["registry"]}
    assert mirrors == {
        "registry.internal:5000": "moorage.example:5000/internal",
        "ghcr.io": "moorage.example:5000/ghcr.io",
    }
    assert config["unqualified-search-registries"] == ["registry.internal:5000"]
    (other,) = client_files("podman", URL, [HUB, INTERNAL], "docker.io").values()
    assert "moorage.example:5000/internal" in other, "a port cannot be a path component: the prefix is"


def test_docker_mirrors_only_a_default_docker_hub() -> None:
    with pytest.raises(ValueError, match=r"docker\.io must be the default upstream"):
        client_files("docker", URL, [HUB, INTERNAL], "registry.internal:5000")
    # Mirroring Docker Hub needs it as the default, not among the registries picked.
    assert client_files("docker", URL, [GHCR], "docker.io")


def test_k3s_and_kind_snippets_are_yaml_that_names_every_registry() -> None:
    (k3s,) = client_files("k3s", URL, REGISTRIES).values()
    names = ["docker.io", "registry-1.docker.io", "index.docker.io", "ghcr.io", "*"]
    assert yaml.safe_load(k3s) == {"mirrors": {r: {"endpoint": [URL]} for r in names}}
    files = client_files("kind", URL, REGISTRIES, "docker.io")
    config = yaml.safe_load(files["kind-config.yaml"])
    # Current kind nodes read certs.d and refuse registry.mirrors beside it: hosts.toml only.
    patch = tomllib.loads(config["containerdConfigPatches"][0])
    assert patch["plugins"]["io.containerd.grpc.v1.cri"]["registry"] == {"config_path": "/etc/containerd/certs.d"}
    mounts = [node["extraMounts"] for node in config["nodes"]]
    assert mounts and all(m == [{"hostPath": "./certs.d", "containerPath": "/etc/containerd/certs.d"}] for m in mounts)
    hosts = tomllib.loads(files["certs.d/ghcr.io/hosts.toml"])
    assert hosts["server"] == "https://ghcr.io" and hosts["host"][URL]["capabilities"] == ["pull", "resolve"]
    assert "certs.d/_default/hosts.toml" in files


def client_config(*args: str, url: str = URL) -> str:
    result = CliRunner().invoke(main, ["client-config", *args, "--url", url], env={"MOORAGE_CONFIG": ""})
    assert result.exit_code == 0, result.output
    return result.output


def test_written_files_keep_what_the_host_had_there(tmp_path: Path) -> None:
    """--output-dir on a host's own configuration directory: its other settings survive, and
    the file it had is kept beside the new one."""
    docker = tmp_path / "docker"
    docker.mkdir()
    original = '{"log-driver": "journald", "registry-mirrors": "https://mirror.gcr.io"}'
    (docker / "daemon.json").write_text(original)
    (docker / "daemon.json").chmod(0o640)
    client_config("docker", "--output-dir", str(docker))
    daemon = json.loads((docker / "daemon.json").read_text())
    assert daemon["log-driver"] == "journald"
    assert daemon["registry-mirrors"] == [URL, "https://mirror.gcr.io"], "the cache first: Docker tries in order"
    assert daemon["insecure-registries"] == ["moorage.example:5000"]
    assert (docker / "daemon.json").stat().st_mode & 0o777 == 0o640, "the file's mode is kept"
    assert (docker / "daemon.json.bak").read_text() == original
    assert "unchanged" in client_config("docker", "--output-dir", str(docker)), "a second run changes nothing"
    client_config("docker", "--output-dir", str(docker), url="http://other.example:5000")
    assert (docker / "daemon.json.bak").read_text() == original, "the host's own file is never overwritten"
    assert "moorage.example" in (docker / "daemon.json.bak.1").read_text()

    k3s = tmp_path / "k3s"
    k3s.mkdir()
    (k3s / "registries.yaml").write_text(
        'mirrors:\n  "registry.corp":\n    endpoint: ["https://registry.corp"]\n'
        '  docker.io:\n    endpoint: ["https://mirror.corp"]\n'
        'configs:\n  "registry.corp":\n    auth: {username: robot, password: hunter2}\n'
        '  "moorage.example:5000":\n    auth: {username: node, password: s3cret}\n'
    )
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    client_config("k3s", "--ca", str(ca), "--output-dir", str(k3s), url="https://moorage.example:5000")
    registries = yaml.safe_load((k3s / "registries.yaml").read_text())
    assert registries["configs"]["registry.corp"]["auth"]["username"] == "robot", "other registries' credentials"
    assert registries["configs"]["moorage.example:5000"] == {
        "auth": {"username": "node", "password": "s3cret"},  # how nodes sign in to the cache
        "tls": {"ca_file": "/etc/rancher/k3s/moorage-ca.crt"},
    }
    assert registries["mirrors"]["registry.corp"] == {"endpoint": ["https://registry.corp"]}
    assert registries["mirrors"]["docker.io"] == {
        "endpoint": ["https://moorage.example:5000", "https://mirror.corp"]  # the cache first, the host's own kept
    }

    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    own = 'server = "https://registry-1.docker.io"\n[host."https://corp-mirror"]\n  capabilities = ["pull"]\n'
    elsewhere = tmp_path / "managed-hosts.toml"
    elsewhere.write_text(own)
    (certs / "docker.io" / "hosts.toml").symlink_to(elsewhere)
    output = client_config("containerd", "--output-dir", str(certs))
    assert (tmp_path / "managed-hosts.toml.bak").read_text() == own, "a replaced file is kept beside it"
    assert "managed-hosts.toml.bak" in output
    assert (certs / "docker.io" / "hosts.toml").is_symlink(), "written through the link, which stays"
    assert tomllib.loads(elsewhere.read_text())["host"][URL]


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("daemon.json", '{"log-driver": "journald",}', "not valid JSON"),
        ("daemon.json", '{"registry-mirrors": {"a": 1}}', "registry-mirrors is not a list"),
        ("registries.yaml", "mirrors: [docker.io]\n", "mirrors is not a mapping"),
    ],
)
def test_a_file_that_cannot_be_merged_is_left_alone(tmp_path: Path, name: str, text: str, problem: str) -> None:
    (tmp_path / name).write_text(text)
    client = "docker" if name == "daemon.json" else "k3s"
    result = CliRunner().invoke(
        main, ["client-config", client, "--url", URL, "--output-dir", str(tmp_path)], env={"MOORAGE_CONFIG": ""}
    )
    assert result.exit_code == 2 and "cannot merge into" in result.output and problem in result.output
    assert (tmp_path / name).read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "nothing written beside it"


def test_an_output_dir_that_cannot_be_written_is_a_sentence_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("listen: x\n")
    result = CliRunner().invoke(
        main,
        ["client-config", "docker", "--url", URL, "--output-dir", str(tmp_path / "config.yaml" / "sub")],
        env={"MOORAGE_CONFIG": ""},
    )
    assert result.exit_code == 2 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert "cannot write" in result.output and "Not a directory" in result.output


def test_a_file_that_cannot_be_replaced_stays_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As an immutable daemon.json (chattr +i) refuses the rename even to root."""
    (tmp_path / "daemon.json").write_text('{"log-driver": "journald"}')

    def refused(source: object, target: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("moorage.proxy.cli.os.replace", refused)
    result = CliRunner().invoke(
        main, ["client-config", "docker", "--url", URL, "--output-dir", str(tmp_path)], env={"MOORAGE_CONFIG": ""}
    )
    assert result.exit_code == 2 and "cannot write" in result.output and "Operation not permitted" in result.output
    assert (tmp_path / "daemon.json").read_text() == '{"log-driver": "journald"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.json"], "no temporary, no copy left behind"
    assert "kept the previous" not in result.output


@pytest.mark.parametrize("timeout", ["-1", "0", "inf", "nan", "abc"])
def test_healthcheck_mistakes_exit_1_without_a_traceback(timeout: str) -> None:
    result = CliRunner().invoke(main, ["healthcheck", "--url", URL, "--timeout", timeout], env={"MOORAGE_CONFIG": ""})
    assert result.exit_code == 1 and "--timeout must be a number of seconds above 0" in result.output


def test_healthcheck_with_bad_settings_exits_1_not_docker_s_reserved_2(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("tag_tll: 1m\n")
    result = CliRunner().invoke(main, ["healthcheck", "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 1 and "tag_tll: unknown key" in result.output


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _OneFamilyServer(http.server.HTTPServer):
    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:  # IPv6 alone, as asyncio binds "::"
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class _V6Server(_OneFamilyServer):
    address_family = socket.AF_INET6


class _NotMetrics(http.server.BaseHTTPRequestHandler):
    """200 and a body that is no Moorage metrics: another server at the address given."""

    body = b"<html>hello</html>"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


class _OtherMetrics(_NotMetrics):
    body = b'moorage_cache_results_total{result="hit"} 5\n'


@contextlib.contextmanager
def serving_healthz(address: str, handler: type[http.server.BaseHTTPRequestHandler] = _Healthz) -> Iterator[int]:
    """A server answering 200 on /healthz (or as ``handler`` does) at ``address``, in a thread;
    its port."""
    server_class = _V6Server if ":" in address else _OneFamilyServer
    with server_class((address, 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()


@pytest.mark.parametrize(("bound", "listen"), [("::1", "[::1]"), ("::", "[::]")])
def test_healthcheck_reaches_an_ipv6_listen_address(tmp_path: Path, bound: str, listen: str) -> None:
    """``listen: "[::1]:port"``: the URL needs the brackets, or a healthy cache reads as down
    (and a container with it as unhealthy for ever). asyncio binds ``[::]`` to IPv6 alone, so
    that one is asked at ``[::1]``, not at 127.0.0.1."""
    with serving_healthz(bound) as port:
        config = tmp_path / "v6.yaml"
        config.write_text(f'listen: "{listen}:{port}"\nstorage: {{path: {tmp_path}}}\n')
        result = CliRunner().invoke(main, ["healthcheck", "--config", str(config)])
        assert result.exit_code == 0, result.output


def test_an_https_url_for_a_plain_http_listener_says_to_use_http() -> None:
    """OpenSSL's "wrong version number" alone told a user nothing."""
    with serving_healthz("127.0.0.1") as port:
        for command in (["healthcheck", "--url"], ["stats", "--url"]):
            result = CliRunner().invoke(main, [*command, f"https://127.0.0.1:{port}"], env={"MOORAGE_CONFIG": ""})
            assert result.exit_code in (1, 2) and "Traceback" not in result.output
            assert "WRONG_VERSION_NUMBER" in result.output and "Use http://" in result.output, result.output


def test_healthcheck_of_a_loopback_address_never_goes_through_a_proxy() -> None:
    """A container's HTTPS_PROXY, set for the upstreams, had carried the check to the proxy."""
    with serving_healthz("127.0.0.1") as port:
        dead_proxy = f"http://127.0.0.1:{closed_port()}"
        proxies = {name: dead_proxy for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy")}
        url = f"http://127.0.0.1:{port}"
        # A process of its own: urllib keeps the proxies it first saw for the life of a process.
        result = subprocess.run(
            [sys.executable, "-m", "moorage.proxy", "healthcheck", "--url", url],
            env={**os.environ, **proxies, "MOORAGE_CONFIG": ""},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_one_client_file_is_printed_alone_so_that_it_can_be_saved() -> None:
    """daemon.json as printed is JSON (a ``# file:`` line would stop dockerd from starting);
    its path goes to standard error. Several files keep their ``# file:`` lines."""
    result = CliRunner().invoke(main, ["client-config", "docker", "--url", URL], env={"MOORAGE_CONFIG": ""})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["registry-mirrors"] == [URL]
    assert "# file: /etc/docker/daemon.json" in result.stderr
    containerd = CliRunner().invoke(main, ["client-config", "containerd", "--url", URL], env={"MOORAGE_CONFIG": ""})
    assert "# file: /etc/containerd/certs.d/docker.io/hosts.toml" in containerd.stdout


def test_a_url_with_a_path_is_refused() -> None:
    with pytest.raises(ValueError, match="base URL"):
        client_files("docker", "http://moorage.example:5000/v2", REGISTRIES, "docker.io")


def test_kind_is_warned_that_localhost_is_the_node_itself() -> None:
    assert "the node itself" in " ".join(client_warnings("kind", "http://localhost:5000", REGISTRIES))
    assert "the node itself" in " ".join(client_warnings("kind", "http://127.0.0.1:5000", REGISTRIES))
    assert client_warnings("kind", "http://172.18.0.1:5000", REGISTRIES) == []
    assert client_warnings("containerd", "http://localhost:5000", REGISTRIES) == [], "a host's containerd reaches it"


def test_clients_that_cannot_read_an_ipv6_mirror_address_are_warned() -> None:
    """containerd 1.x cannot read [host."http://[fd00::1]:5000"] (go-toml) and pulls past the
    cache without a word; podman 4 refuses the location and fails every mirrored pull."""
    url = "http://[fd00::1]:5000"
    for client in ("containerd", "k3s", "kind"):
        (warning,) = client_warnings(client, url, REGISTRIES)
        assert "containerd before 2.0" in warning and "/etc/hosts" in warning
    (podman,) = client_warnings("podman", url, REGISTRIES)
    assert "podman 4 refuses" in podman
    assert client_warnings("docker", url, REGISTRIES) == []
    assert client_warnings("containerd", "http://10.0.0.8:5000", REGISTRIES) == []


def test_podman_is_warned_of_a_registry_it_cannot_name() -> None:
    portal = UpstreamSettings(host="registry.local:5999", url="http://10.0.0.8:5999")
    (warning,) = client_warnings("podman", URL, [HUB, portal], "docker.io")
    assert warning.startswith("registry.local:5999 is left out") and "prefixes" in warning
    assert client_warnings("podman", URL, [portal], "registry.local:5999") == [], "the default needs no path"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:5000", None),
        ("https://[::1]:5000/", None),
        ("http://fd00::1", "Port could not be cast"),  # an IPv6 address unbracketed
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://127.0.0.1:99999", "Port out of range"),
        ("127.0.0.1:5000", "expected the cache's base URL"),
        ("ftp://cache:21", "expected the cache's base URL"),
    ],
)
def test_a_url_mistake_is_a_sentence_not_a_traceback(url: str, problem: str | None) -> None:
    found = url_problem(url)
    assert found is None if problem is None else (found is not None and problem in found)


def test_a_password_in_the_url_is_never_repeated() -> None:
    """``warm --url http://ci:TOKEN@…`` signs in; healthcheck and stats need no sign-in, and
    their messages once printed the token (or, for a long one, a traceback)."""
    token = "eyJ" + "x" * 400
    for command in (["healthcheck", "--url"], ["stats", "--url"]):
        result = CliRunner().invoke(main, [*command, f"http://ci:{token}@127.0.0.1:5000"], env={"MOORAGE_CONFIG": ""})
        assert result.exit_code in (1, 2) and token not in result.output and "Traceback" not in result.output
        assert "leave the user and password out" in result.output
    assert url_problem(f"http://ci:{token}@127.0.0.1:5000", path_ok=False, user_ok=True) is None
    # A password with characters that split a URL: no part of it is repeated either.
    for password in (token, "pa/ss-secret", "pa?ss-secret", "p@ss-secret"):
        for url in (f"http://ci:{password}@127.0.0.1:99999", f"http://ci:{password}@127.0.0.1:5000/x"):
            problem = url_problem(url, path_ok=False, user_ok=True) or ""
            assert problem and password not in problem and "ss-secret" not in problem, problem
        refused = url_problem(f"http://ci:{password}@127.0.0.1:5000") or ""
        assert "leave the user and password out" in refused and "ss-secret" not in refused


def test_warm_at_a_listener_that_gives_no_http_answer_is_one_line_not_a_traceback() -> None:
    """As a TLS listener does to a plain http:// request: the connection closes unanswered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def hang_up() -> None:
            with contextlib.suppress(OSError):
                while True:
                    connection, _ = listener.accept()
                    connection.recv(65536)
                    connection.close()

        threading.Thread(target=hang_up, daemon=True).start()
        url = f"http://ci:s3cret@127.0.0.1:{listener.getsockname()[1]}"
        result = CliRunner().invoke(main, ["warm", "alpine:3.19", "--url", url], env={"MOORAGE_CONFIG": ""})
    assert result.exit_code == 2, result.output
    assert "gave no HTTP answer (ServerDisconnectedError)" in result.output
    assert "Traceback" not in result.output and "s3cret" not in result.output


def test_warm_takes_a_base_url_without_a_path() -> None:
    assert url_problem("http://cache:5000/healthz") is None, "healthcheck takes the endpoint's URL"
    assert "has no path" in (url_problem("http://cache:5000/x", path_ok=False) or "")
    assert url_problem("http://cache:5000/", path_ok=False) is None


def test_the_stats_table_shows_every_answer_its_hit_ratio_counts() -> None:
    """A CI team checks the ratio against the columns: 150 + 5 + 10 of 178 answers is 92.7 %."""
    counters = {"hit": 150.0, "revalidated": 5.0, "stale": 10.0, "miss": 8.0, "coalesced": 4.0, "refreshed": 1.0}
    header, row = _stats_table(StatsReport("store", 0, 0, {"docker.io": counters}))[:2]
    assert header.split()[:9] == [
        *("UPSTREAM", "HIT", "RATIO", "HITS", "REVALIDATED", "STALE", "MISSES", "COALESCED", "PREFETCHED")
    ]
    assert row.split()[:9] == ["docker.io", "92.7%", "150", "5", "10", "8", "4", "0", "1"]


def serve_once(config: Path, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """``moorage serve`` in a process of its own, for a test whose settings make it stop."""
    return subprocess.run(
        [sys.executable, "-m", "moorage.proxy", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=preexec_fn,
        env={**os.environ, "MOORAGE_CONFIG": ""},
    )


def test_a_damaged_index_is_one_line_that_says_what_to_do(tmp_path: Path) -> None:
    """sqlite3's errors escaped every command that opens the index: a traceback for ls, stats,
    gc, lifecycle preview and serve, on a store another user made or a damaged one."""
    store = tmp_path / "store"
    (store / "blobs").mkdir(parents=True)
    (store / "index").mkdir()
    (store / "index" / "cache.db").write_bytes(os.urandom(8192))
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{path: {store}}}\nlisten: 127.0.0.1:{closed_port()}\n")
    commands = (["ls"], ["stats"], ["gc"], ["verify"], ["verify", "--repair"])
    for args in ([*command, "--store", str(store)] for command in commands):
        result = CliRunner().invoke(main, args, env={"MOORAGE_CONFIG": ""})
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (args, result.output)
        assert f"storage.path: the index {store / 'index'} cannot be opened" in result.output
        assert "move it aside" in result.output
    served = serve_once(config)
    assert served.returncode == 2 and "Traceback" not in served.stderr, served.stderr
    # Found by the check of the settings' files before serving, as check-config finds it.
    assert f"storage.path: the index {store / 'index'} cannot be opened" in served.stderr
    assert "move it aside" in served.stderr
    checked = CliRunner().invoke(main, ["check-config", str(config)], env={"MOORAGE_CONFIG": ""})
    assert checked.exit_code == 2 and "move it aside" in checked.output, checked.output


@pytest.mark.parametrize("handler", [_NotMetrics, _OtherMetrics], ids=["html", "metrics_of_another_version"])
def test_stats_from_an_address_that_serves_no_moorage_metrics_is_one_line(
    handler: type[http.server.BaseHTTPRequestHandler],
) -> None:
    with serving_healthz("127.0.0.1", handler) as port:
        result = CliRunner().invoke(main, ["stats", "--url", f"http://127.0.0.1:{port}"], env={"MOORAGE_CONFIG": ""})
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "is not a Moorage cache's metrics" in result.output


def test_client_files_never_carry_a_password(tmp_path: Path) -> None:
    """`--url http://user:pw@cache:5000` (as warm takes it) was written into daemon.json and
    every hosts.toml: a secret in the host's files, and a mirror dockerd refuses."""
    for client in ("docker", "containerd", "podman", "k3s", "kind"):
        result = CliRunner().invoke(
            main,
            ["client-config", client, "--url", "http://ci:s3cret@cache:5000", "--output-dir", str(tmp_path / client)],
            env={"MOORAGE_CONFIG": ""},
        )
        assert result.exit_code == 2 and "leave the user and password out" in result.output, result.output
        assert "s3cret" not in result.output and not (tmp_path / client).exists()


def test_files_are_all_written_when_what_is_printed_finds_the_pipe_closed(tmp_path: Path) -> None:
    """`client-config … --output-dir DIR | head -1`: the second line hit a closed pipe, which was
    reported as a write that failed ("the file there is as it was"), after two of eleven files."""
    command = f"{sys.executable} -m moorage.proxy client-config containerd --url http://cache:5000 --output-dir out"
    result = subprocess.run(
        f"{command} | head -1",
        shell=True,
        cwd=tmp_path,
        env={**os.environ, "MOORAGE_CONFIG": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "cannot write" not in result.stderr, result.stderr
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("hosts.toml"))
    listed = CliRunner().invoke(
        main, ["client-config", "containerd", "--url", "http://cache:5000"], env={"MOORAGE_CONFIG": ""}
    )
    assert written == sorted(
        line.removeprefix("# file: /etc/containerd/certs.d/")
        for line in listed.output.splitlines()
        if line.startswith("# file:")
    )


def test_a_write_that_fails_part_way_says_what_was_changed_before_it(tmp_path: Path) -> None:
    """What was written before the failure was printed only once every file was: a failure
    part-way said 'the file there is as it was', and nothing of the files already replaced."""
    (tmp_path / "quay.io").write_text("a file where a directory must go")
    result = CliRunner().invoke(
        main,
        ["client-config", "containerd", "--url", URL, "--output-dir", str(tmp_path)],
        env={"MOORAGE_CONFIG": ""},
    )
    assert result.exit_code == 2
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("hosts.toml"))
    assert written, "the files before quay.io's"
    for path in written:
        assert f"wrote {tmp_path / path}" in result.output
    assert f"cannot write {tmp_path / 'quay.io' / 'hosts.toml'}" in result.output


def test_login_password_names_only_the_options_it_has(tmp_path: Path) -> None:
    """It pointed at --store DIR, which it does not take."""
    (tmp_path / "htpasswd").write_text("ci:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode() + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{path: {tmp_path / 'none'}}}\nauth: {{htpasswd_file: {tmp_path / 'htpasswd'}}}\n")
    result = CliRunner().invoke(main, ["login-password", "--user", "ci", "--config", str(config)])
    assert result.exit_code == 2 and "no Moorage store" in result.output
    assert "--store" not in result.output


def test_serve_raises_its_open_files_limit_to_the_most_it_may_have(tmp_path: Path) -> None:
    """A soft limit of 1,024 (systemd's default, which containers inherit): a thousand idle
    connections, anyone's, left no descriptor to answer a pull with."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "config.yaml"
        config.write_text(f'listen: "127.0.0.1:{taken.getsockname()[1]}"\nstorage: {{path: "{tmp_path / "store"}"}}\n')

        def low_soft_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

        served = serve_once(config, preexec_fn=low_soft_limit)
    assert served.returncode == 2, served.stderr  # the port is taken: it stops after its first line
    (starting,) = [line for line in map(json.loads, served.stderr.splitlines()) if line["event"] == "starting"]
    assert starting["open_files_limit"] == (hard if hard != resource.RLIM_INFINITY else 1024 * 1024)


def test_a_file_that_cannot_be_read_part_way_says_what_was_changed_before_it(tmp_path: Path) -> None:
    """daemon.json had been replaced (and kept as .bak) when the CA beside it could not be read:
    only the failure was said."""
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    out = tmp_path / "docker"
    (out / "certs.d" / "cache.example:5000" / "ca.crt").mkdir(parents=True)  # a directory where the CA goes
    (out / "daemon.json").write_text('{"log-driver": "journald"}')
    arguments = ["client-config", "docker", "--url", "https://cache.example:5000", "--ca", str(tmp_path / "ca.pem")]
    result = CliRunner().invoke(main, [*arguments, "--output-dir", str(out)], env={"MOORAGE_CONFIG": ""})
    assert result.exit_code == 2, result.output
    assert f"cannot read {out / 'certs.d' / 'cache.example:5000' / 'ca.crt'}" in result.output
    assert f"updated {out / 'daemon.json'}" in result.output and "kept the previous daemon.json" in result.output


def test_a_store_of_a_later_format_is_refused_by_every_command(tmp_path: Path) -> None:
    """A version that read a later layout as its own answered its misreadings, and its gc and
    eviction acted on them; it says which store and what to do, and changes nothing.
    ``check-config`` says so too."""
    store = tmp_path / "store"
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{path: {store}}}\nlisten: 127.0.0.1:{closed_port()}\n")
    corrupt = store / "blobs" / "sha256" / "00" / ("0" * 64)
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not what its name says")  # what verify --repair would move
    later = diskcache.Cache(str(store / "index"))
    later.set(FORMAT_KEY, STORE_FORMAT + 1)
    later.set(("tag", "docker.io", "library/alpine", "3", "image"), {"a later": "layout"})
    later.close()
    commands = (["ls"], ["stats"], ["gc"], ["verify"], ["verify", "--repair"])
    for args in ([*command, "--store", str(store)] for command in commands):
        result = CliRunner().invoke(main, args, env={"MOORAGE_CONFIG": ""})
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (args, result.output)
        assert f"the store at {store} was written by a later Moorage" in result.output, result.output
        assert "another storage.path" in result.output
    served = serve_once(config)
    assert served.returncode == 2 and "Traceback" not in served.stderr, served.stderr
    assert "written by a later Moorage" in served.stderr
    # A check before a rollback said "ok" to the store serve then refused; the check writes
    # nothing into it (opened as serving opens it, diskcache rewrote its settings).
    before = {path.name: path.read_bytes() for path in (store / "index").iterdir()}
    checked = CliRunner().invoke(main, ["check-config", str(config)], env={"MOORAGE_CONFIG": ""})
    assert checked.exit_code == 2, checked.output
    assert f"storage.path: the store at {store} was written by a later Moorage" in checked.output
    assert {path.name: path.read_bytes() for path in (store / "index").iterdir()} == before
    after = diskcache.Cache(str(store / "index"))
    assert after.get(FORMAT_KEY) == STORE_FORMAT + 1, "left as it was"
    assert after.get(("tag", "docker.io", "library/alpine", "3", "image")) == {"a later": "layout"}
    after.close()
    assert corrupt.read_bytes() == b"not what its name says", "left in place"


@pytest.mark.parametrize("begun", ["empty_file", "no_tables"])
def test_an_index_begun_and_never_set_up_is_checked_ok_and_served(tmp_path: Path, begun: str) -> None:
    """A first start killed as SQLite made the index file (or a disk that filled then) left a
    file with no tables, which serving sets up. The check before serving took it for damaged
    and refused to start, until someone deleted the file by hand."""
    store = tmp_path / "store"
    (store / "index").mkdir(parents=True)
    database = store / "index" / "cache.db"
    if begun == "empty_file":
        database.touch()
    else:
        sqlite3.connect(database).close()  # a database, no table in it
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{path: {store}}}\nlisten: 127.0.0.1:{closed_port()}\n")
    checked = CliRunner().invoke(main, ["check-config", str(config)], env={"MOORAGE_CONFIG": ""})
    assert checked.exit_code == 0, checked.output
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        serving = subprocess.Popen(
            [sys.executable, "-m", "moorage.proxy", "serve", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOORAGE_CONFIG": ""},
        )
    try:
        deadline = time.monotonic() + 30
        while '"event":"listening"' not in log.read_text() and serving.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert '"event":"listening"' in log.read_text(), log.read_text()
    finally:
        serving.terminate()
        serving.wait(30)
    index = diskcache.Cache(str(store / "index"))
    assert index.get(FORMAT_KEY) == STORE_FORMAT, "set up by serving"
    index.close()


def test_ls_prints_one_aligned_row_per_tag(tmp_path: Path) -> None:
    """Each column starts where its header does, whatever the lengths of the names."""
    store = DirectoryStore(tmp_path)
    index = Index(tmp_path / "index")
    for repository, tag in (("library/a", "1"), ("team/a-much-longer-repository-name", "2024.11.30-rc1")):
        body = json.dumps({"mediaType": OCI_IMAGE_MANIFEST, "layers": []}).encode() + repository.encode()
        digest = Digest.of(body)
        pending = store.begin(digest)
        pending.write(body)
        pending.commit()
        pending.close()
        index.put_manifest(digest, OCI_IMAGE_MANIFEST)
        index.put_tag(("tag", "docker.io", repository, tag, "image"), TagEntry(digest, OCI_IMAGE_MANIFEST, 1.0))
    index.close()
    result = CliRunner().invoke(main, ["ls", "--store", str(tmp_path)], env={"MOORAGE_CONFIG": ""})
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert [row.split()[1] for row in rows] == ["library/a", "team/a-much-longer-repository-name"]
    for title in ("TAG", "DIGEST", "SIZE"):
        column = header.index(title)
        assert all(row[column - 2 : column] == "  " and row[column] != " " for row in rows), title


async def test_a_machine_without_ipv6_listens_on_ipv4_alone_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``:5000`` takes every address; where IPv6 is switched off, binding "::" fails with
    EADDRNOTAVAIL (or the family is missing), and the cache serves IPv4 instead of not at all."""
    started = web.TCPSite.start

    async def no_ipv6(site: web.TCPSite) -> None:
        if site._host is None:  # every address: IPv6 among them
            await web.BaseSite.start(site)  # registered with its runner, as aiohttp does first
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        await started(site)

    monkeypatch.setattr(web.TCPSite, "start", no_ipv6)
    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        site = await _listen(runner, "listen", f":{closed_port()}")
        assert site._host == "0.0.0.0"
        [said] = [r for r in caplog.records if getattr(r, "event", "") == "listen_ipv4_only"]
        assert said.levelname == "WARNING"
        with pytest.raises(ListenFailed, match=r"cannot listen on 127.0.0.1:\d+ \(listen\)"):
            monkeypatch.setattr(web.TCPSite, "start", _refused)
            await _listen(runner, "listen", f"127.0.0.1:{closed_port()}")
    finally:
        await runner.cleanup()


async def _refused(site: web.TCPSite) -> None:
    raise OSError(errno.EADDRINUSE, "Address already in use")
