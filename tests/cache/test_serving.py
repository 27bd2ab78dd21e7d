"""Whether the last run stopped cleanly: a crash is seen by the next process that starts
alone, never by one that starts beside a running one, and a clean stop leaves no mark."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from moorage.cache._index import Index
from moorage.cache._serving import ServingLock


def test_a_clean_stop_leaves_nothing_to_count(tmp_path: Path) -> None:
    index = Index(tmp_path / "index")
    first = ServingLock(tmp_path, index)
    assert first.acquire(1.0) is False, "a new store: nothing to count"
    first.release(clean=True)
    again = ServingLock(tmp_path, index)
    assert again.acquire(2.0) is False
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
    assert after.acquire(2.0) is True
    after.release(clean=True)


def test_a_process_beside_a_running_one_neither_counts_nor_clears(tmp_path: Path) -> None:
    """``moorage warm --store`` beside a daemon: the daemon's mark is the daemon's."""
    index = Index(tmp_path / "index")
    daemon = ServingLock(tmp_path, index)
    assert daemon.acquire(1.0) is False
    beside = ServingLock(tmp_path, index)
    assert beside.acquire(2.0) is False, "the daemon's mark is no crash"
    beside.release(clean=True)
    assert index.begin_serving(3.0) is True, "the mark stays while the daemon serves"
    fd = daemon._fd
    assert fd is not None
    os.close(fd)  # the daemon dies without a clean stop
    daemon._fd = None
    after = ServingLock(tmp_path, index)
    assert after.acquire(4.0) is True, "so the next start alone counts the store"
    after.release(clean=False)
    assert ServingLock(tmp_path, index).acquire(5.0) is True, "a stop with a failed flush leaves the mark"


def test_a_mark_that_cannot_be_cleared_is_left_for_the_next_start(tmp_path: Path) -> None:
    """A stop on a full disk or a broken index must still stop: the mark stays, and the next
    start counts the store."""
    index = Index(tmp_path / "index")
    serving = ServingLock(tmp_path, index)
    assert serving.acquire(1.0) is False

    def broken() -> None:
        raise sqlite3.OperationalError("unable to open database file")

    index.end_serving = broken  # type: ignore[method-assign]
    serving.release(clean=True)
    assert ServingLock(tmp_path, Index(tmp_path / "index")).acquire(2.0) is True
