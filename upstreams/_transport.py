"""Where httpx ends: its exceptions and HTTP statuses become ``upstreams.errors``.

Every call to an upstream goes through :func:`mapped_errors` and :func:`raise_for_status`;
no ``httpx`` exception leaves ``upstreams/``. A change of HTTP client touches the modules built
on httpx and httpcore: this one, ``_client``, ``_auth``, ``_body``, ``_network``, ``_stream``
and ``_pool``, and the transport the proxy's tests hand in (``build_app``).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, Literal

import httpx

from ._challenge import parse_challenge
from ._ratelimit import parse_ratelimit, retry_after_seconds
from .errors import (
    HeadRefused,
    RedirectRefused,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamNotFound,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRefused,
    UpstreamUnavailable,
)

__all__ = ["PROXY_NOTE", "mapped_errors", "raise_for_status", "tls_failure"]

#: How a note on an httpx error (``add_note``) begins when its request went through the
#: environment's proxy (``_proxies``): said with the error, so that the proxy is looked at.
PROXY_NOTE: Final = "through"


@contextmanager
def mapped_errors(upstream: str, what: str, origin: str | None = None) -> Iterator[None]:
    """httpx's errors as the cache's, ``what`` naming the request. One that happened at a host
    other than ``origin`` (the upstream URL's) names that host, a redirect's target such as a
    CDN: its certificate, not the registry's, is the one to look at. Never its URL, whose
    query may carry a signature."""
    try:
        yield
    except (httpx.TimeoutException, httpx.TooManyRedirects, httpx.TransportError, httpx.StreamError) as exc:
        target = _host_of(exc)
        if origin is not None and target is not None and target != origin:
            what = f"{what} (at the redirect's target {target})"
        raise _mapped(upstream, what, exc) from None


def _host_of(exc: Exception) -> str | None:
    if not isinstance(exc, httpx.RequestError):
        return None
    try:
        return exc.request.url.host
    except RuntimeError:  # an error raised before any request was made
        return None


def _mapped(upstream: str, what: str, exc: Exception) -> UpstreamError:
    via = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()) if str(note).startswith(PROXY_NOTE))
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamUnavailable(upstream, f"{what}: timed out ({type(exc).__name__}){via}")
    if isinstance(exc, httpx.TooManyRedirects):
        return UpstreamProtocolError(upstream, f"{what}: too many redirects")
    if isinstance(exc, httpx.LocalProtocolError):  # its text quotes the request's headers, a token among them
        return UpstreamProtocolError(upstream, f"{what}: the request could not be written (LocalProtocolError)")
    return UpstreamUnavailable(
        upstream, f"{what}: {type(exc).__name__}: {_short(exc)}{_tls_hint(exc)}{via}", lasting=_lasting(exc)
    )


def _lasting(exc: BaseException) -> bool:
    """Whether the failure stays for the seconds retries take: a TLS failure a user meets (see
    ``tls_failure``), a proxy that wants credentials (407), or a host name the DNS says does
    not exist (not a lookup that failed for now, EAI_AGAIN, as while a cluster's DNS restarts)."""
    if tls_failure(exc) is not None or (isinstance(exc, httpx.ProxyError) and "407" in str(exc)):
        return True
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror) and seen.errno == socket.EAI_NONAME:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def tls_failure(error: BaseException) -> Literal["plain_http", "untrusted"] | None:
    """The two TLS failures a user meets, told by OpenSSL's words for them: a TLS client at a
    plain-HTTP server, and a certificate no trusted CA signed."""
    text = str(error)
    if "WRONG_VERSION_NUMBER" in text:
        return "plain_http"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "untrusted"
    return None


def _tls_hint(exc: Exception) -> str:
    failure = tls_failure(exc)
    if failure == "plain_http":
        return " (the upstream speaks plain HTTP? Use http:// in its url)"
    if failure == "untrusted":
        return " (a certificate a private CA signed? Name the CA in the upstream's ca_file)"
    return ""


#: The socket address an OS error names (``('10.0.0.7', 5000)``, IPv6 with flow and scope).
_ADDRESS: Final = re.compile(r"\s*\(\s*'[^']*',\s*\d+[^)]*\)")


def _short(exc: Exception) -> str:
    """The error's text for a client and the log, without what it must not show: a URL (a
    CDN URL carries a signature) or the upstream's network address (a private registry's
    address is not the clients' business)."""
    text = str(exc) or type(exc).__name__
    text = _ADDRESS.sub("", text.split("http", 1)[0])
    return text.strip(" :'\"") or type(exc).__name__


def _refusal(upstream: str, what: str, response: httpx.Response) -> UpstreamError:
    """A 401 or 403, told apart by who refused and how:

    - the target of a redirect (a CDN's signed URL, expired): asking again gets a new one;
    - a repository the upstream does not grant: Docker Hub answers a name it does not have,
      or a private one, with a token that grants nothing and 401 ``insufficient_scope``;
      Quay with a plain Bearer challenge, Harbor with a Basic one, to a request that carried a
      token the token service had just given; a 403 is a plain "not yours";
    - anything else (a Basic challenge after credentials were sent, a token the registry
      calls ``invalid_token`` though its token service has just given it: clocks apart, a
      signing key rotated): the cache's own credentials, or the upstream's fault.

    A HEAD refused by a redirect's target (a URL signed for GET alone) is :class:`HeadRefused`:
    asked again, it is refused again, and a GET answers instead.
    """
    status = response.status_code
    if any(earlier.is_redirect for earlier in response.history):  # (auth challenges are history too)
        refusal = f"{what}: the redirect's target refused it (HTTP {status})"
        if response.request.method == "HEAD":
            return HeadRefused(upstream, refusal)
        return RedirectRefused(upstream, refusal, status=status)
    scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
    error = params.get("error")
    # The token service took whatever credentials the cache has, and its token is refused here.
    sent_token = response.request.headers.get("authorization", "").lower().startswith("bearer ")
    if (
        status == 403
        or (sent_token and error != "invalid_token")
        or (scheme == "bearer" and error == "insufficient_scope")
    ):
        return UpstreamRefused(
            upstream,
            f"{what}: refused (HTTP {status}{f', {error}' if error else ''}):"
            " no such repository there, or not one these credentials may pull",
            status=status,
        )
    challenge = f", challenge {scheme} {error}" if error else ""
    return UpstreamAuthFailed(upstream, f"{what}: access refused (HTTP {status}{challenge})", status=status)


def raise_for_status(upstream: str, what: str, response: httpx.Response, said: str | None = None) -> None:
    """Raise the error an upstream's answer stands for; ``said``: what a 404's body said."""
    status = response.status_code
    if status < 400:
        return
    error: UpstreamError
    if status == 404:
        error = UpstreamNotFound(upstream, f"{what}: not found{f' (the upstream says: {said})' if said else ''}")
    elif status == 429:
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        budget = parse_ratelimit(response.headers)
        # Spent for longer than retries wait (Docker Hub's window is six hours); a limit per
        # second or so may well let the next attempt through.
        spent = budget is not None and budget.remaining == 0 and (budget.window_seconds or 3600) > 60
        message = f"{what}: rate limited (HTTP 429{', pull budget spent' if spent else ''})"
        error = UpstreamRateLimited(upstream, message, retry_after=retry_after, budget_spent=spent)
    elif status in (401, 403):
        error = _refusal(upstream, what, response)
    elif status in (400, 405, 501) and response.request.method == "HEAD":
        error = HeadRefused(upstream, f"{what}: HEAD refused (HTTP {status})")
    elif status >= 500 or status == 408:
        error = UpstreamUnavailable(upstream, f"{what}: HTTP {status}", status=status)
    else:
        error = UpstreamProtocolError(upstream, f"{what}: unexpected HTTP {status}")
    raise error
