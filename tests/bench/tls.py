"""Warm blob throughput with Moorage's own TLS on and off (``python -m tests.bench.tls``).

Python's TLS cannot use sendfile, so this is the figure that decides where to terminate TLS.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration.harness import images
from tests.integration.harness.moorage import MoorageProcess
from tests.integration.harness.registry import RealRegistry
from tests.integration.harness.tools import self_signed_certificate

GiB = 1024**3


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="moorage-tls-bench-"))
    try:
        cert, key = self_signed_certificate(work, "bench")
        registry = RealRegistry(work / "registry", extra_config={"log": {"level": "warn"}})
        blob = work / "blob.bin"
        digest = images.write_random_file(blob, GiB, 9)
        images.push_blob(registry.url, "library/t", blob)
        blob.unlink()
        for tls in (False, True):
            settings: dict[str, Any] = {"tls": {"cert_file": str(cert), "key_file": str(key)}} if tls else {}
            upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
            with MoorageProcess(work / f"moorage-{tls}", upstreams, **settings) as moorage:
                url = f"{moorage.url}/v2/t/blobs/{digest}"
                ca = ["--cacert", str(cert)] if tls else []
                subprocess.run(["curl", "-sf", "-o", "/dev/null", *ca, url], check=True)  # fill
                for streams in (1, 16):
                    started = time.monotonic()
                    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", *ca, url]) for _ in range(streams)]
                    assert all(p.wait(900) == 0 for p in procs)
                    rate = streams * GiB / (time.monotonic() - started) / 1e6
                    print(
                        json.dumps(
                            {
                                "tls": tls,
                                "streams": streams,
                                "MB/s": round(rate),
                                "peak_rss_MiB": moorage.memory_kib()["VmHWM"] // 1024,
                            }
                        ),
                        flush=True,
                    )
        registry.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
