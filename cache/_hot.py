"""A bounded in-memory front of the index for what is asked most: tag answers and manifests.

A fresh tag found here costs no thread hop and no SQLite read. Tags are bounded by count,
manifest bodies by total bytes; the least recently used go first. Everything here is also in
the index and the store, so forgetting is always safe. Only the event loop touches it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from moorage.upstreams.reference import Digest

from ._index import TagEntry
from ._keys import IndexKey

__all__ = ["HotAnswers", "StoredManifest"]

DEFAULT_MAX_TAGS: Final = 100_000
DEFAULT_MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoredManifest:
    body: bytes
    media_type: str
    #: Whether the index records it as a manifest. A file it no longer does (an expiring image
    #: took the record while another image still names the file) is recorded again once a
    #: client pulls it, so that the image it is part of there counts that pull.
    recorded: bool = True


class HotAnswers:
    def __init__(self, max_tags: int = DEFAULT_MAX_TAGS, max_manifest_bytes: int = DEFAULT_MAX_MANIFEST_BYTES) -> None:
        self._tags: OrderedDict[IndexKey, TagEntry] = OrderedDict()
        self._manifests: OrderedDict[Digest, StoredManifest] = OrderedDict()
        self._manifest_bytes = 0
        self._max_tags = max_tags
        self._max_manifest_bytes = max_manifest_bytes

    def tag(self, key: IndexKey) -> TagEntry | None:
        entry = self._tags.get(key)
        if entry is not None:
            self._tags.move_to_end(key)
        return entry

    def put_tag(self, key: IndexKey, entry: TagEntry) -> None:
        self._tags[key] = entry
        self._tags.move_to_end(key)
        while len(self._tags) > self._max_tags:
            self._tags.popitem(last=False)

    def forget_tag(self, key: IndexKey) -> None:
        self._tags.pop(key, None)

    def manifest(self, digest: Digest) -> StoredManifest | None:
        stored = self._manifests.get(digest)
        if stored is not None:
            self._manifests.move_to_end(digest)
        return stored

    def put_manifest(self, digest: Digest, stored: StoredManifest) -> None:
        if len(stored.body) > self._max_manifest_bytes:
            return
        previous = self._manifests.pop(digest, None)
        if previous is not None:
            self._manifest_bytes -= len(previous.body)
        self._manifests[digest] = stored
        self._manifest_bytes += len(stored.body)
        while self._manifest_bytes > self._max_manifest_bytes:
            _, dropped = self._manifests.popitem(last=False)
            self._manifest_bytes -= len(dropped.body)

    def forget_manifest(self, digest: Digest) -> None:
        stored = self._manifests.pop(digest, None)
        if stored is not None:
            self._manifest_bytes -= len(stored.body)
