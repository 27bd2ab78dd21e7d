"""Upstream registries: routing a name to an upstream, and the registry client.

Exports what proxy and cache may use. Imports ``moorage.config`` only; never cache or proxy.
"""

from ._client import (
    BlobBody,
    FetchedManifest,
    ManifestHead,
    NullObserver,
    ReferrersPage,
    RegistryClient,
    TagsPage,
    UpstreamObserver,
)
from ._pages import artifact_type_only, cut_tags_page, error_codes, error_message, next_link, of_artifact_type
from ._pool import open_upstreams, read_password
from ._proxies import ProxyEnvironment
from ._ratelimit import RateLimitState, parse_ratelimit
from ._routing import NoRoute, Route, Router
from ._transport import tls_failure
from ._trust import trust_for
from .errors import (
    HeadRefused,
    ManifestTooLarge,
    NoReferrersApi,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamUnavailable,
)

__all__ = [
    "BlobBody",
    "FetchedManifest",
    "HeadRefused",
    "ManifestHead",
    "ManifestTooLarge",
    "NoReferrersApi",
    "NoRoute",
    "NullObserver",
    "ProxyEnvironment",
    "RateLimitState",
    "ReferrersPage",
    "RegistryClient",
    "Route",
    "Router",
    "TagsPage",
    "UpstreamAuthFailed",
    "UpstreamError",
    "UpstreamNotFound",
    "UpstreamObserver",
    "UpstreamProtocolError",
    "UpstreamRateLimited",
    "UpstreamRefused",
    "UpstreamUnavailable",
    "artifact_type_only",
    "cut_tags_page",
    "error_codes",
    "error_message",
    "next_link",
    "of_artifact_type",
    "open_upstreams",
    "parse_ratelimit",
    "read_password",
    "tls_failure",
    "trust_for",
]
