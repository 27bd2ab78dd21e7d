"""Real clients pulling through a real Moorage process from a real registry.

The upstream is Debian's ``docker-registry`` (CNCF Distribution), seeded once per module with
skopeo from OCI layouts these tests write; its access log counts what reached it. Moorage runs
as a user runs it (``moorage serve --config``), with a fresh store per test unless a test says
otherwise. Clients: skopeo, podman (vfs, a registries.conf mirror) and containerd's ctr
(hosts.toml, which adds ``?ns=``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from .harness import images
from .harness.clients import Containerd, Podman, skopeo_copy, skopeo_inspect_raw
from .harness.moorage import MoorageProcess
from .harness.registry import RealRegistry

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


@dataclass(frozen=True)
class Seeded:
    registry: RealRegistry
    app: images.ImageRef  # library/app:1, OCI, three layers
    app_docker: images.ImageRef  # library/app-docker:1, Docker schema 2, the same blobs
    multi: images.ImageRef  # library/multi:1, OCI index linux/amd64 + linux/arm64
    multi_docker: images.ImageRef  # library/multi-docker:1, Docker manifest list
    tool: images.ImageRef  # owner/tool:1, reached through the "ghcr.io" upstream


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    work = tmp_path_factory.mktemp("upstream")
    with RealRegistry(work / "registry") as registry:
        layout = work / "layout"
        layers = [images.random_layer(2 * MiB, 1), images.random_layer(MiB, 2), images.random_layer(512 * 1024, 3)]
        images.write_oci_image(layout, "app", layers)
        app = images.push(layout, "app", registry.host, "library/app", "1")
        app_docker = images.push(layout, "app", registry.host, "library/app-docker", "1", docker_v2s2=True)
        images.write_oci_index(layout, "multi", [("linux", "amd64"), ("linux", "arm64")])
        multi = images.push(layout, "multi", registry.host, "library/multi", "1", all_platforms=True)
        multi_docker = images.push(
            layout, "multi", registry.host, "library/multi-docker", "1", all_platforms=True, docker_v2s2=True
        )
        images.write_oci_image(layout, "tool", [images.random_layer(300 * 1024, 4)])
        tool = images.push(layout, "tool", registry.host, "owner/tool", "1")
        yield Seeded(registry, app, app_docker, multi, multi_docker, tool)


def start_moorage(workdir: Path, registry: RealRegistry, **settings: Any) -> MoorageProcess:
    return MoorageProcess(
        workdir,
        [
            {"host": "docker.io", "url": registry.url, "default": True, "prefixes": ["docker-hub"]},
            {"host": "ghcr.io", "url": registry.url, "prefixes": ["ghcr"]},
        ],
        **settings,
    )


@pytest.fixture
def moorage(tmp_path: Path, seeded: Seeded) -> Iterator[MoorageProcess]:
    with start_moorage(tmp_path / "moorage", seeded.registry) as process:
        yield process


def upstream_counts(registry: RealRegistry, since: int) -> dict[str, int]:
    """Requests that reached the upstream since ``since``, by method and kind."""
    counts: dict[str, int] = {}
    for request in registry.requests_since(since):
        kind = "blob" if "/blobs/" in request.path else "manifest" if "/manifests/" in request.path else "other"
        key = f"{request.method} {kind}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def assert_dir_image(out: Path, image: images.ImageRef) -> None:
    """skopeo's dir: output holds every blob of the image, with verified bytes."""
    for digest in image.blob_digests:
        data = (out / digest.split(":", 1)[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


def test_skopeo_cold_then_warm_pull(moorage: MoorageProcess, seeded: Seeded, tmp_path: Path) -> None:
    registry, app = seeded.registry, seeded.app
    mark = registry.mark()
    skopeo_copy(f"docker://{moorage.host}/app:1", f"dir:{tmp_path / 'cold'}")
    assert_dir_image(tmp_path / "cold", app)
    cold = upstream_counts(registry, mark)
    assert registry.blob_gets(mark) == {d: 1 for d in app.blob_digests}
    assert cold.get("GET manifest") == 1
    mark = registry.mark()
    skopeo_copy(f"docker://{moorage.host}/library/app:1", f"dir:{tmp_path / 'warm'}")
    assert_dir_image(tmp_path / "warm", app)
    assert registry.requests_since(mark) == [], "a warm pull of a fresh tag must not reach the upstream"
    print(f"\nupstream requests: cold pull {cold}, warm pull {{}} ({len(app.blob_digests)} blobs)")


def test_skopeo_by_digest_docker_schema_2_and_shared_layers(
    moorage: MoorageProcess, seeded: Seeded, tmp_path: Path
) -> None:
    registry = seeded.registry
    skopeo_copy(f"docker://{moorage.host}/app@{seeded.app.manifest_digest}", f"dir:{tmp_path / 'oci'}")
    mark = registry.mark()
    skopeo_copy(f"docker://{moorage.host}/app-docker:1", f"dir:{tmp_path / 'docker'}")
    assert_dir_image(tmp_path / "docker", seeded.app_docker)
    raw = (tmp_path / "docker" / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == seeded.app_docker.manifest_digest
    # The Docker image shares config and layers with the OCI one: only its manifest is new.
    assert registry.blob_gets(mark) == {}
    assert upstream_counts(registry, mark).get("GET manifest") == 1


@pytest.mark.parametrize("name", ["multi", "multi-docker"])
def test_skopeo_multi_arch_index_all_platforms(
    moorage: MoorageProcess, seeded: Seeded, tmp_path: Path, name: str
) -> None:
    index = seeded.multi if name == "multi" else seeded.multi_docker
    raw = skopeo_inspect_raw(f"docker://{moorage.host}/{name}:1")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == index.manifest_digest
    mark = seeded.registry.mark()
    skopeo_copy(f"docker://{moorage.host}/{name}:1", f"oci:{tmp_path / 'out'}:x", all_platforms=True)
    wanted = {d for child in index.children for d in child.blob_digests}
    assert set(seeded.registry.blob_gets(mark)) == wanted
    assert all(n == 1 for n in seeded.registry.blob_gets(mark).values())


def test_sixteen_concurrent_cold_pulls_fetch_each_blob_once(
    moorage: MoorageProcess, seeded: Seeded, tmp_path: Path
) -> None:
    registry, app = seeded.registry, seeded.app
    mark = registry.mark()

    def pull(i: int) -> None:
        skopeo_copy(f"docker://{moorage.host}/app:1", f"dir:{tmp_path / f'out{i}'}")
        assert_dir_image(tmp_path / f"out{i}", app)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(pull, range(16)))
    assert registry.blob_gets(mark) == {d: 1 for d in app.blob_digests}
    counts = upstream_counts(registry, mark)
    assert counts.get("GET manifest") == 1, counts


def test_podman_pulls_through_the_mirror(moorage: MoorageProcess, seeded: Seeded, tmp_path: Path) -> None:
    registry = seeded.registry
    with Podman(tmp_path / "podman-a", moorage.host) as podman:
        podman.pull("docker.io/library/app:1")
        assert podman.image_exists("docker.io/library/app:1")
        podman.pull("docker.io/library/multi:1", arch="arm64")
        arm64 = seeded.multi.child("linux/arm64").manifest_digest
        assert f"docker.io/library/multi@{arm64}" in podman.repo_digests("docker.io/library/multi:1")
    mark = registry.mark()
    with Podman(tmp_path / "podman-b", f"{moorage.host}/docker-hub") as podman:  # a mirror with a path prefix
        podman.pull("docker.io/library/app:1")
    assert registry.blob_gets(mark) == {}, "a second node's pull must come from the store"


def test_containerd_pulls_through_hosts_toml_with_ns(moorage: MoorageProcess, seeded: Seeded, tmp_path: Path) -> None:
    registry = seeded.registry
    with Containerd(tmp_path / "containerd") as containerd:
        containerd.write_hosts("docker.io", moorage.url)
        containerd.write_hosts("ghcr.io", moorage.url)
        containerd.pull("docker.io/library/app:1")
        containerd.pull("docker.io/library/multi-docker:1", platform="linux/arm64")
        containerd.pull("ghcr.io/owner/tool:1")  # ?ns=ghcr.io picks the ghcr.io upstream
        assert containerd.image_digest("ghcr.io/owner/tool:1") == seeded.tool.manifest_digest
        assert containerd.image_digest("docker.io/library/app:1") == seeded.app.manifest_digest
    mark = registry.mark()
    with Containerd(tmp_path / "containerd-2") as second:
        second.write_hosts("docker.io", moorage.url)
        second.pull("docker.io/library/app:1")
    assert registry.requests_since(mark) == []
    routed = [line for line in moorage.log_lines() if line.get("event") == "request" and line.get("upstream")]
    assert {"docker.io", "ghcr.io"} <= {line["upstream"] for line in routed}


def test_restart_keeps_the_store(seeded: Seeded, tmp_path: Path) -> None:
    registry = seeded.registry
    with start_moorage(tmp_path / "m", registry) as moorage:
        skopeo_copy(f"docker://{moorage.host}/app:1", f"dir:{tmp_path / 'a'}")
        moorage.restart()
        mark = registry.mark()
        skopeo_copy(f"docker://{moorage.host}/app:1", f"dir:{tmp_path / 'b'}")
        assert_dir_image(tmp_path / "b", seeded.app)
        assert registry.blob_gets(mark) == {}
        lines = moorage.log_lines()
        assert [line for line in lines if "unparsed" in line] == [], "every log line is JSON"
        assert {"starting", "listening", "request"} <= {line.get("event") for line in lines}


def test_kill_9_mid_fill_leaves_nothing_partial(seeded: Seeded, tmp_path: Path) -> None:
    registry = seeded.registry
    with start_moorage(tmp_path / "m", registry) as moorage:
        source = tmp_path / "big.bin"
        digest = images.write_random_file(source, 256 * MiB, seed=9)
        images.push_blob(registry.url, "library/big", source)
        reader = subprocess.Popen(["curl", "-s", "-o", "/dev/null", f"{moorage.url}/v2/big/blobs/{digest}"])
        deadline = time.monotonic() + 10
        temporaries = moorage.store / "tmp"
        while time.monotonic() < deadline and not any(temporaries.iterdir()):
            time.sleep(0.005)
        moorage.kill()  # as soon as the fill has begun writing
        reader.wait(10)
        blob_path = moorage.store / "blobs" / "sha256" / digest[7:9] / digest[7:]
        if blob_path.exists():  # only when the fill had already committed: then it is whole
            assert images.sha256_digest(blob_path.read_bytes()) == digest
        moorage.start()
        assert not any(temporaries.iterdir()), "start-up clears temporaries"
        out = subprocess.run(
            ["curl", "-sf", f"{moorage.url}/v2/big/blobs/{digest}"], capture_output=True, check=True, timeout=60
        ).stdout
        assert hashlib.sha256(out).hexdigest() == digest[7:]


def test_sigterm_cuts_a_slow_download_after_shutdown_timeout_and_says_so(seeded: Seeded, tmp_path: Path) -> None:
    """Past ``shutdown_timeout`` the stop cuts what is still running: exit code 0, nothing
    partial kept, and the request logged as cut by the stop, not as a client that left. It is
    cut after the timeout, not twice it: a pod's grace period is set from it. A download that
    ends within the timeout gets all its bytes."""
    registry = seeded.registry
    source, short = tmp_path / "slow.bin", tmp_path / "short.bin"
    digest = images.write_random_file(source, 32 * MiB, seed=12)
    short_digest = images.write_random_file(short, 6 * MiB, seed=13)
    images.push_blob(registry.url, "library/slow", source)
    images.push_blob(registry.url, "library/slow", short)
    with start_moorage(tmp_path / "m", registry, shutdown_timeout="2s") as moorage:
        url = f"{moorage.url}/v2/slow/blobs/{digest}"
        cold = subprocess.Popen(["curl", "-s", "--limit-rate", "4M", "-o", "/dev/null", url])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any((moorage.store / "blobs").rglob(digest[7:])):
            time.sleep(0.05)  # stored: the next reader is a hit, sent from the file
        warm = subprocess.Popen(["curl", "-s", "--limit-rate", "4M", "-o", "/dev/null", url])
        received = tmp_path / "received.bin"
        ending = subprocess.Popen(  # about 1.5 s: it ends within the timeout
            ["curl", "-s", "--limit-rate", "4M", "-o", str(received), f"{moorage.url}/v2/slow/blobs/{short_digest}"]
        )
        idle = socket.create_connection(("127.0.0.1", moorage.port))  # a pooled keep-alive connection
        idle.sendall(b"GET /v2/ HTTP/1.1\r\nHost: moorage\r\n\r\n")
        assert read_response(idle).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)  # a few MB in, both clients far from the end
        os.kill(moorage.pid, signal.SIGTERM)
        idle.settimeout(1.5)  # within shutdown_timeout, the downloads still running
        assert idle.recv(65536) == b"", "an idle connection is closed at once, so its client opens another"
        idle.close()
        assert moorage.wait(15) == 0  # no second signal: that would cut at once
        cold.wait(10)
        warm.wait(10)
        assert ending.wait(10) == 0 and images.sha256_digest(received.read_bytes()) == short_digest
        assert not any((moorage.store / "tmp").iterdir())
        cut = [line for line in moorage.log_lines() if line.get("event") == "request" and digest in line["path"]]
        assert sorted((line["status"], line.get("error"), line.get("result")) for line in cut) == [
            (503, "SHUTDOWN", "hit"),
            (503, "SHUTDOWN", "miss"),
        ]
        (stopping,) = [log_time(line) for line in moorage.log_lines() if line.get("event") == "stopping"]
        waited = [log_time(line) - stopping for line in cut]
        assert all(1.9 <= seconds < 3.5 for seconds in waited), waited


def test_a_second_sigterm_cuts_at_once(seeded: Seeded, tmp_path: Path) -> None:
    """As a second Ctrl-C does: an operator who will not wait for shutdown_timeout."""
    registry = seeded.registry
    source = tmp_path / "slow.bin"
    digest = images.write_random_file(source, 32 * MiB, seed=14)
    images.push_blob(registry.url, "library/slow", source)
    with start_moorage(tmp_path / "m", registry, shutdown_timeout="60s") as moorage:
        slow = subprocess.Popen(
            ["curl", "-s", "--limit-rate", "2M", "-o", "/dev/null", f"{moorage.url}/v2/slow/blobs/{digest}"]
        )
        time.sleep(1.0)
        os.kill(moorage.pid, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(moorage.pid, signal.SIGTERM)
        assert moorage.wait(15) == 0
        slow.terminate()  # it may still read what the kernel had buffered, at 2 MB/s
        slow.wait(10)
        (cut,) = [line for line in moorage.log_lines() if line.get("event") == "request" and digest in line["path"]]
        assert (cut["status"], cut.get("error")) == (503, "SHUTDOWN")
        (stopping,) = [log_time(line) for line in moorage.log_lines() if line.get("event") == "stopping"]
        assert log_time(cut) - stopping < 5, "cut at the second signal, not after shutdown_timeout"


def test_a_stop_with_a_shutdown_delay_leaves_the_load_balancer_time_to_look_away(
    seeded: Seeded, tmp_path: Path
) -> None:
    """After SIGTERM, for ``shutdown_delay``, /readyz fails while pulls are still served, new
    connections too (a Service's endpoints drop the pod only once its readiness fails; a pull
    is many requests). A SIGHUP without TLS reloads nothing and ends nothing."""
    registry = seeded.registry
    source = tmp_path / "blob.bin"
    digest = images.write_random_file(source, 2 * MiB, seed=15)
    images.push_blob(registry.url, "library/app", source)
    with start_moorage(tmp_path / "m", registry, shutdown_delay="3s", shutdown_timeout="2s") as moorage:
        os.kill(moorage.pid, signal.SIGHUP)
        time.sleep(0.3)
        with pytest.raises(subprocess.TimeoutExpired):  # SIGHUP's default would have ended it
            moorage.wait(0.1)
        assert [line for line in moorage.log_lines() if line.get("event") == "sighup"]
        os.kill(moorage.pid, signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError) as readiness:
            urllib.request.urlopen(f"{moorage.url}/readyz", timeout=5)
        assert readiness.value.code == 503
        assert json.loads(readiness.value.read())["status"] == "stopping"
        with urllib.request.urlopen(f"{moorage.url}/v2/app/blobs/{digest}", timeout=10) as pulled:
            assert images.sha256_digest(pulled.read()) == digest, "still served on a new connection"
        assert moorage.wait(15) == 0
        (stopping,) = [log_time(line) for line in moorage.log_lines() if line.get("event") == "stopping"]
        (stopped,) = [log_time(line) for line in moorage.log_lines() if line.get("event") == "stopped"]
        assert stopped - stopping >= 2.9, "the delay is served in full"


def read_response(connection: socket.socket) -> bytes:
    """One whole response with a Content-Length, however the segments fall."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    (length,) = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    while len(body) < length:
        body += connection.recv(65536)
    return data


def log_time(line: dict[str, object]) -> float:
    return datetime.strptime(str(line["time"]), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def store_metric(moorage: MoorageProcess) -> float:
    with urllib.request.urlopen(f"{moorage.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    (line,) = [line for line in text.splitlines() if line.startswith("moorage_store_bytes ")]
    return float(line.split()[1])


def bytes_on_disk(store: Path) -> int:
    return sum(path.stat().st_size for path in (store / "blobs").rglob("*") if path.is_file())


def test_after_kill_9_the_store_is_counted_again_and_its_cap_holds(seeded: Seeded, tmp_path: Path) -> None:
    """The daemon writes its store totals every 10 s: a crash loses its last seconds of them.
    The next start finds the store was not closed cleanly and counts it, so the size metric
    and the size cap (which acts on that size) are true again."""
    registry = seeded.registry
    store = tmp_path / "store"
    with start_moorage(tmp_path / "first", registry, storage={"path": str(store)}) as moorage:
        skopeo_copy(f"docker://{moorage.host}/app:1", f"dir:{tmp_path / 'a'}")
        assert not [line for line in moorage.log_lines() if line.get("event") == "store_counted"], "a new store"
        moorage.kill()  # within the 10 s between flushes: the pull is in no total yet
    on_disk = bytes_on_disk(store)
    assert on_disk > 3 * MiB
    cap = 2 * MiB  # below what the crash left: only a count can tell
    with start_moorage(tmp_path / "second", registry, storage={"path": str(store), "max_size": cap}) as moorage:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and bytes_on_disk(store) > 0.85 * cap:
            time.sleep(0.05)
        assert bytes_on_disk(store) <= 0.85 * cap, "counted, found above the cap, evicted"
        while time.monotonic() < deadline and store_metric(moorage) != bytes_on_disk(store):
            time.sleep(0.05)  # the files go before the pass hands its count to the event loop
        assert store_metric(moorage) == bytes_on_disk(store)
        assert [line["event"] for line in moorage.log_lines() if line.get("event") == "store_counted"] == [
            "store_counted"
        ]
    with start_moorage(tmp_path / "third", registry, storage={"path": str(store)}) as moorage:
        assert store_metric(moorage) == bytes_on_disk(store), "a clean stop wrote the totals"
        assert not [line for line in moorage.log_lines() if line.get("event") == "store_counted"], "no count needed"


def test_cached_tags_pull_while_the_upstream_is_down(seeded: Seeded, tmp_path: Path) -> None:
    # A registry of its own: this test stops it.
    with RealRegistry(tmp_path / "registry") as registry:
        layout = tmp_path / "layout"
        images.write_oci_image(layout, "x", [images.random_layer(256 * 1024, 7)])
        image = images.push(layout, "x", registry.host, "library/down", "1")
        with start_moorage(tmp_path / "m", registry, tag_ttl="1s") as moorage:
            skopeo_copy(f"docker://{moorage.host}/down:1", f"dir:{tmp_path / 'a'}")
            registry.stop()
            time.sleep(1.2)  # the tag is stale now: revalidation fails, the stale answer is served
            skopeo_copy(f"docker://{moorage.host}/down:1", f"dir:{tmp_path / 'b'}")
            assert_dir_image(tmp_path / "b", image)
            stale = [line for line in moorage.log_lines() if line.get("result") == "stale"]
            assert stale, "the manifest must have been answered stale"


def test_a_tag_list_is_paged_for_the_client_when_the_upstream_ignores_n(
    moorage: MoorageProcess, seeded: Seeded, tmp_path: Path
) -> None:
    """The spec has a tag list asked for with n hold at most n tags and a Link to the next
    page. Distribution 2.x answers every tag whatever n and last say; a client paging through
    it got the whole list on every page and looped, or stopped at the first page's size."""
    layout = tmp_path / "layout"
    images.write_oci_image(layout, "paged", [images.random_layer(1024, 70)])
    for tag in ("v1", "v2", "v3"):
        images.push(layout, "paged", seeded.registry.host, "library/paged", tag)
    with urllib.request.urlopen(f"{seeded.registry.url}/v2/library/paged/tags/list?n=2", timeout=30) as direct:
        assert len(json.load(direct)["tags"]) == 3, "the premise: this upstream ignores n"

    def page(query: str) -> tuple[list[str], str | None]:
        with urllib.request.urlopen(f"{moorage.url}/v2/library/paged/tags/list?{query}", timeout=30) as response:
            return json.load(response)["tags"], response.headers.get("Link")

    first, link = page("n=2")
    assert first == ["v1", "v2"]
    assert link == '</v2/library/paged/tags/list?last=v2&n=2>; rel="next"'
    rest, link = page("n=2&last=v2")
    assert rest == ["v3"] and link is None
    whole, link = page("n=3")
    assert whole == ["v1", "v2", "v3"] and link is None
    assert page("")[0] == ["v1", "v2", "v3"], "without n, the whole list"
    # The spec's page is the tags lexically after last, whether or not last is a tag there
    # (one deleted between two pages): the first page came back, and a client paging by
    # Link got its tags twice.
    assert page("n=2&last=v15") == (["v2", "v3"], None)
    assert page("n=2&last=zzz") == ([], None)
    assert page("last=v1") == (["v2", "v3"], None), "last without n"
    # A last that is no tag, with n beyond the list: this upstream's answer of every tag was
    # passed on, tags before last and all.
    assert page("n=10&last=v15") == (["v2", "v3"], None)


def test_a_whole_tag_list_is_in_lexical_order(moorage: MoorageProcess, seeded: Seeded, tmp_path: Path) -> None:
    """The spec has every tag list in lexical order; Distribution 2.x answers in the order its
    storage lists the tags' directories, which the cache passed on."""
    layout = tmp_path / "layout"
    images.write_oci_image(layout, "unsorted", [images.random_layer(1024, 72)])
    tags = ["b", "Z", "10", "a", "latest", "2"]
    for tag in tags:
        images.push(layout, "unsorted", seeded.registry.host, "library/unsorted", tag)
    with urllib.request.urlopen(f"{seeded.registry.url}/v2/library/unsorted/tags/list", timeout=30) as direct:
        assert sorted(json.load(direct)["tags"]) == sorted(tags)
    with urllib.request.urlopen(f"{moorage.url}/v2/library/unsorted/tags/list", timeout=30) as response:
        assert json.load(response)["tags"] == ["10", "2", "Z", "a", "b", "latest"]


def test_without_the_upstreams_referrers_api_clients_find_referrers_by_the_tag_schema(
    moorage: MoorageProcess, seeded: Seeded, tmp_path: Path
) -> None:
    """Distribution 2.x has no referrers API. Through the cache a client is told so with the
    spec's 404, once per ``referrers_ttl`` at the upstream, and finds the referrers where OCI 1.1
    clients (cosign, notation, oras) then look: the index tagged ``sha256-<hex>``."""
    registry = seeded.registry
    layout = tmp_path / "layout"
    images.write_oci_image(layout, "signed", [images.random_layer(4096, 71)])
    image = images.push(layout, "signed", registry.host, "library/signed", "1")
    empty = images.push_blob(registry.url, "library/signed", b"{}")
    signature_type = "application/vnd.dev.cosign.artifact.sig.v1+json"
    signature = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": signature_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}],
            "subject": {"mediaType": image.media_type, "digest": image.manifest_digest, "size": image.manifest_size},
        }
    ).encode()
    signature_digest = "sha256:" + hashlib.sha256(signature).hexdigest()
    images.push_manifest(
        registry.url, "library/signed", signature_digest, signature, "application/vnd.oci.image.manifest.v1+json"
    )
    fallback_tag = "sha256-" + image.manifest_digest.removeprefix("sha256:")
    fallback = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": signature_digest,
                "size": len(signature),
                "artifactType": signature_type,
            }
        ],
    }
    images.push_manifest(
        registry.url,
        "library/signed",
        fallback_tag,
        json.dumps(fallback).encode(),
        "application/vnd.oci.image.index.v1+json",
    )

    mark = registry.mark()
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{moorage.url}/v2/library/signed/referrers/{image.manifest_digest}", timeout=30)
        assert refused.value.code == 404
        assert json.loads(refused.value.read())["errors"][0]["code"] == "UNSUPPORTED"
    asked = [request for request in registry.requests_since(mark) if "/referrers/" in request.path]
    assert len(asked) == 1, "the upstream's 404 is kept for referrers_ttl"

    listed = json.loads(skopeo_inspect_raw(f"{moorage.host}/library/signed:{fallback_tag}"))
    assert [entry["digest"] for entry in listed["manifests"]] == [signature_digest]
    assert skopeo_inspect_raw(f"{moorage.host}/library/signed@{signature_digest}") == signature


def test_a_not_found_says_what_the_upstream_said(moorage: MoorageProcess, seeded: Seeded) -> None:
    """Distribution refuses an OCI index to a client that takes no index, with a 404 that says
    so; through the cache the client read only "not found", for a tag that is there."""
    request = urllib.request.Request(
        f"{moorage.url}/v2/library/multi/manifests/1",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 404
    (error,) = json.load(refused.value)["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "the upstream says: OCI index found, but accept header does not support OCI indexes" in error["message"]
