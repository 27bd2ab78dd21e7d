"""``moorage warm`` against the fake upstream, for what a real registry cannot be made to do:
a layer whose every transfer is cut."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from moorage.cache import read_catalog
from moorage.config import load_settings
from moorage.proxy._warm import NotTheCache, WarmIncomplete, warm
from moorage.proxy.cli import warm_settings
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS, parse_image_reference
from tests.fakes import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, FakeRegistry

Client = TestClient[web.Request, web.Application]
ALL = {"Accept": ACCEPT_ALL_MANIFESTS}


async def test_a_transfer_the_cache_cuts_fails_that_image_and_warms_the_rest(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """The cache cuts a body when its upstream fails mid-blob: that ended the whole run, with
    a hint about TLS, and the images after it stayed cold."""
    upstream.add_image("owner/first", "1", [os.urandom(1000)])
    broken = upstream.add_image("owner/broken", "1", [os.urandom(200_000)])
    upstream.add_image("owner/last", "1", [os.urandom(1000)])
    upstream.cut_blob(broken.layer_digests[0], after_bytes=1000, times=100)
    names = [parse_image_reference(f"owner/{name}:1") for name in ("first", "broken", "last")]
    with pytest.raises(WarmIncomplete) as incomplete:
        await warm(str(moorage.make_url("")), names, None, None)
    assert [image.image for image in incomplete.value.warmed] == [
        "docker.io/owner/first:1",
        "docker.io/owner/last:1",
    ]
    (failure,) = incomplete.value.failures
    assert "docker.io/owner/broken:1: the cache cut a transfer" in str(failure)


async def test_a_url_that_names_the_registry_itself_is_refused_not_reported_warmed(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """Pointed at the upstream by mistake, warm pulled every image from it, cached nothing, and
    said each was warmed."""
    upstream.add_image("owner/app", "1", [os.urandom(1000)])
    names = [parse_image_reference(f"owner/app:{tag}") for tag in ("1", "2")]
    with pytest.raises(NotTheCache, match="--url must name the cache, not a registry"):
        await warm(upstream.url, names, None, None)
    assert upstream.count("GET", "/blobs/") == 0, "it stopped at the first answer"
    warmed = await warm(str(moorage.make_url("")), names[:1], None, None)
    assert [image.image for image in warmed] == ["docker.io/owner/app:1"]


async def test_a_failed_manifest_names_the_image_once(moorage: Client, upstream: FakeRegistry) -> None:
    upstream.add_image("owner/app", "1", [os.urandom(1000)])
    upstream.fail_next(10, 503, paths=r"/manifests/")
    with pytest.raises(WarmIncomplete) as incomplete:
        await warm(str(moorage.make_url("")), [parse_image_reference("owner/app:1")], None, None)
    (failure,) = incomplete.value.failures
    assert str(failure).startswith("docker.io/owner/app:1: HTTP 503"), str(failure)


async def test_an_error_from_the_server_named_by_url_reaches_the_terminal_printable() -> None:
    """``--url`` can name any server: its error message went to the terminal as it came, control
    characters and all (a screen cleared, a line forged), and at any length."""

    async def refuse(request: web.Request) -> web.Response:
        message = "\x1b[2J\nforged line " + "x" * 400
        return web.json_response({"errors": [{"code": "DENIED", "message": message}]}, status=403)

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", refuse)
    async with TestServer(app) as server:
        with pytest.raises(WarmIncomplete) as incomplete:
            await warm(str(server.make_url("")), [parse_image_reference("owner/app:1")], None, None)
    (failure,) = incomplete.value.failures
    text = str(failure)
    assert "HTTP 403 DENIED: [2Jforged line xxx" in text, text
    assert text.isprintable() and len(text) < 300, text


def oci_manifest(config: tuple[str, int], layers: list[dict[str, Any]] | None) -> bytes:
    """An OCI image manifest written by hand: ``layers`` None is Go's empty list."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
            "layers": layers,
        }
    ).encode()


