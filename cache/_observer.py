"""What the cache reports as it works; proxy turns it into metrics.

A Protocol, so the cache knows nothing of Prometheus, and a do-nothing default for tests and
tools that do not count.
"""

from __future__ import annotations

from typing import Literal, Protocol

from moorage.upstreams.reference import Digest

__all__ = ["CacheObserver", "ContentKind", "NullCacheObserver"]

ContentKind = Literal["manifest", "blob"]


class CacheObserver(Protocol):
    def on_fetched_bytes(self, upstream: str, kind: ContentKind, count: int) -> None:
        """Body bytes received from an upstream and written to the store."""

    def on_fill_resumed(self, upstream: str) -> None:
        """A cut upstream body was resumed (or refetched)."""

    def on_digest_mismatch(self, upstream: str, kind: ContentKind) -> None:
        """Bytes from upstream did not hash to their digest; nothing was kept."""

    def on_fill_failed(self, upstream: str) -> None:
        """A blob download from ``upstream`` failed (the upstream, a digest mismatch, the store):
        its readers were cut and nothing was kept."""

    def on_stored(self, kind: ContentKind, size: int, digest: Digest) -> None:
        """A verified blob or manifest entered the store."""

    def on_evicted(self, reason: str, count: int, size: int) -> None:
        """Content left the store (``reason``: size, disk_full, corrupt, lifecycle, gc)."""

    def on_store_failure(self, disk_full: bool) -> None:
        """A write to the store failed (the disk full, or permissions): nothing was kept."""

    def on_images_expired(self, upstream: str, rule: int, count: int) -> None:
        """A lifecycle pass expired ``count`` images of ``upstream`` by the rule of that priority."""

    def on_maintenance(self, task: str, seconds: float) -> None:
        """A maintenance pass (``gc``, ``lifecycle``) finished after ``seconds``."""


class NullCacheObserver:
    def on_fetched_bytes(self, upstream: str, kind: ContentKind, count: int) -> None:
        pass

    def on_fill_resumed(self, upstream: str) -> None:
        pass

    def on_digest_mismatch(self, upstream: str, kind: ContentKind) -> None:
        pass

    def on_fill_failed(self, upstream: str) -> None:
        pass

    def on_stored(self, kind: ContentKind, size: int, digest: Digest) -> None:
        pass

    def on_evicted(self, reason: str, count: int, size: int) -> None:
        pass

    def on_store_failure(self, disk_full: bool) -> None:
        pass

    def on_images_expired(self, upstream: str, rule: int, count: int) -> None:
        pass

    def on_maintenance(self, task: str, seconds: float) -> None:
        pass
