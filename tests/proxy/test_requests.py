"""The door: bad names, digests and references get OCI errors and touch nothing; read-only
routes; unknown routes; the API base, health, metrics and common headers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.fakes import FakeRegistry

Client = TestClient[web.Request, web.Application]
DIGEST = "sha256:" + "a" * 64


async def raw_request(client: Client, method: str, target: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """Send a request line exactly as given (no client-side path normalisation)."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n".encode("latin-1"))
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, fields, body


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        pytest.param("/v2/../etc/passwd/manifests/latest", 400, "NAME_INVALID", id="dotdot"),
        pytest.param("/v2/a/..%2F..%2Fb/manifests/latest", 400, "NAME_INVALID", id="encoded_slash"),
        pytest.param("/v2/a%00b/manifests/latest", 400, "NAME_INVALID", id="nul"),
        pytest.param("/v2/Alpine/manifests/latest", 400, "NAME_INVALID", id="uppercase"),
        pytest.param("/v2/" + "a" * 256 + "/manifests/latest", 400, "NAME_INVALID", id="256_chars"),
        # No manifest has such a tag: 404, the spec's only answer for a manifest not found,
        # which its conformance tests ask of ".INVALID_MANIFEST_NAME".
        pytest.param("/v2/alpine/manifests/-bad", 404, "MANIFEST_UNKNOWN", id="bad_tag"),
        pytest.param("/v2/alpine/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN", id="conformance_tag"),
        pytest.param("/v2/alpine/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN", id="long_tag"),
        pytest.param("/v2/alpine/manifests/bad%20tag", 400, "MANIFEST_INVALID", id="encoded_tag"),
        pytest.param("/v2/alpine/manifests/sha256:abc", 400, "DIGEST_INVALID", id="short_digest"),
        pytest.param("/v2/alpine/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID", id="uppercase_digest"),
        pytest.param("/v2/alpine/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID", id="md5"),
        pytest.param("/v2/alpine/blobs/latest", 400, "DIGEST_INVALID", id="tag_as_digest"),
        pytest.param("/v2/alpine/tags/list?n=x", 400, "PAGINATION_NUMBER_INVALID", id="bad_n"),
        pytest.param("/v2/alpine/manifests/latest?ns=evil.example", 404, "NAME_UNKNOWN", id="unknown_ns"),
        # The spec lists the codes an error body may carry; NOT_FOUND is none of them.
        pytest.param("/v2/alpine/nothing/here", 404, "UNSUPPORTED", id="unknown_v2_route"),
        pytest.param("/v2/_catalog", 404, "UNSUPPORTED", id="catalog"),
        pytest.param("/v3/", 404, "UNSUPPORTED", id="unknown_route"),
        pytest.param(f"/v2/alpine/referrers/{DIGEST}?artifactType=x", 400, "UNSUPPORTED", id="referrers_bad_type"),
        pytest.param("/v2/alpine/referrers/latest", 400, "DIGEST_INVALID", id="referrers_of_a_tag"),
    ],
)
async def test_bad_input_gets_an_oci_error_and_touches_nothing(
    moorage: Client, upstream: FakeRegistry, tmp_path: Path, target: str, status: int, code: str
) -> None:
    got_status, headers, body = await raw_request(moorage, "GET", target)
    assert got_status == status, body
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["errors"][0]["code"] == code
    assert upstream.requests == []
    assert not any((tmp_path / "store" / "blobs").rglob("*"))


