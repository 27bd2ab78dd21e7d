"""CPU to read blob bodies from an upstream, over plain HTTP and TLS
(``python -m tests.bench.upstream_tls``).

Every public registry answers only over HTTPS, so each cold byte is decrypted in the cache's
process. This reads four 39 MB blobs from the Distribution registry (once over plain HTTP, once
over TLS with a self-signed certificate) with the registry client, in this process, and prints
one JSON line per way of reading: Moorage's (asyncio's transports, ``upstreams/_stream.py``,
and the body past h11, ``upstreams/_body.py``), the body through h11, and httpcore's default
anyio streams. The figure is CPU milliseconds per blob, the median of three rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import typing
from pathlib import Path

import httpcore
import httpx
import yaml

from moorage.config import UpstreamSettings
from moorage.upstreams import RegistryClient
from moorage.upstreams import _body as body_module
from moorage.upstreams._network import WideReadStream, wide_read_transport
from moorage.upstreams.reference import RepositoryName, parse_digest
from tests.integration.harness import images
from tests.integration.harness.registry import RealRegistry
from tests.integration.harness.tools import free_port, self_signed_certificate

BLOB_SIZE = 39_321_600
BLOBS = 4
ROUNDS = 3
REPOSITORY = RepositoryName("library/big")


class AnyioBackend(httpcore.AsyncNetworkBackend):
    """What the client used before: httpcore's anyio streams, with 1 MiB asks."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(self, *args: typing.Any, **kwargs: typing.Any) -> httpcore.AsyncNetworkStream:
        return WideReadStream(await self._backend.connect_tcp(*args, **kwargs))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class AnyioTransport(httpx.AsyncHTTPTransport):
    def __init__(self, limits: httpx.Limits) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            network_backend=AnyioBackend(),
        )


async def cpu_ms_per_blob(url: str, digests: list[str], streams: str, past_h11: bool) -> float:
    direct_of = body_module.DirectBody.of
    if not past_h11:
        body_module.DirectBody.of = classmethod(lambda cls, response: None)  # type: ignore[assignment]
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    trust = httpx.create_ssl_context()  # SSL_CERT_FILE, set above
    transport = wide_read_transport(limits, trust) if streams == "asyncio" else AnyioTransport(limits)
    client = RegistryClient(UpstreamSettings.model_validate({"host": "docker.io", "url": url}), transport=transport)
    samples = []
    try:
        for _ in range(ROUNDS):
            started = time.process_time()
            for digest in digests:
                async with client.open_blob(REPOSITORY, parse_digest(digest)) as body:
                    async for _chunk in body.chunks():
                        pass
            samples.append((time.process_time() - started) / len(digests) * 1000)
    finally:
        await client.aclose()
        body_module.DirectBody.of = direct_of  # type: ignore[method-assign]
    return statistics.median(samples)


async def measure(urls: dict[str, str], digests: list[str]) -> None:
    ways = (("asyncio", True, "Moorage"), ("asyncio", False, "through h11"), ("anyio", True, "anyio streams"))
    for scheme, url in urls.items():
        for streams, past_h11, label in ways:
            ms = await cpu_ms_per_blob(url, digests, streams, past_h11)
            line = {"upstream": scheme, "reading": label, "cpu_ms_per_39MB_blob": round(ms, 1)}
            print(json.dumps(line), flush=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="moorage-upstream-tls-bench-"))
    registry = RealRegistry(work / "registry", extra_config={"log": {"level": "warn"}})
    tls_process: subprocess.Popen[bytes] | None = None
    try:
        digests = [
            images.push_blob(registry.url, str(REPOSITORY), images.random_layer(BLOB_SIZE, 100 + i))
            for i in range(BLOBS)
        ]
        cert, key = self_signed_certificate(work, "bench")
        # A second registry process on the same storage, serving HTTPS.
        config = registry.config()
        port = free_port()
        config["http"]["addr"] = f"127.0.0.1:{port}"
        config["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
        (work / "tls.yml").write_text(yaml.safe_dump(config))
        tls_process = subprocess.Popen(
            [registry.binary, "serve", str(work / "tls.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        tls_url = f"https://127.0.0.1:{port}"
        os.environ["SSL_CERT_FILE"] = str(cert)  # the client trusts the self-signed certificate
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{tls_url}/v2/", verify=str(cert)).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        asyncio.run(measure({"http": registry.url, "https": tls_url}, digests))
    finally:
        if tls_process is not None:
            tls_process.terminate()
            tls_process.wait()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
