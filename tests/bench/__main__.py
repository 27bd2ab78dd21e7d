"""The benchmark: what Moorage takes from the upstream and how fast it serves what it holds,
measured in one run beside the references a user would compare it with.

- upstream: Debian's ``docker-registry`` seeded with a 300 MB image in 8 layers, a 25 MB image
  in 12 small layers (as most application images are), an image with a 1 GiB layer and 40
  small repositories; its access log counts what reaches it;
- distribution: the same binary in proxy mode (``proxy.remoteurl``), what most users run;
- nginx: the 1 GiB blob as a static file with sendfile, the physical limit here; and over
  TLS, the reference for Moorage's own TLS;
- direct: skopeo pulling from the upstream itself, the floor for a cold pull;
- moorage: ``moorage serve`` on a fresh store (and once more with prefetching off);
- a long link (``link``) in front of the upstream, for cold pulls as across the internet.

Every load is bounded in count and time and stays on 127.0.0.1. Prints one table with ratios
and one JSON line per figure. ``--quick`` shrinks images and load for a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.integration.harness import images
from tests.integration.harness.moorage import MoorageProcess
from tests.integration.harness.process import BackgroundProcess
from tests.integration.harness.registry import RealRegistry
from tests.integration.harness.tools import free_port, require_tool, self_signed_certificate

from .link import Link

MiB = 1024 * 1024
#: Rounds of each warm-blob measurement (median reported).
WARM_ROUNDS = 3
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = {"Accept": f"{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json"}
SYSTEMS = ("moorage", "distribution", "nginx", "direct")
#: The link of a cold pull across the internet: rate per connection (bytes/s) and round trip.
LINK_RATE = 25e6
LINK_RTT = 0.020
#: Layer sizes (MiB) of library/layered:1, an image of small layers (24 MiB in all).
LAYERED_MIB = (2, 0.5, 3, 1, 4, 0.2, 3, 1.5, 2, 4, 1, 2)


@dataclass
class Figure:
    name: str
    unit: str
    #: True when a larger number is better (throughput), False for times and counts.
    higher_is_better: bool
    values: dict[str, float] = field(default_factory=dict)
    target: str = ""


class Report:
    def __init__(self) -> None:
        self.figures: list[Figure] = []

    def add(self, name: str, unit: str, higher: bool, values: Mapping[str, float | None], target: str = "") -> None:
        figure = Figure(name, unit, higher, {k: v for k, v in values.items() if v is not None}, target)
        self.figures.append(figure)
        print(json.dumps({"figure": name, "unit": unit, **figure.values}), flush=True)

    def table(self) -> str:
        head = f"{'figure':<44} {'unit':<9}" + "".join(f"{s:>13}" for s in SYSTEMS)
        head += f"{'M/dist':>9}{'M/nginx':>9}  target"
        lines = [head, "-" * len(head)]
        for f in self.figures:
            cells = "".join(f"{_fmt(f.values.get(s)):>13}" for s in SYSTEMS)
            lines.append(
                f"{f.name:<44} {f.unit:<9}{cells}{_ratio(f, 'distribution'):>9}{_ratio(f, 'nginx'):>9}  {f.target}"
            )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def _ratio(figure: Figure, other: str) -> str:
    mine, theirs = figure.values.get("moorage"), figure.values.get(other)
    if mine is None or not theirs:
        return "-"
    return f"{mine / theirs:.2f}"


@dataclass
class Seed:
    big: str  # library/big:1, 8 layers
    big_blobs: list[str]
    huge_blob: str
    huge_file: Path
    huge_size: int
    small_digest: str  # small/app-0:1


def seed(registry: RealRegistry, work: Path, layer_size: int, huge_size: int) -> Seed:
    """Images pushed through the registry API (raw random layers: skopeo copies them to dir:
    without unpacking, and gzip would only cost seeding time)."""
    started = time.monotonic()
    layers = []
    for i in range(8):
        data = images.random_layer(layer_size, 100 + i)
        layers.append((images.push_blob(registry.url, "library/big", data), len(data)))
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    config_digest = images.push_blob(registry.url, "library/big", config)
    manifest = _manifest((config_digest, len(config)), layers)
    big = images.push_manifest(registry.url, "library/big", "1", manifest, OCI_MANIFEST)
    small_layers = []
    for i, size in enumerate(LAYERED_MIB):
        data = images.random_layer(int(size * MiB), 200 + i)
        small_layers.append((images.push_blob(registry.url, "library/layered", data), len(data)))
    layered_config = images.push_blob(registry.url, "library/layered", config)
    layered = _manifest((layered_config, len(config)), small_layers)
    images.push_manifest(registry.url, "library/layered", "1", layered, OCI_MANIFEST)
    huge_file = work / "huge.bin"
    huge_blob = images.write_random_file(huge_file, huge_size, seed=7)
    images.push_blob(registry.url, "library/huge", huge_file)
    huge_config = images.push_blob(registry.url, "library/huge", config)
    images.push_manifest(
        registry.url, "library/huge", "1", _manifest((huge_config, len(config)), [(huge_blob, huge_size)]), OCI_MANIFEST
    )
    small_digest = ""
    for i in range(40):
        layer = images.random_layer(4096, 1000 + i)
        layer_digest = images.push_blob(registry.url, f"small/app-{i}", layer)
        small_config = images.push_blob(registry.url, f"small/app-{i}", config)
        body = _manifest((small_config, len(config)), [(layer_digest, len(layer))])
        digest = images.push_manifest(registry.url, f"small/app-{i}", "1", body, OCI_MANIFEST)
        small_digest = small_digest or digest
    print(f"# seeded in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return Seed(big, [config_digest, *(d for d, _ in layers)], huge_blob, huge_file, huge_size, small_digest)


def _manifest(config: tuple[str, int], layers: list[tuple[str, int]]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config[0], "size": config[1]},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s} for d, s in layers
            ],
        }
    ).encode()


# -- the systems under test ------------------------------------------------------------------------


class System:
    name: str
    host: str
    repo_prefix: str = ""

    def pid(self) -> int:
        raise NotImplementedError

    def peak_rss_mib(self) -> float:
        return _status(self.pid(), "VmHWM") / 1024

    def image(self, repository: str) -> str:
        return f"{self.repo_prefix}{repository}"


def _status(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


class MoorageSystem(System):
    name = "moorage"

    def __init__(self, work: Path, upstream_url: str, prefetch_blobs: int | None = None) -> None:
        upstream: dict[str, object] = {"host": "docker.io", "url": upstream_url, "default": True}
        if prefetch_blobs is not None:
            upstream["prefetch_blobs"] = prefetch_blobs
        self.process = MoorageProcess(work, [upstream])
        self.host = self.process.host

    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.stop()


class DistributionSystem(System):
    name = "distribution"

    def __init__(self, work: Path, upstream_url: str) -> None:
        self.registry = RealRegistry(
            work, extra_config={"proxy": {"remoteurl": upstream_url}, "log": {"level": "warn"}}
        )
        self.host = self.registry.host

    def pid(self) -> int:
        assert self.registry._proc is not None
        return self.registry._proc.pid

    def stop(self) -> None:
        self.registry.stop()


class DirectSystem(System):
    name = "direct"

    def __init__(self, upstream: RealRegistry, host: str | None = None) -> None:
        self.registry = upstream
        #: Where skopeo pulls from: the upstream itself, or a link in front of it.
        self.host = host or upstream.host

    def pid(self) -> int:
        assert self.registry._proc is not None
        return self.registry._proc.pid


class NginxSystem(System):
    name = "nginx"

    def __init__(self, work: Path, blob: Path, digest: str, tls: tuple[Path, Path] | None = None) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        port = free_port()
        # Over TLS nginx encrypts in user space too (no kernel TLS here), sendfile off.
        listen = (
            f"listen 127.0.0.1:{port} ssl; ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};"
            if tls is not None
            else f"listen 127.0.0.1:{port};"
        )
        root = work / "root" / "v2" / "library" / "huge" / "blobs"
        root.mkdir(parents=True)
        os.link(blob, root / digest) if blob.stat().st_dev == root.stat().st_dev else shutil.copy(blob, root / digest)
        (work / "logs").mkdir()
        conf = work / "nginx.conf"
        conf.write_text(
            f"""daemon off; master_process off; worker_processes 1; user root;
