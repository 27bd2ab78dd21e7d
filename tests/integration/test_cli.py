"""The moorage command against a real registry: warm (on a store and through a daemon), ls,
stats, healthcheck, and client-config snippets fed to real containerd and podman."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import yaml

from moorage.cache._layout import index_files

from .harness import images
from .harness.clients import Containerd, Podman, skopeo_copy
from .harness.moorage import MoorageProcess
from .harness.registry import RealRegistry
from .harness.tools import closed_port, free_port, require_tool

pytestmark = pytest.mark.integration
KiB = 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


@dataclass(frozen=True)
class Upstream:
    registry: RealRegistry
    tiny: images.ImageRef
    multi: images.ImageRef


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    work = tmp_path_factory.mktemp("cli-upstream")
    with RealRegistry(work / "registry") as registry:
        layout = work / "layout"
        images.write_oci_image(layout, "tiny", [images.random_layer(200 * KiB, 21), images.random_layer(50 * KiB, 22)])
        tiny = images.push(layout, "tiny", registry.host, "library/tiny", "1")
        images.write_oci_index(layout, "multi", [("linux", "amd64"), ("linux", "arm64")], seed=5)
        multi = images.push(layout, "multi", registry.host, "library/multi", "1", all_platforms=True)
        yield Upstream(registry, tiny, multi)


def upstream_settings(registry: RealRegistry) -> list[dict[str, object]]:
    return [
        {"host": "docker.io", "url": registry.url, "default": True},
        {"host": "ghcr.io", "url": registry.url, "prefixes": ["ghcr"]},
    ]


def moorage(*args: str, config: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "moorage.proxy", *args]
    if config is not None:
        argv += ["--config", str(config)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def write_config(tmp_path: Path, registry: RealRegistry) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"storage": {"path": str(tmp_path / "store")}, "upstreams": upstream_settings(registry)})
    )
    return path


def test_warm_on_the_store_then_ls_stats_and_a_pull_that_needs_no_upstream(upstream: Upstream, tmp_path: Path) -> None:
    registry = upstream.registry
    config = write_config(tmp_path, registry)
    mark = registry.mark()
    warmed = moorage("warm", "tiny:1", "docker.io/library/multi:1", "--all-platforms", config=config)
    wanted = {*upstream.tiny.blob_digests, *(d for c in upstream.multi.children for d in c.blob_digests)}
    assert registry.blob_gets(mark) == {d: 1 for d in wanted}
    assert "docker.io/library/tiny:1: 3 blobs" in warmed.stdout
    assert "[linux/amd64, linux/arm64]" in warmed.stdout

    listed = [json.loads(line) for line in moorage("ls", "--json", config=config).stdout.splitlines()]
    assert {(t["upstream"], t["repository"], t["tag"]) for t in listed} == {
        ("docker.io", "library/tiny", "1"),
        ("docker.io", "library/multi", "1"),
    }
    tiny = next(t for t in listed if t["repository"] == "library/tiny")
    assert tiny["digest"] == upstream.tiny.manifest_digest
    assert tiny["size"] == (upstream.tiny.config_size or 0) + sum(upstream.tiny.layer_sizes)
    assert tiny["pulled_at"] is not None
    table = moorage("ls", "docker.io/library/t*", config=config).stdout
    assert "library/tiny" in table and "library/multi" not in table
    for name in ("tiny", "tiny:1", "library/tiny:1", "t*:1", "docker.io/tiny:1"):  # as people name images
        named = [
            json.loads(line)["repository"] for line in moorage("ls", name, "--json", config=config).stdout.splitlines()
        ]
        assert named == ["library/tiny"], name
    print("\n" + moorage("ls", config=config).stdout)

    stats = json.loads(moorage("stats", "--json", config=config).stdout)
    assert stats["store_entries"] == len(wanted) + 2 + 2  # blobs, two tag manifests, two child manifests
    docker = stats["upstreams"]["docker.io"]
    # Fetched for the pull: asked for before the fetch (miss), or prefetched by the manifest.
    assert docker.get("miss", 0) + docker.get("prefetched", 0) >= len(wanted)
    assert stats["upstreams"]["docker.io"]["upstream_bytes"] > 250 * KiB

    with MoorageProcess(
        tmp_path / "daemon", upstream_settings(registry), storage={"path": str(tmp_path / "store")}
    ) as m:
        mark = registry.mark()
        skopeo_copy(f"docker://{m.host}/tiny:1", f"dir:{tmp_path / 'out'}")
        assert registry.blob_gets(mark) == {}, "warm filled the store: the pull needed no upstream blob"


def test_one_image_that_fails_leaves_the_others_warm(upstream: Upstream, tmp_path: Path) -> None:
    """A typo in a list of images stopped warm at that image: nothing after it was warmed,
    and the output did not say what had been."""
    config = write_config(tmp_path, upstream.registry)
    result = moorage("warm", "tiny:1", "nothing-here:1", "multi:1", config=config, check=False)
    assert result.returncode == 2, result.stderr
    assert "docker.io/library/tiny:1: 3 blobs" in result.stdout and "docker.io/library/multi:1" in result.stdout
    assert "nothing-here" in result.stderr and "MANIFEST_UNKNOWN" in result.stderr
    assert "1 of 3 images not warmed" in result.stderr and "Traceback" not in result.stderr
    listed = [json.loads(line)["repository"] for line in moorage("ls", "--json", config=config).stdout.splitlines()]
    assert sorted(listed) == ["library/multi", "library/tiny"]


def test_a_line_of_the_image_file_that_is_no_image_is_named_and_the_rest_warmed(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A malformed line (a capital letter) stopped warm before it began, naming neither the
    file nor the line; a comment after an image was read as part of its tag."""
    config = write_config(tmp_path, upstream.registry)
    images = tmp_path / "images.txt"
    images.write_text("# CI's images\ntiny:1\nTiny:1\nmulti:1   # the multi-platform one\n")
    result = moorage("warm", "-f", str(images), config=config, check=False)
    assert result.returncode == 2, result.stderr
    assert "docker.io/library/tiny:1: 3 blobs" in result.stdout and "docker.io/library/multi:1" in result.stdout
    assert f"{images}:3: invalid name 'Tiny'" in result.stderr
    assert "1 of 3 images not warmed" in result.stderr and "Traceback" not in result.stderr


