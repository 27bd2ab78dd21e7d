"""The embedded index: tag answers, manifest media types and tag lists, in diskcache (SQLite).

Every method blocks and is called from a thread by the cache; keys come only from ``_keys``.
Entries leave this module as frozen values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import diskcache

from moorage.upstreams.reference import Digest, parse_digest

from ._keys import IndexKey, manifest_key

__all__ = ["Index", "TagEntry", "TagsEntry"]


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: Digest
    media_type: str
    #: When the upstream last confirmed this digest (GET or HEAD), epoch seconds.
    checked_at: float


@dataclass(frozen=True, slots=True)
class TagsEntry:
    body: bytes
    next_last: str | None
    next_n: str | None
    fetched_at: float


class Index:
    def __init__(self, directory: Path) -> None:
        # No size limit and no culling: eviction is decided by the cache, not by diskcache.
        self._db = diskcache.Cache(str(directory), size_limit=2**62, cull_limit=0, eviction_policy="none")

    def close(self) -> None:
        self._db.close()

    def tag(self, key: IndexKey) -> TagEntry | None:
        value = self._db.get(key)
        if value is None:
            return None
        digest, media_type, checked_at = value
        return TagEntry(parse_digest(digest), media_type, checked_at)

    def put_tag(self, key: IndexKey, entry: TagEntry) -> None:
        self._db.set(key, (str(entry.digest), entry.media_type, entry.checked_at))

    def manifest_media_type(self, digest: Digest) -> str | None:
        value = self._db.get(manifest_key(digest))
        return value if isinstance(value, str) else None

    def put_manifest(self, digest: Digest, media_type: str) -> None:
        self._db.set(manifest_key(digest), media_type)

    def tags(self, key: IndexKey) -> TagsEntry | None:
        value = self._db.get(key)
        if value is None:
            return None
        body, next_last, next_n, fetched_at = value
        return TagsEntry(body, next_last, next_n, fetched_at)

    def put_tags(self, key: IndexKey, entry: TagsEntry) -> None:
        self._db.set(key, (entry.body, entry.next_last, entry.next_n, entry.fetched_at))