error_log {work}/logs/error.log; pid {work}/nginx.pid;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; sendfile_max_chunk 0; tcp_nopush on; keepalive_requests 100000;
  client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp;
  uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  server {{ {listen} root {work}/root; default_type application/octet-stream; }} }}
"""
        )
        self.process = BackgroundProcess(
            [nginx, "-c", str(conf), "-p", str(work)],
            stdout=work / "logs" / "out.log",
            stderr=work / "logs" / "out.log",
        )
        self.host = f"127.0.0.1:{port}"
        _wait_http(f"{'https' if tls else 'http'}://{self.host}/v2/library/huge/blobs/{digest}")

    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.stop()


def _wait_http(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # -k: only "are you up?", over TLS too
        if subprocess.run(["curl", "-sfkI", "-o", "/dev/null", url], check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


# -- measurements ----------------------------------------------------------------------------------


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    started = time.monotonic()
    end: list[float] = []
    yield lambda: (end[0] if end else time.monotonic()) - started
    end.append(time.monotonic())


def skopeo_pull(system: System, image: str, out_root: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=out_root))
    try:
        with timed() as elapsed:
            subprocess.run(
                [
                    "skopeo",
                    "copy",
                    "-q",
                    "--src-tls-verify=false",
                    f"docker://{system.host}/{system.image(image)}",
                    f"dir:{out}",
                ],
                check=True,
                capture_output=True,
                timeout=600,
            )
        return elapsed()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def curl_pulls(system: System, repository: str, blobs: list[str], clients: int) -> float:
    """``clients`` concurrent pulls (manifest, then every blob), bytes discarded; wall seconds."""
    base = f"http://{system.host}/v2/{system.image(repository)}"
    argv = ["curl", "-sf", "-H", f"Accept: {ACCEPT['Accept']}", "-o", "/dev/null", f"{base}/manifests/1"]
    for blob in blobs:
        argv += ["-o", "/dev/null", f"{base}/blobs/{blob}"]
    with timed() as elapsed:
        procs = [subprocess.Popen(argv) for _ in range(clients)]
        codes = [p.wait(600) for p in procs]
    if any(codes):
        raise RuntimeError(f"{system.name}: a concurrent pull failed: {codes}")
    return elapsed()


def get_manifest(system: System, path: str) -> None:
    """One manifest GET (fills the cache, or counts what a pull costs upstream)."""
    subprocess.run(
        ["curl", "-sf", "-o", "/dev/null", "-H", f"Accept: {ACCEPT['Accept']}", f"http://{system.host}/{path}"],
        check=True,
    )


def blob_throughput(url: str, streams: int, size: int, ca: Path | None = None) -> float:
    """Aggregate MB/s of ``streams`` concurrent downloads of one blob (over TLS, trusting ``ca``)."""
    trust = ["--cacert", str(ca)] if ca is not None else []
    with timed() as elapsed:
        procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", *trust, url]) for _ in range(streams)]
        codes = [p.wait(600) for p in procs]
    if any(codes):
        raise RuntimeError(f"download of {url} failed: {codes}")
    return streams * size / elapsed() / 1e6


def wrk(url: str, seconds: int, connections: int, accept: bool = True) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) with wrk on one thread."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if accept:
        argv[1:1] = ["-H", f"Accept: {ACCEPT['Accept']}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk {url}: {errors.group(1)} error responses")
    return rate, _latency(out, "50%"), _latency(out, "99%")


def _latency(out: str, percentile: str) -> float:
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def head_load(url: str, requests: int, concurrency: int) -> tuple[float, float, float]:
    """HEAD load (wrk cannot): (requests/s, p50 ms, p99 ms), bounded by ``requests``."""
    latencies: list[float] = []
    queue = list(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            while queue:
                queue.pop()
                started = time.perf_counter()
                async with session.head(url, headers=ACCEPT) as response:
                    assert response.status == 200, response.status
                latencies.append((time.perf_counter() - started) * 1000)

        with timed() as elapsed:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    return requests / elapsed(), latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]


def upstream_gets_per_blob(upstream: RealRegistry, since: int, blobs: list[str]) -> float:
    gets = sum(1 for r in upstream.requests_since(since) if r.method == "GET" and r.path.rsplit("/", 1)[-1] in blobs)
    return gets / len(blobs)


def upstream_requests(upstream: RealRegistry, since: int) -> int:
    return len(upstream.requests_since(since))


# -- the run ---------------------------------------------------------------------------------------


def fresh(kind: str, work: Path, upstream: RealRegistry | Link) -> MoorageSystem | DistributionSystem:
    """A cache of ``kind`` on an empty store, in front of ``upstream`` (or a link to it)."""
    if kind == "moorage-no-prefetch":
        return fresh_moorage(work, upstream, prefetch_blobs=0)
    return (fresh_moorage if kind == "moorage" else fresh_distribution)(work, upstream)


def fresh_moorage(work: Path, upstream: RealRegistry | Link, prefetch_blobs: int | None = None) -> MoorageSystem:
    return MoorageSystem(Path(tempfile.mkdtemp(prefix="moorage-", dir=work)), upstream.url, prefetch_blobs)


def fresh_distribution(work: Path, upstream: RealRegistry | Link) -> DistributionSystem:
    return DistributionSystem(Path(tempfile.mkdtemp(prefix="distribution-", dir=work)), upstream.url)


@contextmanager
def part_of_run(name: str) -> Iterator[None]:
    """Say on stderr how long one part of the run took."""
    with timed() as elapsed:
        yield
    print(f"# {name}: {elapsed():.0f} s", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> Report:
    for tool in ("docker-registry", "skopeo", "wrk", "curl"):
        require_tool(tool)
    quick = args.quick
    layer_size = 4 * MiB if quick else 300 * MiB // 8
    huge_size = 64 * MiB if quick else 1024 * MiB
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="moorage-bench-", dir=args.workdir))
    shm = Path(tempfile.mkdtemp(prefix="moorage-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    upstream = RealRegistry(work / "upstream", extra_config={"log": {"level": "warn"}})
    try:
        data = seed(upstream, work, layer_size, huge_size)
        blobs = data.big_blobs
        image_mb = (8 * layer_size) / 1e6

        with part_of_run("cold pulls on one machine"):
            cold_pulls(report, upstream, work, shm, blobs, image_mb, args.repeat)
        with part_of_run("cold pulls over the link"):
            linked_cold_pulls(report, upstream, work, shm)
        if args.only == "cold":
            return report

        with part_of_run("concurrent cold pulls"):
            concurrent_cold_pulls(report, upstream, work, blobs)

        with part_of_run("warm blobs, manifests and memory"):
            serving_figures(report, upstream, work, data, quick)

        with part_of_run("warm blobs over TLS"):
            tls_figures(report, upstream, work, data)

        with part_of_run("index scale"):
            index_figures(report, work, quick)
        return report
    finally:
        upstream.stop()
        shutil.rmtree(shm, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pids: list[int], quiet: float = 0.05, window: float = 0.5, timeout: float = 60.0) -> None:
    """Wait until none of ``pids`` uses more than ``quiet`` CPU seconds per ``window``."""
    deadline = time.monotonic() + timeout
    before = [cpu_seconds(pid) for pid in pids]
    while time.monotonic() < deadline:
        time.sleep(window)
        now = [cpu_seconds(pid) for pid in pids]
        if all(after - earlier <= quiet for earlier, after in zip(before, now, strict=True)):
            return
        before = now
    raise RuntimeError(f"processes {pids} still busy after {timeout:g} s")


def children_cpu_seconds() -> float:
    """CPU time of the child processes this one has waited for (skopeo, curl)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cold_pulls(
    report: Report, upstream: RealRegistry, work: Path, shm: Path, blobs: list[str], image_mb: float, repeat: int
) -> None:
    """Cold pulls of the big image, one client, each on a fresh cache; the direct pull is the
    floor. ``repeat`` rounds, interleaved so that the systems share the machine's moods; the
    median of each is reported (a single cold pull varies by 10 to 30 % here). The CPU time
    each process spent on a pull is reported too: on a machine whose cores the client, the
    upstream and the cache share, their sum over the cores bounds how fast the pull can be."""
    samples: dict[str, list[float]] = {"moorage": [], "moorage-no-prefetch": [], "distribution": [], "direct": []}
    cpu: dict[str, dict[str, list[float]]] = {"cache": {}, "skopeo": {}, "upstream": {}}
    per_blob: dict[str, float] = {}
    upstream_pid = DirectSystem(upstream).pid()

    def pull(system: System, kind: str) -> None:
        before = (cpu_seconds(system.pid()), cpu_seconds(upstream_pid), children_cpu_seconds())
        samples[kind].append(skopeo_pull(system, "library/big:1", shm))
        after = (cpu_seconds(system.pid()), cpu_seconds(upstream_pid), children_cpu_seconds())
        if kind != "direct":
            cpu["cache"].setdefault(kind, []).append(after[0] - before[0])
        cpu["upstream"].setdefault(kind, []).append(after[1] - before[1])
        cpu["skopeo"].setdefault(kind, []).append(after[2] - before[2])

    for round_number in range(repeat):
        for kind in ("moorage", "moorage-no-prefetch", "distribution"):
            system = fresh(kind, work, upstream)
            try:
                mark = upstream.mark()
                pull(system, kind)
                per_blob[kind] = max(per_blob.get(kind, 0.0), upstream_gets_per_blob(upstream, mark, blobs))
                if round_number == 0 and kind in SYSTEMS:
                    mark = upstream.mark()
                    warm_seconds = skopeo_pull(system, "library/big:1", shm)
                    warm_requests = upstream_requests(upstream, mark)
                    report.add(f"warm pull {image_mb:.0f} MB image (skopeo)", "s", False, {kind: warm_seconds})
                    report.add("warm pull: upstream requests", "count", False, {kind: warm_requests}, "0")
            finally:
                system.stop()
        pull(DirectSystem(upstream), "direct")
    print(f"# cold pull samples (s): {json.dumps(samples)}", file=sys.stderr, flush=True)
    cold = {kind: statistics.median(values) for kind, values in samples.items()}
    off = cold.pop("moorage-no-prefetch")
    report.add(f"cold pull {image_mb:.0f} MB image (skopeo, median of {repeat})", "s", False, cold, "<= 1.1 x direct")
    report.add(
        "cold pull / direct pull",
        "ratio",
        False,
        {kind: cold[kind] / cold["direct"] for kind in ("moorage", "distribution")},
        "<= 1.1",
    )
    report.add("cold pull, prefetch_blobs: 0 / direct pull", "ratio", False, {"moorage": off / cold["direct"]})
    per_blob["moorage"] = max(per_blob["moorage"], per_blob.pop("moorage-no-prefetch"))
    report.add("cold pull: upstream GETs per blob", "count", False, per_blob, "1.00")
    medians = {
        who: {k: statistics.median(v) for k, v in by_kind.items() if k in SYSTEMS} for who, by_kind in cpu.items()
    }
    for who, label in (("cache", "the cache process"), ("skopeo", "skopeo"), ("upstream", "the upstream")):
        report.add(f"cold pull CPU: {label}", "s", False, medians[who])
    cores = os.cpu_count() or 1
    floor = {
        kind: sum(medians[who].get(kind, 0.0) for who in medians) / cores / cold["direct"]
        for kind in ("moorage", "distribution", "direct")
    }
    report.add(f"cold pull CPU / {cores} cores / direct pull", "ratio", False, floor)
    _merge_rows(report)


