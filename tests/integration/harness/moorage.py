"""Moorage as a user runs it: ``python -m moorage.proxy serve --config FILE`` in its own process.

Used where the test needs a real process: restarts on the same store, SIGKILL, and memory
measured from ``/proc/<pid>/status`` (``VmRSS`` now, ``VmHWM`` the peak).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

import yaml

from .process import BackgroundProcess, tail
from .tools import free_port

__all__ = ["MoorageProcess"]


class MoorageProcess:
    def __init__(
        self,
        workdir: Path,
        upstreams: list[dict[str, Any]],
        *,
        client_cert: Any = None,  # (cert, key) for the readiness probe under mutual TLS
        listen_host: str = "127.0.0.1",  # "": every address; probed on 127.0.0.1 all the same
        **settings: Any,
    ) -> None:
        self.client_cert = client_cert
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.store = self.workdir / "store"
        self.log_path = self.workdir / "moorage.log"
        self.config_path = self.workdir / "config.yaml"
        config = {
            "listen": f"{listen_host}:{self.port}",
            "storage": {"path": str(self.store)},
            "upstreams": upstreams,
            **settings,
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.tls = "tls" in settings
        self._proc: BackgroundProcess | None = None
        self.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout: float = 20.0) -> None:
        self._proc = BackgroundProcess(
            [sys.executable, "-m", "moorage.proxy", "serve", "--config", str(self.config_path)],
            stdout=self.log_path,
            stderr=self.log_path,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._proc.running():
                raise RuntimeError(f"moorage exited at start:\n{tail(self.log_path)}")
            context = ssl._create_unverified_context() if self.tls else None  # only asks "are you up?"
            if context is not None and self.client_cert is not None:
                context.load_cert_chain(*self.client_cert)
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1, context=context) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"moorage did not become healthy:\n{tail(self.log_path)}")

    def running(self) -> bool:
        return self._proc is not None and self._proc.running()

    def wait(self, timeout: float) -> int:
        """Wait for the process to end by itself (after a signal the test sent); its exit code."""
        assert self._proc is not None
        return self._proc.popen.wait(timeout)

    def stop(self) -> int | None:
        if self._proc is None:
            return None
        code = self._proc.stop()
        self._proc = None
        return code

    def signal_hup(self) -> None:
        """SIGHUP: reload the TLS certificate; waits until the log says it did."""
        assert self._proc is not None

        def reloads() -> int:
            return sum(line.get("event") in ("tls_reloaded", "tls_reload_failed") for line in self.log_lines())

        before = reloads()
        os.kill(self._proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if reloads() > before:
                return
        raise AssertionError("no reload in the log")

    def kill(self) -> None:
        """SIGKILL, as an OOM killer or a power cut would."""
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.popen.wait(10)
        self._proc.stop()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def memory_kib(self) -> dict[str, int]:
        """``VmRSS`` (now) and ``VmHWM`` (peak) of the server process, in KiB."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values

    def log_lines(self) -> list[dict[str, Any]]:
        """Every line logged so far. Moorage writes its log in batches (every 50 ms): wait
        until the file has stopped growing for a few batches before reading."""
        deadline = time.monotonic() + 5
        size, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.log_path.stat().st_size
            if now != size:
                size, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since > 0.2:
                break
            time.sleep(0.02)
        lines = []
        for raw in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                lines.append({"unparsed": raw})
        return lines

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
