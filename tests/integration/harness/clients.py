"""Real container clients pulling through a mirror: skopeo, podman and containerd (ctr).

* :func:`skopeo_copy` / :func:`skopeo_inspect_raw` -- plain HTTP, no TLS verification.
* :class:`Podman` -- podman with private ``registries.conf``, ``storage.conf`` (vfs),
  ``containers.conf`` and auth file under a test directory; ``docker.io`` (or any other
  prefix) resolves to a closed loopback port, so only the mirror can answer.
* :class:`Containerd` -- a private ``containerd`` daemon (no CRI plugin, its own
  root/state/socket) driven with ``ctr ... --hosts-dir``; ``hosts.toml`` files send each
  registry to the mirror, with a closed loopback port as ``server``.

Every call raises :class:`ClientError` (command, exit code, stdout and stderr in the
message) when the command fails, unless ``check=False``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .process import BackgroundProcess, tail
from .tools import closed_port, require_tool

__all__ = [
    "ClientError",
    "Containerd",
    "Podman",
    "run_checked",
    "skopeo_copy",
    "skopeo_inspect_raw",
]


class ClientError(RuntimeError):
    """A client command exited non-zero."""

    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        self.argv = list(argv)
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        super().__init__(
            f"command failed with exit code {proc.returncode}: {' '.join(self.argv)}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )


def run_checked(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing text output; raise ``ClientError`` on failure
    when ``check``."""
    proc = subprocess.run(
        list(argv),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
    )
    if check and proc.returncode != 0:
        raise ClientError(argv, proc)
    return proc


def _docker_ref(ref: str) -> str:
    return ref if "://" in ref or ref.startswith(("dir:", "oci:", "docker-archive:")) else ("docker://" + ref)


# -- skopeo ---------------------------------------------------------------------------


