"""The referrers API (OCI 1.1): the signatures, SBOMs and attestations of a digest, listed by
the upstream, kept for ``referrers_ttl`` and served stale while the upstream fails; 404 where
the upstream has none, which sends clients (cosign, notation, oras) to the tag schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from moorage.proxy._state import CACHE
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS
from tests.fakes import OCI_INDEX, OCI_MANIFEST, FakeImage, FakeRegistry, image_manifest

from .conftest import StartMoorage, advance_clock, metric

Client = TestClient[web.Request, web.Application]
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"


def attach(
    upstream: FakeRegistry, repository: str, image: FakeImage, artifact_type: str, tag: str | None = None
) -> str:
    """Push an artifact whose subject is ``image`` (under ``tag``); its manifest's digest."""
    config = upstream.add_blob(b"{}")
    body = image_manifest(
        config,
        2,
        [],
        OCI_MANIFEST,
        subject=(image.digest, len(image.manifest), image.media_type),
        artifact_type=artifact_type,
    )
    return upstream.add_manifest(repository, tag, body, OCI_MANIFEST)


def listed(body: bytes) -> list[str]:
    document = json.loads(body)
    assert document["mediaType"] == OCI_INDEX
    return sorted(entry["digest"] for entry in document["manifests"])


async def test_referrers_are_fetched_once_then_served_from_the_cache(moorage: Client, upstream: FakeRegistry) -> None:
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    sbom = attach(upstream, "owner/app", image, SBOM)
    first = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert first.status == 200, await first.text()
    assert first.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in first.headers
    assert listed(await first.read()) == sorted([signature, sbom])
    again = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert listed(await again.read()) == sorted([signature, sbom])
    assert again.headers["X-Moorage-Cache"] == "hit"
    assert upstream.count("GET", "/referrers/") == 1
    # What the list names is pulled like any manifest, by digest.
    artifact = await moorage.get(f"/v2/owner/app/manifests/{signature}", headers={"Accept": OCI_MANIFEST})
    assert artifact.status == 200 and artifact.headers["Docker-Content-Digest"] == signature
    assert await metric(moorage, "moorage_cache_results_total", kind="referrers", result="hit") == 1


async def test_an_artifact_type_is_filtered_where_the_upstream_does_not(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """A client that finds OCI-Filters-Applied trusts the list to hold only the type it asked
    for; an upstream that ignores the filter is filtered here."""
    upstream.referrers_filter = False
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    attach(upstream, "owner/app", image, SBOM)
    response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}", params={"artifactType": SIGNATURE})
    assert response.status == 200
    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    assert listed(await response.read()) == [signature]


async def test_an_upstream_without_the_api_sends_clients_to_the_tag_schema(
    moorage: Client, upstream: FakeRegistry
) -> None:
    upstream.referrers_api = False
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    for _ in range(3):
        response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
        assert response.status == 404
        error = (await response.json())["errors"][0]
        assert error["code"] == "UNSUPPORTED" and "docker.io" in error["message"]
    assert upstream.count("GET", "/referrers/") == 1, "the upstream's 404 is kept like an answer"
    # The fallback: the sha256-<hex> tag, cached like any other.
    fallback = "sha256-" + image.digest.removeprefix("sha256:")
    signature = attach(upstream, "owner/app", image, SIGNATURE, tag=fallback)
    tagged = await moorage.get(f"/v2/owner/app/manifests/{fallback}", headers={"Accept": ACCEPT_ALL_MANIFESTS})
    assert tagged.headers["Docker-Content-Digest"] == signature


