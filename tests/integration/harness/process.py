"""Background processes started by the harness (registries, containerd).

Each process runs in its own session (process group) so that stopping it also stops any
children it spawned. Processes still running when the interpreter exits are stopped by
an ``atexit`` hook; on Linux, processes started from the main thread also get SIGKILL
from the kernel when the test process dies without running ``atexit`` (e.g. killed by a
signal), so an aborted test run does not leave daemons behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["BackgroundProcess", "tail"]

_live: set[BackgroundProcess] = set()
_live_lock = threading.Lock()


def tail(path: Path, max_bytes: int = 8192) -> str:
    """Return the last ``max_bytes`` of a text file, or an empty string if it is missing."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _preexec() -> Callable[[], None] | None:
    # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so only use
    # it from the main thread, whose end is the end of the test process.
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        return _die_with_parent
    return None


class BackgroundProcess:
    """A daemon started with ``subprocess.Popen`` in a new session.

    ``stdout`` and ``stderr`` are appended to the given files.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdout: Path,
        stderr: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.stdout_path = stdout
        self.stderr_path = stderr
        out: IO[bytes] = stdout.open("ab")
        err: IO[bytes] = out if stderr == stdout else stderr.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                preexec_fn=_preexec(),  # noqa: PLW1509 - only a prctl call
            )
        finally:
            out.close()
            if err is not out:
                err.close()
        with _live_lock:
            _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the process and its process group: SIGTERM, then SIGKILL after ``timeout``.

        Idempotent; returns the exit code.
        """
        try:
            if self.popen.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.popen.wait(timeout)
            # Children left in the group (if any) are not wanted either.
            self._signal_group(signal.SIGKILL)
        finally:
            with _live_lock:
                _live.discard(self)
        return self.popen.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            proc.stop(timeout=5.0)
