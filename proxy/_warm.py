"""Pre-pulling images into the cache (``moorage warm``): CI warm-up and air-gap preparation.

It pulls through a running Moorage like any client would: the manifest, the chosen platforms'
manifests, then every config and layer, read and discarded. With no daemon it starts one in
this process on the store (see ``_serve.running``). Blobs are fetched a few at a time, each
with its own progress bar. With ``referrers``, also the image's signatures, SBOMs and
attestations, so that a verifier finds them while the upstream is out of reach: what the
referrers list of the image's digest names (every page), or, where the upstream has no
referrers API, what the tag schema's index names; and what cosign's ``.sig``, ``.att`` and
``.sbom`` tags hold (cosign writes them with no ``subject``, so no referrers list names
them). A referrer that is an index comes with its manifests.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from moorage.upstreams import error_codes, error_message, next_link
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS, INDEX_MEDIA_TYPES, ImageReference, descriptors

__all__ = ["WarmFailed", "WarmedImage", "platform_matches", "progress_bars", "warm"]

PARALLEL_BLOBS: Final = 4
CHUNK: Final = 1024 * 1024
#: cosign's tags for a digest's signatures, attestations and SBOMs: ``sha256-<hex>`` + these.
COSIGN_TAG_SUFFIXES: Final = (".sig", ".att", ".sbom")
#: Pages of a referrers list followed at most.
MAX_REFERRER_PAGES: Final = 100
#: Indexes within an index followed at most (one level is as deep as registries nest them).
MAX_NESTED_INDEXES: Final = 4


class WarmFailed(Exception):
    """An image could not be pulled through the cache; the message says which and why."""


class NotTheCache(WarmFailed):
    """The server answered a manifest as no Moorage does: ``--url`` names something else (the
    upstream registry itself), where nothing would be cached. Ends the run."""


class WarmIncomplete(WarmFailed):
    """Some images could not be pulled; every other one was (``warmed``). One typo in a list
    of images no longer leaves the images after it cold."""

    def __init__(self, warmed: list[WarmedImage], failures: list[WarmFailed]) -> None:
        super().__init__("\n".join(str(failure) for failure in failures))
        self.warmed = warmed
        self.failures = failures


@dataclass
class WarmedImage:
    image: str
    digest: str
    platforms: list[str] = field(default_factory=list)
    #: Signatures, SBOMs and attestations warmed with it (with ``referrers``).
    referrers: int = 0
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
    platform = entry.get("platform")
    if not isinstance(platform, dict):  # none, or odd content (a string, a list)
        platform = {}
    parts = (platform.get("os"), platform.get("architecture"), platform.get("variant"))
    return "/".join(p for p in parts if isinstance(p, str) and p) or "(no platform)"


async def warm(
    base_url: str,
    images: Sequence[ImageReference],
    platforms: Sequence[str] | None,
    progress: Progress | None,
    *,
    referrers: bool = False,
    unix_socket: Path | None = None,
) -> list[WarmedImage]:
    """Pull each image through the cache at ``base_url`` (reached through ``unix_socket``
    when given); ``platforms`` None means every one; ``referrers``: with its signatures, SBOMs
    and attestations. An image that fails does not stop the others: :class:`WarmIncomplete`
    at the end says which failed and holds those warmed."""
    timeout = aiohttp.ClientTimeout(sock_connect=30, sock_read=300)
    connector = aiohttp.UnixConnector(path=str(unix_socket)) if unix_socket is not None else None
    warmed: list[WarmedImage] = []
    failures: list[WarmFailed] = []
    async with aiohttp.ClientSession(base_url=base_url, timeout=timeout, connector=connector) as session:
        try:
            for image in images:
                try:
                    warmed.append(await _warm_one(session, image, platforms, progress, referrers))
                except NotTheCache:
                    raise
                except WarmFailed as failure:
                    failures.append(failure)
                except aiohttp.ClientPayloadError as cut:
                    # The cache answered, then cut a body (its upstream failed mid-blob): this
                    # image's failure, not the run's. Only its name: its text may hold the URL.
                    # A connection closed with no answer at all ends the run, below.
                    failures.append(WarmFailed(f"{image}: the cache cut a transfer ({type(cut).__name__})"))
        except aiohttp.ClientError as error:
            if isinstance(error, OSError):  # could not connect: the caller says so
                raise
            # Only its name: the text of some names the URL, which may hold a password.
            raise WarmFailed(
                f"the cache gave no HTTP answer ({type(error).__name__}): an http:// URL for a TLS listener?"
            ) from None
    if failures:
        raise WarmIncomplete(warmed, failures)
    return warmed


async def _get_manifest(
    session: aiohttp.ClientSession, image: ImageReference, reference: str, warmed: WarmedImage
) -> tuple[dict[str, Any], str, str]:
    found = await _find_manifest(session, image, reference, warmed)
    if isinstance(found, str):
        raise WarmFailed(f"{image}: {found}")
    return found


async def _find_manifest(
    session: aiohttp.ClientSession, image: ImageReference, reference: str, warmed: WarmedImage
) -> tuple[dict[str, Any], str, str] | str:
    """(the manifest, its media type, its digest), or why there is none where the cache
    answers 404; any other failure (the upstream down, refused) raises :class:`WarmFailed`."""
    url = f"/v2/{image.repository}/manifests/{reference}"
    async with session.get(url, params={"ns": image.registry}, headers={"Accept": ACCEPT_ALL_MANIFESTS}) as response:
        body = await response.read()
        if response.status == 404:
            return _error_text(response.status, body)
        if response.status != 200:
            own = str(image).endswith((f":{reference}", f"@{reference}"))  # named once, not twice
            raise WarmFailed(f"{image}: {'' if own else f'{reference}: '}{_error_text(response.status, body)}")
        if "X-Moorage-Cache" not in response.headers:
            raise NotTheCache(
                "the server answered without Moorage's X-Moorage-Cache header, so nothing was cached:"
                " --url must name the cache, not a registry"
            )
        warmed.results[response.headers["X-Moorage-Cache"]] += 1
        document = _json_object(body)
        if document is None:
            raise WarmFailed(f"{image}: {reference}: the cache answered something that is no manifest")
        return document, response.headers["Content-Type"], response.headers["Docker-Content-Digest"]


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The JSON object ``body`` holds; None for anything else."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        return None
    return document if isinstance(document, dict) else None


def _blobs_of(manifest: dict[str, Any]) -> dict[str, int]:
    """The blobs an image manifest needs pulled, with their sizes: its config and layers (and
    an OCI artifact manifest's ``blobs``), but no foreign layer (one with ``urls``, as Windows
    base layers are: its registry is another, and no registry the cache asks has it)."""
    config = manifest.get("config")
    parts = [config] if isinstance(config, dict) and isinstance(config.get("digest"), str) else []
    parts += descriptors(manifest, "layers") + descriptors(manifest, "blobs")
    blobs: dict[str, int] = {}
    for descriptor in parts:
        if not descriptor.get("urls"):
            size = descriptor.get("size")
            blobs[descriptor["digest"]] = size if isinstance(size, int) and size >= 0 else 0
    return blobs


def _is_index(document: dict[str, Any], media_type: str) -> bool:
    return media_type in INDEX_MEDIA_TYPES or "manifests" in document


def _error_text(status: int, body: bytes) -> str:
    """An error answer, as the terminal may show it: ``--url`` can name any server, whose
    message could hold control characters (read through ``error_message``: printable,
    at most 200 characters)."""
    codes = ",".join(code for code in sorted(error_codes(body)) if code.isascii() and code.isprintable())[:100]
    message = error_message(body)
    return f"HTTP {status} {codes}: {message}" if codes and message else f"HTTP {status}"


async def _referrers_of(
    session: aiohttp.ClientSession, image: ImageReference, digest: str, warmed: WarmedImage
) -> list[dict[str, Any]]:
    """The manifests that name ``digest`` as their subject (and cosign's, which name none),
    pulled through the cache, each once. A tag that is not there is passed over."""
    found: dict[str, dict[str, Any]] = {}

    async def add(document: dict[str, Any], referrer: str) -> None:
        if referrer in found:
            return
        found[referrer] = document
        for child in descriptors(document, "manifests"):  # an index of attestations: its manifests too
            child_document, _, child_digest = await _get_manifest(session, image, child["digest"], warmed)
            found[child_digest] = child_document

    listed = await _referrers_list(session, image, digest)
    prefix = digest.replace(":", "-")
    if listed is None:  # no referrers API: the tag schema's index lists them, under sha256-<hex>
        schema = await _find_manifest(session, image, prefix, warmed)
        listed = [] if isinstance(schema, str) else [entry["digest"] for entry in descriptors(schema[0], "manifests")]
    for referrer in listed:
        document, _, got = await _get_manifest(session, image, referrer, warmed)
        await add(document, got)
    for suffix in COSIGN_TAG_SUFFIXES:
        tagged = await _find_manifest(session, image, prefix + suffix, warmed)
        if not isinstance(tagged, str):
            await add(tagged[0], tagged[2])
    return list(found.values())


async def _referrers_list(session: aiohttp.ClientSession, image: ImageReference, digest: str) -> list[str] | None:
    """The digests the referrers list of ``digest`` names, every page of it; None where the
    upstream has no referrers API (the cache answers 404 ``UNSUPPORTED``)."""
    url = f"/v2/{image.repository}/referrers/{digest}?ns={image.registry}"
    named: list[str] = []
    for _ in range(MAX_REFERRER_PAGES):
        async with session.get(url) as response:
            body = await response.read()
            if response.status == 404 and "UNSUPPORTED" in error_codes(body):
                return None
            if response.status != 200:
                raise WarmFailed(f"{image}: referrers of {digest}: {_error_text(response.status, body)}")
            page = _json_object(body)
            if page is None:
                raise WarmFailed(f"{image}: referrers of {digest}: the cache answered something that is no list")
            named += [entry["digest"] for entry in descriptors(page, "manifests")]
            following = next_link(response.headers.get("Link", ""))
        if following is None:
            return named
        url = following
    raise WarmFailed(f"{image}: referrers of {digest}: more than {MAX_REFERRER_PAGES} pages")


async def _warm_one(
    session: aiohttp.ClientSession,
    image: ImageReference,
    platforms: Sequence[str] | None,
    progress: Progress | None,
    referrers: bool,
) -> WarmedImage:
    warmed = WarmedImage(str(image), "")
    document, media_type, warmed.digest = await _get_manifest(session, image, str(image.reference), warmed)
    manifests = [document]
    if _is_index(document, media_type):
        manifests = await _platform_images(session, image, document, platforms, referrers, warmed)
        if not manifests:
            raise WarmFailed(f"{image}: no platform matches {', '.join(platforms or [])}")
    if referrers:
        attached = await _referrers_of(session, image, warmed.digest, warmed)
        warmed.referrers += len(attached)
        manifests.extend(attached)
    blobs: dict[str, int] = {}
    for manifest in manifests:
        blobs.update(_blobs_of(manifest))
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


async def _platform_images(
    session: aiohttp.ClientSession,
    image: ImageReference,
    index: dict[str, Any],
    platforms: Sequence[str] | None,
    attestations: bool,
    warmed: WarmedImage,
    depth: int = 0,
) -> list[dict[str, Any]]:
    """The image manifests of ``platforms`` (every one for None) an index leads to, pulled
    through the cache: through the indexes it nests too (at most ``MAX_NESTED_INDEXES`` deep).
    With ``platforms``, an entry that names no platform and is no index is no image asked for,
    and is not pulled. With ``attestations``, also the attestation manifests BuildKit keeps in
    the index for the images chosen (``unknown/unknown`` entries whose
    ``vnd.docker.reference.digest`` names one): the SBOM and provenance a verifier looks for,
    which no referrers list names; with every platform, they come as part of the image."""
    chosen: list[dict[str, Any]] = []
    chosen_digests: set[str] = set()
    entries = descriptors(index, "manifests")
    for entry in entries:
        platform = entry.get("platform")
        if _attests(entry) is not None:
            continue
        asked = platforms is None or (
            isinstance(platform, dict) and any(platform_matches(entry, wanted) for wanted in platforms)
        )
        if not asked and (isinstance(platform, dict) or entry.get("mediaType") not in INDEX_MEDIA_TYPES):
            continue  # another platform's, or an image of none
        child, child_type, child_digest = await _get_manifest(session, image, entry["digest"], warmed)
        if _is_index(child, child_type):
            if depth >= MAX_NESTED_INDEXES:
                raise WarmFailed(f"{image}: indexes nested more than {MAX_NESTED_INDEXES} deep")
            chosen += await _platform_images(session, image, child, platforms, attestations, warmed, depth + 1)
            continue
        if not asked:
            continue  # described as an index, and an image of no platform
        warmed.platforms.append(_platform_name(entry))
        chosen.append(child)
        chosen_digests.add(child_digest)
    for entry in entries:
        if (attestations or platforms is None) and _attests(entry) in chosen_digests:
            child, _, _ = await _get_manifest(session, image, entry["digest"], warmed)
            chosen.append(child)
            if attestations:
                warmed.referrers += 1
    return chosen


def _attests(entry: dict[str, Any]) -> str | None:
    """The digest an index entry is BuildKit's attestation manifest of, if it is one."""
    annotations = entry.get("annotations")
    if not isinstance(annotations, dict) or annotations.get("vnd.docker.reference.type") != "attestation-manifest":
        return None
    attested = annotations.get("vnd.docker.reference.digest")
    return attested if isinstance(attested, str) else None


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
