"""The referrers API (OCI 1.1): the signatures, SBOMs and attestations of a digest, listed by
the upstream, kept for ``referrers_ttl`` and served stale while the upstream fails; 404 where
the upstream has none, which sends clients (cosign, notation, oras) to the tag schema."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from moorage.cache import policy_resolver
from moorage.cache._stale import BACKING_OFF
from moorage.proxy._state import CACHE, SETTINGS
from moorage.proxy._warm import WarmFailed, warm
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS, parse_digest, parse_image_reference
from tests.fakes import OCI_INDEX, OCI_MANIFEST, FakeImage, FakeRegistry, image_manifest

from .conftest import StartMoorage, advance_clock, metric

Client = TestClient[web.Request, web.Application]
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
ALL = {"Accept": ACCEPT_ALL_MANIFESTS}


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


async def signed_and_kept(start_moorage: StartMoorage, upstream: FakeRegistry) -> tuple[Client, FakeImage, str]:
    """owner/app:1 with a signature upstream, pulled through the cache and its referrers
    asked for once, so that the list is kept in the index: (the cache, the image, the
    signature's digest)."""
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    moorage = await start_moorage()
    assert (await moorage.get("/v2/owner/app/manifests/1", headers=ALL)).status == 200
    assert listed(await (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).read()) == [signature]
    return moorage, image, signature


async def restarted_while_down(moorage: Client, start_moorage: StartMoorage, upstream: FakeRegistry) -> Client:
    """The cache stopped, the upstream gone, the cache started again on the same store, and
    everything it kept older than ``referrers_ttl``."""
    await moorage.close()
    await upstream.stop_listening()
    restarted = await start_moorage()
    advance_clock(restarted, 120)
    return restarted


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


@pytest.mark.parametrize("listing", ["tags", "referrers"])
async def test_a_stale_listing_waits_for_a_hung_upstream_once_then_backs_off(
    start_moorage: StartMoorage, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture, listing: str
) -> None:
    """A kept tag list or referrers list gone stale while the upstream hung: every request
    waited out every try of the read timeout (three minutes with the defaults: a signature
    check in an admission webhook gave up first). It is served stale past
    ``revalidate_timeout`` and not asked for again for ``stale_backoff``, as a stale tag."""
    caplog.set_level("INFO", logger="moorage")
    moorage = await start_moorage(
        tags_list_ttl="1m", referrers_ttl="1m", revalidate_timeout="0.5s", stale_backoff="30s"
    )
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    assert (await moorage.get("/v2/owner/app/manifests/1", headers=ALL)).status == 200  # referrers kept for it
    path = "/v2/owner/app/tags/list" if listing == "tags" else f"/v2/owner/app/referrers/{image.digest}"
    first = await (await moorage.get(path)).read()
    advance_clock(moorage, 61)
    upstream.reset_requests()
    upstream.delay_next(1, 20.0, paths=r"/tags/list|/referrers/")
    answers = [await moorage.get(path) for _ in range(3)]
    assert [answer.headers["X-Moorage-Cache"] for answer in answers] == ["stale"] * 3
    assert [await answer.read() for answer in answers] == [first] * 3
    assert len(upstream.requests) == 1, "asked once: the back-off answers the others"
    (failed,) = [r for r in caplog.records if getattr(r, "event", "") == "revalidation_failed"]
    assert "no answer within 0.5 s" in failed.__dict__["error"]
    reasons = [r.__dict__.get("stale_reason") for r in caplog.records if getattr(r, "result", "") == "stale"]
    assert reasons == [failed.__dict__["error"]] + [BACKING_OFF] * 2, "each access line says why"
    if listing == "referrers":
        assert listed(first) == [signature]


async def test_a_page_cut_from_the_kept_tag_list_waits_for_a_hung_upstream_once(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """A page asked for with ``n`` (as clients that page always do) and never kept is cut from
    the whole list kept while the upstream fails; it was cut only after every try had failed,
    each request waiting them all out, and the back-off never consulted."""
    moorage = await start_moorage(tags_list_ttl="1m", revalidate_timeout="0.5s", stale_backoff="30s")
    for tag in ("a", "b", "c"):
        upstream.add_image("owner/app", tag, [tag.encode()])
    assert (await (await moorage.get("/v2/owner/app/tags/list")).json())["tags"] == ["a", "b", "c"]
    advance_clock(moorage, 61)
    upstream.reset_requests()
    upstream.delay_next(1, 20.0, paths=r"/tags/list")
    answers = [await moorage.get("/v2/owner/app/tags/list?n=2") for _ in range(3)]
    assert [answer.headers["X-Moorage-Cache"] for answer in answers] == ["stale"] * 3
    assert [(await answer.json())["tags"] for answer in answers] == [["a", "b"]] * 3
    assert len(upstream.requests) == 1, "asked once: the back-off answers the others"


@pytest.mark.parametrize("listing", ["tags", "referrers"])
async def test_a_listing_fetched_past_the_deadline_with_nothing_kept_is_a_miss(
    start_moorage: StartMoorage, upstream: FakeRegistry, listing: str
) -> None:
    """With nothing kept, a listing slower than ``revalidate_timeout`` is waited for; the
    waiting caller then joined its own fetch a second time, and said ``coalesced``."""
    moorage = await start_moorage(revalidate_timeout="0.2s")
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    path = "/v2/owner/app/tags/list" if listing == "tags" else f"/v2/owner/app/referrers/{image.digest}"
    upstream.delay_next(1, 0.6, paths=r"/tags/list|/referrers/")
    response = await moorage.get(path)
    assert response.status == 200 and response.headers["X-Moorage-Cache"] == "miss"


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


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(400, None, id="400"),
        pytest.param(404, None, id="404"),
        pytest.param(405, None, id="405"),
        pytest.param(406, None, id="406"),
        pytest.param(200, b"<html>not here</html>", id="200_not_an_index"),
        pytest.param(200, b"[" * 100_000, id="200_nested_past_the_parser"),
    ],
)
async def test_any_answer_that_is_no_list_sends_clients_to_the_tag_schema(
    moorage: Client, upstream: FakeRegistry, status: int, body: bytes | None
) -> None:
    """Registries without the API answer other than 404 (Quay 400, Artifactory 406). oras-go
    and notation fall back to the tag schema on a 404 only: anything else, passed on as a
    502, failed their signature checks."""
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    if body is None:
        upstream.fail_next(1, status, paths="/referrers/", code="UNSUPPORTED")
    else:
        upstream.referrers_body = body
    response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert response.status == 404, await response.text()
    assert (await response.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_an_upstream_down_with_nothing_kept_is_an_error_not_the_404_of_no_api(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """A client told "no referrers API" may keep to the tag schema for good (oras-go does, for
    the life of its repository object): after the outage it would find no signature there,
    and a check for the absence of an attestation would pass. An outage fails closed."""
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    await upstream.stop_listening()
    response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert response.status == 503
    assert (await response.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_a_repository_the_upstream_does_not_hold_is_name_unknown_not_the_end_of_the_api(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """A registry with the API answers 404 NAME_UNKNOWN for a repository it does not hold
    (deleted, renamed): oras-go takes that as no word on the API, and so must the cache, or
    its answer would replace the kept list and send verifiers to the tag schema for good."""
    moorage, image, _ = await signed_and_kept(start_moorage, upstream)
    advance_clock(moorage, 61)
    upstream.fail_next(1, 404, paths="/referrers/", code="NAME_UNKNOWN")
    gone = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert gone.status == 404 and (await gone.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    kept = moorage.app[CACHE]._index.referrers(("referrers", "docker.io", "owner/app", image.digest, ""))
    assert kept is not None and kept.body is not None, "the kept list is not replaced"


@pytest.mark.logs_errors("bookkeeping not written")
async def test_a_referrers_answer_the_index_cannot_record_is_served_all_the_same(
    moorage: Client, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    index = moorage.app[CACHE]._index

    def full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(index, "_db", _Failing(index._db, full))
    response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert response.status == 200 and listed(await response.read()) == [signature]


class _Failing:
    """An index database whose reads pass and whose writes fail."""

    def __init__(self, db: object, fail: Callable[..., None]) -> None:
        self._db, self._fail = db, fail

    def __contains__(self, key: object) -> bool:
        self._fail()
        return False

    def __getattr__(self, name: str) -> object:
        return self._fail if name in ("set", "delete", "add", "transact") else getattr(self._db, name)


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_are_a_failure_not_the_end_of_the_api(
    start_moorage: StartMoorage, upstream: FakeRegistry, status: int
) -> None:
    """A refusal may be the cache's own credentials, rotated: taking it for "no API" replaced
    the kept list, and sent verifiers to the tag schema while the image still pulled."""
    moorage, image, signature = await signed_and_kept(start_moorage, upstream)
    advance_clock(moorage, 61)
    upstream.fail_next(5, status, paths="/referrers/")
    response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert response.status == 200 and response.headers["Warning"] == '110 - "stale"'
    assert listed(await response.read()) == [signature]
    restarted = await restarted_while_down(moorage, start_moorage, upstream)
    assert listed(await (await restarted.get(f"/v2/owner/app/referrers/{image.digest}")).read()) == [signature]


async def test_a_kept_list_of_one_type_gives_way_to_a_newer_whole_list(moorage: Client, upstream: FakeRegistry) -> None:
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    assert (await moorage.get("/v2/owner/app/manifests/1", headers=ALL)).status == 200
    one_type = {"artifactType": SIGNATURE}
    first = await moorage.get(f"/v2/owner/app/referrers/{image.digest}", params=one_type)
    assert listed(await first.read()) == [signature]
    upstream.delete_manifest("owner/app", signature)
    advance_clock(moorage, 61)
    assert listed(await (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).read()) == []
    upstream.reset_requests()
    again = await moorage.get(f"/v2/owner/app/referrers/{image.digest}", params=one_type)
    assert listed(await again.read()) == [] and again.headers["X-Moorage-Cache"] == "hit"
    assert upstream.requests == [], "cut from the whole list just fetched"


async def test_no_api_for_a_stored_image_is_answered_through_a_restart_and_an_outage(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """Distribution 2.x has no referrers API: clients of a cache in front of it found the tag
    schema offline before referrers were served, and still do for the images it holds."""
    upstream.referrers_api = False
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    moorage = await start_moorage()
    assert (await moorage.get("/v2/owner/app/manifests/1", headers=ALL)).status == 200
    assert (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).status == 404
    restarted = await restarted_while_down(moorage, start_moorage, upstream)
    response = await restarted.get(f"/v2/owner/app/referrers/{image.digest}")
    assert response.status == 404 and response.headers["Warning"] == '110 - "stale"'
    assert (await response.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_a_list_of_one_type_is_cut_from_the_kept_list_while_the_upstream_is_down(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """notation (through oras-go) always asks with artifactType."""
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    attach(upstream, "owner/app", image, SBOM)
    moorage = await start_moorage()
    assert (await moorage.get("/v2/owner/app/manifests/1", headers=ALL)).status == 200
    assert len(listed(await (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).read())) == 2
    upstream.reset_requests()
    fresh = await moorage.get(f"/v2/owner/app/referrers/{image.digest}", params={"artifactType": SIGNATURE})
    assert listed(await fresh.read()) == [signature] and fresh.headers["X-Moorage-Cache"] == "hit"
    assert upstream.requests == [], "cut from the whole list, which is fresh"
    restarted = await restarted_while_down(moorage, start_moorage, upstream)
    response = await restarted.get(f"/v2/owner/app/referrers/{image.digest}", params={"artifactType": SIGNATURE})
    assert response.status == 200 and response.headers["Warning"] == '110 - "stale"'
    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    assert listed(await response.read()) == [signature]


async def test_a_signature_withdrawn_upstream_does_not_come_back_after_a_restart(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    moorage, image, signature = await signed_and_kept(start_moorage, upstream)
    upstream.delete_manifest("owner/app", signature)
    advance_clock(moorage, 61)
    assert listed(await (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).read()) == []
    restarted = await restarted_while_down(moorage, start_moorage, upstream)
    assert listed(await (await restarted.get(f"/v2/owner/app/referrers/{image.digest}")).read()) == []


async def test_an_upstream_without_the_api_sends_clients_to_the_tag_schema(
    moorage: Client, upstream: FakeRegistry
) -> None:
    upstream.referrers_api = False
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    results = []
    for _ in range(3):
        response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
        assert response.status == 404
        error = (await response.json())["errors"][0]
        assert error["code"] == "UNSUPPORTED" and "docker.io" in error["message"]
        results.append(response.headers.get("X-Moorage-Cache"))
    assert upstream.count("GET", "/referrers/") == 1, "the upstream's 404 is kept like an answer"
    # Counted as the cache's answers they are: signature checks against such a registry were
    # missing from the hit rate, and the answers had no X-Moorage-Cache header.
    assert results == ["miss", "hit", "hit"]
    assert await metric(moorage, "moorage_cache_results_total", kind="referrers", result="hit") == 2
    # The fallback: the sha256-<hex> tag, cached like any other.
    fallback = "sha256-" + image.digest.removeprefix("sha256:")
    signature = attach(upstream, "owner/app", image, SIGNATURE, tag=fallback)
    tagged = await moorage.get(f"/v2/owner/app/manifests/{fallback}", headers=ALL)
    assert tagged.headers["Docker-Content-Digest"] == signature


async def test_referrers_are_served_stale_while_the_upstream_is_down_even_after_a_restart(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    moorage = await start_moorage(referrers_ttl="1m")
    assert (await moorage.get("/v2/owner/app/manifests/1", headers=ALL)).status == 200
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


async def test_only_lists_of_stored_manifests_are_kept_in_the_index_and_leave_with_them(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """An upstream answers any digest with an empty list, and anyone who may push there can
    make referrers of digests that name nothing: such lists are kept in memory, bounded,
    never in the index, or clients could grow it without end."""
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    attach(upstream, "owner/app", image, SIGNATURE)
    config = upstream.add_blob(b"{}")
    for number in range(20):
        made_up = f"sha256:{number:064x}"
        sbom = image_manifest(config, 2, [], OCI_MANIFEST, subject=(made_up, 10, OCI_MANIFEST), artifact_type=SBOM)
        upstream.add_manifest("owner/app", None, sbom, OCI_MANIFEST)
        response = await moorage.get(f"/v2/owner/app/referrers/{made_up}", params={"artifactType": SIGNATURE})
        assert response.status == 200 and listed(await response.read()) == []
        assert len(listed(await (await moorage.get(f"/v2/owner/app/referrers/{made_up}")).read())) == 1
    cache = moorage.app[CACHE]

    def kept() -> list[tuple[str, ...]]:
        return [key for key in cache._index._db.iterkeys() if key[0] == "referrers"]

    assert (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).status == 200
    assert kept() == [], "its subject is not stored"
    assert (await moorage.get("/v2/owner/app/manifests/1", headers=ALL)).status == 200
    advance_clock(moorage, 61)
    assert (await moorage.get(f"/v2/owner/app/referrers/{image.digest}")).status == 200
    assert kept() == [("referrers", "docker.io", "owner/app", image.digest, "")]
    assert ("docker.io", "owner/app") in cache._index.routes(parse_digest(image.digest)), (
        "its route is written with it, not only with the next batch: a crash must not leave a list whose route is lost"
    )
    # The same manifest named through a repository anyone could create upstream: not kept.
    config = upstream.add_blob(b"{}")
    for number in range(5):
        elsewhere = f"evil/r{number}"
        sbom = image_manifest(config, 2, [], OCI_MANIFEST, subject=(image.digest, 10, OCI_MANIFEST), artifact_type=SBOM)
        upstream.add_manifest(elsewhere, None, sbom, OCI_MANIFEST)
        answer = await moorage.get(f"/v2/{elsewhere}/referrers/{image.digest}")
        assert len(listed(await answer.read())) == 1
    assert kept() == [("referrers", "docker.io", "owner/app", image.digest, "")]
    cache._index.forget({parse_digest(image.digest)})
    assert kept() == [], "the list leaves the index with its subject"


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


TOKEN = "t" * 1500


@pytest.mark.parametrize(
    ("link", "query"),
    [
        pytest.param('</v2/owner/app/referrers/x?last=a%0d%0aSet-Cookie:%20x>; rel="next"', None, id="crlf"),
        pytest.param(
            '</v2/owner/app/referrers/x?last=a>; rel="next", <https://evil.example/>; rel="prev"', "last=a", id="two"
        ),
        pytest.param(
            "</v2/owner/app/referrers/x?" + "&".join(f"p{n}=1" for n in range(9)) + '>; rel="next"', None, id="nine"
        ),
        pytest.param('</v2/owner/app/referrers/x?last=a&ns=ghcr.io>; rel="next"', "last=a", id="upstream_ns"),
        pytest.param('<http://[x/v2/owner/app/referrers/x?last=a>; rel="next"', None, id="no_url"),
        pytest.param(f'</v2/owner/app/referrers/x?next_token={TOKEN}>; rel="next"', f"next_token={TOKEN}", id="token"),
    ],
)
async def test_an_upstream_next_link_goes_on_only_as_a_bounded_query_of_our_own(
    moorage: Client, upstream: FakeRegistry, link: str, query: str | None
) -> None:
    """An ``ns`` in the upstream's link sent the client's next page to another upstream; a
    link that is no URL gave a 500."""
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    upstream.referrers_link = link
    response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert response.status == 200
    assert "Set-Cookie" not in response.headers and "evil" not in response.headers.get("Link", "")
    if query is None:
        assert "Link" not in response.headers
    else:
        assert response.headers["Link"] == f'</v2/owner/app/referrers/{image.digest}?{query}>; rel="next"'


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


async def test_an_image_a_lifecycle_policy_expires_takes_its_referrers_list_along(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    policy = {
        "rules": [
            {
                "rulePriority": 1,
                "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 1},
                "action": {"type": "expire"},
            }
        ]
    }
    old = upstream.add_image("team/app", "v1", [b"one"], media_type=OCI_MANIFEST)
    upstream.add_image("team/app", "v2", [b"two"], media_type=OCI_MANIFEST)
    attach(upstream, "team/app", old, SIGNATURE)
    policy_file = tmp_path / "lifecycle.json"
    policy_file.write_text(json.dumps(policy))
    moorage = await start_moorage(
        storage={"path": str(tmp_path / "store"), "lifecycle_interval": 0, "gc_interval": 0},
        upstream_settings={"lifecycle_policy_file": str(policy_file)},
    )
    for tag in ("v1", "v2"):
        assert (await moorage.get(f"/v2/team/app/manifests/{tag}", headers=ALL)).status == 200
    assert (await moorage.get(f"/v2/team/app/referrers/{old.digest}")).status == 200
    cache = moorage.app[CACHE]
    await cache.flush()
    assert ("referrers", "docker.io", "team/app", old.digest, "") in set(cache._index._db.iterkeys())
    result = await cache.apply_lifecycle(policy_resolver(moorage.app[SETTINGS].upstreams))
    assert [image.digest for image in (e.image for e in result.expired)] == [parse_digest(old.digest)]
    assert not [key for key in cache._index._db.iterkeys() if key[0] == "referrers"]


async def test_warm_with_referrers_takes_every_page_an_index_s_manifests_and_cosign_s_tags(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """cosign writes its .sig, .att and .sbom tags with no subject, so no referrers list names
    them, also where the upstream has the API; an attestation index is no use offline without
    its manifests; and a list may come in pages."""
    upstream.referrers_page_size = 1
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    signature = attach(upstream, "owner/app", image, SIGNATURE)
    sbom = attach(upstream, "owner/app", image, SBOM)
    statement_body = image_manifest(upstream.add_blob(b"{}"), 2, [], OCI_MANIFEST)
    statement = upstream.add_manifest("owner/app", None, statement_body, OCI_MANIFEST)
    entry = {"mediaType": OCI_MANIFEST, "digest": statement, "size": len(statement_body)}
    subject = {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)}
    attestations = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry], "subject": subject})
    index = upstream.add_manifest("owner/app", None, attestations.encode(), OCI_INDEX)
    fallback = "sha256-" + image.digest.removeprefix("sha256:")
    cosign = upstream.add_manifest(
        "owner/app", fallback + ".sig", image_manifest(upstream.add_blob(b"sig"), 3, [], OCI_MANIFEST), OCI_MANIFEST
    )
    base = str(moorage.make_url(""))
    [warmed] = await warm(base, [parse_image_reference("owner/app:1")], None, None, referrers=True)
    assert warmed.referrers == 5, "signature, SBOM, the index and its manifest, cosign's .sig"
    assert upstream.count("GET", "/referrers/") == 3, "a page for each"
    assert upstream.count("GET", f"/manifests/{fallback}.att") == 1
    assert upstream.count("GET", re.compile(rf"/manifests/{fallback}$")) == 0, "the tag schema only where no API"
    upstream.reset_requests()
    for digest in (signature, sbom, statement, index, cosign):
        again = await moorage.get(f"/v2/owner/app/manifests/{digest}", headers=ALL)
        assert again.status == 200 and again.headers["X-Moorage-Cache"] == "hit", digest
    assert upstream.requests == []


async def test_warm_with_referrers_fails_where_a_cosign_tag_cannot_be_read(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """Passing over a tag the upstream failed to give, as if it were not there, left an air
    gap without the signature and said nothing."""
    upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    upstream.fail_next(20, 503, paths=r"/manifests/sha256-")
    base = str(moorage.make_url(""))
    with pytest.raises(WarmFailed, match="503"):
        await warm(base, [parse_image_reference("owner/app:1")], None, None, referrers=True)


async def test_a_referrers_list_larger_than_a_manifest_may_be_is_listed(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """An image signed and attested by every build of a busy pipeline: past 4 MiB, the limit
    for a manifest, its list was a 502."""
    image = upstream.add_image("owner/app", "1", media_type=OCI_MANIFEST)
    entry = {"mediaType": OCI_MANIFEST, "size": 500, "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json"}
    listed = [{**entry, "digest": "sha256:" + f"{number:064x}"} for number in range(30_000)]
    upstream.referrers_body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}).encode()
    assert len(upstream.referrers_body) > 4 * 1024 * 1024
    response = await moorage.get(f"/v2/owner/app/referrers/{image.digest}")
    assert response.status == 200, await response.text()
    assert len((await response.json())["manifests"]) == 30_000
