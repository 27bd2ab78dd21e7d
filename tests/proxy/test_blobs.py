"""Blobs through Moorage: one upstream GET per digest for any number of clients, readers that
follow a growing fill, resumed cuts, refused wrong bytes, ranges, CDN redirects; each with
sendfile and without."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import moorage.proxy._handlers as handlers_module
from moorage.cache import _fill as fill_module
from tests.fakes import FakeRegistry
from tests.polling import until, until_async

from .conftest import StartMoorage, metric, until_settled

Client = TestClient[web.Request, web.Application]
MiB = 1024 * 1024


@pytest.fixture(autouse=True, params=["sendfile", "no_sendfile"])
def sender(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: with sendfile, and as over TLS, where the loop cannot sendfile
    and blobs (warm and in flight) are copied through Python in chunks."""
    if request.param == "no_sendfile":

        async def no_sendfile(self: asyncio.AbstractEventLoop, *args: object, **kwargs: object) -> int:
            if kwargs.get("fallback", True):  # aiohttp's FileResponse: copy through the loop
                raise NotImplementedError
            raise asyncio.SendfileNotAvailableError("no sendfile")  # a loop without it (TLS is never asked)

        monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", no_sendfile)
    return str(request.param)


def stored_files(store: Path) -> list[Path]:
    return [p for p in (store / "blobs").rglob("*") if p.is_file()]


def temporaries(store: Path) -> list[Path]:
    return [p for p in (store / "tmp").iterdir()]


async def read_all(response: aiohttp.ClientResponse) -> bytes:
    return await response.read()


async def test_cold_blob_fetched_once_for_16_concurrent_clients(moorage: Client, upstream: FakeRegistry) -> None:
    data = os.urandom(8 * MiB)
    digest = upstream.add_blob(data)
    upstream.slow_blob(digest, chunk=256 * 1024, delay=0.01)
    responses = await asyncio.gather(*(moorage.get(f"/v2/alpine/blobs/{digest}") for _ in range(16)))
    bodies = await asyncio.gather(*(read_all(r) for r in responses))
    assert all(r.status == 200 for r in responses)
    assert all(hashlib.sha256(b).hexdigest() == digest.split(":")[1] for b in bodies)
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    results = [
        await metric(moorage, "moorage_cache_results_total", kind="blob", result=r) for r in ("miss", "coalesced")
    ]
    assert results == [1, 15]