async def test_unknown_ns_lists_the_configured_hosts(moorage: Client) -> None:
    response = await moorage.get("/v2/alpine/manifests/latest", params={"ns": "quay.io"})
    message = (await response.json())["errors"][0]["message"]
    assert "quay.io" in message and "docker.io" in message and "ghcr.io" in message


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        pytest.param("PUT", "/v2/alpine/manifests/latest", "GET, HEAD", id="push_manifest"),
        pytest.param("DELETE", "/v2/alpine/manifests/latest", "GET, HEAD", id="delete_manifest"),
        pytest.param("DELETE", f"/v2/alpine/blobs/{DIGEST}", "GET, HEAD", id="delete_blob"),
        pytest.param("POST", "/v2/alpine/blobs/uploads/", "", id="start_upload"),
        pytest.param("PATCH", "/v2/alpine/blobs/uploads/abc", "", id="patch_upload"),
        pytest.param("PUT", f"/v2/alpine/blobs/uploads/abc?digest={DIGEST}", "", id="finish_upload"),
        pytest.param("GET", "/v2/alpine/blobs/uploads/abc", "", id="upload_status"),
        pytest.param("POST", "/v2/", "GET, HEAD", id="post_to_the_base"),
        pytest.param("DELETE", "/v2/alpine/tags/list", "GET", id="delete_tags"),
        pytest.param("HEAD", "/v2/alpine/tags/list", "GET", id="head_tags"),
    ],
)
async def test_writes_are_unsupported(
    moorage: Client, upstream: FakeRegistry, method: str, target: str, allow: str
) -> None:
    """405 UNSUPPORTED, with an Allow that is true: POST /v2/ was 404 with a code the spec
    does not have, and DELETE on a tag list offered HEAD, which it refuses."""
    response = await moorage.request(method, target, data=b"x")
    assert response.status == 405
    assert response.headers["Allow"] == allow
    if method != "HEAD":
        assert (await response.json())["errors"][0]["code"] == "UNSUPPORTED"
    assert upstream.requests == []


async def test_api_base_and_common_headers(moorage: Client) -> None:
    response = await moorage.get("/v2/")
    assert response.status == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert len(response.headers["X-Request-Id"]) == 16
    echoed = await moorage.get("/v2/", headers={"X-Request-Id": "ci-job-42"})
    assert echoed.headers["X-Request-Id"] == "ci-job-42"


async def test_health_and_readiness(moorage: Client, upstream: FakeRegistry) -> None:
    assert (await moorage.get("/v2/alpine/manifests/nope")).status == 404
    hub = (await (await moorage.get("/readyz")).json())["upstreams"]["docker.io"]
    assert hub["reachable"] is True and hub["last_answer"] is not None, "a 404 is an answer"
    await upstream.stop_listening()  # readiness does not depend on the upstream
    assert (await moorage.get("/healthz")).status == 200
    assert (await moorage.get("/readyz")).status == 200


async def test_a_repository_may_contain_a_component_named_manifests(moorage: Client, upstream: FakeRegistry) -> None:
    image = upstream.add_image("org/manifests", "1")
    response = await moorage.get("/v2/org/manifests/manifests/1")
    assert response.status == 200 and await response.read() == image.manifest


async def test_keys_cannot_collide(moorage: Client, upstream: FakeRegistry) -> None:
    one = upstream.add_image("org/a_b", "1", [b"one"])
    two = upstream.add_image("org_a/b", "1", [b"two"])
    assert (await moorage.get("/v2/org/a_b/manifests/1")).headers["Docker-Content-Digest"] == one.digest
    assert (await moorage.get("/v2/org_a/b/manifests/1")).headers["Docker-Content-Digest"] == two.digest


async def test_prefix_and_ns_reach_the_same_cached_answer(moorage: Client, upstream: FakeRegistry) -> None:
    image = upstream.add_image("library/alpine", "3.19")
    for path, params in [
        ("/v2/alpine/manifests/3.19", {}),
        ("/v2/library/alpine/manifests/3.19", {"ns": "docker.io"}),
        ("/v2/docker-hub/library/alpine/manifests/3.19", {}),
        ("/v2/docker.io/alpine/manifests/3.19", {}),
    ]:
        response = await moorage.get(path, params=params)
        assert response.headers["Docker-Content-Digest"] == image.digest, path
    assert upstream.count("GET", "/manifests/") == 1


async def test_access_log_is_json_without_query_strings(
    moorage: Client, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.add_image("library/alpine", "3.19")
    caplog.set_level("INFO", logger="moorage.access")
    await moorage.get("/v2/alpine/manifests/3.19?secret=do-not-log", headers={"X-Request-Id": "r1"})
    records = [r for r in caplog.records if r.name == "moorage.access"]
    assert len(records) == 1
    record = records[0].__dict__
    assert record["request_id"] == "r1"
    assert record["upstream"] == "docker.io" and record["repository"] == "library/alpine"
    assert record["reference"] == "3.19" and record["result"] == "miss" and record["status"] == 200
    assert "do-not-log" not in json.dumps({k: str(v) for k, v in record.items()})