def test_warm_on_a_store_whose_settings_ask_clients_to_sign_in(upstream: Upstream, tmp_path: Path) -> None:
    """Users and access rules are for the cache's clients; whoever may open the store warms it
    without signing in (the in-process cache is reached only through a private socket)."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("ci:" + bcrypt.hashpw(b"a-passphrase", bcrypt.gensalt(rounds=4)).decode() + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"path": str(tmp_path / "store")},
                "upstreams": upstream_settings(upstream.registry),
                "auth": {
                    "htpasswd_file": str(htpasswd),
                    "policy": [{"effect": "deny", "description": "nobody", "repositories": ["*"]}],
                },
            }
        )
    )
    warmed = moorage("warm", "tiny:1", config=config)
    assert "docker.io/library/tiny:1: 3 blobs" in warmed.stdout


def test_warm_on_a_store_it_cannot_use_is_one_line_and_exit_2(upstream: Upstream, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    result = moorage("warm", "tiny:1", "--store", str(not_a_directory / "store"), check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "cannot use" in result.stderr, result.stderr


def test_a_metrics_listener_that_cannot_listen_is_named(upstream: Upstream, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{free_port()}",
                    "metrics_listen": f"127.0.0.1:{busy}",
                    "storage": {"path": str(tmp_path / "store")},
                    "upstreams": upstream_settings(upstream.registry),
                }
            )
        )
        result = moorage("serve", config=config, check=False)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{busy} (metrics_listen)" in result.stderr, result.stderr


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_a_listen_address_without_a_host_takes_ipv4_and_ipv6_clients(upstream: Upstream, tmp_path: Path) -> None:
    """The default was 0.0.0.0:5000, IPv4 alone, and "[::]" is IPv6 alone: in an IPv6-only
    cluster the kubelet probes the pod's IPv6 address and the Service sends IPv6, so the
    chart's pod never got ready. ":5000" (the default now, the chart's too) takes both, as a
    Go server's does; a machine without IPv6 gets IPv4 alone, said in the log."""
    metrics_port = free_port()
    daemon = MoorageProcess(
        tmp_path, upstream_settings(upstream.registry), listen_host="", metrics_listen=f":{metrics_port}"
    )
    port = daemon.port
    try:
        families = ["127.0.0.1", "[::1]"] if _ipv6_loopback() else ["127.0.0.1"]
        for host in families:
            for at, path in ((port, "/healthz"), (metrics_port, "/metrics")):
                with urllib.request.urlopen(f"http://{host}:{at}{path}", timeout=5) as answer:
                    assert answer.status == 200, (host, at)
        if len(families) == 1:
            assert any(line.get("event") == "listen_ipv4_only" for line in daemon.log_lines())
        config = tmp_path / "config.yaml"
        assert moorage("healthcheck", config=config, check=False).returncode == 0
    finally:
        daemon.stop()


