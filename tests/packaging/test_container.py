"""The container image, built from the Dockerfile with podman and run for real.

No registry is reachable from a build, so the base image is made here: a Debian bookworm
with python3 (debootstrap, cached between runs under ~/.cache/moorage-tests) imported into
podman, then passed as BASE_IMAGE. The built image serves a real registry's images to skopeo,
reports healthy through its HEALTHCHECK command, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.integration.harness import images
from tests.integration.harness.clients import ClientError, skopeo_copy
from tests.integration.harness.registry import RealRegistry
from tests.integration.harness.tools import free_port, require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moorage-tests"
BASE_TARBALL = CACHE / "bookworm-python3.tar"
BASE_IMAGE = "localhost/moorage-test-base:bookworm"
IMAGE = "localhost/moorage:test"


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if not path.is_file():
            continue
        text = path.read_text()
        match = re.search(r"^URIs:\s*(\S+)", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M
        )
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


class Podman:
    """podman with storage and settings of its own (overlay, runc, container limits a
    rootful sandbox allows)."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_tool("podman")
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{workdir}/run"\ngraphroot = "{workdir}/root"\n'
        )
        (workdir / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = ["nofile=8192:8192", "nproc=4096:4096"]\n'
            f'[engine]\nruntime = "runc"\nevents_logger = "file"\ntmp_dir = "{workdir}/tmp"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(workdir / "storage.conf"),
            "CONTAINERS_CONF": str(workdir / "containers.conf"),
        }

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True, stdin: IO[bytes] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, *args],
            env=self.env,
            stdin=stdin,
            capture_output=True,
            text=stdin is None,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{str(result.stderr)[-3000:]}")
        return result


def base_tarball() -> Path:
    """A minimal Debian bookworm with python3 and venv, made once and kept."""
    if BASE_TARBALL.is_file():
        return BASE_TARBALL
    debootstrap = require_tool("debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "rootfs.partial"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(
        [
            debootstrap,
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(rootfs),
            debian_mirror(),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    for waste in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
        shutil.rmtree(rootfs / waste, ignore_errors=True)
    partial = BASE_TARBALL.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], check=True)
    partial.rename(BASE_TARBALL)
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_TARBALL


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    podman = Podman(tmp_path_factory.mktemp("podman"))
    with base_tarball().open("rb") as tarball:
        podman("import", "-q", "-", f"{BASE_IMAGE}-debootstrap", stdin=tarball)
    # As the official python images ship it (the Dockerfile's default base): no bytecode of
    # the standard library.
    stripping = tmp_path_factory.mktemp("base")
    (stripping / "Containerfile").write_text(
        f"FROM {BASE_IMAGE}-debootstrap\nRUN find /usr/lib/python3* -name __pycache__ -prune -exec rm -rf {{}} +\n"
    )
    podman("build", "--isolation", "chroot", "-t", BASE_IMAGE, str(stripping))
    build = ["build", "--isolation", "chroot", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
    ca_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca_bundle.is_file():  # the host's trust store, for pip inside the build (not kept in the image)
        build += ["-v", f"{ca_bundle}:{ca_bundle}:ro"]
    started = time.monotonic()
    podman(*build, "-t", IMAGE, str(ROOT))
    print(f"\nimage built in {time.monotonic() - started:.0f} s")
    yield podman
    podman("rmi", "-f", IMAGE, BASE_IMAGE, f"{BASE_IMAGE}-debootstrap", check=False)


def test_the_image_runs_as_a_user_with_its_labels_and_health_check(built: Podman) -> None:
    assert built("run", "--rm", IMAGE, "--version").stdout.strip() == "moorage 0.1.0"
    inspect = json.loads(built("image", "inspect", IMAGE).stdout)[0]
    config = inspect["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["moorage"] and config["Cmd"] == ["serve"]
    assert "5000/tcp" in config["ExposedPorts"]
    assert "/var/lib/moorage" in config["Volumes"]
    assert config["StopSignal"] == "SIGTERM"
    assert config["Labels"]["org.opencontainers.image.title"] == "moorage"
    assert "MOORAGE_CONFIG=/etc/moorage/config.yaml" in config["Env"]
    print(f"image size: {inspect['Size'] / 1e6:.0f} MB")
    # Compiled once in the image, the standard library too: on a read-only root (as the chart
    # runs it) every start and every HEALTHCHECK would otherwise compile them again (0.5 s
    # more each). pip is not needed to run.
    probe = """
import importlib.util, os, moorage.proxy.cli as cli, aiohttp.web as web, asyncio.base_events, json.decoder
def current(module):  # present, and stamped with its source's time and size, so Python uses it
    source = os.stat(module.__file__)
    with open(importlib.util.cache_from_source(module.__file__), "rb") as pyc:
        head = pyc.read(16)
    stamp, size = int.from_bytes(head[8:12], "little"), int.from_bytes(head[12:16], "little")
    return int.from_bytes(head[4:8], "little") != 0 or (stamp, size) == (int(source.st_mtime), source.st_size)
print(all(current(module) for module in (cli, web, asyncio.base_events, json.decoder)))
print(importlib.util.find_spec("pip") is None)
"""
    found = built("run", "--rm", "--read-only", "--entrypoint", "/opt/moorage/bin/python", IMAGE, "-c", probe)
    assert found.stdout.split() == ["True", "True"], found.stdout
    built("run", "--rm", IMAGE, "check-config", "/etc/moorage/config.yaml")
    bad = built(
        "run", "--rm", "-e", "MOORAGE_TAG_TLL=1m", IMAGE, "check-config", "/etc/moorage/config.yaml", check=False
    )
    assert bad.returncode == 2 and "tag_tll: unknown key" in bad.stderr


def test_the_container_serves_pulls_and_stops_cleanly(built: Podman, tmp_path: Path) -> None:
    require_tool("skopeo")
    with RealRegistry(tmp_path / "registry") as registry:
        layout = tmp_path / "layout"
        images.write_oci_image(layout, "app", [images.random_layer(256 * 1024, 31)])
        image = images.push(layout, "app", registry.host, "library/app", "1")
        port = free_port()
        name = f"moorage-test-{port}"
        built(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "-e",
            f"MOORAGE_LISTEN=127.0.0.1:{port}",
            "-e",
            f"MOORAGE_UPSTREAMS__0__URL={registry.url}",
            IMAGE,
        )
        try:
            deadline = time.monotonic() + 30
            while built("exec", name, "moorage", "healthcheck", check=False).returncode != 0:
                assert time.monotonic() < deadline, built("logs", name).stderr
                time.sleep(0.3)
            try:
                skopeo_copy(f"docker://127.0.0.1:{port}/app:1", f"dir:{tmp_path / 'out'}")
            except ClientError as exc:  # the cache's own log says why a pull failed
                raise AssertionError(f"{exc}\n--- moorage log ---\n{built('logs', name).stderr[-8000:]}") from exc
            assert (tmp_path / "out" / image.layer_digests[0].split(":")[1]).is_file()
            started = time.monotonic()
            built("stop", "-t", "20", name)
            assert time.monotonic() - started < 15, "SIGTERM must stop it without waiting for a kill"
            state = json.loads(built("inspect", name).stdout)[0]["State"]
            assert state["ExitCode"] == 0
            logs = built("logs", name).stderr.splitlines()
            events = [json.loads(line).get("event") for line in logs if line.startswith("{")]
            assert "request" in events and events[-1] == "stopped"
        finally:
            built("rm", "-f", name, check=False)
