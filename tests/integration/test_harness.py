"""Self-tests of the integration harness against a real registry and real clients."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from .harness import images
from .harness.clients import Containerd, Podman, skopeo_copy, skopeo_inspect_raw
from .harness.httpclient import request
from .harness.registry import RealRegistry, parse_access_line
from .harness.tools import free_port, require_tool

pytestmark = pytest.mark.integration


def _seed_tiny(registry: RealRegistry, layout: Path, repo: str = "library/tiny") -> images.ImageRef:
    images.write_oci_image(layout, "tiny", [b"hello moorage\n", images.random_layer(64 << 10, 1)])
    return images.push(layout, "tiny", registry.host, repo, "1")


def _seed_multi(registry: RealRegistry, layout: Path, **kw: bool) -> images.ImageRef:
    images.write_oci_index(layout, "multi", [("linux", "amd64"), ("linux", "arm64")])
    return images.push(layout, "multi", registry.host, "library/multi", "1", all_platforms=True, **kw)


def test_require_tool_skips_locally_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Path(require_tool("sh")).is_file()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        require_tool("moorage-no-such-tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_tool("moorage-no-such-tool")
    assert 1024 <= free_port() <= 65535


def test_access_log_line_parsing() -> None:
    line = (
        '127.0.0.1 - - [23/Nov/2026:06:59:48 +0000] "HEAD /v2/a/b/manifests/1?ns=docker.io '
        'HTTP/1.1" 404 96 "" "containerd/1.6.20~ds1"'
    )
    req = parse_access_line(line)
    assert req is not None
    assert (req.method, req.path, req.query, req.status, req.size) == (
        "HEAD",
        "/v2/a/b/manifests/1",
        "ns=docker.io",
        404,
        96,
    )
    assert req.user_agent == "containerd/1.6.20~ds1"
    assert parse_access_line('{"level":"info","msg":"response completed"}') is None


def test_layout_is_deterministic(tmp_path: Path) -> None:
    one = images.write_oci_image(tmp_path / "a", "t", [b"x", images.random_layer(1000, 7)])
    two = images.write_oci_image(tmp_path / "b", "t", [b"x", images.random_layer(1000, 7)])
    assert one == two
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [one.manifest_digest]
    for digest in (one.manifest_digest, one.config_digest, *one.layer_digests):
        assert digest is not None
        blob = (tmp_path / "a" / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        assert images.sha256_digest(blob) == digest


def test_push_then_skopeo_copy_to_dir(real_registry: RealRegistry, tmp_path: Path) -> None:
    ref = _seed_tiny(real_registry, tmp_path / "layout")
    assert ref.media_type == images.OCI_MANIFEST
    assert ref.platform == "linux/amd64"
    out = tmp_path / "out"
    skopeo_copy(f"docker://{real_registry.host}/library/tiny:1", f"dir:{out}")
    blobs = {p.name: p for p in out.iterdir() if len(p.name) == 64}
    assert ref.config_digest is not None
    expected = {d.removeprefix("sha256:") for d in (ref.config_digest, *ref.layer_digests)}
    assert set(blobs) == expected
    for name, path in blobs.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == name
    assert (out / "manifest.json").read_bytes() == ref.raw_manifest


def test_request_counts_are_exact(real_registry: RealRegistry, tmp_path: Path) -> None:
    ref = _seed_tiny(real_registry, tmp_path / "layout")
    mark = real_registry.mark()
    assert real_registry.requests_since(mark) == []

    raw = skopeo_inspect_raw(f"{real_registry.host}/library/tiny:1")
    assert images.sha256_digest(raw) == ref.manifest_digest
    manifest = real_registry.manifest_path("library/tiny", "1")
    assert real_registry.count("GET", manifest, since=mark) == 1
    assert real_registry.count("HEAD", manifest, since=mark) == 0

    # HEAD, 404 and 405 answers and concurrent requests are each logged exactly once.
    mark = real_registry.mark()
    blob_url = f"{real_registry.url}/v2/library/tiny/blobs/{ref.layer_digests[0]}"
    blob = real_registry.blob_path("library/tiny", ref.layer_digests[0])
    url = real_registry.url

    def head_blob() -> None:
        for _ in range(5):
            assert request("HEAD", blob_url, user_agent="t").status == 200

    threads = [threading.Thread(target=head_blob) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert request("GET", url + "/v2/library/tiny/manifests/nope", user_agent="t").status == 404
    assert request("PATCH", url + "/v2/library/tiny/manifests/1", user_agent="t").status == 405
    assert real_registry.count("HEAD", blob, since=mark) == 40
    assert real_registry.count("GET", r"/v2/library/tiny/manifests/.*", since=mark, status=404) == 1
    assert real_registry.count("*", r"/v2/library/tiny/manifests/1", since=mark) == 1
    assert len(real_registry.requests_since(mark)) == 42


def test_push_docker_v2s2_index_and_large_blob(real_registry: RealRegistry, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    local = images.write_oci_index(layout, "multi", [("linux", "amd64"), ("linux", "arm64")])
    oci = images.push(layout, "multi", real_registry.host, "library/multi", "oci", all_platforms=True)
    assert oci.manifest_digest == local.manifest_digest
    assert oci.child(platform="linux/arm64").manifest_digest == local.children[1].manifest_digest

    v2 = images.push(
        layout,
        "multi",
        real_registry.host,
        "library/multi",
        "v2",
        all_platforms=True,
        docker_v2s2=True,
    )
    assert v2.media_type == images.DOCKER_MANIFEST_LIST
    assert v2.manifest_digest != local.manifest_digest
    assert {c.media_type for c in v2.children} == {images.DOCKER_MANIFEST}
    assert set(v2.child_manifest_digests).isdisjoint(local.child_manifest_digests)
    assert v2.blob_digests == local.blob_digests  # same config and layer blobs
    raw = skopeo_inspect_raw(f"{real_registry.host}/library/multi:v2")
    assert images.sha256_digest(raw) == v2.manifest_digest

    big = tmp_path / "big.bin"
    digest = images.write_random_file(big, 8 << 20, seed=3)
    assert images.push_blob(real_registry.url, "library/big", big) == digest
    head = request("HEAD", f"{real_registry.url}/v2/library/big/blobs/{digest}")
    assert head.status == 200
    assert head.header("content-length") == str(8 << 20)
    assert head.header("docker-content-digest") == digest


def test_podman_pulls_directly_from_registry(real_registry: RealRegistry, tmp_path: Path) -> None:
    tiny = _seed_tiny(real_registry, tmp_path / "layout")
    multi = _seed_multi(real_registry, tmp_path / "layout")
    mark = real_registry.mark()
    podman = Podman(tmp_path / "podman", real_registry.host)
    try:
        podman.pull("docker.io/library/tiny:1")
        assert podman.image_digest("docker.io/library/tiny:1") == tiny.manifest_digest
        for digest in tiny.layer_digests:
            assert real_registry.count("GET", real_registry.blob_path("library/tiny", digest), mark) == 1

        podman.pull("docker.io/library/multi:1", arch="arm64")
        arm = multi.child("linux/arm64")
        assert f"docker.io/library/multi@{arm.manifest_digest}" in podman.repo_digests("docker.io/library/multi:1")
        assert arm.config_digest is not None
        assert podman.image_id("docker.io/library/multi:1") == arm.config_digest[len("sha256:") :]
        amd = multi.child("linux/amd64")
        assert (
            real_registry.count(
                "GET",
                real_registry.blob_path("library/multi", amd.layer_digests[0]),
                mark,
            )
            == 0
        )
    finally:
        podman.cleanup()


def test_path_prefixed_mirror_with_podman_and_containerd(
    real_registry: RealRegistry, containerd: Containerd, tmp_path: Path
) -> None:
    tiny = _seed_tiny(real_registry, tmp_path / "layout", repo="docker-hub/library/tiny")
    manifest = real_registry.manifest_path("docker-hub/library/tiny", "1")

    mark = real_registry.mark()
    with Podman(tmp_path / "podman", f"{real_registry.host}/docker-hub") as podman:
        podman.pull("docker.io/library/tiny:1")
    assert real_registry.count("GET", manifest, mark) == 1

    # containerd puts a mirror URL's path *before* /v2 unless override_path is set.
    mark = real_registry.mark()
    containerd.write_hosts("docker.io", f"{real_registry.url}/v2/docker-hub", override_path=True)
    containerd.pull("docker.io/library/tiny:1")
    assert containerd.image_digest("docker.io/library/tiny:1") == tiny.manifest_digest
    assert real_registry.count("HEAD", manifest, mark) == 1


def test_containerd_pulls_directly_from_registry(
    real_registry: RealRegistry, containerd: Containerd, tmp_path: Path
) -> None:
    tiny = _seed_tiny(real_registry, tmp_path / "layout")
    multi = _seed_multi(real_registry, tmp_path / "layout")
    containerd.write_hosts("docker.io", real_registry.url)
    mark = real_registry.mark()

    containerd.pull("docker.io/library/tiny:1")
    assert containerd.image_digest("docker.io/library/tiny:1") == tiny.manifest_digest
    assert set(tiny.blob_digests) <= containerd.content_digests()
    got = real_registry.requests_since(mark)
    assert got and all(r.query == "ns=docker.io" for r in got)
    assert real_registry.count("HEAD", real_registry.manifest_path("library/tiny", "1"), mark) == 1
    for digest in tiny.layer_digests:
        assert real_registry.count("GET", real_registry.blob_path("library/tiny", digest), mark) == 1

    containerd.pull("docker.io/library/multi:1", platform="linux/arm64")
    assert containerd.image_digest("docker.io/library/multi:1") == multi.manifest_digest
    arm, amd = multi.child("linux/arm64"), multi.child("linux/amd64")
    content = containerd.content_digests()
    assert arm.layer_digests[0] in content
    assert amd.layer_digests[0] not in content
