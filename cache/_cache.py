"""The cache's face: answers for manifests, blobs and tag lists, and how each was obtained.

A lookup never raises for an ordinary outcome; it returns an answer whose ``result`` says
what happened, in the words used everywhere (logs, metrics, README):

- ``hit``: from the store, no upstream request;
- ``miss``: fetched from upstream now (a fill, for blobs);
- ``coalesced``: joined a fetch another client had started;
- ``revalidated``: a stale tag confirmed unchanged with one upstream HEAD;
- ``refreshed``: a stale tag whose digest changed, fetched again;
- ``stale``: the upstream failed (network, 5xx, 429, auth) and the last good answer is served;
  ``stale_reason`` says why.

A fresh tag costs no upstream request; a stale one costs one HEAD; only a changed digest
costs a GET. Upstream errors reach the caller only when the cache has nothing to answer with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from moorage.config import StorageSettings
from moorage.upstreams import UpstreamError, UpstreamNotFound
from moorage.upstreams.reference import (
    MAX_MANIFEST_BYTES,
    AcceptClass,
    Digest,
    Reference,
    RepositoryName,
    Tag,
    sniff_media_type,
)

from ._fill import FillReader, Fills
from ._flight import SingleFlight
from ._index import Index, TagEntry, TagsEntry
from ._keys import IndexKey, tag_key, tags_list_key
from ._source import Source
from ._store import BlobStore, DirectoryStore
from .errors import CacheError, DigestMismatch

__all__ = [
    "BlobAnswer",
    "Cache",
    "CacheResult",
    "FillingBlob",
    "ManifestAnswer",
    "TagsAnswer",
    "WarmBlob",
    "open_cache",
]

CacheResult = Literal["hit", "miss", "coalesced", "revalidated", "refreshed", "stale"]


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    digest: Digest
    media_type: str
    body: bytes
    result: CacheResult
    stale_reason: str | None = None


@dataclass(frozen=True, slots=True)
class WarmBlob:
    digest: Digest
    size: int
    #: A local file the transport may sendfile from; None for stores that have none.
    path: Path | None
    result: CacheResult = "hit"


@dataclass(frozen=True, slots=True)
class FillingBlob:
    reader: FillReader
    result: CacheResult


BlobAnswer = WarmBlob | FillingBlob


@dataclass(frozen=True, slots=True)
class TagsAnswer:
    body: bytes
    next_last: str | None
    next_n: str | None
    result: CacheResult
    stale_reason: str | None = None


@dataclass(frozen=True, slots=True)
class _Stored:
    body: bytes
    media_type: str


class Cache:
    def __init__(self, store: BlobStore, index: Index, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._index = index
        self._clock = clock
        self.resumes = 0
        self.fills = Fills(store, on_resume=self._count_resume)
        self._manifest_flights: SingleFlight[IndexKey | Digest, ManifestAnswer] = SingleFlight()
        self._tags_flights: SingleFlight[IndexKey, TagsAnswer] = SingleFlight()

    def _count_resume(self) -> None:
        self.resumes += 1

    async def aclose(self) -> None:
        await self.fills.aclose()
        await self._manifest_flights.aclose()
        await self._tags_flights.aclose()

    # -- manifests ------------------------------------------------------------------------------

    async def manifest(
        self, source: Source, repository: RepositoryName, reference: Reference, accept: AcceptClass, ttl: float
    ) -> ManifestAnswer:
        if isinstance(reference, Digest):
            return await self._manifest_by_digest(source, repository, reference)
        key = tag_key(source.host, repository, reference, accept)
        entry, stored = await asyncio.to_thread(self._lookup_tag, key)
        if entry is None:
            return await self._flight(key, lambda: self._fetch_tag(source, repository, reference, accept, key))
        if self._clock() - entry.checked_at < ttl:
            if stored is not None:
                return ManifestAnswer(entry.digest, stored.media_type, stored.body, "hit")
            return await self._manifest_by_digest(source, repository, entry.digest)
        try:
            return await self._flight(
                key, lambda: self._revalidate(source, repository, reference, accept, key, entry, stored)
            )
        except (UpstreamError, CacheError) as exc:
            if isinstance(exc, UpstreamNotFound) or stored is None:
                raise
            return ManifestAnswer(entry.digest, stored.media_type, stored.body, "stale", stale_reason=str(exc))

    async def _flight(
        self, key: IndexKey | Digest, fetch: Callable[[], asyncio.Future[ManifestAnswer] | object]
    ) -> ManifestAnswer:
        answer, joined = await self._manifest_flights.run(key, fetch)  # type: ignore[arg-type]
        return replace(answer, result="coalesced") if joined and answer.result == "miss" else answer

    async def _manifest_by_digest(self, source: Source, repository: RepositoryName, digest: Digest) -> ManifestAnswer:
        stored = await asyncio.to_thread(self._load_manifest, digest)
        if stored is not None:
            return ManifestAnswer(digest, stored.media_type, stored.body, "hit")
        return await self._flight(digest, lambda: self._fetch_by_digest(source, repository, digest))

    async def _fetch_by_digest(self, source: Source, repository: RepositoryName, digest: Digest) -> ManifestAnswer:
        fetched = await source.get_manifest(repository, digest, "index")
        if not digest.matches(fetched.body):
            actual = Digest.of(fetched.body, digest.algorithm)
            raise DigestMismatch(str(digest), str(actual), f"manifest {repository}@{digest} from {source.host}")
        await asyncio.to_thread(self._save_manifest, digest, fetched.body, fetched.media_type, None)
        return ManifestAnswer(digest, fetched.media_type, fetched.body, "miss")

    async def _fetch_tag(
        self,
        source: Source,
        repository: RepositoryName,
        tag: Tag,
        accept: AcceptClass,
        key: IndexKey,
        result: CacheResult = "miss",
    ) -> ManifestAnswer:
        fetched = await source.get_manifest(repository, tag, accept)
        digest = Digest.of(fetched.body)
        claimed = fetched.claimed_digest
        if claimed is not None and claimed.algorithm == digest.algorithm and claimed != digest:
            raise DigestMismatch(str(claimed), str(digest), f"manifest {repository}:{tag} from {source.host}")
        entry = TagEntry(digest, fetched.media_type, self._clock())
        await asyncio.to_thread(self._save_manifest, digest, fetched.body, fetched.media_type, (key, entry))
        return ManifestAnswer(digest, fetched.media_type, fetched.body, result)

    async def _revalidate(
        self,
        source: Source,
        repository: RepositoryName,
        tag: Tag,
        accept: AcceptClass,
        key: IndexKey,
        entry: TagEntry,
        stored: _Stored | None,
    ) -> ManifestAnswer:
        head = await source.head_manifest(repository, tag, accept)
        if head.digest == entry.digest:
            await asyncio.to_thread(self._index.put_tag, key, replace(entry, checked_at=self._clock()))
            if stored is not None:
                return ManifestAnswer(entry.digest, stored.media_type, stored.body, "revalidated")
            answer = await self._fetch_by_digest(source, repository, entry.digest)
            return replace(answer, result="revalidated")
        return await self._fetch_tag(source, repository, tag, accept, key, result="refreshed")

    # Blocking helpers: each is one whole operation for one thread hop.

    def _lookup_tag(self, key: IndexKey) -> tuple[TagEntry | None, _Stored | None]:
        entry = self._index.tag(key)
        return entry, (self._load_manifest(entry.digest) if entry is not None else None)

    def _load_manifest(self, digest: Digest) -> _Stored | None:
        body = self._store.read_small(digest, MAX_MANIFEST_BYTES)
        if body is None:
            return None
        return _Stored(body, self._index.manifest_media_type(digest) or sniff_media_type(body))

    def _save_manifest(
        self, digest: Digest, body: bytes, media_type: str, tag: tuple[IndexKey, TagEntry] | None
    ) -> None:
        if self._store.size_of(digest) is None:
            pending = self._store.begin(digest)
            try:
                pending.write(body)
                pending.commit()
            finally:
                pending.close()
        self._index.put_manifest(digest, media_type)
        if tag is not None:
            self._index.put_tag(*tag)

    # -- blobs ----------------------------------------------------------------------------------

    async def blob(self, source: Source, repository: RepositoryName, digest: Digest) -> BlobAnswer:
        """The stored blob, or a reader of its fill (joined or started now)."""
        reader = self.fills.join(digest)
        if reader is not None:
            return FillingBlob(reader, "coalesced")
        size = await asyncio.to_thread(self._store.size_of, digest)
        if size is None:
            size = self.fills.recently_committed(digest)
        if size is not None:
            return WarmBlob(digest, size, self._store.local_path(digest))
        reader = self.fills.join(digest)
        if reader is not None:
            return FillingBlob(reader, "coalesced")
        return FillingBlob(self.fills.start(source, repository, digest), "miss")

    async def blob_size(self, source: Source, repository: RepositoryName, digest: Digest) -> tuple[int, CacheResult]:
        """For HEAD: the size from the store or a fill in flight, else one upstream HEAD."""
        reader = self.fills.join(digest)
        if reader is not None:
            try:
                return await reader.wait_started(), "coalesced"
            finally:
                reader.close()
        size = await asyncio.to_thread(self._store.size_of, digest)
        if size is not None:
            return size, "hit"
        return await source.head_blob(repository, digest), "miss"

    # -- tag lists ------------------------------------------------------------------------------

    async def tags(
        self, source: Source, repository: RepositoryName, n: str | None, last: str | None, ttl: float
    ) -> TagsAnswer:
        key = tags_list_key(source.host, repository, n, last)
        entry = await asyncio.to_thread(self._index.tags, key)
        if entry is not None and self._clock() - entry.fetched_at < ttl:
            return TagsAnswer(entry.body, entry.next_last, entry.next_n, "hit")

        async def fetch() -> TagsAnswer:
            page = await source.list_tags(repository, n, last)
            fresh = TagsEntry(page.body, page.next_last, page.next_n, self._clock())
            await asyncio.to_thread(self._index.put_tags, key, fresh)
            return TagsAnswer(page.body, page.next_last, page.next_n, "miss")

        try:
            answer, joined = await self._tags_flights.run(key, fetch)
        except UpstreamError as exc:
            if isinstance(exc, UpstreamNotFound) or entry is None:
                raise
            return TagsAnswer(entry.body, entry.next_last, entry.next_n, "stale", stale_reason=str(exc))
        return replace(answer, result="coalesced") if joined else answer


@asynccontextmanager
async def open_cache(settings: StorageSettings) -> AsyncIterator[Cache]:
    """The store and index under ``settings.path``; temporaries of a previous run are swept."""

    def open_sync() -> tuple[DirectoryStore, Index]:
        root = settings.path
        root.mkdir(parents=True, exist_ok=True)
        store = DirectoryStore(root)
        store.sweep_temporaries()
        return store, Index(root / "index")

    store, index = await asyncio.to_thread(open_sync)
    cache = Cache(store, index)
    try:
        yield cache
    finally:
        await cache.aclose()
        await asyncio.to_thread(index.close)