def linked_cold_pulls(report: Report, upstream: RealRegistry, work: Path, shm: Path) -> None:
    """One cold pull of each of two images (large layers, small layers) by each system through
    a long link (see ``link``), as across the internet, where each connection has a rate of
    its own. One round each: pulls bound by the link vary little."""
    host, _, port = upstream.host.rpartition(":")
    link = Link(host, int(port), LINK_RATE, LINK_RTT)
    layered_mb = sum(LAYERED_MIB) * MiB / 1e6
    layered = f"cold pull, {layered_mb:.0f} MB in {len(LAYERED_MIB)} layers, link"
    link_name = f"cold pull over a {LINK_RATE / 1e6:.0f} MB/s, {LINK_RTT * 1000:.0f} ms link"
    # The rate is per connection (see ``link``).
    labels = {
        "library/big:1": (link_name, "cold pull over the link / direct pull"),
        "library/layered:1": (layered, f"{layered} / direct"),
    }
    try:
        for image, (label, ratio_label) in labels.items():
            seconds: dict[str, float] = {}
            for kind in ("moorage", "distribution"):
                system = fresh(kind, work, link)
                try:
                    seconds[kind] = skopeo_pull(system, image, shm)
                finally:
                    system.stop()
            seconds["direct"] = skopeo_pull(DirectSystem(upstream, link.host), image, shm)
            report.add(label, "s", False, seconds)
            ratios = {kind: seconds[kind] / seconds["direct"] for kind in ("moorage", "distribution")}
            report.add(ratio_label, "ratio", False, ratios, "<= 1.1")
    finally:
        link.close()


