"""Lifecycle policies, garbage collection and eviction on a serving cache: exactly the images a
policy names leave (tags, manifests and the layers only they used), the preview command says
so beforehand, and pulls running throughout all succeed with verified bytes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

import moorage.cache._cache as cache_module
from moorage.cache import policy_resolver, read_catalog
from moorage.cache._cache import first_pass_delay
from moorage.cache._index import Index
from moorage.cache._keys import image_key
from moorage.cache._lifecycle import Expiry, PolicyFor
from moorage.config import UpstreamSettings
from moorage.proxy._state import CACHE
from moorage.proxy.cli import main
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS, DOCKER_MANIFEST_V2, RepositoryName, parse_digest
from tests.fakes import OCI_INDEX, OCI_MANIFEST, FakeRegistry
from tests.polling import until_async

from .conftest import StartMoorage, advance_clock, metric, settings_for

Client = TestClient[web.Request, web.Application]
ALL = {"Accept": ACCEPT_ALL_MANIFESTS}

KEEP_TWO_RELEASES = {
    "rules": [
        {
            "rulePriority": 1,
            "description": "keep the last two releases",
            "selection": {
                "tagStatus": "tagged",
                "tagPatternList": ["v*"],
                "countType": "imageCountMoreThan",
                "countNumber": 2,
            },
            "action": {"type": "expire"},
        }
    ]
}


def release_config(tag: str) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": {"version": tag}}}).encode()


def stored(store: Path, digest: str) -> bool:
    algorithm, hex_digest = digest.split(":")
    return (store / "blobs" / algorithm / hex_digest[:2] / hex_digest).exists()


async def pull(moorage: Client, repository: str, reference: str) -> None:
    """A whole image pull, every byte checked against its digest."""
    response = await moorage.get(f"/v2/{repository}/manifests/{reference}")
    assert response.status == 200, await response.text()
    body = await response.read()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == response.headers["Docker-Content-Digest"]
    document = json.loads(body)
    for descriptor in [document["config"], *document["layers"]]:
        blob = await moorage.get(f"/v2/{repository}/blobs/{descriptor['digest']}")
        assert blob.status == 200
        assert "sha256:" + hashlib.sha256(await blob.read()).hexdigest() == descriptor["digest"]


async def test_a_policy_expires_exactly_the_images_it_names(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    policy = tmp_path / "lifecycle.json"
    policy.write_text(json.dumps(KEEP_TWO_RELEASES))
    shared = os.urandom(1000)  # a base layer every release shares
    releases = {
        tag: upstream.add_image("team/app", tag, [shared, os.urandom(2000)], config=release_config(tag))
        for tag in ("v1", "v2", "v3", "v4")
    }
    latest = upstream.add_image("team/app", "latest", [shared, os.urandom(2000)])
    other = upstream.add_image("team/other", "v1", [os.urandom(500)])
    moorage = await start_moorage(
        storage={"path": str(store), "lifecycle_interval": 0, "gc_interval": 0},
        upstream_settings={"lifecycle_policies": [{"repositories": "team/app", "policy_file": str(policy)}]},
    )
    for tag in ("v1", "v2", "v3", "v4", "latest"):
        await pull(moorage, "team/app", tag)
        await asyncio.sleep(0.01)  # distinct first-cached times, in release order
    await pull(moorage, "team/other", "v1")
    await moorage.app[CACHE].flush()

    config = tmp_path / "config.yaml"
    settings = settings_for(
        upstream,
        store,
        upstream_settings={"lifecycle_policies": [{"repositories": "team/app", "policy_file": str(policy)}]},
    )
    config.write_text(json.dumps(settings.model_dump(mode="json")))
    preview = CliRunner().invoke(main, ["lifecycle", "preview", "--config", str(config), "--format", "json"])
    assert preview.exit_code == 0, preview.output
    listed = [json.loads(line) for line in preview.output.splitlines()]
    assert [(r["repository"], r["tags"], r["rule"]) for r in listed] == [
        ("team/app", ["v1"], 1),
        ("team/app", ["v2"], 1),
    ]
    assert listed[0]["reason"] == "rule 1 (keep the last two releases): more than 2 images match"

    result = await moorage.app[CACHE].apply_lifecycle(policy_resolver(settings.upstreams))
    assert sorted(sorted(e.image.tags) for e in result.expired) == [["v1"], ["v2"]]
    for tag in ("v1", "v2"):
        image = releases[tag]
        assert not stored(store, image.digest), f"{tag}'s manifest left the store"
        assert not stored(store, image.layer_digests[1]), f"{tag}'s own layer left the store"
        assert not stored(store, image.config_digest), f"{tag}'s config left the store"
    assert stored(store, releases["v1"].layer_digests[0]), "the shared layer stays: newer releases use it"
    for kept in (releases["v3"], releases["v4"], latest, other):
        assert all(stored(store, d) for d in (kept.digest, kept.config_digest, *kept.layer_digests))
    assert await metric(moorage, "moorage_lifecycle_expired_images_total", upstream="docker.io", rule="1") == 2
    assert await metric(moorage, "moorage_evictions_total", reason="lifecycle") == len(result.removed) == 6
    assert await metric(moorage, "moorage_evicted_bytes_total", reason="lifecycle") == result.freed_bytes > 4000

    upstream.reset_requests()
    await pull(moorage, "team/app", "v3")
    assert upstream.count() == 0, "a kept release is still a plain hit"
    await pull(moorage, "team/app", "v1")
    assert upstream.count("GET", "/manifests/v1") == 1, "an expired tag is fetched again"
    assert upstream.count("GET", f"/blobs/{releases['v1'].layer_digests[1]}") == 1

    again = CliRunner().invoke(main, ["lifecycle", "preview", "--config", str(config)])
    assert again.exit_code == 0, again.output
    assert "team/app" in again.output and "v2" not in again.output


async def test_scheduled_passes_run_while_serving(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    policy = tmp_path / "lifecycle.json"
    policy.write_text(json.dumps(KEEP_TWO_RELEASES))
    for tag in ("v1", "v2", "v3"):
        upstream.add_image("team/app", tag, [os.urandom(3000)])
    moorage = await start_moorage(
        storage={"path": str(store), "lifecycle_interval": "0.2s", "gc_interval": "0.2s", "gc_grace": "0s"},
        upstream_settings={"lifecycle_policy_file": str(policy)},
    )
    orphan = "sha256:" + hashlib.sha256(b"left behind").hexdigest()  # a blob no manifest refers to
    orphan_path = store / "blobs" / "sha256" / orphan[7:9] / orphan[7:]
    orphan_path.parent.mkdir(parents=True, exist_ok=True)
    orphan_path.write_bytes(b"left behind")
    os.utime(orphan_path, (1e9, 1e9))
    for tag in ("v1", "v2", "v3"):
        await pull(moorage, "team/app", tag)
        await asyncio.sleep(0.01)

    async def both_ran() -> bool:
        return await metric(moorage, "moorage_lifecycle_expired_images_total") >= 1 and not stored(store, orphan)

    await until_async(both_ran)
    assert await metric(moorage, "moorage_lifecycle_expired_images_total", rule="1") == 1
    assert not stored(store, orphan), "gc swept the blob no manifest refers to"
    assert await metric(moorage, "moorage_evictions_total", reason="gc") >= 1
    assert await metric(moorage, "moorage_maintenance_last_finished_timestamp_seconds", task="gc") > 0
    assert await metric(moorage, "moorage_maintenance_last_finished_timestamp_seconds", task="lifecycle") > 0


async def test_a_scheduled_pass_due_at_a_start_runs_soon_after_it(
    start_moorage: StartMoorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted from each start, a pass never ran in a daemon restarted more often than its
    interval (6 h for gc: a rolling deployment, nodes drained nightly): unreachable blobs
    piled up and lifecycle policies never applied, with nothing logged. When each pass last
    ran is kept in the store."""
    monkeypatch.setattr(cache_module, "OVERDUE_PASS_DELAY", 0.05)
    store = tmp_path / "store"
    first = await start_moorage(storage={"path": str(store), "gc_interval": "6h", "gc_grace": "0s"})
    await first.close()
    index = Index(store / "index")
    first_scheduled = index.last_pass("gc", 0.0)
    assert first_scheduled > time.time() - 60, "a store's first pass is due an interval after its first start"
    index.record_pass("gc", time.time() - 7 * 3600)  # the last pass, 7 h ago: due
    index.close()
    orphan = "sha256:" + hashlib.sha256(b"left behind").hexdigest()
    orphan_path = store / "blobs" / "sha256" / orphan[7:9] / orphan[7:]
    orphan_path.parent.mkdir(parents=True, exist_ok=True)
    orphan_path.write_bytes(b"left behind")
    restarted = await start_moorage(storage={"path": str(store), "gc_interval": "6h", "gc_grace": "0s"})

    async def swept() -> bool:
        return await metric(restarted, "moorage_maintenance_last_finished_timestamp_seconds", task="gc") > 0

    await until_async(swept)
    assert not stored(store, orphan)
    await restarted.close()
    index = Index(store / "index")
    assert index.last_pass("gc", 0.0) > time.time() - 60, "the pass is kept: the next is due 6 h after it"
    index.close()