async def test_referrers_are_served_stale_while_the_upstream_is_down_even_after_a_restart(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    moorage = await start_moorage(referrers_ttl="1m")
    assert listed(await (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).read()) == [signature]
    await upstream.stop_listening()
    advance_clock(moorage, 120)
    stale = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert stale.status == 200 and stale.headers["Warning"] == '110 - "stale"'
    assert listed(await stale.read()) == [signature]
    await moorage.close()
    restarted = await start_moorage(referrers_ttl="1m")
    advance_clock(restarted, 120)
    kept = await restarted.get(f"/v2/owner/app/referrers/{image.digest}")
    assert kept.status == 200 and kept.headers["Warning"] == '110 - "stale"'
    assert listed(await kept.read()) == [signature]


async def test_a_new_referrer_shows_once_the_list_is_older_than_referrers_ttl(
    moorage: Client, upstream: FakeRegistry
) -> None:
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    assert listed(await (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).read()) == []
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    assert listed(await (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).read()) == []
    advance_clock(moorage, 61)
    assert listed(await (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).read()) == [signature]


async def test_made_up_digests_leave_nothing_in_the_index(moorage: Client, upstream: FakeRegistry) -> None:
    """An upstream answers any digest with an empty list: kept in memory, bounded, never in
    the index, or any client could grow it without end."""
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    attach(upstream, "owner/app", image, SIGNATURE)
    for number in range(20):
        made_up = f"sha256:{number:064x}"
        response = await moorage.get(f"/v2/owner/app/referrers/{made_up}", params={"artifactType": SBOM})
        assert response.status == 200 and listed(await response.read()) == []
        assert listed(await (await moorage.get(f"/v2/owner/app/referrers/{made_up}")).read()) == []
    assert (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).status == 200
    keys = [key for key in moorage.app[CACHE]._index._db.iterkeys() if key[0] == "referrers"]
    assert keys == [("referrers", "docker.io", "owner/app", image.digest, "")]


async def test_pages_follow_the_upstreams_next_links(moorage: Client, upstream: FakeRegistry) -> None:
    upstream.referrers_page_size = 1
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    referrers = sorted([attach(upstream, "owner/app", image, SIGNATURE), attach(upstream, "owner/app", image, SBOM)])
    path = f"/v2/owner/app/referrers/{image.digest}"
    first = await moorage.get(path, params={"ns": "docker.io"})
    assert listed(await first.read()) == referrers[:1]
    assert first.headers["Link"] == f'<{path}?last={referrers[0].replace(":", "%3A")}&n=1&ns=docker.io>; rel="next"'
    following = first.headers["Link"][1 : first.headers["Link"].index(">")]
    second = await moorage.get(following, allow_redirects=False)
    assert listed(await second.read()) == referrers[1:]
    assert "Link" not in second.headers


@pytest.mark.parametrize(
    "link",
    [
        '</v2/owner/app/referrers/x?last=a%0d%0aSet-Cookie:%20x>; rel="next"',
        '</v2/owner/app/referrers/x?last=a>; rel="next", <https://evil.example/>; rel="prev"',
        "</v2/owner/app/referrers/x?" + "&".join(f"p{number}=1" for number in range(9)) + '>; rel="next"',
    ],
)
async def test_an_upstream_next_link_goes_on_only_as_a_bounded_query_of_our_own(
    moorage: Client, upstream: FakeRegistry, link: str
) -> None:
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    upstream.referrers_link = link
    response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert response.status == 200
    assert "Set-Cookie" not in response.headers and "evil" not in response.headers.get("Link", "")
    if 'rel="prev"' in link:
        assert response.headers["Link"] == f'</v2/owner/app/referrers/{image.digest}?last=a>; rel="next"'
    else:
        assert "Link" not in response.headers


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        pytest.param({"artifactType": "not a media type"}, 400, "UNSUPPORTED", id="artifact_type"),
        pytest.param({f"p{number}": "1" for number in range(9)}, 400, "UNSUPPORTED", id="too_many"),
        pytest.param({"last": "\x7f"}, 400, "UNSUPPORTED", id="control_character"),
    ],
)
async def test_a_bad_query_gets_an_oci_error_and_touches_nothing(
    moorage: Client, upstream: FakeRegistry, tmp_path: Path, query: dict[str, str], status: int, code: str
) -> None:
    response = await moorage.get(f"/v2/owner/app/referrers/sha256:{'a' * 64}", params=query)
    assert response.status == status
    assert (await response.json())["errors"][0]["code"] == code
    assert upstream.requests == []


async def test_referrers_answer_get_only(moorage: Client, upstream: FakeRegistry) -> None:
    response = await moorage.head(f"/v2/owner/app/referrers/sha256:{'a' * 64}")
    assert response.status == 405 and response.headers["Allow"] == "GET"
    assert upstream.requests == []