def test_warm_sends_short_names_to_the_configured_default_upstream(upstream: Upstream, tmp_path: Path) -> None:
    """Not to Docker Hub when another registry is the default, as the daemon routes them."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"path": str(tmp_path / "store")},
                "upstreams": [{"host": "registry.internal", "url": upstream.registry.url, "default": True}],
            }
        )
    )
    warmed = moorage("warm", "library/tiny:1", config=config)
    assert "registry.internal/library/tiny:1: 3 blobs" in warmed.stdout


def test_warm_through_a_daemon_one_platform_and_stats_from_it(upstream: Upstream, tmp_path: Path) -> None:
    registry = upstream.registry
    with MoorageProcess(tmp_path / "daemon", upstream_settings(registry)) as daemon:
        mark = registry.mark()
        out = moorage("warm", "multi:1", "--platform", "linux/arm64", "--url", daemon.url).stdout
        assert "[linux/arm64]" in out
        assert set(registry.blob_gets(mark)) == set(upstream.multi.child("linux/arm64").blob_digests)
        again = moorage("warm", "multi:1", "--platform", "linux/arm64", "--url", daemon.url).stdout
        assert "miss" not in again and "hit" in again
        stats = json.loads(moorage("stats", "--json", "--url", daemon.url).stdout)
        docker = stats["upstreams"]["docker.io"]
        fetched = docker.get("miss", 0) + docker.get("prefetched", 0)
        assert docker["hit"] >= 3 and fetched >= 3 and 0 < docker["hit_ratio"] < 1
        assert isinstance(docker["hit"], int), "a count is a whole number, not 3.0"
        assert stats["store_entries"] > 0
        assert list(stats["upstreams"]) == ["docker.io"], "upstreams never pulled from have no row"

        assert moorage("healthcheck", "--url", daemon.url).returncode == 0
        assert moorage("healthcheck", "--url", f"{daemon.url}/healthz").returncode == 0, "the endpoint's URL too"
        bare = moorage("healthcheck", "--url", daemon.host, check=False)
        assert bare.returncode == 1 and "expected the cache's base URL" in bare.stderr
    down = moorage("healthcheck", "--url", f"http://127.0.0.1:{closed_port()}", check=False)
    assert down.returncode == 1 and "not healthy" in down.stderr


def test_stats_from_the_main_port_names_the_metrics_address(upstream: Upstream, tmp_path: Path) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    with MoorageProcess(tmp_path / "daemon", upstream_settings(upstream.registry), metrics_listen=metrics) as daemon:
        wrong = moorage("stats", "--url", daemon.url, "--config", str(daemon.config_path), check=False)
        assert wrong.returncode == 2 and f"pass --url http://{metrics}" in wrong.stderr, wrong.stderr
        assert moorage("stats", "--url", f"http://{metrics}").returncode == 0


def test_user_mistakes_are_one_line_and_exit_2(upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(tmp_path, upstream.registry)
    for args, message in [
        (("warm", "Bad/Name:1"), "invalid name"),
        (("warm", "nothing-here:1"), "MANIFEST_UNKNOWN"),
        (("warm",), "name at least one image"),
        (("ls", "--store", str(tmp_path / "absent")), "a store is made by the first `moorage serve` on it"),
        (("stats", "--store", str(tmp_path / "absent")), "name the one serve uses with --store DIR"),
        (("stats", "--url", "http://[::1"), "--url: Invalid IPv6 URL"),
        (("warm", "alpine:3", "--url", "http://127.0.0.1:99999"), "--url: Port out of range"),
        (("client-config", "docker", "--url", "moorage:5000"), "not the cache's base URL"),
        (("client-config", "podman", "--url", "http://m:5000", "--registries", "nvcr.io"), "not a configured upstream"),
    ]:
        result = moorage(*args, config=config if "--store" not in args else None, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_containerd_pulls_with_the_generated_hosts_toml(upstream: Upstream, tmp_path: Path) -> None:
    """The registries asked for, an alias among them (no other way for containerd to reach
    it), and no catch-all for the rest."""
    registry = upstream.registry
    settings = upstream_settings(registry)
    settings[1]["aliases"] = ["ghcr.example"]
    with MoorageProcess(tmp_path / "daemon", settings) as daemon, Containerd(tmp_path / "c") as ctr:
        moorage(
            "client-config",
            "containerd",
            "--url",
            daemon.url,
            "--registries",
            "docker.io,ghcr.io",
            "--output-dir",
            str(ctr.hosts_dir),
            config=daemon.config_path,
        )
        assert not (ctr.hosts_dir / "_default").exists(), "only the registries asked for"
        ctr.pull("docker.io/library/tiny:1")
        ctr.pull("ghcr.io/library/multi:1", platform="linux/arm64")
        ctr.pull("ghcr.example/library/multi:1", platform="linux/amd64")  # the alias: a name that resolves nowhere
        assert ctr.image_digest("docker.io/library/tiny:1") == upstream.tiny.manifest_digest
        requests = [line for line in daemon.log_lines() if line.get("event") == "request" and "upstream" in line]
        assert {line["upstream"] for line in requests} == {"docker.io", "ghcr.io"}


def test_podman_pulls_with_the_generated_registries_conf(upstream: Upstream, tmp_path: Path) -> None:
    """Every registry by its path, Docker Hub's too, and an upstream's aliases as the upstream."""
    registry = upstream.registry
    settings = upstream_settings(registry)
    settings[1]["aliases"] = ["ghcr.example"]
    with MoorageProcess(tmp_path / "daemon", settings) as daemon:
        with Podman(tmp_path / "podman", daemon.host) as podman:
            snippet = moorage(
                "client-config",
                "podman",
                "--url",
                daemon.url,
                "--registries",
                "docker.io,ghcr.io",
                "--output-dir",
                str(tmp_path / "generated"),
                config=daemon.config_path,
            )
            assert "registries.conf" in snippet.stdout
            podman.registries_conf.write_text((tmp_path / "generated" / "registries.conf").read_text())
            podman.pull("docker.io/library/tiny:1")
            podman.pull("ghcr.io/library/multi:1", arch="arm64")
            assert podman.image_exists("ghcr.io/library/multi:1")
            podman.pull("ghcr.example/library/tiny:1")  # the alias resolves nowhere else here
        requests = [line for line in daemon.log_lines() if line.get("event") == "request" and "upstream" in line]
        assert {line["upstream"] for line in requests} == {"docker.io", "ghcr.io"}
        hub = [line["path"] for line in requests if line["upstream"] == "docker.io"]
        assert hub and all(path.startswith("/v2/docker.io/library/tiny/") for path in hub)
        assert any(line["path"].startswith("/v2/ghcr.io/library/tiny/") for line in requests)


def test_warm_with_referrers_takes_the_signatures_along_where_the_upstream_has_no_referrers_api(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A verifier behind the cache asks for an image's signatures too: warmed with the image,
    they are there while the upstream is out of reach. Distribution 2.x has no referrers API,
    so they come from cosign's .sig tag and the OCI 1.1 tag schema's index."""
    registry, repository = upstream.registry, "library/signed"
    layout = tmp_path / "layout"
    images.write_oci_image(layout, "signed", [images.random_layer(20 * KiB, 23)])
    image = images.push(layout, "signed", registry.host, repository, "1")
    subject = {"mediaType": image.media_type, "digest": image.manifest_digest, "size": image.manifest_size}
    config = {"mediaType": OCI_CONFIG, "digest": images.push_blob(registry.url, repository, b"{}"), "size": 2}
    prefix = image.manifest_digest.replace(":", "-")
    attached: dict[str, str] = {}  # tag -> the digest of the layer only its artifact names
    for tag, payload, layer_type in (
        (prefix + ".sig", b'{"critical": {}}', "application/vnd.dev.cosign.simplesigning.v1+json"),
        (prefix, b'{"spdxVersion": "SPDX-2.3"}', "application/spdx+json"),
    ):
        layer_digest = images.push_blob(registry.url, repository, payload)
        layer = {"mediaType": layer_type, "digest": layer_digest, "size": len(payload)}
        document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}
        manifest = json.dumps({**document, "subject": subject}).encode()
        if tag.endswith(".sig"):  # cosign's own tag: the signature itself
            images.push_manifest(registry.url, repository, tag, manifest, OCI_MANIFEST)
        else:  # the tag schema: an index of the referrers, under the bare digest
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            images.push_manifest(registry.url, repository, digest, manifest, OCI_MANIFEST)
            entry = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}
            index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}).encode()
            images.push_manifest(registry.url, repository, tag, index, OCI_INDEX)
        attached[tag] = layer_digest

    config_path = write_config(tmp_path, registry)
    warmed = moorage("warm", "signed:1", "--referrers", config=config_path)
    # The image's config and layer, the artifacts' shared config and their two layers; the
    # SBOM the tag schema's index names, and cosign's signature.
    assert "docker.io/library/signed:1: 5 blobs, 2 referrers" in warmed.stdout, warmed.stdout

    store = {"path": str(tmp_path / "store")}
    with MoorageProcess(tmp_path / "daemon", upstream_settings(registry), storage=store) as daemon:
        mark = registry.mark()
        for tag, only_there in attached.items():
            skopeo_copy(f"docker://{daemon.host}/signed:{tag}", f"dir:{tmp_path / tag}")
            assert (tmp_path / tag / only_there.removeprefix("sha256:")).exists()
        assert registry.requests_since(mark) == [], "the signatures were warmed with the image: no upstream needed"


