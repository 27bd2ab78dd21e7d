"""The directory store: nothing becomes visible before its digest matched; temporaries go."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest

from moorage.cache import DigestMismatch, DirectoryStore, StoreFailure
from moorage.upstreams.reference import Digest


def test_commit_makes_a_verified_blob_visible(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    data = os.urandom(100_000)
    digest = Digest.of(data)
    pending = store.begin(digest)
    pending.write(data[:50_000])
    assert store.size_of(digest) is None, "invisible while being written"
    assert pending.pread(10, 0) == data[:10]
    pending.write(data[50_000:])
    pending.commit()
    pending.close()
    assert store.size_of(digest) == len(data)
    path = store.local_path(digest)
    assert path is not None and path.read_bytes() == data
    assert path == tmp_path / "blobs" / "sha256" / digest.encoded[:2] / digest.encoded
    assert list((tmp_path / "tmp").iterdir()) == []


def test_wrong_bytes_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    digest = Digest.of(b"expected")
    pending = store.begin(digest)
    pending.write(b"something else")
    with pytest.raises(DigestMismatch, match=str(digest)):
        pending.commit()
    pending.close()
    assert store.size_of(digest) is None
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not any((tmp_path / "blobs").rglob("*"))


def test_sweep_removes_what_a_crash_left(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    digest = Digest.of(b"x")
    store.begin(digest).write(b"x")  # never committed: a crash
    assert len(list((tmp_path / "tmp").iterdir())) == 1
    assert DirectoryStore(tmp_path).sweep_temporaries() == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_sweep_beside_other_processes_takes_only_temporaries_nobody_writes(tmp_path: Path) -> None:
    """A process that died while others serve the store leaves its temporaries, and no start
    alone comes to sweep them: what nothing wrote for the given time goes, a fill's stays."""
    store = DirectoryStore(tmp_path)
    dead, live = store.begin(Digest.of(b"dead")), store.begin(Digest.of(b"live"))
    dead.write(b"dead")
    live.write(b"live")
    (old,) = [p for p in (tmp_path / "tmp").iterdir() if Digest.of(b"dead").encoded in p.name]
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.sweep_temporaries(unwritten_for=3600) == 1
    assert [Digest.of(b"live").encoded in p.name for p in (tmp_path / "tmp").iterdir()] == [True]
    live.commit()
    assert store.size_of(Digest.of(b"live")) == 4, "the fill still writing is stored"
    dead.close()
    live.close()


def test_a_vanished_temporary_fails_the_commit_but_is_no_full_disk(tmp_path: Path) -> None:
    """Only a full disk calls for an evicting pass; a temporary another process swept, or a
    permission error, would not be helped by deleting stored content."""
    store = DirectoryStore(tmp_path)
    data = os.urandom(1000)
    pending = store.begin(Digest.of(data))
    pending.write(data)
    for leftover in (tmp_path / "tmp").iterdir():
        leftover.unlink()
    with pytest.raises(StoreFailure) as failure:
        pending.commit()
    pending.close()
    assert failure.value.disk_full is False
    assert store.size_of(Digest.of(data)) is None
    full = StoreFailure.of("cannot write", OSError(28, "No space left on device"))
    assert full.disk_full is True and str(full) == "cannot write: No space left on device"


