"""``RealRegistry``: a real CNCF distribution registry (``docker-registry``) for tests.

The registry runs on ``127.0.0.1:<free port>`` with filesystem storage under a test's
temporary directory, deletes enabled and no authentication. Every request it serves is
read back from its access log (Apache combined format, written by the registry's
outermost HTTP handler exactly once per request, whatever its method or status: checked
for HEAD, 404, 405, unknown routes, client-aborted downloads and 200 concurrent
requests), so tests can assert exact request counts::

    with RealRegistry(tmp_path / "upstream") as upstream:
        ...  # seed images
        mark = upstream.mark()
        ...  # pull through the cache
        assert upstream.count("GET", r"/v2/library/a/blobs/sha256:[0-9a-f]{64}", since=mark) == 2

Requests the harness sends itself (readiness probes, log-sync markers, and the HTTP
helpers of :mod:`.images` such as ``push_blob`` and ``inspect_image``) carry the
harness User-Agent and are left out; skopeo pushes are not, so take a :meth:`mark`
after seeding.

The JSON application log (``registry.log``) is kept for debugging only: it writes
"response completed" lines only for 2xx/3xx answers and for errors the application
itself raised, and nothing for requests the router rejects (405, unknown routes).
"""

from __future__ import annotations

import copy
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from .httpclient import HARNESS_USER_AGENT, request
from .process import BackgroundProcess, tail
from .tools import free_port, require_tool

__all__ = ["LoggedRequest", "RealRegistry", "RegistryStartError"]

# 127.0.0.1 - - [23/Nov/2026:06:59:48 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]*)\] "
    r'"(?P<method>\S+) (?P<uri>\S*) (?P<proto>[^"]*)" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?\s*$'
)

_SYNC_PREFIX = "/_harness/sync/"


class RegistryStartError(RuntimeError):
    """``docker-registry`` did not come up; the message includes its log."""


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the registry's access log recorded it."""

    method: str
    path: str  # request URI without the query string
    query: str  # query string without the leading "?", "" if none
    status: int | None
    size: int | None  # response body bytes written by the registry
    user_agent: str
    remote: str


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def parse_access_line(line: str) -> LoggedRequest | None:
    """Parse one access-log line; ``None`` for anything else."""
    m = _ACCESS_LINE.match(line)
    if m is None:
        return None
    uri = m["uri"]
    path, _, query = uri.partition("?")
    size = m["size"]
    return LoggedRequest(
        method=m["method"],
        path=path,
        query=query,
        status=int(m["status"]),
        size=None if size == "-" else int(size),
        user_agent=_unescape(m["agent"] or ""),
        remote=m["remote"],
    )