def serving_figures(report: Report, upstream: RealRegistry, work: Path, data: Seed, quick: bool) -> None:
    """Serving what the caches hold: a warm 1 GiB blob beside nginx, manifests under load, a
    fresh tag's upstream requests, and the memory each server needed."""
    with ExitStack() as running:  # every server stopped, however the part ends
        _serving_figures(report, upstream, work, data, quick, running)


def _serving_figures(
    report: Report, upstream: RealRegistry, work: Path, data: Seed, quick: bool, running: ExitStack
) -> None:
    huge_size = data.huge_size
    load_seconds = 3 if quick else 8
    # Warm 1 GiB blob, then manifests, then peak memory while serving 16 streams.
    moorage = fresh_moorage(work, upstream)
    running.callback(moorage.stop)
    distribution = fresh_distribution(work, upstream)
    running.callback(distribution.stop)
    nginx = NginxSystem(work / "nginx", data.huge_file, data.huge_blob)
    running.callback(nginx.stop)
    urls = {
        s.name: f"http://{s.host}/v2/{s.image('library/huge')}/blobs/{data.huge_blob}"
        for s in (moorage, distribution, nginx)
    }
    for name in ("moorage", "distribution"):
        subprocess.run(["curl", "-sf", "-o", "/dev/null", urls[name]], check=True, timeout=600)  # fill
    # Both caches store the blob after the client has it: Moorage fsyncs it then, and
    # Distribution goes on copying it into its storage for seconds (a full core for 6 s
    # here). Wait until neither works any more, then write everything out, so that no
    # cache's storing runs during the measurements of serving a warm blob.
    settle([moorage.pid(), distribution.pid()])
    os.sync()
    # Rounds interleaved, median reported: one round here varies by up to a third.
    for streams in (1, 16):
        samples: dict[str, list[float]] = {name: [] for name in urls}
        for _ in range(WARM_ROUNDS):
            for name, url in urls.items():
                samples[name].append(blob_throughput(url, streams, huge_size))
        print(f"# warm {streams} stream(s) samples (MB/s): {json.dumps(samples)}", file=sys.stderr, flush=True)
        rates = {name: statistics.median(values) for name, values in samples.items()}
        target = ">= 0.9 x nginx, > distribution" if streams == 16 else ""
        label = f"warm {huge_size // MiB} MiB blob, {streams} stream(s), median of {WARM_ROUNDS}"
        report.add(label, "MB/s", True, rates, target)

    tag_path = "v2/small/app-0/manifests/1"
    digest_path = f"v2/small/app-0/manifests/{data.small_digest}"
    for system in (moorage, distribution):
        get_manifest(system, digest_path)
    for label, path in (("fresh tag", tag_path), ("digest", digest_path)):
        figures = {s.name: wrk(f"http://{s.host}/{path}", load_seconds, 16) for s in (moorage, distribution)}
        target = ">= 3000/s; >= 4 x dist by digest" if label == "fresh tag" else ""
        report.add(f"manifest GET by {label}", "req/s", True, {k: v[0] for k, v in figures.items()}, target)
        report.add(f"manifest GET by {label} p50", "ms", False, {k: v[1] for k, v in figures.items()})
        report.add(
            f"manifest GET by {label} p99",
            "ms",
            False,
            {k: v[2] for k, v in figures.items()},
            "< 20 ms" if label == "fresh tag" else "",
        )
    heads = {
        s.name: asyncio.run(head_load(f"http://{s.host}/{tag_path}", 1000 if quick else 5000, 16))
        for s in (moorage, distribution)
    }
    report.add("manifest HEAD by fresh tag", "req/s", True, {k: v[0] for k, v in heads.items()})
    report.add("manifest HEAD by fresh tag p99", "ms", False, {k: v[2] for k, v in heads.items()})
    mark = upstream.mark()
    get_manifest(moorage, tag_path)
    moorage_fresh = upstream_requests(upstream, mark)
    mark = upstream.mark()
    get_manifest(distribution, tag_path)
    report.add(
        "fresh tag pull: upstream requests",
        "count",
        False,
        {"moorage": moorage_fresh, "distribution": upstream_requests(upstream, mark)},
        "0",
    )
    report.add(
        "peak RSS during the run",
        "MiB",
        False,
        {
            "moorage": moorage.peak_rss_mib(),
            "distribution": distribution.peak_rss_mib(),
            "nginx": nginx.peak_rss_mib(),
        },
    )
    moorage.process.restart()
    blob_throughput(urls["moorage"], 16, huge_size)
    report.add(
        f"peak RSS serving 16 x {huge_size // MiB} MiB warm",
        "MiB",
        False,
        {"moorage": moorage.peak_rss_mib()},
        "<= 80",
    )


