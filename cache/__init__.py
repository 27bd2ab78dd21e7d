"""The content: blob store, manifest and tag index, tag and referrers lists, single-flight fills.

Exports what proxy may use. Imports ``moorage.config`` and ``moorage.upstreams``; never proxy
and never ``aiohttp.web``.
"""

from ._cache import (
    BlobAnswer,
    Cache,
    CacheResult,
    FillingBlob,
    ManifestAnswer,
    ReferrersAnswer,
    TagsAnswer,
    WarmBlob,
    open_cache,
)
from ._catalog import CachedTag, StoreSummary, read_catalog, read_summary
from ._fill import FillReader
from ._gc import GcReport, collect_garbage
from ._index import index_problem
from ._layout import index_files, is_store
from ._lifecycle import CachedImage, Expiry, LifecycleResult, evaluate, policy_resolver
from ._lifecycle import preview as preview_lifecycle
from ._observer import CacheObserver, ContentKind, NullCacheObserver
from ._routes import MayRead
from ._source import Source
from ._store import BlobStore, DirectoryStore
from ._verify import VerifyReport, verify_store
from .errors import CacheError, ClientGone, DigestMismatch, FillAborted, StoreFailure, error_text

__all__ = [
    "BlobAnswer",
    "BlobStore",
    "Cache",
    "CacheError",
    "CacheObserver",
    "CacheResult",
    "CachedImage",
    "CachedTag",
    "ClientGone",
    "ContentKind",
    "DigestMismatch",
    "DirectoryStore",
    "Expiry",
    "FillAborted",
    "FillReader",
    "FillingBlob",
    "GcReport",
    "LifecycleResult",
    "ManifestAnswer",
    "MayRead",
    "NullCacheObserver",
    "ReferrersAnswer",
    "Source",
    "StoreFailure",
    "StoreSummary",
    "TagsAnswer",
    "VerifyReport",
    "WarmBlob",
    "collect_garbage",
    "error_text",
    "evaluate",
    "index_files",
    "index_problem",
    "is_store",
    "open_cache",
    "policy_resolver",
    "preview_lifecycle",
    "read_catalog",
    "read_summary",
    "verify_store",
]