def entry(digest: str, body: bytes, media_type: str, **fields: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": len(body), **fields}


async def test_warm_takes_the_manifests_registries_write_besides_plain_images(
    moorage: Client, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """Each of these failed warm: a manifest with ``"layers": null`` (Go's empty list; ``ls``
    failed on it too, both with a traceback), an image with a foreign layer (Windows base
    layers carry ``urls``: no registry the cache asks has them, and the 404 failed the image),
    and an index within an index (no platform matched; with every platform, nothing below the
    inner index was pulled, and the run said it was warmed)."""
    config = b'{"os": "linux", "architecture": "amd64"}'
    config_entry = (upstream.add_blob(config), len(config))
    upstream.add_manifest("owner/nulls", "1", oci_manifest(config_entry, None), OCI_MANIFEST)
    layer = os.urandom(1000)
    foreign = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "size": 5_000_000}
    foreign |= {"digest": "sha256:" + "f" * 64, "urls": ["https://mcr.microsoft.com/base-layer"]}
    layers = [entry(upstream.add_blob(layer), layer, OCI_LAYER), foreign]
    upstream.add_manifest("owner/windows", "1", oci_manifest(config_entry, layers), OCI_MANIFEST)
    image = upstream.add_image("owner/nested", None, [layer], media_type=OCI_MANIFEST)
    inner = upstream.add_index("owner/nested", None, [(image.digest, "linux", "amd64")], OCI_INDEX)
    inner_body = await (await moorage.get(f"/v2/owner/nested/manifests/{inner}", headers=ALL)).read()
    outer = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry(inner, inner_body, OCI_INDEX)]})
    upstream.add_manifest("owner/nested", "1", outer.encode(), OCI_INDEX)
    names = [parse_image_reference(f"owner/{name}:1") for name in ("nulls", "windows", "nested")]
    url = str(moorage.make_url(""))
    for platforms in (["linux/amd64"], None):
        warmed = await warm(url, names, platforms, None)
        assert [(image.image, image.blobs) for image in warmed] == [
            ("docker.io/owner/nulls:1", 1),
            ("docker.io/owner/windows:1", 2),
            ("docker.io/owner/nested:1", 2),
        ]
        assert warmed[2].platforms == ["linux/amd64"]
    sizes = {tag.repository: tag.size for tag in read_catalog(tmp_path / "store")}
    assert sizes["owner/nulls"] == len(config)
    assert sizes["owner/windows"] == len(config) + len(layer), "the foreign layer is never stored"


async def test_warm_with_referrers_takes_the_attestations_buildkit_keeps_in_the_index(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """BuildKit keeps an image's SBOM and provenance as ``unknown/unknown`` entries of its index
    (Docker Official Images carry them), which no referrers list names: ``--referrers`` with a
    platform left them behind, and only ``--all-platforms`` took them."""
    image = upstream.add_image("owner/app", None, [os.urandom(1000)], media_type=OCI_MANIFEST)
    other = upstream.add_image("owner/app", None, [os.urandom(1000)], media_type=OCI_MANIFEST, architecture="arm64")
    statement = os.urandom(300)
    config = b"{}"
    attestation_body = oci_manifest(
        (upstream.add_blob(config), len(config)),
        [entry(upstream.add_blob(statement), statement, "application/vnd.in-toto+json")],
    )
    attestation = upstream.add_manifest("owner/app", None, attestation_body, OCI_MANIFEST)
    annotations = {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": image.digest}
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            entry(image.digest, image.manifest, OCI_MANIFEST, platform={"os": "linux", "architecture": "amd64"}),
            entry(other.digest, other.manifest, OCI_MANIFEST, platform={"os": "linux", "architecture": "arm64"}),
            entry(
                attestation,
                attestation_body,
                OCI_MANIFEST,
                platform={"os": "unknown", "architecture": "unknown"},
                annotations=annotations,
            ),
        ],
    }
    upstream.add_manifest("owner/app", "1", json.dumps(index).encode(), OCI_INDEX)
    url = str(moorage.make_url(""))
    (plain,) = await warm(url, [parse_image_reference("owner/app:1")], ["linux/amd64"], None)
    assert (plain.platforms, plain.blobs, plain.referrers) == (["linux/amd64"], 2, 0)
    (signed,) = await warm(url, [parse_image_reference("owner/app:1")], ["linux/amd64"], None, referrers=True)
    assert (signed.platforms, signed.blobs, signed.referrers) == (["linux/amd64"], 4, 1)
    (every,) = await warm(url, [parse_image_reference("owner/app:1")], None, None)
    assert every.platforms == ["linux/amd64", "linux/arm64"], "an attestation is no platform"
    assert every.blobs == 6