def tls_figures(report: Report, upstream: RealRegistry, work: Path, data: Seed) -> None:
    """The warm blob over each server's own TLS: Moorage (asyncio's TLS, no sendfile) and nginx
    (OpenSSL in its worker, sendfile off for TLS), one round each, each on its own store."""
    cert, key = self_signed_certificate(work / "tls")
    with ExitStack() as running:
        upstreams = [{"host": "docker.io", "url": upstream.url, "default": True}]
        moorage = MoorageProcess(work / "moorage-tls", upstreams, tls={"cert_file": str(cert), "key_file": str(key)})
        running.callback(moorage.stop)
        nginx = NginxSystem(work / "nginx-tls", data.huge_file, data.huge_blob, tls=(cert, key))
        running.callback(nginx.stop)
        urls = {
            "moorage": f"{moorage.url}/v2/library/huge/blobs/{data.huge_blob}",
            "nginx": f"https://{nginx.host}/v2/library/huge/blobs/{data.huge_blob}",
        }
        blob_throughput(urls["moorage"], 1, data.huge_size, cert)  # the fill
        settle([moorage.pid])
        for streams in (1, 16):
            rates = {name: blob_throughput(url, streams, data.huge_size, cert) for name, url in urls.items()}
            report.add(f"warm {data.huge_size // MiB} MiB blob over TLS, {streams} stream(s)", "MB/s", True, rates)
        report.add("peak RSS serving over TLS", "MiB", False, {"moorage": moorage.memory_kib()["VmHWM"] / 1024})


