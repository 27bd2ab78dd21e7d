"""The environment's outbound HTTP proxy: which upstream requests go through it.

``HTTPS_PROXY``, ``HTTP_PROXY`` and ``ALL_PROXY`` name the proxy (``ALL_PROXY`` for a scheme the
other two leave unset), ``NO_PROXY`` the hosts reached directly. Each may be written in either
case; where both are set the lower-case one is read, as curl reads them, and an empty one is
passed over. httpx reads these too, but takes a CIDR range in ``NO_PROXY`` (``10.0.0.0/8``, what
a Kubernetes cluster's pod and service networks are written as) for the single address it starts
with, so an in-cluster registry named by address was sent to the proxy; and a client given a
transport of its own ignores them altogether. :func:`routed_transport` reads them here and
sends each request down the transport its host calls for: the caller's direct one (the
wide-read transport, ``_network``) or an httpx transport through the proxy, whose failures
then name the proxy.

``NO_PROXY`` entries, comma-separated, case-insensitive, as Go reads them:

- ``*``: no request goes through the proxy;
- ``10.0.0.0/8``, ``fd00::/8``: an upstream named by an address in the range;
- ``192.168.1.5``, ``::1``, ``[::1]``: that address;
- ``example.com`` (or ``*example.com``): that host and every host under it;
- ``.example.com`` (or ``*.example.com``): the hosts under it, not ``example.com`` itself;
- any of the above but a range with ``:port`` (``[::1]:5000`` for an IPv6 address): that
  port only.

Host names are compared as written, not resolved: a range matches upstreams named by address.
An entry that is none of these is ignored (and listed in :attr:`ProxyEnvironment.ignored`).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import httpx

from moorage.config import ConfigError

from ._transport import PROXY_NOTE

__all__ = ["Proxy", "ProxyEnvironment", "routed_transport"]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class _Exemption:
    """One ``NO_PROXY`` entry: a range of addresses, or a host name (and the hosts under it)."""

    network: _Network | None = None
    host: str = ""
    under_only: bool = False
    port: int | None = None

    def covers(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return False
            return address.version == self.network.version and address in self.network
        return host.endswith("." + self.host) or (host == self.host and not self.under_only)


def _exemption(entry: str) -> _Exemption | None:
    """The exemption ``entry`` (lower-case, stripped, not empty) names; None if none."""
    if "/" in entry:
        try:
            return _Exemption(network=ipaddress.ip_network(entry, strict=False))
        except ValueError:
            return None
    host, port = entry, None
    if entry.startswith("["):  # [::1] or [::1]:5000
        host, _, rest = entry[1:].partition("]")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        port = int(rest[1:]) if rest else None
    elif entry.count(":") == 1:  # host:port (an IPv6 address has more than one colon)
        host, _, number = entry.partition(":")
        if not number.isdigit():
            return None
        port = int(number)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return _Exemption(network=ipaddress.ip_network(address), port=port)
    host = host.removeprefix("*").rstrip(".")
    under_only = host.startswith(".")
    host = host.lstrip(".")
    if not host or any(c in host for c in "*[]/ "):
        return None
    return _Exemption(host=host, under_only=under_only, port=port)


@dataclass(frozen=True, slots=True)
class Proxy:
    """A proxy to send requests through, and the variable that named it (for messages: its
    URL may carry credentials, never shown)."""

    url: httpx.URL
    variable: str

    @property
    def shown(self) -> str:
        """How errors name it: by its variable, upper-case (messages for clients show no URL and
        no network address, and are cut where ``http`` starts)."""
        return f"the proxy {self.variable.upper()} names"


@dataclass(frozen=True)
class ProxyEnvironment:
    """The proxies the environment names, by the scheme of the URLs they carry, and the hosts
    exempted from them."""

    proxies: Mapping[str, Proxy]
    exemptions: tuple[_Exemption, ...] = ()
    exempt_all: bool = False
    #: ``NO_PROXY`` entries that are none of the forms it takes.
    ignored: tuple[str, ...] = ()

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> ProxyEnvironment:
        """The proxy settings in ``environ`` (the process's by default). Raises
        ``ConfigError`` for a proxy that would be used and cannot be (not an ``http://`` or
        ``https://`` URL with a host and a port that can be)."""
        environ = os.environ if environ is None else environ
        found = {name: _variable(environ, name) for name in ("http_proxy", "https_proxy", "all_proxy")}
        proxies: dict[str, Proxy] = {}
        for scheme in ("http", "https"):
            if (named := found[f"{scheme}_proxy"]) is not None:
                proxies[scheme] = _proxy(*named)
            elif (named := found["all_proxy"]) is not None:
                proxies[scheme] = _proxy(*named, f" (read for {scheme}:// URLs: {scheme.upper()}_PROXY is unset)")
        no_proxy = _variable(environ, "no_proxy")
        entries = [e.strip().lower() for e in (no_proxy[1] if no_proxy else "").split(",") if e.strip()]
        understood = {entry: _exemption(entry) for entry in entries if entry != "*"}
        return cls(
            proxies,
            tuple(e for e in understood.values() if e is not None),
            "*" in entries,
            tuple(entry for entry, exemption in understood.items() if exemption is None),
        )

    def proxy_for(self, url: httpx.URL) -> Proxy | None:
        """The proxy a request for ``url`` goes through; None to go directly."""
        proxy = self.proxies.get(url.scheme)
        if proxy is None or self.exempt_all:
            return None
        host = url.host.lower().rstrip(".")
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
        return None if any(e.covers(host, port) for e in self.exemptions) else proxy


def _variable(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(the variable read, its value) for ``name`` in either case: the lower-case one first,
    an empty one passed over."""
    for variable in (name.lower(), name.upper()):
        value = environ.get(variable, "").strip()
        if value:
            return variable, value
    return None


def _proxy(variable: str, value: str, why_read: str = "") -> Proxy:
    def refused(why: str) -> ConfigError:
        return ConfigError("the environment", [f"{variable}: {why}{why_read}"])

    try:
        url = httpx.URL(value if "://" in value else f"http://{value}")
    except httpx.InvalidURL as exc:
        raise refused(f"not a proxy URL ({exc})") from None
    if url.scheme not in ("http", "https"):
        shown = f"{url.scheme}://" if url.scheme.isascii() and url.scheme.isalnum() else "that"
        raise refused(f"only HTTP proxies (http:// or https://) are supported, not {shown}")
    if not url.host:
        raise refused("not a proxy URL: it names no host")
    if url.port is not None and not 0 < url.port < 65536:
        raise refused(f"not a proxy URL: port {url.port} is out of range")
    return Proxy(url, variable)


class _RoutedTransport(httpx.AsyncBaseTransport):
    """Each request down ``direct`` or through the proxy ``environment`` names for its URL."""

    def __init__(
        self,
        direct: httpx.AsyncBaseTransport,
        environment: ProxyEnvironment,
        limits: httpx.Limits,
        trust: ssl.SSLContext,
    ) -> None:
        self._direct = direct
        self._environment = environment
        # An https:// proxy's certificate is checked as the upstream's is.
        self._proxied = {
            str(proxy.url): httpx.AsyncHTTPTransport(
                proxy=httpx.Proxy(proxy.url, ssl_context=trust if proxy.url.scheme == "https" else None),
                verify=trust,
                limits=limits,
            )
            for proxy in environment.proxies.values()
        }

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxy = self._environment.proxy_for(request.url)
        if proxy is None:
            return await self._direct.handle_async_request(request)
        try:
            response = await self._proxied[str(proxy.url)].handle_async_request(request)
        except httpx.TransportError as exc:  # the proxy's failure, or the upstream's through it
            exc.add_note(f"{PROXY_NOTE} {proxy.shown}")  # said with the error (``_transport``)
            raise
        if response.status_code == 407:  # a forwarding proxy refused: no answer of the upstream's
            await response.aclose()
            raise httpx.ProxyError(
                f"{proxy.shown} asked for credentials (407 Proxy Authentication Required)", request=request
            )
        return response

    async def aclose(self) -> None:
        await self._direct.aclose()
        for transport in self._proxied.values():
            await transport.aclose()


def routed_transport(
    direct: httpx.AsyncBaseTransport,
    limits: httpx.Limits,
    trust: ssl.SSLContext,
    environment: ProxyEnvironment,
) -> httpx.AsyncBaseTransport:
    """``direct`` where ``environment`` names no proxy, else a transport that sends each
    request directly or through its proxy (with ``limits``, checking certificates with
    ``trust``) as ``NO_PROXY`` says."""
    if not environment.proxies or environment.exempt_all:
        return direct
    return _RoutedTransport(direct, environment, limits, trust)
