"""What the cache needs from an upstream, as a Protocol.

``moorage.upstreams.RegistryClient`` is the real one; cache tests may plug in a fake.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from moorage.upstreams import BlobBody, FetchedManifest, ManifestHead, ReferrersPage, TagsPage
from moorage.upstreams.reference import AcceptClass, Digest, Reference, RepositoryName

__all__ = ["BlobSource", "Source"]


class BlobSource(Protocol):
    """What a fill needs: the upstream's name and a blob body from an offset."""

    @property
    def host(self) -> str: ...

    def open_blob(
        self, repository: RepositoryName, digest: Digest, offset: int = 0
    ) -> AbstractAsyncContextManager[BlobBody]: ...


class Source(BlobSource, Protocol):
    """What the cache needs from an upstream for every kind of answer."""

    async def get_manifest(
        self, repository: RepositoryName, reference: Reference, accept: AcceptClass
    ) -> FetchedManifest: ...
    async def head_manifest(
        self, repository: RepositoryName, reference: Reference, accept: AcceptClass, *, wait_out_429: bool = True
    ) -> ManifestHead: ...
    async def head_blob(self, repository: RepositoryName, digest: Digest) -> int: ...
    async def list_tags(self, repository: RepositoryName, query: str) -> TagsPage: ...
    async def list_referrers(self, repository: RepositoryName, digest: Digest, query: str) -> ReferrersPage: ...