async def test_late_joiner_gets_its_first_byte_before_the_fill_ends(moorage: Client, upstream: FakeRegistry) -> None:
    data = os.urandom(4 * MiB)
    digest = upstream.add_blob(data)
    upstream.slow_blob(digest, chunk=64 * 1024, delay=0.02)  # about 1.3 s for the whole blob
    first = await moorage.get(f"/v2/alpine/blobs/{digest}")
    first_body = asyncio.ensure_future(first.read())
    await asyncio.sleep(0.3)
    late = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert late.status == 200
    chunk = await late.content.readany()
    assert chunk and not first_body.done(), "the late client must not wait for the end of the fill"
    rest = await late.read()
    assert chunk + rest == data
    assert await first_body == data
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_warm_blob_needs_no_upstream_and_survives_a_restart(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    data = os.urandom(3 * MiB + 17)
    digest = upstream.add_blob(data)
    moorage = await start_moorage()
    assert await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read() == data
    await moorage.close()
    upstream.reset_requests()
    again = await start_moorage()
    response = await again.get(f"/v2/library/alpine/blobs/{digest}")
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Content-Length"] == str(len(data))
    assert await response.read() == data
    assert upstream.requests == []


async def test_cut_body_is_resumed_with_range(moorage: Client, upstream: FakeRegistry, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB)
    digest = upstream.add_blob(data)
    upstream.cut_blob(digest, after_bytes=2 * MiB + 5)
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert await response.read() == data
    gets = [r for r in upstream.requests if r.method == "GET" and digest in r.path]
    assert len(gets) == 2
    # Resumed from what was stored when the cut came (chunks arrive in up to 1 MiB pieces).
    resumed_at = int(gets[1].headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 2 * MiB + 5
    assert await metric(moorage, "moorage_fill_resumes_total") == 1
    await until_settled(moorage)  # the blob is stored just after the client has its last byte
    assert len(stored_files(tmp_path / "store")) == 1


async def test_a_trickling_body_is_resumed_on_another_connection(
    moorage: Client, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A body that never went silent for a whole read timeout but brought a few bytes a second
    held its clients (kubelets have no deadline) and a download slot for as long as it took."""
    monkeypatch.setattr(fill_module, "SLOW_BODY_SECONDS", 0.5)  # 16 KiB in 0.5 s at the least
    caplog.set_level("INFO", logger="moorage.cache")
    data = os.urandom(MiB)
    digest = upstream.add_blob(data)
    upstream.slow_blob(digest, chunk=512, delay=0.05, times=1)  # 10 KiB/s: 100 s for it all
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert await asyncio.wait_for(response.read(), 20) == data
    gets = [r for r in upstream.requests if r.method == "GET" and digest in r.path]
    assert len(gets) == 2 and int(gets[1].headers["range"].removeprefix("bytes=").removesuffix("-")) > 0
    (resumed,) = [r for r in caplog.records if getattr(r, "event", None) == "fill_resume"]
    assert "body slower than 16384 bytes in 0.5 s" in resumed.__dict__["error"]


async def test_a_resume_that_reads_the_prefix_again_is_no_trickle(
    moorage: Client, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that ignores Range sends what the cache holds again, at the link's pace:
    those bytes count, or every cut past a minute's worth of link failed the pull."""
    monkeypatch.setattr(fill_module, "SLOW_BODY_SECONDS", 0.5)  # 16 KiB in 0.5 s at the least
    upstream.support_ranges = False
    data = os.urandom(3 * MiB)
    digest = upstream.add_blob(data)
    upstream.cut_blob(digest, after_bytes=2 * MiB)
    upstream.slow_blob(digest, chunk=64 * 1024, delay=0.05)  # 1.3 MB/s: the prefix takes 1.6 s
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert await asyncio.wait_for(response.read(), 30) == data
    assert upstream.count("GET", f"/blobs/{digest}") == 2


async def test_cut_body_is_refetched_when_upstream_ignores_range(moorage: Client, upstream: FakeRegistry) -> None:
    upstream.support_ranges = False
    data = os.urandom(3 * MiB)
    digest = upstream.add_blob(data)
    upstream.cut_blob(digest, after_bytes=MiB)
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert await response.read() == data
    assert upstream.count("GET", f"/blobs/{digest}") == 2


async def test_failed_fill_cuts_every_reader_and_keeps_nothing(
    moorage: Client, upstream: FakeRegistry, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    digest = upstream.add_blob(data)
    upstream.cut_blob(digest, after_bytes=100_000, times=10)  # every attempt and every resume is cut
    responses = await asyncio.gather(*(moorage.get(f"/v2/alpine/blobs/{digest}") for _ in range(3)))
    for response in responses:
        assert response.status == 200  # headers went out before the cut
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    # The access lines say 200 (what the clients were told first); the failure is counted.
    assert await metric(moorage, "moorage_fill_failures_total", upstream="docker.io") == 1
    store = tmp_path / "store"
    assert stored_files(store) == []
    # Readers are cut at once; the temporary is removed in a thread just after.
    await until(lambda: temporaries(store) == [])
    upstream.clear_faults()
    upstream.reset_requests()
    assert await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read() == data
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_wrong_bytes_are_never_completed_nor_kept(
    moorage: Client, upstream: FakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(2 * MiB)
    digest = upstream.add_blob(data)
    upstream.corrupt_blob(digest, times=1)
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    # The cut names the request it cut, as the request's own line does.
    (cut,) = [r for r in caplog.records if getattr(r, "event", "") == "response_cut"]
    assert getattr(cut, "request_id", None) == response.headers["X-Request-Id"]
    assert stored_files(tmp_path / "store") == []
    assert await metric(moorage, "moorage_fill_failures_total") == 1
    assert await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read() == data


async def test_stalled_body_is_resumed_after_the_read_timeout(moorage: Client, upstream: FakeRegistry) -> None:
    data = os.urandom(2 * MiB)
    digest = upstream.add_blob(data)
    upstream.stall_blob(digest, after_bytes=MiB, seconds=None, times=1)  # read timeout is 2 s
    started = time.monotonic()
    assert await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read() == data
    assert 1.5 < time.monotonic() - started < 15
    assert upstream.count("GET", f"/blobs/{digest}") == 2


async def test_unknown_blob_is_blob_unknown(moorage: Client) -> None:
    response = await moorage.get(f"/v2/alpine/blobs/sha256:{'0' * 64}")
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert await metric(moorage, "moorage_fill_failures_total") == 0, "an answer, not a failed download"


async def test_head_on_uncached_blob_does_not_download(moorage: Client, upstream: FakeRegistry, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    digest = upstream.add_blob(data)
    head = await moorage.head(f"/v2/alpine/blobs/{digest}")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    assert upstream.count("HEAD", f"/blobs/{digest}") == 1
    assert upstream.count("GET", f"/blobs/{digest}") == 0
    assert stored_files(tmp_path / "store") == []


@pytest.mark.parametrize("odd", ["no_length", "zero", "gzip", "cdn_refuses_head"])
async def test_a_blob_head_that_tells_no_true_size_is_asked_again_with_a_get_of_one_byte(
    start_moorage: StartMoorage, upstream: FakeRegistry, odd: str
) -> None:
    """Front ends strip Content-Length from HEAD answers (Cloud Run), send 0, or compress
    the body they do not send and give its size; a bucket's URL signed for GET alone refuses
    HEAD. The cache answered 502 or 503, or, for the gzip case, the wrong size, where a GET
    of the same blob worked; access-policy route checks failed the same way."""
    data = os.urandom(5011)
    digest = upstream.add_blob(data)
    if odd == "cdn_refuses_head":
        cdn = await upstream.start_cdn()
        cdn.refuse_head = True
        upstream.cdn_redirect_head = True
    else:
        upstream.blob_head = odd  # type: ignore[assignment]
    moorage = await start_moorage()
    head = await moorage.head(f"/v2/alpine/blobs/{digest}")
    assert (head.status, head.headers["Content-Length"]) == (200, "5011")
    asked = [r for r in upstream.requests if r.method == "GET" and "/blobs/" in r.path]
    assert [r.headers.get("range") for r in asked] == ["bytes=0-0"], "one byte, not the blob"
    assert upstream.count("HEAD", "/blobs/") == 1, "a HEAD refused again is not asked again"
    assert all(r.headers.get("accept-encoding") == "identity" for r in upstream.requests if "/blobs/" in r.path)


async def test_head_on_warm_blob_is_local(moorage: Client, upstream: FakeRegistry) -> None:
    data = os.urandom(1000)
    digest = upstream.add_blob(data)
    await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    upstream.reset_requests()
    head = await moorage.head(f"/v2/alpine/blobs/{digest}")
    assert head.headers["Content-Length"] == "1000"
    assert upstream.requests == []


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "in_flight"])
@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        pytest.param("bytes=1000-", 1000, None, id="open_end"),
        pytest.param("bytes=10-19", 10, 20, id="closed"),
        pytest.param("bytes=-100", -100, None, id="suffix"),
    ],
)
async def test_ranges(
    moorage: Client, upstream: FakeRegistry, warm: bool, header: str, start: int, end: int | None
) -> None:
    data = os.urandom(2 * MiB)
    digest = upstream.add_blob(data)
    if warm:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    else:
        upstream.slow_blob(digest, chunk=128 * 1024, delay=0.01)
    response = await moorage.get(f"/v2/alpine/blobs/{digest}", headers={"Range": header})
    assert response.status == 206
    expected = data[start:end]
    assert await response.read() == expected
    first = start if start >= 0 else len(data) + start
    assert response.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "in_flight"])
