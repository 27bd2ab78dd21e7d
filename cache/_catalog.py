"""What the store holds, for people: cached tags with their size and last pull, and totals.

Read-only and blocking; for the command line (``moorage ls``, ``moorage stats``), which may
run beside a serving daemon (the index is SQLite, safe across processes).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from moorage.upstreams.reference import (
    INDEX_MEDIA_TYPES,
    MAX_MANIFEST_BYTES,
    Digest,
    InvalidReference,
    RepositoryName,
    Tag,
    descriptors,
    parse_digest,
)

from ._index import Index, Usage
from ._keys import pulled_key
from ._layout import index_dir
from ._store import DirectoryStore

__all__ = ["CachedTag", "StoreSummary", "read_catalog", "read_summary"]


@dataclass(frozen=True, slots=True)
class CachedTag:
    upstream: str
    repository: str
    tag: str
    digest: str
    media_type: str
    #: Bytes of the image (config and layers; for an index, every platform held), when known.
    size: int | None
    #: When the upstream last confirmed the tag, and when a client last pulled it (epoch s).
    checked_at: float
    pulled_at: float | None

    @property
    def name(self) -> str:
        return f"{self.upstream}/{self.repository}:{self.tag}"


@dataclass(frozen=True, slots=True)
class StoreSummary:
    path: str
    bytes: int
    entries: int
    tags: dict[str, int]
    usage: Usage


def read_catalog(root: Path, pattern: str | None = None) -> list[CachedTag]:
    """Cached tags one of whose names (:func:`_names_of`) matches the glob ``pattern``."""
    store, index = _open(root)
    try:
        seen: dict[tuple[str, str, str], CachedTag] = {}
        for key, entry in index.tag_entries():
            _, upstream, repository, tag, _accept = key
            # Matched by name before its manifests are read: a pattern naming a few tags of a
            # store of 100,000 had read every manifest first (17 s).
            if pattern and not any(fnmatch.fnmatch(name, pattern) for name in _names_of(upstream, repository, tag)):
                continue
            cached = CachedTag(
                upstream,
                repository,
                tag,
                str(entry.digest),
                entry.media_type,
                _image_size(store, entry.digest),
                entry.checked_at,
                index.pulled_at(pulled_key(upstream, RepositoryName(repository), Tag(tag))),
            )
            # One row per tag: the answer for clients that take indexes wins over a platform's.
            previous = seen.get((upstream, repository, tag))
            if previous is None or cached.media_type in INDEX_MEDIA_TYPES:
                seen[(upstream, repository, tag)] = cached
        return sorted(seen.values(), key=lambda c: (c.upstream, c.repository, c.tag))
    finally:
        index.close()


def _names_of(upstream: str, repository: str, tag: str) -> tuple[str, ...]:
    """The names a person may give a cached tag: ``upstream/repository:tag``, the repository
    with or without its tag, and for a Docker Hub official image its short name (``alpine:3.19``,
    ``docker.io/alpine:3.19``); ``library/`` elsewhere (Harbor's default project) is a name."""
    names = [f"{upstream}/{repository}:{tag}", repository, f"{repository}:{tag}"]
    if upstream == "docker.io" and repository.startswith("library/"):
        short = repository.removeprefix("library/")
        names += [short, f"{short}:{tag}", f"docker.io/{short}", f"docker.io/{short}:{tag}"]
    return tuple(names)


def read_summary(root: Path) -> StoreSummary:
    store, index = _open(root)
    try:
        totals = index.store_totals() or store.count()
        totals = (max(0, totals[0]), max(0, totals[1]))  # below zero a moment (see Index)
        tags: dict[str, int] = {}
        for key, _ in index.tag_entries():
            tags[key[1]] = tags.get(key[1], 0) + 1
        return StoreSummary(str(root), totals[0], totals[1], tags, index.usage())
    finally:
        index.close()


def _open(root: Path) -> tuple[DirectoryStore, Index]:
    if not index_dir(root).is_dir():
        raise FileNotFoundError(f"no Moorage store at {root}")
    return DirectoryStore(root), Index(index_dir(root))


def _image_size(store: DirectoryStore, digest: Digest, depth: int = 0) -> int | None:
    body = store.read_small(digest, MAX_MANIFEST_BYTES)
    if body is None or depth > 3:  # an index of indexes, at most three deep
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    if "manifests" in document:
        sizes = []
        for child in descriptors(document, "manifests"):
            try:
                size = _image_size(store, parse_digest(child["digest"]), depth + 1)
            except InvalidReference:
                size = None
            if size is not None:
                sizes.append(size)
        return sum(sizes) if sizes else None
    config = document.get("config")
    parts = [config] if isinstance(config, dict) else []
    parts += descriptors(document, "layers") + descriptors(document, "blobs")
    stored = [part.get("size") for part in parts if not part.get("urls")]  # a foreign layer is never stored
    return sum(size for size in stored if isinstance(size, int) and size >= 0)