def skopeo_copy(
    src: str,
    dest: str,
    *,
    all_platforms: bool = False,
    extra: Sequence[str] = (),
    timeout: float = 300.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy --src-tls-verify=false [--all] SRC DEST``.

    ``src``/``dest`` are skopeo references (``docker://127.0.0.1:PORT/repo:tag``,
    ``dir:/path``, ``oci:/path:tag``); a bare ``host/repo:tag`` means ``docker://``.
    A ``docker://`` destination also gets ``--dest-tls-verify=false``.
    """
    src, dest = _docker_ref(src), _docker_ref(dest)
    argv = [
        require_tool("skopeo"),
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
    ]
    if dest.startswith("docker://"):
        argv.append("--dest-tls-verify=false")
    if all_platforms:
        argv.append("--all")
    argv += [*extra, src, dest]
    return run_checked(argv, timeout=timeout, check=check)


def skopeo_inspect_raw(ref: str, *, timeout: float = 120.0) -> bytes:
    """The manifest bytes exactly as the registry serves them (``skopeo inspect --raw``)."""
    argv = [
        require_tool("skopeo"),
        "--insecure-policy",
        "inspect",
        "--raw",
        "--tls-verify=false",
        _docker_ref(ref),
    ]
    proc = subprocess.run(
        argv,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise ClientError(
            argv,
            subprocess.CompletedProcess(
                argv,
                proc.returncode,
                proc.stdout.decode("utf-8", "replace"),
                proc.stderr.decode("utf-8", "replace"),
            ),
        )
    return proc.stdout


# -- podman ---------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class Podman:
    """podman with private configuration under ``workdir``.

    ``mirror`` is the mirror location podman uses for ``docker.io`` (``"127.0.0.1:PORT"``
    or with a path prefix, ``"127.0.0.1:PORT/docker-hub"``: podman then requests
    ``/v2/docker-hub/library/alpine/...``), or a mapping ``{prefix: location}`` to mirror
    several registries (``{"docker.io": ..., "ghcr.io": ...}``). Each prefix's own
    location is a closed loopback port, so a failing mirror cannot fall back.

    Pulling an image already in the store again fetches ``/v2/``, the manifest and the
    config blob but no layers; use another ``Podman`` (another ``workdir``) for a pull
    with an empty store.
    """

    def __init__(self, workdir: Path, mirror: str | Mapping[str, str], *, tls_verify: bool = False) -> None:
        """``tls_verify``: the mirror is HTTPS with a certificate podman must verify (give it
        the CA with ``pull(extra=["--cert-dir", DIR])``); otherwise it is marked insecure."""
        self.binary = require_tool("podman")
        self.tls_verify = tls_verify
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mirrors = {"docker.io": mirror} if isinstance(mirror, str) else dict(mirror)
        self.registries_conf = self.workdir / "registries.conf"
        self.storage_conf = self.workdir / "storage.conf"
        self.containers_conf = self.workdir / "containers.conf"
        self.auth_file = self.workdir / "auth.json"
        self.graphroot = self.workdir / "storage"
        self.runroot = self.workdir / "run"
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            'unqualified-search-registries = ["docker.io"]',
            'short-name-mode = "disabled"',
        ]
        for prefix, location in self.mirrors.items():
            lines += [
                "",
                "[[registry]]",
                f"prefix = {_toml_str(prefix)}",
                f"location = {_toml_str(f'127.0.0.1:{closed_port()}')}",
                "insecure = true",
                "[[registry.mirror]]",
                f"location = {_toml_str(location)}",
                f"insecure = {'false' if self.tls_verify else 'true'}",
            ]
        self.registries_conf.write_text("\n".join(lines) + "\n")
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f"runroot = {_toml_str(str(self.runroot))}\n"
            f"graphroot = {_toml_str(str(self.graphroot))}\n"
        )
        # Keep podman's runtime state out of the host's /run/libpod and journald.
        self.containers_conf.write_text(
            "[engine]\n"
            f"tmp_dir = {_toml_str(str(self.workdir / 'libpod-tmp'))}\n"
            'events_logger = "file"\n'
            f"events_logfile_path = {_toml_str(str(self.workdir / 'events.log'))}\n"
            'cgroup_manager = "cgroupfs"\n'
            "[network]\n"
            f"network_config_dir = {_toml_str(str(self.workdir / 'networks'))}\n"
        )
        if not self.auth_file.exists():
            self.auth_file.write_text('{"auths": {}}\n')

    @property
    def env(self) -> dict[str, str]:
        """Environment for running podman against the private configuration."""
        env = dict(os.environ)
        env.update(
            CONTAINERS_REGISTRIES_CONF=str(self.registries_conf),
            CONTAINERS_STORAGE_CONF=str(self.storage_conf),
            CONTAINERS_CONF=str(self.containers_conf),
            REGISTRY_AUTH_FILE=str(self.auth_file),
        )
        env.pop("CONTAINERS_REGISTRIES_CONF_DIR", None)
        return env

    def run(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``podman ARGS...`` with the private configuration."""
        return run_checked([self.binary, *args], env=self.env, timeout=timeout, check=check)

    def pull(
        self,
        ref: str,
        arch: str | None = None,
        *,
        variant: str | None = None,
        extra: Sequence[str] = (),
        timeout: float = 300.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``podman pull [--arch A] [--variant V] REF``. A failed pull takes 3 s longer
        than it needs: podman 4.3 retries three times, 1 s apart, and has no flag to stop
        that."""
        args = ["pull"]
        if arch:
            args += ["--arch", arch]
        if variant:
            args += ["--variant", variant]
        return self.run(*args, *extra, ref, timeout=timeout, check=check)

    def login(self, registry: str, username: str, password: str) -> None:
        """``podman login`` to ``registry`` (e.g. the mirror host); podman sends mirror
        credentials only from the auth file, not from ``pull --creds``."""
        self.run(
            "login",
            "--tls-verify=false",
            "--username",
            username,
            "--password",
            password,
            registry,
        )

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def inspect(self, ref: str) -> dict[str, object]:
        """``podman image inspect REF`` (first entry)."""
        data = json.loads(self.run("image", "inspect", ref).stdout)
        result: dict[str, object] = data[0]
        return result

    def image_digest(self, ref: str) -> str:
        """The digest of the manifest the tag pointed to when pulled (the index's digest
        for a multi-platform image)."""
        return str(self.inspect(ref)["Digest"])

    def repo_digests(self, ref: str) -> list[str]:
        """``name@digest`` entries: for an index both the index and the instance pulled."""
        value = self.inspect(ref).get("RepoDigests") or []
        return [str(v) for v in value] if isinstance(value, list) else []

    def image_id(self, ref: str) -> str:
        """The image ID, i.e. the hex digest of the image config."""
        return str(self.inspect(ref)["Id"])

    def rmi(self, ref: str) -> None:
        self.run("rmi", "--force", ref)

    def cleanup(self) -> None:
        """Remove the image store and configuration (idempotent)."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


# -- containerd -----------------------------------------------------------------------

_DISABLED_PLUGINS = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
]


class ContainerdStartError(RuntimeError):
    """containerd did not come up; the message includes its log."""


class Containerd:
    """A private containerd daemon; started by the constructor, stopped by :meth:`stop`.

    Its root and state live under ``workdir``; its sockets live in a short-named
    directory under the system temp dir (unix socket paths are limited to 107 bytes).
    ``hosts_dir`` holds one ``<registry>/hosts.toml`` per mirrored registry
    (:meth:`write_hosts`).

    The content store is shared by all namespaces: pulling an image again, even in
    another namespace, sends only ``HEAD`` for the manifest. A test that needs a client
    without any cached content starts another ``Containerd`` (about 0.1 s).
    """

    def __init__(self, workdir: Path, *, namespace: str = "test", start_timeout: float = 20.0) -> None:
        self.binary = require_tool("containerd")
        self.ctr_binary = require_tool("ctr")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.namespace = namespace
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.hosts_dir = self.workdir / "hosts"
        self.hosts_dir.mkdir(exist_ok=True)
        self.log_path = self.workdir / "containerd.log"
        self.config_path = self.workdir / "config.toml"
        self._sock_dir = Path(tempfile.mkdtemp(prefix="ctrd-"))
        self.socket = self._sock_dir / "containerd.sock"
        self._proc: BackgroundProcess | None = None
        try:
            self._write_config()
            self._start(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _write_config(self) -> None:
        disabled = ", ".join(_toml_str(p) for p in _DISABLED_PLUGINS)
        self.config_path.write_text(
            "version = 2\n"
            f"root = {_toml_str(str(self.root))}\n"
            f"state = {_toml_str(str(self.state))}\n"
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f"  address = {_toml_str(str(self.socket))}\n"
            "[ttrpc]\n"
            f"  address = {_toml_str(str(self.socket) + '.ttrpc')}\n"
            "[debug]\n"
            '  address = ""\n'
            "[metrics]\n"
            '  address = ""\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f"  path = {_toml_str(str(self.workdir / 'opt'))}\n"
        )

    def _start(self, timeout: float) -> None:
        self._proc = BackgroundProcess(
            [self.binary, "--config", str(self.config_path)],
            stdout=self.log_path,
            stderr=self.log_path,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._proc.running():
                raise ContainerdStartError(
                    f"containerd exited with {self._proc.popen.returncode}:\n" + tail(self.log_path)
                )
            if self.socket.exists():
                proc = self.ctr("version", check=False, timeout=10.0)
                if proc.returncode == 0:
                    return
            time.sleep(0.05)
        raise ContainerdStartError(f"containerd not ready after {timeout}s:\n" + tail(self.log_path))

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running()

    def write_hosts(
        self,
        registry: str,
        mirror_url: str,
        *,
        override_path: bool = False,
        server: str | None = None,
        capabilities: Sequence[str] = ("pull", "resolve"),
        ca: Path | None = None,
    ) -> Path:
        """Write ``HOSTS_DIR/<registry>/hosts.toml`` sending ``registry`` (``docker.io``,
        ``ghcr.io``, ``_default``...) to ``mirror_url`` (``http://127.0.0.1:PORT``).

        ``server`` defaults to a closed loopback port so that a failing mirror cannot
        fall back. containerd appends ``/v2`` to a mirror URL's path: a mirror at
        ``http://H/prefix`` gets ``/prefix/v2/<name>/...``; for podman's convention
        (``/v2/prefix/<name>/...``) pass ``http://H/v2/prefix`` with
        ``override_path=True``. containerd adds ``?ns=<registry>`` to every request.
        """
        directory = self.hosts_dir / registry
        directory.mkdir(parents=True, exist_ok=True)
        caps = ", ".join(_toml_str(c) for c in capabilities)
        lines = [
            f"server = {_toml_str(server or f'http://127.0.0.1:{closed_port()}')}",
            "",
            f"[host.{_toml_str(mirror_url)}]",
            f"  capabilities = [{caps}]",
        ]
        if override_path:
            lines.append("  override_path = true")
        if ca is not None:  # an HTTPS mirror verified against this CA
            lines.append(f"  ca = {_toml_str(str(ca))}")
        path = directory / "hosts.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def ctr(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ctr -a SOCKET -n NAMESPACE ARGS...``."""
        argv = [self.ctr_binary, "-a", str(self.socket), "-n", self.namespace, *args]
        return run_checked(argv, timeout=timeout, check=check)

    def pull(
        self,
        ref: str,
        platform: str | None = None,
        *,
        all_platforms: bool = False,
        user: str | None = None,
        extra: Sequence[str] = (),
        timeout: float = 300.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull --snapshotter native --hosts-dir HOSTS_DIR [--platform P] REF``
        (fetches and unpacks). ``user`` is ``"name:password"``."""
        args = [
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            str(self.hosts_dir),
        ]
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if user:
            args += ["--user", user]
        return self.ctr(*args, *extra, ref, timeout=timeout, check=check)

    def fetch(
        self,
        ref: str,
        platform: str | None = None,
        *,
        timeout: float = 300.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr content fetch --hosts-dir HOSTS_DIR [--platform P] REF`` (no unpacking)."""
        args = ["content", "fetch", "--hosts-dir", str(self.hosts_dir)]
        if platform:
            args += ["--platform", platform]
        return self.ctr(*args, ref, timeout=timeout, check=check)

    def images(self) -> dict[str, str]:
        """``{image name: target digest}`` in the namespace."""
        out: dict[str, str] = {}
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3:
                out[cols[0]] = cols[2]
        return out

    def image_digest(self, ref: str) -> str:
        """Digest of the manifest (or index) the image name points at."""
        try:
            return self.images()[ref]
        except KeyError:
            raise KeyError(f"{ref} not in containerd namespace {self.namespace!r}") from None

    def content_digests(self) -> set[str]:
        """Digests of all blobs in the content store visible in the namespace."""
        return {line.strip() for line in self.ctr("content", "ls", "-q").stdout.splitlines() if line}

    def stop(self) -> None:
        """Stop containerd (and anything in its process group) and delete its files.
        Idempotent; safe after a failed start."""
        try:
            if self._proc is not None:
                self._proc.stop()
        finally:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            shutil.rmtree(self.root, ignore_errors=True)
            shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
