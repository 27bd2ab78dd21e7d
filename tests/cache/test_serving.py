"""Whether the last run stopped cleanly: a crash is seen by the next process that starts
alone, never by one that starts beside a running one, and a clean stop leaves no mark. A
process beside a running one leaves the store's temporaries alone: they are downloads in flight."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import diskcache
import pytest

from moorage.cache import open_cache
from moorage.cache._index import Index
from moorage.cache._serving import ServingLock
from moorage.cache._store import DirectoryStore, WalkCount
from moorage.config import ConfigError, StorageSettings
from moorage.upstreams.reference import Digest
from tests.polling import until


def test_a_clean_stop_leaves_nothing_to_count(tmp_path: Path) -> None:
    index = Index(tmp_path / "index")
    first = ServingLock(tmp_path, index)
    assert first.acquire(1.0).crashed is False, "a new store: nothing to count"
    first.release(clean=True)
    again = ServingLock(tmp_path, index)
    assert again.acquire(2.0).crashed is False
    again.release(clean=True)


def test_a_process_that_died_serving_is_seen_by_the_next_start(tmp_path: Path) -> None:
    """The lock goes with the process, however it ends; the mark stays in the index."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from moorage.cache._index import Index\n"
        "from moorage.cache._serving import ServingLock\n"
        f"ServingLock(Path({str(tmp_path)!r}), Index(Path({str(tmp_path / 'index')!r}))).acquire(1.0)\n"
        "os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    after = ServingLock(tmp_path, Index(tmp_path / "index"))
    assert after.acquire(2.0).crashed is True
    after.release(clean=True)


def test_a_process_beside_a_running_one_neither_counts_nor_clears(tmp_path: Path) -> None:
    """``moorage warm --store`` beside a daemon: the daemon's mark is the daemon's."""
    index = Index(tmp_path / "index")
    daemon = ServingLock(tmp_path, index)
    assert daemon.acquire(1.0).crashed is False
    beside = ServingLock(tmp_path, index)
    assert beside.acquire(2.0).crashed is False, "the daemon's mark is no crash"
    beside.release(clean=True)
    assert index.begin_serving(3.0) is True, "the mark stays while the daemon serves"
    fd = daemon._fd
    assert fd is not None
    os.close(fd)  # the daemon dies without a clean stop
    daemon._fd = None
    after = ServingLock(tmp_path, index)
    assert after.acquire(4.0).crashed is True, "so the next start alone counts the store"
    after.release(clean=False)
    assert ServingLock(tmp_path, index).acquire(5.0).crashed is True, "a stop with a failed flush leaves the mark"


def test_a_mark_that_cannot_be_cleared_is_left_for_the_next_start(tmp_path: Path) -> None:
    """A stop on a full disk or a broken index must still stop: the mark stays, and the next
    start counts the store."""
    index = Index(tmp_path / "index")
    serving = ServingLock(tmp_path, index)
    assert serving.acquire(1.0).crashed is False

    def broken() -> None:
        raise sqlite3.OperationalError("unable to open database file")

    index.end_serving = broken  # type: ignore[method-assign]
    serving.release(clean=True)
    assert ServingLock(tmp_path, Index(tmp_path / "index")).acquire(2.0).crashed is True


def test_a_mark_left_for_a_locked_index_says_what_failed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """diskcache's Timeout (another process holds the index locked) has no message: the log
    line said the mark was not cleared, and that the error was nothing."""
    index = Index(tmp_path / "index")
    serving = ServingLock(tmp_path, index)
    serving.acquire(1.0)

    def locked() -> None:
        raise diskcache.Timeout

    index.end_serving = locked  # type: ignore[method-assign]
    serving.release(clean=True)
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "maintenance_failed"]
    assert getattr(record, "error", "") == "Timeout"