class RealRegistry:
    """A ``docker-registry serve`` process; started by the constructor.

    ``workdir`` receives ``config.yml``, ``data/`` (storage), ``access.log`` (one line
    per request, what :meth:`requests` parses) and ``registry.log`` (JSON app log).
    ``extra_config`` is deep-merged into the generated configuration (e.g. ``auth``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.binary = require_tool("docker-registry")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "data"
        self.storage_dir.mkdir(exist_ok=True)
        self.config_path = self.workdir / "config.yml"
        self.access_log = self.workdir / "access.log"
        self.app_log = self.workdir / "registry.log"
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self._extra_config = dict(extra_config or {})
        self._start_timeout = start_timeout
        self._proc: BackgroundProcess | None = None
        self.start()

    # -- addresses ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    # -- lifecycle ---------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The configuration written to ``config.yml``."""
        base: dict[str, Any] = {
            "version": 0.1,
            "log": {
                "level": "info",
                "formatter": "json",
                "accesslog": {"disabled": False},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                "secret": "moorage-integration-tests",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        return _deep_merge(base, self._extra_config)

    def start(self) -> None:
        """Start (or restart, keeping port and storage) the registry and wait until
        ``GET /v2/`` answers 200."""
        if self.running:
            return
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
            self._proc = BackgroundProcess(
                [self.binary, "serve", str(self.config_path)],
                stdout=self.access_log,
                stderr=self.app_log,
                cwd=self.workdir,
            )
            try:
                self._wait_ready()
                return
            except RegistryStartError:
                self._proc.stop()
                log = tail(self.app_log)
                if attempt + 1 < attempts and "address already in use" in log:
                    self.port = free_port()
                    continue
                raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if not self._proc.running():
                raise RegistryStartError(
                    f"docker-registry exited with {self._proc.popen.returncode}:\n" + tail(self.app_log)
                )
            try:
                if request("GET", self.url + "/v2/", timeout=2.0).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RegistryStartError(
            f"docker-registry not ready on {self.url} after {self._start_timeout}s:\n" + tail(self.app_log)
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running()

    def stop(self) -> None:
        """Stop the registry (idempotent). Storage and logs stay; :meth:`start` resumes."""
        if self._proc is not None:
            self._proc.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RealRegistry({self.url}, workdir={str(self.workdir)!r})"

    # -- request log -------------------------------------------------------------------

    def _read_lines(self) -> list[str]:
        try:
            data = self.access_log.read_bytes()
        except FileNotFoundError:
            return []
        text = data.decode("utf-8", "replace")
        # Only complete lines: a line still being written has no newline yet.
        return text.split("\n")[:-1]

    def _log_size(self) -> int:
        try:
            return self.access_log.stat().st_size
        except FileNotFoundError:
            return 0

    def sync(self, *, settle: float = 0.05, timeout: float = 5.0) -> None:
        """Wait until every request answered so far is in the access log.

        Sends a marker request (left out of all results), waits for its line, then until
        the log has not grown for ``settle`` seconds. Requests whose responses a client
        has fully received are then logged: the registry writes the line as soon as its
        handler returns. When the registry is stopped, only the settle wait is done.
        """
        deadline = time.monotonic() + timeout
        if self.running:
            marker = f" {_SYNC_PREFIX}{uuid.uuid4().hex} ".encode()
            offset = self._log_size()
            try:
                request("GET", self.url + marker.decode().strip(), timeout=timeout)
            except OSError:
                marker = b""
            while marker and time.monotonic() < deadline:
                with self.access_log.open("rb") as fh:
                    fh.seek(offset)
                    if marker in fh.read():
                        break
                time.sleep(0.005)
        size = -1
        while time.monotonic() < deadline:
            new_size = self._log_size()
            if new_size == size:
                return
            size = new_size
            time.sleep(settle)

    def requests(self, *, sync: bool = True) -> list[LoggedRequest]:
        """All requests served so far, oldest first, without the harness's own requests
        (readiness probes, :meth:`sync` markers: those sent with the harness User-Agent)."""
        if sync:
            self.sync()
        out: list[LoggedRequest] = []
        for line in self._read_lines():
            req = parse_access_line(line)
            if req is None or req.user_agent == HARNESS_USER_AGENT:
                continue
            if req.path.startswith(_SYNC_PREFIX):
                continue
            out.append(req)
        return out

    def mark(self) -> int:
        """A position in the request log; pass it to :meth:`requests_since` or ``count``."""
        return len(self.requests())

    def requests_since(self, mark: int) -> list[LoggedRequest]:
        """Requests served after :meth:`mark` returned ``mark``."""
        return self.requests()[mark:]

    def count(
        self,
        method: str,
        path_regex: str,
        since: int = 0,
        *,
        status: int | None = None,
    ) -> int:
        """Number of requests since ``since`` whose method equals ``method`` (``"*"`` for
        any; case-insensitive) and whose path (query excluded) matches ``path_regex`` in
        full (``re.fullmatch``), optionally only those answered with ``status``."""
        pattern = re.compile(path_regex)
        want = method.upper()
        return sum(
            1
            for r in self.requests_since(since)
            if (want == "*" or r.method.upper() == want)
            and pattern.fullmatch(r.path) is not None
            and (status is None or r.status == status)
        )

    # -- path helpers ------------------------------------------------------------------

    def blob_gets(self, since: int = 0) -> dict[str, int]:
        """GETs per blob digest that reached the registry since ``since``."""
        gets: dict[str, int] = {}
        for logged in self.requests_since(since):
            if logged.method == "GET" and "/blobs/" in logged.path:
                digest = logged.path.rsplit("/", 1)[1]
                gets[digest] = gets.get(digest, 0) + 1
        return gets

    @staticmethod
    def manifest_path(repo: str, reference: str) -> str:
        """Regex matching ``/v2/<repo>/manifests/<reference>`` exactly."""
        return re.escape(f"/v2/{repo}/manifests/{reference}")

    @staticmethod
    def blob_path(repo: str, digest: str) -> str:
        """Regex matching ``/v2/<repo>/blobs/<digest>`` exactly."""
        return re.escape(f"/v2/{repo}/blobs/{digest}")