def test_serve_stopped_before_it_listens_ends_at_once_as_pid_1(tmp_path: Path) -> None:
    """In a container Moorage is PID 1, for which the kernel takes no default action on
    SIGTERM: a start held up (here by an index another process holds locked) let the kubelet's
    SIGTERM pass, and the pod was killed only at the end of its grace period."""
    upstreams = [{"host": "docker.io", "url": f"http://127.0.0.1:{closed_port()}", "default": True}]
    with MoorageProcess(tmp_path / "m", upstreams) as moorage:  # makes the store
        pass
    _, database = index_files(moorage.store)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    log = tmp_path / "pid1.log"
    unshare = [require_tool("unshare"), "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    command = [*unshare, sys.executable, "-m", "moorage.proxy", "serve", "--config", str(moorage.config_path)]
    with log.open("w") as output:
        outer = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while '"event":"starting"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        (pid_1,) = (int(pid) for pid in subprocess.check_output(["pgrep", "-P", str(outer.pid)]).split())
        (ns_pids,) = [
            line for line in Path(f"/proc/{pid_1}/status").read_text().splitlines() if line.startswith("NSpid:")
        ]
        assert ns_pids.split()[-1] == "1", ns_pids
        time.sleep(0.5)  # held up in the index's lock, not yet listening
        os.kill(pid_1, signal.SIGTERM)
        assert outer.wait(5) == 128 + signal.SIGTERM
    finally:
        if outer.poll() is None:
            subprocess.run(["pkill", "-KILL", "-P", str(outer.pid)], check=False)
            outer.wait(10)
        holder.execute("ROLLBACK")
        holder.close()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "listening" not in events and events[-1] == "start_interrupted", events
    assert lines[-1]["signal"] == "SIGTERM"