async def test_warm_pulls_no_manifest_of_no_platform_asked_for_and_says_when_indexes_nest_too_deep(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """With a platform, an entry naming none was pulled to see whether it is an index (cached
    for nothing, and its failure failed the image); and an index nested past the depth warm
    follows was passed over in silence, the image said warmed with nothing below it."""
    image = upstream.add_image("owner/app", None, [os.urandom(1000)], media_type=OCI_MANIFEST)
    loose = upstream.add_image("owner/app", None, [os.urandom(1000)], media_type=OCI_MANIFEST)
    mislabelled = upstream.add_image("owner/app", None, [os.urandom(1000)], media_type=OCI_MANIFEST)
    windows = upstream.add_image("owner/app", None, [os.urandom(1000)], media_type=OCI_MANIFEST, os="windows")
    platform = {"os": "linux", "architecture": "amd64"}
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            entry(image.digest, image.manifest, OCI_MANIFEST, platform=platform),
            entry(loose.digest, loose.manifest, OCI_MANIFEST),
            entry(mislabelled.digest, mislabelled.manifest, OCI_INDEX),  # said to be an index: followed
            entry(windows.digest, windows.manifest, OCI_INDEX, platform={"os": "windows", "architecture": "amd64"}),
        ],
    }
    upstream.add_manifest("owner/app", "1", json.dumps(index).encode(), OCI_INDEX)
    url = str(moorage.make_url(""))
    (warmed,) = await warm(url, [parse_image_reference("owner/app:1")], ["linux/amd64"], None)
    assert (warmed.platforms, warmed.blobs) == (["linux/amd64"], 2), "nothing of another platform, or of none"
    assert upstream.count("GET", f"/manifests/{loose.digest}") == 0
    assert upstream.count("GET", f"/manifests/{windows.digest}") == 0
    (every,) = await warm(url, [parse_image_reference("owner/app:1")], None, None)
    assert every.platforms == ["linux/amd64", "(no platform)", "(no platform)", "windows/amd64"]
    # A platform that is no object (odd content) ended the whole run with a traceback.
    described = entry(loose.digest, loose.manifest, OCI_MANIFEST) | {"platform": "linux/amd64"}
    odd = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [described]}
    upstream.add_manifest("owner/odd", "1", json.dumps(odd).encode(), OCI_INDEX)
    upstream.add_manifest("owner/odd", None, loose.manifest, OCI_MANIFEST)
    (oddly,) = await warm(url, [parse_image_reference("owner/odd:1")], None, None)
    assert oddly.platforms == ["(no platform)"]
    deepest = json.dumps(index).encode()
    digest = upstream.add_manifest("owner/deep", None, deepest, OCI_INDEX)
    for _ in range(5):
        wrapper = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry(digest, deepest, OCI_INDEX)]}
        deepest = json.dumps(wrapper).encode()
        digest = upstream.add_manifest("owner/deep", None, deepest, OCI_INDEX)
    upstream.add_tags("owner/deep", ["1"], digest)
    with pytest.raises(WarmIncomplete, match="indexes nested more than 4 deep"):
        await warm(url, [parse_image_reference("owner/deep:1")], None, None)


def test_warm_on_a_store_runs_no_scheduled_pass_and_keeps_the_store_s_settings(tmp_path: Path) -> None:
    """The cache warm starts in its own process scheduled gc and lifecycle as a daemon does: a
    pass due ran a minute after the start and expired images the warm had just reported
    warmed, even with both turned off in the settings when ``--store`` was given, which set
    every other storage setting (the size cap among them) back to its default."""
    settings = load_settings(
        None,
        {
            "MOORAGE_STORAGE__PATH": str(tmp_path / "configured"),
            "MOORAGE_STORAGE__MAX_SIZE": "10GiB",
            "MOORAGE_STORAGE__GC_GRACE": "2h",
        },
    )
    for store in (None, tmp_path / "named"):
        storage = warm_settings(settings, store).storage
        assert (storage.gc_interval, storage.lifecycle_interval) == (0, 0)
        assert storage.path == (store or tmp_path / "configured")
        assert (storage.max_size, storage.gc_grace) == (10 * 1024**3, 7200)
