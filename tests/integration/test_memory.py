"""Memory does not grow with blob size or client count: a 1 GiB layer to 8 clients, cold
(every client follows the one fill) and warm (sendfile), measured on the server process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .harness import images
from .harness.moorage import MoorageProcess
from .harness.registry import RealRegistry
from .harness.tools import require_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GiB = 1024**3
CLIENTS = 8
MAX_GROWTH_MIB = 64


def pull_concurrently(url: str) -> list[str]:
    """Digests of what ``CLIENTS`` concurrent curl downloads received."""
    curl = require_tool("curl")
    procs = [
        subprocess.Popen(f"{curl} -sf {url} | sha256sum", shell=True, stdout=subprocess.PIPE, text=True)
        for _ in range(CLIENTS)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return ["sha256:" + out.split()[0] for out in outputs]


def test_one_gib_blob_to_eight_clients_in_bounded_memory(tmp_path: Path) -> None:
    with RealRegistry(tmp_path / "registry") as registry:
        source = tmp_path / "layer.bin"
        digest = images.write_random_file(source, GiB, seed=11)
        images.push_blob(registry.url, "library/big", source)
        source.unlink()
        upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
        with MoorageProcess(tmp_path / "moorage", upstreams) as moorage:
            url = f"{moorage.url}/v2/big/blobs/{digest}"
            baseline = moorage.memory_kib()["VmRSS"]
            mark = registry.mark()
            assert pull_concurrently(url) == [digest] * CLIENTS
            cold_peak = moorage.memory_kib()["VmHWM"]
            assert registry.count("GET", RealRegistry.blob_path("library/big", digest), since=mark) == 1
            assert pull_concurrently(url) == [digest] * CLIENTS
            warm_peak = moorage.memory_kib()["VmHWM"]
            growth_mib = (warm_peak - baseline) / 1024
            print(
                f"\nRSS: baseline {baseline / 1024:.1f} MiB, peak after cold {cold_peak / 1024:.1f} MiB, "
                f"after warm {warm_peak / 1024:.1f} MiB; growth {growth_mib:.1f} MiB"
            )
            assert growth_mib < MAX_GROWTH_MIB
