"""The environment's outbound HTTP proxy: which upstream requests go through it.

``HTTPS_PROXY``, ``HTTP_PROXY`` and ``ALL_PROXY`` (either case) name the proxy, ``NO_PROXY``
the hosts reached directly, as curl and Go read them. httpx reads these too, but takes a CIDR
range in ``NO_PROXY`` (``10.0.0.0/8``, what a Kubernetes cluster's pod and service networks are
written as) for the single address it starts with, so an in-cluster registry named by address
was sent to the proxy; and a client given a transport of its own ignores them altogether.
:func:`routed_transport` reads them here and sends each request down the transport its host
calls for: the caller's direct one (the wide-read transport, ``_network``) or an httpx transport
through the proxy.

``NO_PROXY`` entries, comma-separated, case-insensitive:

- ``*``: no request goes through the proxy;
- ``10.0.0.0/8``, ``fd00::/8``: an upstream named by an address in the range;
- ``192.168.1.5``, ``::1``, ``[::1]``: that address;
- ``example.com`` (or ``*example.com``): that host and every host under it;
- ``.example.com`` (or ``*.example.com``): the hosts under it, not ``example.com`` itself;
- any of the above but a range with ``:port`` (``[::1]:5000`` for an IPv6 address): that
  port only.

Host names are compared as written, not resolved: a range matches upstreams named by address.
"""

from __future__ import annotations

import ipaddress
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import httpx

from moorage.config import ConfigError

__all__ = ["ProxyEnvironment", "routed_transport"]

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
    """The exemption ``entry`` (lower-case, stripped) names; None if it names none."""
    if "/" in entry:
        try:
            return _Exemption(network=ipaddress.ip_network(entry, strict=False))
        except ValueError:
            return None
    host, port = entry, None
    if entry.startswith("["):  # [::1] or [::1]:5000
        host, _, rest = entry[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif entry.count(":") == 1:  # host:port (an IPv6 address has more than one colon)
        name, _, number = entry.partition(":")
        if number.isdigit():
            host, port = name, int(number)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return _Exemption(network=ipaddress.ip_network(address), port=port)
    host = host.removeprefix("*")
    under_only = host.startswith(".")
    host = host.lstrip(".")
    return _Exemption(host=host, under_only=under_only, port=port) if host else None


@dataclass(frozen=True)
class ProxyEnvironment:
    """The proxies the environment names, by the scheme of the URLs they carry (``http``,
    ``https``, and ``all`` for both), and the hosts exempted from them."""

    proxies: Mapping[str, httpx.URL]
    exemptions: tuple[_Exemption, ...] = ()
    exempt_all: bool = False

    @classmethod
    def read(cls, variables: Mapping[str, str] | None = None) -> ProxyEnvironment:
        """The proxy settings in ``variables`` (by ``urllib.request.getproxies``'s names: a
        scheme, or ``no``), by default the process's environment. Raises ``ConfigError`` for a
        proxy that cannot be used (not ``http://`` or ``https://``, or not a URL)."""
        found = urllib.request.getproxies() if variables is None else variables
        proxies: dict[str, httpx.URL] = {}
        for scheme in ("http", "https", "all"):
            value = found.get(scheme, "").strip()
            if value:
                proxies[scheme] = _proxy_url(scheme, value)
        entries = [entry.strip().lower() for entry in found.get("no", "").split(",")]
        exempt_all = "*" in entries
        exemptions = tuple(e for e in map(_exemption, entries) if e is not None)
        return cls(proxies, exemptions, exempt_all)

    def proxy_for(self, url: httpx.URL) -> httpx.URL | None:
        """The proxy a request for ``url`` goes through; None to go directly."""
        proxy = self.proxies.get(url.scheme) or self.proxies.get("all")
        if proxy is None or self.exempt_all:
            return None
        host = url.host.lower().rstrip(".")
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
        return None if any(e.covers(host, port) for e in self.exemptions) else proxy


def _proxy_url(scheme: str, value: str) -> httpx.URL:
    variable = f"{scheme.upper()}_PROXY"
    try:
        url = httpx.URL(value if "://" in value else f"http://{value}")
    except httpx.InvalidURL as exc:
        raise ConfigError("the environment", [f"{variable}: not a proxy URL ({exc})"]) from None
    if url.scheme not in ("http", "https") or not url.host:
        shown = f"{url.scheme}://" if url.scheme else "it"
        raise ConfigError(
            "the environment",
            [f"{variable}: only HTTP proxies (http:// or https://) are supported, not {shown}"],
        )
    return url


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
        self._proxied = {
            str(url): httpx.AsyncHTTPTransport(proxy=httpx.Proxy(url), verify=trust, limits=limits)
            for url in set(environment.proxies.values())
        }

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxy = self._environment.proxy_for(request.url)
        transport = self._direct if proxy is None else self._proxied[str(proxy)]
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._direct.aclose()
        for transport in self._proxied.values():
            await transport.aclose()


def routed_transport(
    direct: httpx.AsyncBaseTransport,
    limits: httpx.Limits,
    trust: ssl.SSLContext,
    environment: ProxyEnvironment | None = None,
) -> httpx.AsyncBaseTransport:
    """``direct`` where no proxy is named (``environment``, by default the process's), else a
    transport that sends each request directly or through its proxy (with ``limits``, checking
    certificates with ``trust``) as ``NO_PROXY`` says."""
    environment = environment or ProxyEnvironment.read()
    if not environment.proxies or environment.exempt_all:
        return direct
    return _RoutedTransport(direct, environment, limits, trust)