async def test_a_range_past_the_end_is_cut_to_the_blob(moorage: Client, upstream: FakeRegistry, warm: bool) -> None:
    """RFC 9110: a last byte past the end means the end. In flight, the answer promised
    bytes the blob does not have, and the client waited for them."""
    data = os.urandom(300 * 1024)
    digest = upstream.add_blob(data)
    if warm:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        await until_settled(moorage)
    else:
        upstream.slow_blob(digest, chunk=32 * 1024, delay=0.01)
    response = await moorage.get(f"/v2/alpine/blobs/{digest}", headers={"Range": "bytes=10-99999999"})
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
    assert await asyncio.wait_for(response.read(), 30) == data[10:]


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "in_flight"])
@pytest.mark.parametrize("asked", ["bytes=5000-", "bytes=-0"])
async def test_unsatisfiable_range_is_416(moorage: Client, upstream: FakeRegistry, warm: bool, asked: str) -> None:
    data = os.urandom(1000)
    digest = upstream.add_blob(data)
    if warm:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    served = await metric(moorage, "moorage_served_bytes_total", kind="blob")
    response = await moorage.get(f"/v2/alpine/blobs/{digest}", headers={"Range": asked})
    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */1000"
    assert (await response.json())["errors"][0]["code"] == "RANGE_INVALID"
    # The error body is no blob served: hit rates and the bandwidth saved leave it out.
    assert await metric(moorage, "moorage_served_bytes_total", kind="blob") == served
    assert "X-Moorage-Cache" not in response.headers


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "in_flight"])
@pytest.mark.parametrize("asked", ["items=0-1", "bytes=0-1,5-6", "bytes=-10, 0-1"])
async def test_a_range_the_cache_does_not_serve_gets_the_whole_blob(
    moorage: Client, upstream: FakeRegistry, warm: bool, asked: str
) -> None:
    """RFC 9110: an unknown range unit is ignored, and several ranges may be; a client then
    takes the 200 and its whole body, where a 416 would fail its pull."""
    data = os.urandom(100_000)
    digest = upstream.add_blob(data)
    if warm:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        await until_settled(moorage)  # committed: served from the store's file, not the fill
    else:
        upstream.slow_blob(digest, chunk=16 * 1024, delay=0.01)
    response = await moorage.get(f"/v2/alpine/blobs/{digest}", headers={"Range": asked})
    assert response.status == 200
    assert "Content-Range" not in response.headers
    assert await response.read() == data