def test_read_small_is_bounded(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    data = b"m" * 100
    digest = Digest.of(data)
    pending = store.begin(digest)
    pending.write(data)
    pending.commit()
    pending.close()
    assert store.read_small(digest, 1000) == data
    assert store.read_small(digest, 10) == data[:11], "one byte past the limit tells the caller it is too large"
    assert store.read_small(Digest.of(b"absent"), 10) is None


def test_a_walk_passes_over_what_is_not_a_blob(tmp_path: Path) -> None:
    """A readiness probe (or anything else) beside the blobs is not counted, nor does it stop a
    walk: eviction, gc, verify and the count all walk the store."""
    store = DirectoryStore(tmp_path)
    data = os.urandom(1000)
    pending = store.begin(Digest.of(data))
    pending.write(data)
    pending.commit()
    pending.close()
    (tmp_path / "blobs" / "sha256" / ".writable-probe").write_bytes(b"ok")
    (tmp_path / "blobs" / ".writable-probe").mkdir()
    (tmp_path / "blobs" / "README").write_text("not ours")
    assert [blob.digest for blob in store.entries()] == [Digest.of(data)]
    assert store.check_writable() == (None, False)
    assert sorted(p.name for p in (tmp_path / "blobs" / "sha256").iterdir() if p.name.startswith(".w")) == [
        ".writable-probe"
    ], "the probe leaves nothing of its own behind"


def test_a_count_of_the_store_holds_one_directory_in_memory_not_the_whole_store(tmp_path: Path) -> None:
    """A walk sorted the names of every stored file at once: 193 MiB to count 300,000 blobs,
    past a pod's memory limit somewhere short of a million (the count after a crash, gc)."""
    store = DirectoryStore(tmp_path)
    for number in range(30_000):
        digest = Digest.of(str(number).encode())
        path = store.path_of(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    tracemalloc.start()
    try:
        assert store.count() == (30_000, 30_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 16 MB when every name was held; what other threads of the run allocate meanwhile is in
    # the figure too.
    assert peak < 5_000_000, f"{peak:,} bytes at most in memory to count 30,000 blobs"


def test_an_eviction_pass_holds_at_most_500_bytes_a_blob_for_its_order(tmp_path: Path) -> None:
    """An eviction pass lists every stored blob to order them by last use: 672 bytes a blob,
    half of it a path, past a pod's memory limit from some 420,000 blobs."""
    store = DirectoryStore(tmp_path)
    for number in range(20_000):
        path = store.path_of(Digest.of(str(number).encode()))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    tracemalloc.start()
    try:
        listed = list(store.entries())
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(listed) == 20_000
    assert held < 20_000 * 500, f"{held / 20_000:.0f} bytes a blob"


def test_a_blob_another_process_stored_meanwhile_is_not_counted_again(tmp_path: Path) -> None:
    """Two daemons serving one store fill the same cold blob at once: each commit is correct,
    and only the first adds to the store's totals (they were counted twice, and a restart with
    a size cap then evicted a store that was below it)."""
    store = DirectoryStore(tmp_path)
    data = os.urandom(10_000)
    digest = Digest.of(data)
    first, second = store.begin(digest), store.begin(digest)
    for pending in (first, second):
        pending.write(data)
    first.commit()
    second.commit()
    assert (first.placed_new, second.placed_new) == (True, False)
    assert store.size_of(digest) == len(data) and store.count() == (len(data), 1)
    for pending in (first, second):
        pending.close()


def test_a_directory_the_daemon_may_not_read_is_passed_over_not_the_end_of_the_walk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One prefix directory left 0700 by a store command run as root failed every walk:
    eviction, gc, the count and verify, and the size cap was no longer kept."""
    if os.geteuid() != 0:
        pytest.fail("this test drops to another user, which needs root (CI runs as root)")
    root = Path(tempfile.mkdtemp(prefix="moorage-store-"))  # outside pytest's 0700 tmp_path
    try:
        root.chmod(0o755)
        store = DirectoryStore(root)
        digests = [Digest.of(str(number).encode()) for number in range(40)]
        for digest in digests:
            path = store.path_of(digest)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        for directory in (store.blobs_dir, store.blobs_dir / "sha256", *(store.blobs_dir / "sha256").iterdir()):
            directory.chmod(0o755)
        closed = store.path_of(digests[0]).parent
        closed.chmod(0o700)
        os.seteuid(65534)
        try:
            walked = [blob.digest for blob in store.entries()]
        finally:
            os.seteuid(0)
        assert set(walked) == {d for d in digests if store.path_of(d).parent != closed}
        assert [r for r in caplog.records if getattr(r, "event", "") == "store_directory_unreadable"]
    finally:
        shutil.rmtree(root)