def concurrent_cold_pulls(report: Report, upstream: RealRegistry, work: Path, blobs: list[str]) -> None:
    """8 and 32 curl clients pulling the big image's blobs at once from each fresh cache, and
    how many times the upstream was asked for each blob."""
    for clients in (8, 32):
        seconds: dict[str, float] = {}
        gets: dict[str, float] = {}
        for kind in ("moorage", "distribution"):
            system = fresh(kind, work, upstream)
            try:
                mark = upstream.mark()
                seconds[kind] = curl_pulls(system, "library/big", blobs, clients)
                gets[kind] = upstream_gets_per_blob(upstream, mark, blobs)
            finally:
                system.stop()
        report.add(f"{clients} concurrent cold pulls (curl)", "s", False, seconds)
        report.add(f"{clients} concurrent cold pulls: GETs per blob", "count", False, gets, "1.00")


def _merge_rows(report: Report) -> None:
    """Fold the per-system warm rows added in the cold loop into one row each."""
    merged: dict[str, Figure] = {}
    kept: list[Figure] = []
    for figure in report.figures:
        if figure.name in merged:
            merged[figure.name].values.update(figure.values)
            continue
        merged[figure.name] = figure
        kept.append(figure)
    report.figures = kept


def index_figures(report: Report, work: Path, quick: bool) -> None:
    """Start-up time and tag-lookup cost with a large synthetic index (in a subprocess)."""
    blobs, tags = (100_000, 10_000) if quick else (1_000_000, 100_000)
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.index", str(work / "index-bench"), str(blobs), str(tags)],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    ).stdout
    figures = json.loads(out.splitlines()[-1])
    report.add(
        f"start-up, {blobs:,} blobs + {tags:,} tags",
        "s",
        False,
        {"moorage": figures["startup_seconds"]},
        "< 2 s",
    )
    report.add(
        f"tag lookup, {tags:,} tags (vs 100)",
        "us",
        False,
        {"moorage": figures["lookup_us_large"]},
        f"same as with 100 ({figures['lookup_us_small']} us)",
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="tests/bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images and short load (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--workdir", default=None, help="where to put stores and registries (default: $TMPDIR)")
    parser.add_argument("--repeat", type=int, default=5, help="cold pulls per system, median reported (default 5)")
    parser.add_argument("--only", choices=["cold"], default=None, help="measure only the cold pulls")
    args = parser.parse_args()
    started = time.monotonic()
    report = run(args)
    print()
    print(report.table())
    print(f"\n# {time.monotonic() - started:.0f} s on {os.cpu_count()} cores; python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