@pytest.mark.parametrize(
    ("last", "delay"),
    [
        pytest.param(0.0, 3600.0, id="ran_just_now"),
        pytest.param(-1800.0, 1800.0, id="half_the_interval_left"),
        pytest.param(-3570.0, 60.0, id="due_within_a_minute"),
        pytest.param(-7200.0, 60.0, id="overdue"),
        pytest.param(86400.0, 60.0, id="ahead_of_now_by_a_day_a_clock_step"),
        pytest.param(3600.0, 60.0, id="ahead_of_now_by_the_interval"),
        pytest.param(5.0, 3600.0, id="ahead_of_now_by_a_replicas_clock_skew"),
        pytest.param(1800.0, 3600.0, id="ahead_of_now_by_less_than_the_interval"),
    ],
)
def test_the_first_pass_after_a_start_is_due_an_interval_after_the_last(last: float, delay: float) -> None:
    now = 1_700_000_000.0
    assert first_pass_delay(now + last, now, 3600.0) == delay


async def test_pulls_succeed_while_gc_eviction_and_lifecycle_run(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """The worst case for a sweeper: a zero grace period and a cap smaller than the images."""
    store = tmp_path / "store"
    policy = tmp_path / "lifecycle.json"
    policy.write_text(json.dumps(KEEP_TWO_RELEASES))
    tags = [f"v{n}" for n in range(8)]
    for tag in tags:
        upstream.add_image("team/app", tag, [os.urandom(40_000), os.urandom(40_000)])
    moorage = await start_moorage(
        storage={"path": str(store), "max_size": "300KiB", "lifecycle_interval": 0, "gc_interval": 0},
        upstream_settings={"lifecycle_policy_file": str(policy)},
    )
    cache = moorage.app[CACHE]
    resolve = policy_resolver(cache_upstreams(policy))
    pulls = 0
    stop = asyncio.Event()

    async def puller(offset: int) -> None:
        nonlocal pulls
        n = offset
        while not stop.is_set():
            await pull(moorage, "team/app", tags[n % len(tags)])
            pulls += 1
            n += 1

    async def maintainer() -> int:
        passes = 0
        for _ in range(30):
            await cache.collect_garbage(0.0)
            await cache.evict()
            await cache.apply_lifecycle(resolve)
            passes += 1
            await asyncio.sleep(0.005)
        stop.set()
        return passes

    results = await asyncio.gather(maintainer(), puller(0), puller(3), puller(5))
    assert results[0] == 30
    assert pulls >= 30, "pulls ran throughout"
    assert (
        await metric(moorage, "moorage_evictions_total", reason="gc")
        + await metric(moorage, "moorage_evictions_total", reason="size")
        + await metric(moorage, "moorage_evictions_total", reason="lifecycle")
        > 0
    ), "the sweepers really removed things"
    for tag in tags:  # and afterwards everything is still pullable
        await pull(moorage, "team/app", tag)


KEEP_ONE_RELEASE = {
    "rules": [
        {
            "rulePriority": 1,
            "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 1},
            "action": {"type": "expire"},
        }
    ]
}


def cache_upstreams(policy: Path) -> list[UpstreamSettings]:
    return [UpstreamSettings(host="docker.io", url="http://127.0.0.1:9", lifecycle_policy_file=policy)]


async def test_a_policy_file_broken_by_an_edit_holds_back_only_its_own_repositories(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "store"
    team, other = tmp_path / "team.json", tmp_path / "other.json"
    for policy in (team, other):
        policy.write_text(json.dumps(KEEP_TWO_RELEASES))
    bindings = [
        {"repositories": "team/*", "policy_file": str(team)},
        {"repositories": "other/*", "policy_file": str(other)},
    ]
    moorage = await start_moorage(
        storage={"path": str(store), "lifecycle_interval": 0, "gc_interval": 0},
        upstream_settings={"lifecycle_policies": bindings},
    )
    for repository in ("team/app", "other/app"):
        for tag in ("v1", "v2", "v3"):
            upstream.add_image(repository, tag, [os.urandom(3000)])
            await pull(moorage, repository, tag)
            await asyncio.sleep(0.01)
    settings = settings_for(upstream, store, upstream_settings={"lifecycle_policies": bindings})
    team.write_text('{"rules": [')  # saved half-way by an editor while serving
    result = await moorage.app[CACHE].apply_lifecycle(policy_resolver(settings.upstreams))
    assert [(e.image.repository, sorted(e.image.tags)) for e in result.expired] == [("other/app", ["v1"])]
    [failed] = [r for r in caplog.records if getattr(r, "event", "") == "maintenance_failed"]
    assert "team.json: not valid JSON" in failed.__dict__["error"]
    caplog.clear()  # the one error this test expects

    # The commands beside the daemon: each had refused to run, login-password among them.
    await moorage.app[CACHE].flush()
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(settings.model_dump(mode="json")))
    listed = CliRunner().invoke(main, ["ls", "--config", str(config)])
    assert listed.exit_code == 0 and "team/app" in listed.output, listed.output
    other.write_text(json.dumps(KEEP_ONE_RELEASE))  # v1 expired: this expires v2 too
    preview = CliRunner().invoke(main, ["lifecycle", "preview", "--config", str(config), "--format", "json"])
    assert preview.exit_code == 1
    assert "team.json: not valid JSON" in preview.stderr and "left out" in preview.stderr
    assert [json.loads(line)["tags"] for line in preview.stdout.splitlines()] == [["v2"]]
    # A broken file covering nothing the preview looks at is said all the same: a policy tried
    # with preview before any of its repositories is cached had read as "0 images would expire".
    narrowed = CliRunner().invoke(main, ["lifecycle", "preview", "--config", str(config), "--repository", "other/*"])
    assert narrowed.exit_code == 1 and "team.json: not valid JSON" in narrowed.stderr
    for command in (["check-config", str(config)], ["serve", "--config", str(config)]):
        refused = CliRunner().invoke(main, command)  # a (re)start refuses it: the file is to mend
        assert refused.exit_code == 2 and "team.json: not valid JSON" in refused.output, command


async def with_policy(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, selection: dict[str, object]
) -> tuple[Client, Path, PolicyFor]:
    """A cache whose one upstream has a one-rule policy (no scheduled passes); its store and the
    resolver to apply the policy with."""
    policy, store = tmp_path / "lifecycle.json", tmp_path / "store"
    rule = {"rulePriority": 1, "description": "the rule", "selection": selection, "action": {"type": "expire"}}
    policy.write_text(json.dumps({"rules": [rule]}))
    bound = {"lifecycle_policy_file": str(policy)}
    moorage = await start_moorage(
        storage={"path": str(store), "lifecycle_interval": 0, "gc_interval": 0}, upstream_settings=bound
    )
    return moorage, store, policy_resolver(settings_for(upstream, store, upstream_settings=bound).upstreams)


async def pull_index(moorage: Client, repository: str, tag: str, platform: str) -> None:
    """A current client's pull of a multi-arch tag: the index, then one platform by digest."""
    assert (await moorage.get(f"/v2/{repository}/manifests/{tag}", headers=ALL)).status == 200
    await pull(moorage, repository, platform)


async def test_an_expired_multi_arch_image_leaves_whole(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """The answer kept for clients that take no index named the image's platform manifest:
    that part, and its layers, stayed behind the index, and outlived the newer release."""
    selection = {"tagStatus": "tagged", "tagPrefixList": ["v"], "countType": "imageCountMoreThan", "countNumber": 1}
    moorage, store, resolver = await with_policy(start_moorage, upstream, tmp_path, selection)
    platforms = {}
    for tag in ("v1", "v2"):
        image = upstream.add_image("team/app", None, [os.urandom(2000)], architecture="amd64")
        upstream.add_index("team/app", tag, [(image.digest, "linux", "amd64")])
        platforms[tag] = image
    for tag in ("v1", "v2"):
        await pull_index(moorage, "team/app", tag, platforms[tag].digest)
        await asyncio.sleep(0.01)  # distinct first-cached times, in release order
    old_client = {"Accept": DOCKER_MANIFEST_V2}
    assert (await moorage.get("/v2/team/app/manifests/v1", headers=old_client)).status == 200
    await moorage.app[CACHE].flush()

    result = await moorage.app[CACHE].apply_lifecycle(resolver)
    assert [sorted(e.image.tags) for e in result.expired] == [["v1"]]
    gone = platforms["v1"]
    assert not stored(store, gone.digest) and not stored(store, gone.layer_digests[0]), "the whole image left"
    again = await moorage.app[CACHE].apply_lifecycle(resolver)
    assert again.expired == [], "the newest release stays"
    assert all(stored(store, d) for d in (platforms["v2"].digest, *platforms["v2"].layer_digests))
    upstream.reset_requests()
    assert (await moorage.get("/v2/team/app/manifests/v1", headers=old_client)).status == 200
    assert upstream.count("GET", "/manifests/v1") == 1, "an expired tag is fetched again, for every client"


async def test_an_expired_image_takes_an_index_within_it_and_its_signatures(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """An index within the image's index: its platform manifests stayed behind the image for
    good, layers and all (an image record each, which gc keeps). And a signature pulled by
    digest, untagged, was an image of its own that outlived the image it signs."""
    selection = {"tagStatus": "tagged", "tagPrefixList": ["v"], "countType": "imageCountMoreThan", "countNumber": 1}
    moorage, store, resolver = await with_policy(start_moorage, upstream, tmp_path, selection)
    leaves, inners, signatures = {}, {}, {}
    for tag in ("v1", "v2"):
        leaf = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
        inner = upstream.add_index("team/app", None, [(leaf.digest, "linux", "amd64")], OCI_INDEX)
        outer = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [_entry(upstream, inner, OCI_INDEX)]}
        top = upstream.add_manifest("team/app", tag, json.dumps(outer).encode(), OCI_INDEX)
        signature = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "subject": _entry(upstream, top, OCI_INDEX)}
        empty = upstream.add_blob(b"{}")
        signature |= {"config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}}
        signature |= {"layers": [], "artifactType": "application/vnd.cncf.notary.signature"}
        signatures[tag] = upstream.add_manifest("team/app", None, json.dumps(signature).encode(), OCI_MANIFEST)
        leaves[tag], inners[tag] = leaf, inner
    for tag in ("v1", "v2"):
        assert (await moorage.get(f"/v2/team/app/manifests/{tag}", headers=ALL)).status == 200
        assert (await moorage.get(f"/v2/team/app/manifests/{inners[tag]}", headers=ALL)).status == 200
        await pull(moorage, "team/app", leaves[tag].digest)
        assert (await moorage.get(f"/v2/team/app/manifests/{signatures[tag]}", headers=ALL)).status == 200
        await asyncio.sleep(0.01)  # distinct first-cached times, in release order
    await moorage.app[CACHE].flush()
    result = await moorage.app[CACHE].apply_lifecycle(resolver)
    assert [sorted(e.image.tags) for e in result.expired] == [["v1"]]
    gone = leaves["v1"]
    assert not [d for d in (gone.digest, gone.layer_digests[0], signatures["v1"]) if stored(store, d)]
    assert all(stored(store, d) for d in (leaves["v2"].digest, leaves["v2"].layer_digests[0], signatures["v2"]))
    assert (await moorage.app[CACHE].apply_lifecycle(resolver)).expired == [], "nothing of v1 left to judge"


def _entry(upstream: FakeRegistry, digest: str, media_type: str) -> dict[str, object]:
    """The descriptor of a manifest the upstream holds."""
    return {"mediaType": media_type, "digest": digest, "size": len(upstream.manifest(digest))}


async def test_a_pull_of_a_platform_manifest_is_a_pull_of_its_image(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """Pods pinned to the amd64 digest of a tag last pulled ten days ago keep the image."""
    selection = {"tagStatus": "any", "countType": "sinceImagePulled", "countUnit": "days", "countNumber": 7}
    moorage, store, resolver = await with_policy(start_moorage, upstream, tmp_path, selection)
    amd = upstream.add_image("team/app", None, [os.urandom(2000)], architecture="amd64")
    upstream.add_index("team/app", "1.0", [(amd.digest, "linux", "amd64")])
    await pull_index(moorage, "team/app", "1.0", amd.digest)
    advance_clock(moorage, 10 * 86400)
    await pull(moorage, "team/app", amd.digest)  # today
    await moorage.app[CACHE].flush()
    result = await moorage.app[CACHE].apply_lifecycle(resolver)
    assert result.expired == [] and stored(store, amd.digest)


async def test_an_image_expired_in_one_repository_stays_for_another_that_holds_it(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """Content is stored once for every repository: a policy for team/app took the image out
    of the store while team/mirror still held it, which then cost that repository a pull."""
    store = tmp_path / "store"
    policy = tmp_path / "lifecycle.json"
    policy.write_text(json.dumps(KEEP_TWO_RELEASES))
    layers = [os.urandom(1000)]
    config = release_config("v1")
    old = upstream.add_image("team/app", "v1", layers, config=config)
    for tag in ("v2", "v3"):
        upstream.add_image("team/app", tag, [os.urandom(1000)], config=release_config(tag))
    mirror = upstream.add_image("team/mirror", "v1", layers, config=config)
    assert mirror.digest == old.digest, "the very same image"
    overrides = {"lifecycle_policies": [{"repositories": "team/app", "policy_file": str(policy)}]}
    moorage = await start_moorage(
        storage={"path": str(store), "lifecycle_interval": 0, "gc_interval": 0}, upstream_settings=overrides
    )
    for repository, tag in (("team/app", "v1"), ("team/mirror", "v1"), ("team/app", "v2"), ("team/app", "v3")):
        await pull(moorage, repository, tag)
        await asyncio.sleep(0.01)  # distinct first-cached times, in release order
    settings = settings_for(upstream, store, upstream_settings=overrides)
    result = await moorage.app[CACHE].apply_lifecycle(policy_resolver(settings.upstreams))
    assert [(e.image.repository, sorted(e.image.tags)) for e in result.expired] == [("team/app", ["v1"])]
    assert all(stored(store, d) for d in (old.digest, old.config_digest, *old.layer_digests)), "team/mirror's"
    upstream.reset_requests()
    await pull(moorage, "team/mirror", "v1")
    assert upstream.count("GET") == 0, "still the store's for the other repository"


async def test_a_tag_moved_since_an_old_client_asked_leaves_no_platform_manifest_judged_alone(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """The answer kept for clients that take no index still named the last release's platform
    manifest after the tag moved: that manifest was judged as an image tagged ``app`` of its
    own, and a keep-the-newest rule expired it alone, while the index listing it stayed and
    pods pinned to it pulled on. And when that index went, the tag's pull time went with the
    old answer, though the tag is cached for current clients: ``moorage ls`` showed none."""
    selection = {"tagStatus": "tagged", "tagPrefixList": ["app"], "countType": "imageCountMoreThan", "countNumber": 1}
    moorage, store, resolver = await with_policy(start_moorage, upstream, tmp_path, selection)
    first = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    upstream.add_index("team/app", "app", [(first.digest, "linux", "amd64")], OCI_INDEX)
    await pull_index(moorage, "team/app", "app", first.digest)
    old_client = {"Accept": OCI_MANIFEST}
    assert (await moorage.get("/v2/team/app/manifests/app", headers=old_client)).status == 200
    second = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    upstream.add_index("team/app", "app", [(second.digest, "linux", "amd64")], OCI_INDEX)
    advance_clock(moorage, 86400)  # the tag is revalidated, and found moved
    await pull_index(moorage, "team/app", "app", second.digest)
    cache = moorage.app[CACHE]
    await cache.flush()
    assert (await cache.apply_lifecycle(resolver)).expired == []
    assert all(stored(store, d) for d in (first.digest, first.layer_digests[0]))
    upstream.reset_requests()
    await pull(moorage, "team/app", first.digest)
    assert upstream.count("GET") == 0

    untagged = {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days", "countNumber": 1}
    policy = tmp_path / "lifecycle.json"
    policy.write_text(json.dumps({"rules": [_rule(untagged)]}))
    advance_clock(moorage, 86400)
    await cache.flush()
    bound = {"lifecycle_policy_file": str(policy)}
    result = await cache.apply_lifecycle(
        policy_resolver(settings_for(upstream, store, upstream_settings=bound).upstreams)
    )
    assert [sorted(e.image.tags) for e in result.expired] == [[]], "the last release, with its platform manifest"
    assert not stored(store, first.digest) and stored(store, second.digest)
    await cache.flush()
    (listed,) = read_catalog(store)
    assert (listed.tag, listed.pulled_at is not None) == ("app", True), "the tag's last pull is still known"


async def test_pulls_of_a_platform_manifest_count_for_every_repository_holding_its_index(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """An index cached in two repositories, its platform manifest pulled in the first only:
    expiring the index there took the platform manifest's record, though the second still
    holds the file. Pods pulling it through the second from then on were served from the
    store, uncounted, and the second's not-pulled rule expired the index they use."""
    store, config = tmp_path / "store", release_config("1")
    layer = os.urandom(2000)
    platform = upstream.add_image("team/app", None, [layer], config=config, media_type=OCI_MANIFEST)
    assert upstream.add_image("team/mirror", None, [layer], config=config, media_type=OCI_MANIFEST) == platform
    index = upstream.add_index("team/app", "1", [(platform.digest, "linux", "amd64")], OCI_INDEX)
    assert upstream.add_index("team/mirror", "1", [(platform.digest, "linux", "amd64")], OCI_INDEX) == index
    policies = []
    for repository, selection in (
        ("team/app", {"tagStatus": "any", "countType": "sinceImagePushed", "countUnit": "days", "countNumber": 1}),
        ("team/mirror", {"tagStatus": "any", "countType": "sinceImagePulled", "countUnit": "days", "countNumber": 30}),
    ):
        policy = tmp_path / f"{repository.replace('/', '-')}.json"
        policy.write_text(json.dumps({"rules": [_rule(selection)]}))
        policies.append({"repositories": repository, "policy_file": str(policy)})
    bound = {"lifecycle_policies": policies}
    moorage = await start_moorage(
        storage={"path": str(store), "lifecycle_interval": 0, "gc_interval": 0}, upstream_settings=bound
    )
    resolver = policy_resolver(settings_for(upstream, store, upstream_settings=bound).upstreams)
    cache = moorage.app[CACHE]
    await pull_index(moorage, "team/app", "1", platform.digest)
    assert (await moorage.get("/v2/team/mirror/manifests/1", headers=ALL)).status == 200
    advance_clock(moorage, 2 * 86400)
    await cache.flush()
    result = await cache.apply_lifecycle(resolver)
    assert [e.image.repository for e in result.expired] == ["team/app"]
    upstream.reset_requests()
    for _ in range(4):  # pods pinned to the platform's digest, through the second repository
        advance_clock(moorage, 10 * 86400)
        await pull(moorage, "team/mirror", platform.digest)
        await cache.flush()
    assert upstream.count("GET") == 0
    assert (await cache.apply_lifecycle(resolver)).expired == [], "team/mirror's index is in use"
    assert stored(store, platform.digest) and stored(store, platform.layer_digests[0])


async def test_a_platform_manifest_two_releases_share_counts_its_pulls_for_the_newest(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """A release reusing the last one's arm64 manifest: its pulls counted for both indexes, so
    an untagged rule never expired the old release (nor its own amd64 image) while the new
    one was in use."""
    selection = {"tagStatus": "untagged", "countType": "sinceImagePulled", "countUnit": "days", "countNumber": 7}
    moorage, store, resolver = await with_policy(start_moorage, upstream, tmp_path, selection)
    arm = upstream.add_image("team/app", None, [os.urandom(2000)], architecture="arm64", media_type=OCI_MANIFEST)
    amd = {}
    for release in ("1", "2"):
        amd[release] = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
        platforms = [(amd[release].digest, "linux", "amd64"), (arm.digest, "linux", "arm64")]
        upstream.add_index("team/app", "stable", platforms, OCI_INDEX)
        advance_clock(moorage, 86400)  # the tag is revalidated, and found moved
        await pull_index(moorage, "team/app", "stable", amd[release].digest)
        await pull(moorage, "team/app", arm.digest)
    cache = moorage.app[CACHE]
    for _ in range(3):  # both fleets pull the new release daily for three weeks
        advance_clock(moorage, 7 * 86400)
        await pull_index(moorage, "team/app", "stable", amd["2"].digest)
        await pull(moorage, "team/app", arm.digest)
    await cache.flush()
    result = await cache.apply_lifecycle(resolver)
    assert [sorted(e.image.tags) for e in result.expired] == [[]], "the old release"
    assert not stored(store, amd["1"].digest) and not stored(store, amd["1"].layer_digests[0])
    upstream.reset_requests()
    await pull_index(moorage, "team/app", "stable", amd["2"].digest)
    await pull(moorage, "team/app", arm.digest)
    assert upstream.count("GET") == 0, "the shared manifest stays with the new release"


async def test_a_manifest_cached_again_counts_as_first_cached_now(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """An image record left from before its manifest left the store kept its first-cached
    time when the manifest was cached again: a pushed-before rule expired it at once."""
    selection = {"tagStatus": "any", "countType": "sinceImagePushed", "countUnit": "days", "countNumber": 7}
    moorage, store, resolver = await with_policy(start_moorage, upstream, tmp_path, selection)
    image = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    cache = moorage.app[CACHE]
    await asyncio.to_thread(
        cache._index.add_image, image_key("docker.io", RepositoryName("team/app"), parse_digest(image.digest)), 0.0
    )
    await pull(moorage, "team/app", image.digest)
    await cache.flush()
    assert (await cache.apply_lifecycle(resolver)).expired == []
    assert stored(store, image.digest)


def _rule(selection: dict[str, object]) -> dict[str, object]:
    return {"rulePriority": 1, "description": "the rule", "selection": selection, "action": {"type": "expire"}}


async def test_a_shared_platform_manifest_counts_for_the_tagged_release_as_well_as_the_newest(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """Pods pull the tagged release's arm64 manifest daily; a scanner looked once at a newer
    candidate index reusing it. Counted for the newest alone, those pulls made the tagged
    release look unpulled: it expired, and the manifest the pods pull went with the candidate."""
    selection = {"tagStatus": "any", "countType": "sinceImagePulled", "countUnit": "days", "countNumber": 30}
    moorage, _, resolver = await with_policy(start_moorage, upstream, tmp_path, selection)
    amd = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    arm = upstream.add_image("team/app", None, [os.urandom(2000)], architecture="arm64", media_type=OCI_MANIFEST)
    upstream.add_index("team/app", "v1", [(amd.digest, "linux", "amd64"), (arm.digest, "linux", "arm64")], OCI_INDEX)
    await pull_index(moorage, "team/app", "v1", amd.digest)
    await pull(moorage, "team/app", arm.digest)
    newer = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    candidate = [(newer.digest, "linux", "amd64"), (arm.digest, "linux", "arm64")]
    candidate_index = upstream.add_index("team/app", None, candidate, OCI_INDEX)
    for day in range(1, 41):
        advance_clock(moorage, 86400)
        await pull(moorage, "team/app", arm.digest)
        if day == 38:
            assert (await moorage.get(f"/v2/team/app/manifests/{candidate_index}", headers=ALL)).status == 200
    cache = moorage.app[CACHE]
    await cache.flush()
    assert (await cache.apply_lifecycle(resolver)).expired == [], "both are in use"
    upstream.reset_requests()
    await pull_index(moorage, "team/app", "v1", arm.digest)
    assert upstream.count("GET") == 0


async def test_a_tag_only_clients_that_take_no_index_pulled_since_it_moved_is_that_image_s(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """After the tag moved, only clients that take no index pulled it: the answer kept for the
    others still named the old image. Judged by that one, the image the tag names now was
    untagged, expired, and fetched again at every pass."""
    selection = {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days", "countNumber": 1}
    moorage, store, resolver = await with_policy(start_moorage, upstream, tmp_path, selection)
    old_client = {"Accept": OCI_MANIFEST}
    first = upstream.add_image("team/app", "app", [os.urandom(2000)], media_type=OCI_MANIFEST)
    await pull(moorage, "team/app", "app")
    assert (await moorage.get("/v2/team/app/manifests/app", headers=old_client)).status == 200
    second = upstream.add_image("team/app", "app", [os.urandom(2000)], media_type=OCI_MANIFEST)
    for _ in range(3):
        advance_clock(moorage, 86400)
        response = await moorage.get("/v2/team/app/manifests/app", headers=old_client)
        assert response.headers["Docker-Content-Digest"] == second.digest
    cache = moorage.app[CACHE]
    await cache.flush()
    result = await cache.apply_lifecycle(resolver)
    assert [e.image.digest for e in result.expired] == [parse_digest(first.digest)], "the image the tag left"
    upstream.reset_requests()
    assert (await moorage.get("/v2/team/app/manifests/app", headers=old_client)).status == 200
    assert upstream.count("GET") == 0 and stored(store, second.digest)


async def test_an_expired_tag_leaves_no_answer_that_makes_an_old_platform_manifest_the_tag_again(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """The tag moved, then expired with the image it named; the answer kept for clients that take
    no index, still naming the last release's platform manifest, stayed, and the next pass
    judged that manifest as the tag's image, alone."""
    selection = {"tagStatus": "tagged", "tagPrefixList": ["app"], "countType": "sinceImagePulled", "countUnit": "days"}
    moorage, _, resolver = await with_policy(start_moorage, upstream, tmp_path, selection | {"countNumber": 2})
    first = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    upstream.add_index("team/app", "app", [(first.digest, "linux", "amd64")], OCI_INDEX)
    await pull_index(moorage, "team/app", "app", first.digest)
    assert (await moorage.get("/v2/team/app/manifests/app", headers={"Accept": OCI_MANIFEST})).status == 200
    second = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    upstream.add_index("team/app", "app", [(second.digest, "linux", "amd64")], OCI_INDEX)
    advance_clock(moorage, 86400)
    await pull_index(moorage, "team/app", "app", second.digest)
    advance_clock(moorage, 3 * 86400)
    cache = moorage.app[CACHE]
    await cache.flush()
    assert [sorted(e.image.tags) for e in (await cache.apply_lifecycle(resolver)).expired] == [["app"]]
    assert (await cache.apply_lifecycle(resolver)).expired == [], "nothing is the tag any more"


KEEP_ONE_RELEASE_AND_UNTAGGED_FOR_A_DAY = [
    {"tagStatus": "tagged", "tagPrefixList": ["v"], "countType": "imageCountMoreThan", "countNumber": 1},
    {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days", "countNumber": 1},
]


async def with_rules(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, selections: list[dict[str, object]]
) -> tuple[Client, Path, PolicyFor]:
    """:func:`with_policy` for a policy of several rules, in the order given (the resolver reads
    the file at its first use)."""
    moorage, store, resolver = await with_policy(start_moorage, upstream, tmp_path, selections[0])
    rules = [_rule(selection) | {"rulePriority": n} for n, selection in enumerate(selections, 1)]
    (tmp_path / "lifecycle.json").write_text(json.dumps({"rules": rules}))
    return moorage, store, resolver


async def test_two_releases_sharing_their_amd64_manifest_keep_the_current_one(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """Only arm64 changed between v1.2 and v1.3; clients that take no index pulled both tags
    and got the same amd64 manifest. Tagged with both, it was judged alone and expired with
    v1.2, taking v1.3's answer for the other clients along: v1.3 was then untagged, and went
    a day later with its layers, while every node still pulled it."""
    rules = KEEP_ONE_RELEASE_AND_UNTAGGED_FOR_A_DAY
    moorage, store, resolver = await with_rules(start_moorage, upstream, tmp_path, rules)
    amd = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    arm = {}
    old_client = {"Accept": OCI_MANIFEST}
    for release in ("v1.2", "v1.3"):
        arm[release] = upstream.add_image(
            "team/app", None, [os.urandom(2000)], architecture="arm64", media_type=OCI_MANIFEST
        )
        platforms = [(amd.digest, "linux", "amd64"), (arm[release].digest, "linux", "arm64")]
        upstream.add_index("team/app", release, platforms, OCI_INDEX)
        advance_clock(moorage, 86400)
        await pull_index(moorage, "team/app", release, arm[release].digest)
        response = await moorage.get(f"/v2/team/app/manifests/{release}", headers=old_client)
        assert response.headers["Docker-Content-Digest"] == amd.digest
        await pull(moorage, "team/app", amd.digest)
    cache = moorage.app[CACHE]
    for _ in range(3):
        await cache.flush()
        await cache.apply_lifecycle(resolver)
        advance_clock(moorage, 86400)
    upstream.reset_requests()
    await pull_index(moorage, "team/app", "v1.3", arm["v1.3"].digest)
    await pull(moorage, "team/app", amd.digest)
    assert upstream.count("GET") == 0, "the current release, whole"
    assert not stored(store, arm["v1.2"].digest), "the last one went"


async def test_releases_sharing_an_amd64_manifest_do_not_all_keep_the_tag(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """``latest`` moves daily to a new index reusing the same amd64 manifest; clients that take
    no index pull it after the others, so their answer is the one confirmed last. Given to
    every cached index holding that manifest, the tag kept each old release, none untagged,
    and the store grew for good."""
    untagged = KEEP_ONE_RELEASE_AND_UNTAGGED_FOR_A_DAY[1]
    moorage, store, resolver = await with_policy(start_moorage, upstream, tmp_path, untagged)
    amd = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    cache = moorage.app[CACHE]
    arm = []
    for _ in range(4):
        arm.append(
            upstream.add_image("team/app", None, [os.urandom(2000)], architecture="arm64", media_type=OCI_MANIFEST)
        )
        upstream.add_index(
            "team/app", "latest", [(amd.digest, "linux", "amd64"), (arm[-1].digest, "linux", "arm64")], OCI_INDEX
        )
        advance_clock(moorage, 86400)
        await pull_index(moorage, "team/app", "latest", arm[-1].digest)
        response = await moorage.get("/v2/team/app/manifests/latest", headers={"Accept": OCI_MANIFEST})
        assert response.headers["Docker-Content-Digest"] == amd.digest
        await cache.flush()
        await cache.apply_lifecycle(resolver)
    assert [stored(store, image.digest) for image in arm] == [False, False, False, True], "the current one alone"


async def test_a_pull_while_a_pass_runs_keeps_the_tag_it_recorded(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass planned to expire ``latest`` with the old release; a client pulled the tag,
    moved upstream, between the plan and its application, and the pass dropped the answer just
    recorded (every answer of the tag went): the current release was left untagged, and the
    next pull was a GET upstream."""
    selection = {"tagStatus": "tagged", "tagPrefixList": ["latest"], "countType": "sinceImagePushed"}
    moorage, _, resolver = await with_policy(
        start_moorage, upstream, tmp_path, selection | {"countUnit": "days", "countNumber": 1}
    )
    first = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    upstream.add_index("team/app", "latest", [(first.digest, "linux", "amd64")], OCI_INDEX)
    await pull_index(moorage, "team/app", "latest", first.digest)
    advance_clock(moorage, 2 * 86400)
    second = upstream.add_image("team/app", None, [os.urandom(2000)], media_type=OCI_MANIFEST)
    moved = upstream.add_index("team/app", "latest", [(second.digest, "linux", "amd64")], OCI_INDEX)
    loop = asyncio.get_running_loop()
    planned = cache_module.plan  # type: ignore[attr-defined]  # the name _cache calls

    def plan_then_a_pull(*args: Any, **kwargs: Any) -> list[Expiry]:
        expiries = planned(*args, **kwargs)
        asyncio.run_coroutine_threadsafe(pull_index(moorage, "team/app", "latest", second.digest), loop).result()
        return expiries

    monkeypatch.setattr(cache_module, "plan", plan_then_a_pull)
    cache = moorage.app[CACHE]
    result = await cache.apply_lifecycle(resolver)
    assert [sorted(e.image.tags) for e in result.expired] == [["latest"]]
    upstream.reset_requests()
    response = await moorage.get("/v2/team/app/manifests/latest", headers=ALL)
    assert response.headers["Docker-Content-Digest"] == moved
    assert upstream.count("GET") == 0, "answered from the store"
