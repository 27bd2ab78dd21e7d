"""Stored files that changed or vanished behind the cache's back: the client gets the right
bytes (fetched again from upstream) or a clean error, never the wrong ones."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from moorage.cache._hot import HotAnswers
from moorage.proxy._state import CACHE
from tests.fakes import FakeRegistry
from tests.immutable import immutable
from tests.polling import until

from .conftest import StartMoorage, metric, until_settled

Client = TestClient[web.Request, web.Application]


def stored_file(store: Path, digest: str) -> Path:
    algorithm, hex_digest = digest.split(":")
    return store / "blobs" / algorithm / hex_digest[:2] / hex_digest


async def until_stored(moorage: Client, store: Path, digest: str, content: bytes) -> Path:
    """The stored file, once it holds ``content`` and the cache has recorded it as known good:
    a client has its last byte as soon as the digest is verified, and the blob is made durable,
    put in place and its fingerprint taken just after. A change before that fingerprint would
    be taken for the good copy."""
    await until_settled(moorage)
    path = stored_file(store, digest)
    assert path.is_file() and path.read_bytes() == content, f"{digest} is not stored"
    return path


async def rewrite(path: Path, content: bytes) -> None:
    """Rewrite a stored file in place as a stray writer would: later than the clock tick of its
    commit. A file's times move in ticks of a few ms, and a rewrite within the commit's tick
    would keep the mtime the cache trusts."""
    await asyncio.sleep(0.05)
    path.write_bytes(content)


async def pull_blob(moorage: Client, digest: str) -> bytes:
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert response.status == 200
    return await response.read()


async def a_stored_blob_rewritten(
    start_moorage: StartMoorage, upstream: FakeRegistry, store: Path
) -> tuple[Client, str, bytes, Path]:
    """A cache on ``store`` holding a blob whose file was then rewritten in place with other
    bytes of the same size (a bad disk, a stray writer): the cache, the digest, its true
    bytes and the file."""
    moorage = await start_moorage(storage={"path": str(store)})
    content = os.urandom(300_000)
    digest = upstream.add_blob(content)
    assert await pull_blob(moorage, digest) == content
    path = await until_stored(moorage, store, digest, content)
    await rewrite(path, b"X" * len(content))
    return moorage, digest, content, path


async def test_a_rewritten_blob_is_quarantined_and_fetched_again(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    moorage, digest, content, path = await a_stored_blob_rewritten(start_moorage, upstream, store)

    assert await pull_blob(moorage, digest) == content
    assert upstream.count("GET", f"/blobs/{digest}") == 2, "fetched again, once"
    quarantined = store / "quarantine" / digest.replace(":", "-")
    assert quarantined.read_bytes() == b"X" * len(content), "kept aside for inspection"
    assert await until_stored(moorage, store, digest, content) == path, "the store holds the good copy again"
    assert await metric(moorage, "moorage_evictions_total", reason="corrupt") == 1
    assert await pull_blob(moorage, digest) == content
    assert upstream.count("GET", f"/blobs/{digest}") == 2, "the fresh copy is trusted: a plain hit"


async def test_a_corrupt_blob_quarantine_cannot_take_is_deleted_and_fetched_again(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """A quarantine/ the daemon may not write (made by `verify --repair` run as root) left the
    corrupt file in place: every pull of it was a 500, for good."""
    store = tmp_path / "store"
    moorage, digest, content, path = await a_stored_blob_rewritten(start_moorage, upstream, store)
    (store / "quarantine").mkdir()
    with immutable(store / "quarantine"):
        assert await pull_blob(moorage, digest) == content
    assert upstream.count("GET", f"/blobs/{digest}") == 2, "fetched again, once"
    assert not any((store / "quarantine").iterdir())
    assert await until_stored(moorage, store, digest, content) == path, "the store holds the good copy again"


async def test_a_truncated_blob_is_never_served_short(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store)})
    content = os.urandom(200_000)
    digest = upstream.add_blob(content)
    await pull_blob(moorage, digest)
    with (await until_stored(moorage, store, digest, content)).open("r+b") as handle:
        handle.truncate(1000)
    head = await moorage.head(f"/v2/alpine/blobs/{digest}")
    assert head.headers["Content-Length"] == str(len(content)), "HEAD does not trust the short file either"
    assert await pull_blob(moorage, digest) == content
    await until_stored(moorage, store, digest, content)
    # The short file's whole counted size left the totals, not the 1,000 bytes left of it. The
    # new copy is counted once its directory is durable, a moment after it is in place.
    await until_settled(moorage)
    assert await metric(moorage, "moorage_store_bytes") == len(content)


async def test_a_vanished_blob_is_fetched_again(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store)})
    content = os.urandom(50_000)
    digest = upstream.add_blob(content)
    await pull_blob(moorage, digest)
    (await until_stored(moorage, store, digest, content)).unlink()
    assert await pull_blob(moorage, digest) == content
    assert upstream.count("GET", f"/blobs/{digest}") == 2


async def test_a_corrupt_blob_whose_upstream_is_gone_is_a_clean_error(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store)})
    content = os.urandom(10_000)
    digest = upstream.add_blob(content)
    await pull_blob(moorage, digest)
    await rewrite(await until_stored(moorage, store, digest, content), os.urandom(len(content)))
    del upstream.blobs[digest]
    response = await moorage.get(f"/v2/alpine/blobs/{digest}")
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_a_store_from_another_run_is_verified_once_then_trusted(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """Files the index holds no fingerprint for (a store restored from a backup, or written by
    an older version) are hashed on first serve; good ones are then served without rehashing."""
    store = tmp_path / "store"
    content = os.urandom(100_000)
    digest = upstream.add_blob(content)
    path = stored_file(store, digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    moorage = await start_moorage(storage={"path": str(store)})
    assert await pull_blob(moorage, digest) == content
    assert upstream.count("GET", f"/blobs/{digest}") == 0, "a good file is served, not refetched"
    assert not (store / "quarantine").exists()


async def test_a_corrupt_manifest_is_fetched_again_after_a_restart(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    image = upstream.add_image("library/alpine", "3.19", [b"layer"])
    first = await start_moorage(storage={"path": str(store)})
    body = await (await first.get(f"/v2/alpine/manifests/{image.digest}")).read()
    await first.close()  # the in-memory front goes with the process
    stored_file(store, image.digest).write_bytes(body.replace(b"{", b"[", 1))

    second = await start_moorage(storage={"path": str(store)})
    response = await second.get(f"/v2/alpine/manifests/{image.digest}")
    assert response.status == 200
    fetched = await response.read()
    assert "sha256:" + hashlib.sha256(fetched).hexdigest() == image.digest
    assert upstream.count("GET", f"/manifests/{image.digest}") == 2
    assert await metric(second, "moorage_evictions_total", reason="corrupt") == 1


async def test_a_layer_asked_for_as_a_manifest_is_neither_served_nor_quarantined(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """Layer digests are public in every manifest; asking the manifests route for one must not
    cost the store the layer (it hashed the first 4 MiB, missed, and moved the layer aside)."""
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store)})
    large, small = os.urandom(5 * 1024 * 1024), os.urandom(2_000)
    for content in (large, small):
        digest = upstream.add_blob(content)
        assert await pull_blob(moorage, digest) == content
        await until_stored(moorage, store, digest, content)
        for method in ("GET", "HEAD"):
            response = await moorage.request(method, f"/v2/alpine/manifests/{digest}")
            assert response.status == 404, f"{method} {len(content)} bytes answered as a manifest"
            if method == "GET":
                assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        upstream.reset_requests()
        assert await pull_blob(moorage, digest) == content
        assert upstream.count("GET", "/blobs/") == 0, "the layer is still served from the store"
    assert not (store / "quarantine").exists()
    assert await metric(moorage, "moorage_evictions_total", reason="corrupt") == 0


@pytest.mark.logs_errors("bookkeeping not written")  # the stop's flush reads it too
async def test_an_index_that_cannot_be_read_is_503_not_500(
    moorage: Client, upstream: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's directory removed or replaced under a running daemon: SQLite's error went
    out as 500 "internal error" with a traceback, where every other store failure is 503."""
    upstream.add_image("library/alpine", "3.19")

    def unreadable(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("unable to open database file")  # what SQLite says then

    monkeypatch.setattr(moorage.app[CACHE]._index._db, "get", unreadable)
    response = await moorage.get(
        "/v2/alpine/manifests/3.19", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
    )
    assert response.status == 503, await response.text()
    error = (await response.json())["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "the index cannot be read" in error["message"]


async def test_a_corrupt_blob_that_can_be_neither_moved_nor_removed_is_503_and_said_so(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its directory another user's too: every pull was a 500, each logging that the blob had
    been deleted when it had not."""
    store = tmp_path / "store"
    moorage, digest, _, path = await a_stored_blob_rewritten(start_moorage, upstream, store)
    (store / "quarantine").mkdir()
    with immutable(store / "quarantine"), immutable(path.parent):
        response = await moorage.get(f"/v2/alpine/blobs/{digest}")
        assert response.status == 503, await response.text()
        assert "can be neither quarantined nor removed" in (await response.json())["errors"][0]["message"]
    assert not [r for r in caplog.records if getattr(r, "event", "") == "quarantine_failed"]


@contextlib.contextmanager
def as_another_user() -> Iterator[None]:
    """The daemon's file accesses as ``nobody`` for a while: the store, made by root, is then
    what a store command run as root leaves to a daemon running as its own user."""
    if os.geteuid() != 0:
        pytest.fail("this test drops to another user, which needs root (CI runs as root)")
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


async def test_a_stored_file_the_daemon_may_not_read_is_a_503_that_names_it(
    start_moorage: StartMoorage, upstream: FakeRegistry, tmp_path: Path
) -> None:
    """It was a 500 with a traceback in the log, for a manifest or a blob made by `moorage warm
    --store` run as root beside a daemon running as its own user."""
    store = tmp_path / "store"
    moorage = await start_moorage(storage={"path": str(store)})
    image = upstream.add_image("library/app", "1", [os.urandom(1000)])
    layer = image.layer_digests[0]
    assert (await moorage.get(f"/v2/library/app/blobs/{layer}")).status == 200
    assert (await moorage.get(f"/v2/library/app/manifests/{image.digest}")).status == 200
    await until_settled(moorage)
    moorage.app[CACHE]._hot = HotAnswers()  # the manifest from the store, not from memory
    upstream.reset_requests()
    with as_another_user():
        blob = await moorage.get(f"/v2/library/app/blobs/{layer}")
        manifest = await moorage.get(f"/v2/library/app/manifests/{image.digest}")
    for response, digest in ((blob, layer), (manifest, image.digest)):
        assert response.status == 503, await response.text()
        (error,) = (await response.json())["errors"]
        assert error["code"] == "UNAVAILABLE"
        assert f"cannot read the stored file {stored_file(store, digest)}: Permission denied" in error["message"]
        assert "run store commands as the daemon's user" in error["message"]


@pytest.fixture
def open_store() -> Iterator[Path]:
    """A store directory others may enter, outside pytest's 0700 ``tmp_path``. Asked for before
    ``start_moorage``, it is removed after the daemon stopped: removed before, the daemon's
    last bookkeeping write at its stop failed, and logged an error."""
    store = Path(tempfile.mkdtemp(prefix="moorage-store-"))
    store.chmod(0o755)
    yield store
    shutil.rmtree(store)


async def test_a_stored_file_alone_the_daemon_may_not_read_is_a_503_that_names_it(
    open_store: Path, start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    """The directories readable, the files not (a store command run as root with a umask of
    077 over an existing store): the blob went out as aiohttp's bare 403, naming nothing."""
    moorage = await start_moorage(storage={"path": str(open_store)})
    image = upstream.add_image("library/app", "1", [os.urandom(1000)])
    layer = image.layer_digests[0]
    assert (await moorage.get(f"/v2/library/app/blobs/{layer}")).status == 200
    await until_settled(moorage)
    path = stored_file(open_store, layer)
    for directory in (path.parent, path.parent.parent, path.parent.parent.parent):
        directory.chmod(0o755)
    path.chmod(0o600)
    upstream.reset_requests()
    with as_another_user():
        response = await moorage.get(f"/v2/library/app/blobs/{layer}")
    assert response.status == 503, await response.text()
    (error,) = (await response.json())["errors"]
    assert f"cannot read the stored file {path}: Permission denied" in error["message"]
    assert "run store commands as the daemon's user" in error["message"]


@pytest.mark.logs_errors("cutting response: reading the store timed out", "unexpected error")
@pytest.mark.parametrize("asked", [{}, {"If-None-Match": '"sha256:0"'}], ids=["plain", "conditional"])
async def test_a_store_that_times_out_under_sendfile_is_a_fault_not_a_client_gone(
    moorage: Client,
    upstream: FakeRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    asked: dict[str, str],
) -> None:
    """sendfile reads the store too: a store that times out under it (an NFS mount with
    softerr) fails it with ETIMEDOUT, as client_send_timeout's cut does. Taken for a client
    gone, a failing store showed only clients leaving, with no error; the connection, still
    up, tells them apart. The client sees a short body either way."""
    caplog.set_level("INFO", logger="moorage")
    data = os.urandom(8 * 1024 * 1024)
    digest = upstream.add_blob(data)
    await (await moorage.get(f"/v2/alpine/blobs/{digest}")).read()
    await until_settled(moorage)
    calls = 0
    real_sendfile = os.sendfile

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        return real_sendfile(out_fd, in_fd, offset, min(count, 256 * 1024))

    monkeypatch.setattr(os, "sendfile", sendfile)
    response = await moorage.get(f"/v2/alpine/blobs/{digest}", headers=asked)
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 10)
    await until(lambda: sum(getattr(r, "event", "") == "request" for r in caplog.records) == 2)
    line = [r for r in caplog.records if getattr(r, "event", "") == "request"][-1]
    assert line.__dict__.get("error") not in (None, "CLIENT_GONE")
    assert [r for r in caplog.records if r.levelname == "ERROR"], "the store's fault is logged"
