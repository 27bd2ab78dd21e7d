"""What can go wrong when asking an upstream registry, as one exception tree.

    UpstreamError                 base; ``upstream`` names the registry host
    ├── NoReferrersApi            a referrers request answered with no list: no referrers API
    ├── UpstreamUnavailable       network error, timeout, cut body, 5xx (``status`` when known)
    │   └── RedirectRefused       a redirect's target (a CDN's signed URL) refused with 401/403
    ├── UpstreamRateLimited       429; ``retry_after`` seconds when the upstream said
    ├── UpstreamNotFound          404: the repository, tag or digest is unknown there
    ├── UpstreamAuthFailed        the token service refused the credentials (or anonymous access)
    │   └── UpstreamRefused       401/403 for a repository itself: it does not exist there, or
    │                             the credentials do not grant it (Docker Hub answers both so)
    └── UpstreamProtocolError     an answer that breaks the protocol
        ├── ManifestTooLarge      a manifest above the 4 MiB limit
        └── HeadRefused           400, 405 or 501 to a HEAD: the upstream takes only GET

httpx exceptions never leave ``upstreams/``: they are translated once, in ``_transport``.
Messages carry the upstream and what was asked, never a credential or token.
"""

from __future__ import annotations

__all__ = [
    "HeadRefused",
    "ManifestTooLarge",
    "NoReferrersApi",
    "UpstreamAuthFailed",
    "UpstreamError",
    "UpstreamNotFound",
    "UpstreamProtocolError",
    "UpstreamRateLimited",
    "UpstreamRefused",
    "UpstreamUnavailable",
]


class UpstreamError(Exception):
    def __init__(self, upstream: str, message: str) -> None:
        self.upstream = upstream
        super().__init__(f"{upstream}: {message}")


class NoReferrersApi(UpstreamError):
    """The upstream answered a referrers request, with no list: it has no referrers API."""


class UpstreamUnavailable(UpstreamError):
    def __init__(self, upstream: str, message: str, *, status: int | None = None, lasting: bool = False) -> None:
        self.status = status
        #: Asking again within the second would meet the same (a name the DNS says does not
        #: exist, a certificate not trusted, TLS to a plain-HTTP port): not retried.
        self.lasting = lasting
        super().__init__(upstream, message)


class RedirectRefused(UpstreamUnavailable):
    """A redirect's target (a CDN's or a bucket's signed URL) refused the request with 401 or
    403: an expired signature, which a fresh redirect renews, or one signed for GET alone."""


class UpstreamRateLimited(UpstreamError):
    """A 429. ``budget_spent`` when its rate-limit headers said nothing is left in the window
    (Docker Hub's ``ratelimit-remaining: 0``): asking again within seconds cannot succeed."""

    def __init__(
        self, upstream: str, message: str, *, retry_after: float | None = None, budget_spent: bool = False
    ) -> None:
        self.retry_after = retry_after
        self.budget_spent = budget_spent
        super().__init__(upstream, message)


class UpstreamNotFound(UpstreamError):
    pass


class UpstreamAuthFailed(UpstreamError):
    def __init__(self, upstream: str, message: str, *, status: int = 401) -> None:
        self.status = status
        super().__init__(upstream, message)


class UpstreamRefused(UpstreamAuthFailed):
    pass


class UpstreamProtocolError(UpstreamError):
    pass


class ManifestTooLarge(UpstreamProtocolError):
    pass


class HeadRefused(UpstreamProtocolError):
    """400, 405 or 501 to a HEAD: the upstream does not take HEAD there, though a GET works."""