async def test_a_blob_s_validator_is_its_digest_whatever_its_reads_do(
    moorage: Client, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """A stored blob's ETag and Last-Modified were its file's mtime, which the size cap's
    bookkeeping moves at reads: an HTTP cache in front, or a download resumed with If-Range,
    saw a new blob every few seconds and fetched the whole of it again."""
    data = os.urandom(100_000)
    digest = upstream.add_blob(data)
    upstream.slow_blob(digest, chunk=16 * 1024, delay=0.01)
    during = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert await during.read() == data
    await until_settled(moorage)
    (stored,) = stored_files(tmp_path / "store")
    answers = [during, await moorage.head(f"/v2/alpine/blobs/{digest}")]
    for moved in (1_000_000_000, 2_000_000_000):
        os.utime(stored, ns=(moved, moved))  # a read recorded, as the bookkeeping does
        answers.append(await moorage.get(f"/v2/alpine/blobs/{digest}"))
        answers.append(await moorage.get(f"/v2/alpine/blobs/{digest}", headers={"Range": "bytes=0-9"}))
    assert [answer.headers.get("ETag") for answer in answers] == [f'"{digest}"'] * len(answers)
    assert not [answer for answer in answers if "Last-Modified" in answer.headers]


@pytest.mark.parametrize(
    "headers",
    [{"Range": "bytes=0-1,5-6"}, {"If-None-Match": '"sha256:0"'}, {"If-Range": '"{digest}"', "Range": "bytes=10-"}],
    ids=["ranges", "none_match_other", "if_range"],
)
async def test_a_stored_blob_the_handler_sends_goes_by_sendfile(
    moorage: Client, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch, headers: dict[str, str]
) -> None:
    """A request with a condition, or a Range this cache ignores, is not FileResponse's to
    answer. Its body was copied through Python: a megabyte or more of the blob held for each
    slow reader, where sendfile holds none. (Where the loop cannot sendfile, the reads.)"""
    data = os.urandom(3 * MiB)
    digest = upstream.add_blob(data)
    await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    await until_settled(moorage)
    offered = asyncio.BaseEventLoop.sendfile
    asked: list[int] = []

    async def sendfile(self: asyncio.AbstractEventLoop, transport: Any, file: Any, *args: Any, **kwargs: Any) -> int:
        asked.append(os.fstat(file.fileno()).st_size)
        return await offered(self, transport, file, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", sendfile)
    response = await moorage.get(
        f"/v2/alpine/blobs/{digest}", headers={name: value.format(digest=digest) for name, value in headers.items()}
    )
    assert response.status in (200, 206)
    assert await response.read() == (data[10:] if response.status == 206 else data)
    assert asked == [len(data)], "the stored file offered to sendfile"


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize(
    ("headers", "status", "body"),
    [
        pytest.param({"If-None-Match": '"{digest}"'}, 304, None, id="none_match"),
        pytest.param({"If-None-Match": 'W/"{digest}"'}, 304, None, id="none_match_weak"),
        pytest.param({"If-None-Match": '"sha256:{other}"'}, 200, slice(None), id="none_match_other"),
        pytest.param({"If-None-Match": "*"}, 304, None, id="none_match_any"),
        pytest.param({"If-Match": "*"}, 200, slice(None), id="match_any"),
        pytest.param({"If-Match": '"{digest}"', "Range": "bytes=0-9"}, 206, slice(0, 10), id="match_range"),
        pytest.param({"If-Match": '"sha256:{other}"'}, 412, None, id="match_other"),
        pytest.param({"If-Match": 'W/"{digest}"'}, 412, None, id="match_weak"),
        pytest.param({"If-Range": '"{digest}"', "Range": "bytes=10-19"}, 206, slice(10, 20), id="if_range"),
        pytest.param({"If-Range": 'W/"{digest}"', "Range": "bytes=10-19"}, 200, slice(None), id="if_range_weak"),
        pytest.param(
            {"If-Range": "Wed, 21 Oct 2015 07:28:00 GMT", "Range": "bytes=10-19"}, 200, slice(None), id="if_range_date"
        ),
        pytest.param({"If-Unmodified-Since": "Wed, 21 Oct 2015 07:28:00 GMT"}, 200, slice(None), id="unmodified"),
        pytest.param({"If-Modified-Since": "Wed, 21 Oct 2099 07:28:00 GMT"}, 200, slice(None), id="modified"),
    ],
)
async def test_conditional_blob_requests_are_judged_by_the_digest(
    moorage: Client,
    upstream: FakeRegistry,
    warm: bool,
    headers: dict[str, str],
    status: int,
    body: slice | None,
) -> None:
    """If-Match with the blob's own digest was 412 and If-None-Match with it 200: the file's
    mtime was the validator. A condition that ends in 304 or 412 downloads nothing."""
    data = os.urandom(100_000)
    digest = upstream.add_blob(data)
    if warm:
        await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
        await until_settled(moorage)
    upstream.reset_requests()
    asked = {name: value.format(digest=digest, other="0" * 64) for name, value in headers.items()}
    response = await moorage.get(f"/v2/alpine/blobs/{digest}", headers=asked)
    assert response.status == status
    assert response.headers["ETag"] == f'"{digest}"'
    if body is None:
        assert await response.read() == b""
        assert upstream.count(method="GET", path="/blobs/") == 0
    else:
        assert await response.read() == data[body]
    head = await moorage.head(f"/v2/alpine/blobs/{digest}", headers=asked)
    assert head.status == (200 if status == 206 else status)


@pytest.mark.parametrize("asked", ["bytes=abc", "bytes=5-1"])
async def test_a_malformed_byte_range_is_416(moorage: Client, upstream: FakeRegistry, asked: str) -> None:
    """Refused before anything is fetched: bad input changes nothing, and costs no download
    that no request would be counted for."""
    digest = upstream.add_blob(os.urandom(1000))
    response = await moorage.get(f"/v2/alpine/blobs/{digest}", headers={"Range": asked})
    assert response.status == 416
    assert (await response.json())["errors"][0]["code"] == "RANGE_INVALID"
    assert upstream.count(path="/blobs/") == 0


async def test_an_empty_body_for_a_blob_that_is_not_empty_is_never_a_whole_answer(
    moorage: Client, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """With no last byte to hold back, a 200 with Content-Length 0 would have gone out whole
    before the digest was checked: wrong bytes a client takes for the blob."""
    digest = upstream.add_blob(os.urandom(1000))
    upstream.blobs[digest] = b""  # the upstream answers 200 with an empty body
    for method in ("GET", "HEAD"):
        response = await moorage.request(method, f"/v2/alpine/blobs/{digest}")
        assert response.status == 502, (method, response.status, response.headers.get("Content-Length"))
    assert stored_files(tmp_path / "store") == []
    empty = upstream.add_blob(b"")  # the empty blob itself is served, empty
    response = await moorage.get(f"/v2/alpine/blobs/{empty}")
    assert response.status == 200 and await response.read() == b""


async def test_cdn_redirect_never_carries_credentials(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    upstream.auth = "bearer"
    cdn = await upstream.start_cdn()
    data = os.urandom(MiB)
    digest = upstream.add_blob(data)
    moorage = await start_moorage()
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert await response.read() == data
    assert cdn.count("GET", digest) == 1
    assert cdn.leaked_authorization == 0
    assert "location" not in {k.lower() for k in response.headers}


async def test_an_expired_cdn_url_is_asked_for_again(start_moorage: StartMoorage, upstream: FakeRegistry) -> None:
    """A CDN's 403 to a signed URL is no verdict on the repository: a fresh redirect serves."""
    upstream.auth = "bearer"
    cdn = await upstream.start_cdn()
    cdn.issue_expired = 1
    data = os.urandom(MiB)
    digest = upstream.add_blob(data)
    moorage = await start_moorage()
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert response.status == 200 and await response.read() == data
    assert cdn.count("GET", digest) == 2, "the expired URL, then a fresh one"


async def test_a_cdn_that_cannot_be_reached_is_named_not_taken_for_the_registry(
    start_moorage: StartMoorage, upstream: FakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A CDN's failure (its certificate, its address) read as the registry's own: the operator
    looked at the wrong host."""
    cdn = await upstream.start_cdn()
    await cdn.stop_listening()
    digest = upstream.add_blob(os.urandom(1000))
    moorage = await start_moorage(upstream_settings={"retries": {"attempts": 1}})
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert response.status == 503
    message = (await response.json())["errors"][0]["message"]
    assert "at the redirect's target localhost" in message and "sig=" not in message
    assert "sig=" not in caplog.text, "the signed URL is never logged"


async def test_warm_blobs_keep_the_connection_alive(moorage: Client, upstream: FakeRegistry) -> None:
    data = os.urandom(100_000)
    digest = upstream.add_blob(data)
    await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    connector = moorage.session.connector
    assert connector is not None
    for _ in range(5):
        response = await moorage.get(f"/v2/alpine/blobs/{digest}")
        assert await response.read() == data
    # One pooled connection served them all: the response was complete and well formed.
    assert sum(len(c) for c in connector._conns.values()) == 1


async def test_a_client_leaving_mid_body_does_not_stop_the_fill(
    moorage: Client, upstream: FakeRegistry, tmp_path: Path
) -> None:
    data = os.urandom(4 * MiB)
    digest = upstream.add_blob(data)
    upstream.slow_blob(digest, chunk=256 * 1024, delay=0.02)
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert await response.content.readany()
    response.close()  # the client hangs up
    await until_settled(moorage)
    assert [p.name for p in stored_files(tmp_path / "store")] == [digest.split(":")[1]]

    async def recorded() -> bool:  # the handler notices the hang-up
        return await metric(moorage, "moorage_requests_total", kind="blob") >= 1

    await until_async(recorded)
    assert await metric(moorage, "moorage_requests_total", kind="blob") == 1, "the request is recorded once"
    upstream.reset_requests()
    assert await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read() == data
    assert upstream.requests == []


async def test_another_routes_failure_is_not_this_clients_answer(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """The same digest asked through ghcr.io (which lacks it, slowly) and docker.io (which has it)."""
    async with FakeRegistry() as other:
        moorage = await start_moorage(
            upstreams=[
                {"host": "docker.io", "url": upstream.url, "default": True},
                {"host": "ghcr.io", "url": other.url, "prefixes": ["ghcr"]},
            ]
        )
        data = os.urandom(MiB)
        digest = upstream.add_blob(data)
        other.delay_next(1, 0.5, paths="/blobs/")
        missing = asyncio.ensure_future(moorage.get(f"/v2/ghcr/owner/app/blobs/{digest}"))
        await until(lambda: other.count("GET", "/blobs/") > 0)  # the ghcr.io fill waits on its upstream
        healthy = await moorage.get(f"/v2/alpine/blobs/{digest}")
        assert healthy.status == 200 and await healthy.read() == data
        answer = await missing
        assert answer.status == 404
        assert "library/alpine" not in await answer.text()
        assert upstream.count("GET", f"/blobs/{digest}") == 1


@pytest.mark.logs_errors("unexpected error")
async def test_a_store_read_that_times_out_cuts_the_body(
    moorage: Client, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of the store that times out (an NFS mount with softerr, a FUSE store) is no
    client gone: taken for one, the body was left short with the connection open, and the
    client waited for the rest for good. The connection is cut, so the client sees it short."""
    data = os.urandom(3 * MiB)
    digest = upstream.add_blob(data)
    await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    await until_settled(moorage)

    async def no_sendfile(self: asyncio.AbstractEventLoop, *args: object, **kwargs: object) -> int:
        raise asyncio.SendfileNotAvailableError("no sendfile")

    reads = 0
    real_pread = handlers_module._FileReads.pread

    async def pread(self: Any, count: int, offset: int) -> bytes:
        nonlocal reads
        reads += 1
        if reads == 2:
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        return await real_pread(self, count, offset)

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", no_sendfile)
    monkeypatch.setattr(handlers_module._FileReads, "pread", pread)
    response = await moorage.get(f"/v2/alpine/blobs/{digest}", headers={"If-None-Match": '"sha256:0"'})
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 10)