def test_a_mark_set_while_another_process_stops_survives_its_stop(tmp_path: Path) -> None:
    """The stopping process clears the mark under the exclusive lock; one starting meanwhile
    sets its mark only after, or a later crash of the starting one would go unseen."""
    index = Index(tmp_path / "index")
    last = ServingLock(tmp_path, index)
    assert last.acquire(1.0).crashed is False
    stopping = last._fd
    assert stopping is not None
    fcntl.flock(stopping, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it stops, alone, about to clear the mark
    starting = ServingLock(tmp_path, index)
    started = threading.Thread(target=starting.acquire, args=(2.0,))
    started.start()
    started.join(0.2)
    assert started.is_alive(), "it waits for the stop to end"
    index.end_serving()
    os.close(stopping)
    started.join(5)
    assert index.begin_serving(3.0) is True, "its mark is there: were it to die now, the next start would count"


async def test_only_a_process_alone_sweeps_the_temporaries(tmp_path: Path) -> None:
    settings = StorageSettings(path=tmp_path / "store")
    async with open_cache(settings):
        in_flight = tmp_path / "store" / "tmp" / "a-download-in-flight"
        in_flight.write_bytes(b"partial")
        async with open_cache(settings):  # moorage warm --store beside the daemon
            pass
        assert in_flight.exists(), "the daemon's download in flight is not swept away"
    async with open_cache(settings):  # the next start, alone: nobody will finish it
        assert not in_flight.exists()


def test_a_process_alone_sweeps_while_no_other_can_start(tmp_path: Path) -> None:
    """Under the exclusive lock: a process starting meanwhile waits, so it has no temporary
    of its own in tmp/ yet that the sweep could take."""
    index = Index(tmp_path / "index")
    seen: list[bool] = []

    def sweep() -> None:
        other = os.open(tmp_path / "serving.lock", os.O_RDONLY)
        try:
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
            seen.append(False)
        except BlockingIOError:
            seen.append(True)
        finally:
            os.close(other)

    serving = ServingLock(tmp_path, index)
    assert serving.acquire(1.0, sweep).alone is True
    assert seen == [True], "the sweep ran, and no other process could have begun serving"
    beside = ServingLock(tmp_path, index)
    assert beside.acquire(2.0, sweep).alone is False and seen == [True], "beside a running one: no sweep"


async def test_a_process_that_starts_beside_another_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second daemon on one store races the first's removals (see the manual): nothing had
    told its operator there was a first."""
    settings = StorageSettings(path=tmp_path / "store")
    caplog.set_level("WARNING", logger="moorage.cache")
    async with open_cache(settings):
        assert not [r for r in caplog.records if getattr(r, "event", "") == "store_shared"], "alone: nothing said"
        async with open_cache(settings):
            (shared,) = [r for r in caplog.records if getattr(r, "event", "") == "store_shared"]
            assert getattr(shared, "store", "") == str(settings.path)


@pytest.mark.parametrize("failing", [("store",), ("format",), ("serving",)])
async def test_a_store_whose_index_takes_no_write_at_start_is_one_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: tuple[str, ...]
) -> None:
    """The index opens, but its first writes (a new store's totals and format, the serving
    mark) meet a full disk: SQLite's error went out of the start as a traceback."""
    setting = diskcache.Cache.set

    def full(cache: diskcache.Cache, key: object, *args: object, **kwargs: object) -> bool:
        if key == failing:
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise error
        return bool(setting(cache, key, *args, **kwargs))

    monkeypatch.setattr(diskcache.Cache, "set", full)
    with pytest.raises(ConfigError) as refused:
        async with open_cache(StorageSettings(path=tmp_path / "store")):
            pass
    assert f"storage.path: cannot use {tmp_path / 'store'} as the store: the index cannot record" in str(refused.value)
    assert "database or disk is full" in str(refused.value)


async def test_blobs_the_index_keeps_no_totals_of_are_counted_after_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An index moved aside (as a damaged index's error says to do) over a store of a million
    blobs: the count took 20 s before the daemon listened, and a liveness probe restarted it,
    and the count, before it ended. The start no longer waits for it."""
    settings = StorageSettings(path=tmp_path / "store")
    async with open_cache(settings) as cache:
        for content in (b"a" * 100, b"b" * 300):
            pending = cache._store.begin(Digest.of(content))
            pending.write(content)
            pending.commit()
            pending.close()
    shutil.rmtree(tmp_path / "store" / "index")  # moved aside
    walking, finish = threading.Event(), threading.Event()
    walk_count = DirectoryStore.walk_count

    def slow_count(store: DirectoryStore, fresh_since: float) -> WalkCount:
        walking.set()
        assert finish.wait(10)
        return walk_count(store, fresh_since)

    monkeypatch.setattr(DirectoryStore, "walk_count", slow_count)
    caplog.set_level("WARNING", logger="moorage.cache")
    async with open_cache(settings) as cache:
        assert await asyncio.to_thread(walking.wait, 10), "the count began"
        assert cache.count_pending, "started, the count still under way"
        finish.set()
        await until(lambda: not cache.count_pending)
        assert (cache.store_bytes, cache.store_entries) == (400, 2)
    (counted,) = [r for r in caplog.records if getattr(r, "event", "") == "store_counted"]
    assert "kept no totals" in counted.getMessage()
