"""Pre-pulling images into the cache (``moorage warm``): CI warm-up and air-gap preparation.

It pulls through a running Moorage like any client would: the manifest, the chosen platforms'
manifests, then every config and layer, read and discarded. With no daemon it starts one in
this process on the store (see ``_serve.running``). Blobs are fetched a few at a time, each
with its own progress bar.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS, INDEX_MEDIA_TYPES, ImageReference

__all__ = ["WarmFailed", "WarmedImage", "platform_matches", "progress_bars", "warm"]

PARALLEL_BLOBS: Final = 4
CHUNK: Final = 1024 * 1024


class WarmFailed(Exception):
    """An image could not be pulled through the cache; the message says which and why."""


@dataclass
class WarmedImage:
    image: str
    digest: str
    platforms: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    #: How the cache answered each request (hit, miss, coalesced, ...).
    results: Counter[str] = field(default_factory=Counter)


def platform_matches(entry: dict[str, Any], wanted: str) -> bool:
    platform = entry.get("platform") or {}
    parts = wanted.split("/")
    have = [platform.get("os", ""), platform.get("architecture", ""), platform.get("variant", "")]
    return all(want == got for want, got in zip(parts, have, strict=False))


def _platform_name(entry: dict[str, Any]) -> str:
    platform = entry.get("platform") or {}
    return "/".join(p for p in (platform.get("os"), platform.get("architecture"), platform.get("variant")) if p)


async def warm(
    base_url: str, images: Sequence[ImageReference], platforms: Sequence[str] | None, progress: Progress | None
) -> list[WarmedImage]:
    """Pull each image through the cache at ``base_url``; ``platforms`` None means every one."""
    timeout = aiohttp.ClientTimeout(sock_connect=30, sock_read=300)
    async with aiohttp.ClientSession(base_url=base_url, timeout=timeout) as session:
        return [await _warm_one(session, image, platforms, progress) for image in images]


async def _get_manifest(
    session: aiohttp.ClientSession, image: ImageReference, reference: str, warmed: WarmedImage
) -> tuple[dict[str, Any], str, str]:
    url = f"/v2/{image.repository}/manifests/{reference}"
    async with session.get(url, params={"ns": image.registry}, headers={"Accept": ACCEPT_ALL_MANIFESTS}) as response:
        body = await response.read()
        if response.status != 200:
            raise WarmFailed(f"{image}: {_error_text(response.status, body)}")
        warmed.results[response.headers.get("X-Moorage-Cache", "unknown")] += 1
        return json.loads(body), response.headers["Content-Type"], response.headers["Docker-Content-Digest"]


def _error_text(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["errors"][0]
        return f"HTTP {status} {error['code']}: {error['message']}"
    except (ValueError, KeyError, IndexError, TypeError):
        return f"HTTP {status}"


async def _warm_one(
    session: aiohttp.ClientSession, image: ImageReference, platforms: Sequence[str] | None, progress: Progress | None
) -> WarmedImage:
    warmed = WarmedImage(str(image), "")
    document, media_type, warmed.digest = await _get_manifest(session, image, str(image.reference), warmed)
    manifests = [document]
    if media_type in INDEX_MEDIA_TYPES or "manifests" in document:
        entries = [
            entry
            for entry in document.get("manifests", [])
            if platforms is None or any(platform_matches(entry, wanted) for wanted in platforms)
        ]
        if not entries:
            raise WarmFailed(f"{image}: no platform matches {', '.join(platforms or [])}")
        manifests = []
        for entry in entries:
            warmed.platforms.append(_platform_name(entry))
            child, _, _ = await _get_manifest(session, image, entry["digest"], warmed)
            manifests.append(child)
    blobs: dict[str, int] = {}
    for manifest in manifests:
        for descriptor in [manifest.get("config", {}), *manifest.get("layers", [])]:
            if descriptor.get("digest"):
                blobs[descriptor["digest"]] = int(descriptor.get("size", 0))
    limit = asyncio.Semaphore(PARALLEL_BLOBS)

    async def fetch(blob: str, size: int) -> None:
        async with limit:
            task = progress.add_task(blob[7:19], total=size) if progress else None
            url = f"/v2/{image.repository}/blobs/{blob}"
            async with session.get(url, params={"ns": image.registry}) as response:
                if response.status != 200:
                    raise WarmFailed(f"{image}: blob {blob}: {_error_text(response.status, await response.read())}")
                warmed.results[response.headers.get("X-Moorage-Cache", "unknown")] += 1
                async for chunk in response.content.iter_chunked(CHUNK):
                    warmed.bytes += len(chunk)
                    if progress is not None and task is not None:
                        progress.update(task, advance=len(chunk))
            warmed.blobs += 1

    await asyncio.gather(*(fetch(blob, size) for blob, size in blobs.items()))
    return warmed


def progress_bars(console: Console) -> Progress:
    """A bar per blob on a terminal; nothing when the output is not one."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    )
