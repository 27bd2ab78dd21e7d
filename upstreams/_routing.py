"""Which upstream answers ``/v2/<name>/...``, and under which repository name.

In this order (DESIGN.md, "Routing"):

1. ``?ns=<registry host>`` (containerd mirrors): the upstream with that host or alias; the
   whole name is the repository there. An unknown ``ns`` is an error, never a fallback.
2. A first path component equal to an upstream's host, alias or prefix: that upstream, the rest
   is the repository (``ghcr.io/owner/app`` → ghcr.io ``owner/app``).
3. The default upstream with the whole name.

Docker Hub names of one component get ``library/`` (``alpine`` → ``library/alpine``).
The name is parsed against the spec grammar before any of this.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from moorage.config import UpstreamSettings

from .reference import RepositoryName, parse_repository

__all__ = ["NoRoute", "Route", "Router"]


class _HasSettings(Protocol):
    @property
    def settings(self) -> UpstreamSettings: ...


U = TypeVar("U", bound=_HasSettings)


class NoRoute(LookupError):
    """No upstream answers this name (an unknown ``ns``, or no default upstream)."""


@dataclass(frozen=True, slots=True)
class Route(Generic[U]):
    upstream: U
    repository: RepositoryName


#: How many resolved names a router keeps (all forgotten at once when full).
MAX_REMEMBERED_ROUTES = 4096


class Router(Generic[U]):
    def __init__(self, upstreams: Iterable[U]) -> None:
        self._upstreams: Sequence[U] = tuple(upstreams)
        self._by_ns: dict[str, U] = {}
        self._by_prefix: dict[str, U] = {}
        self._default: U | None = None
        self._resolved: dict[tuple[str, str | None], Route[U]] = {}
        for upstream in self._upstreams:
            settings = upstream.settings
            for name in (settings.host, *settings.aliases):
                self._by_ns[name] = upstream
                self._by_prefix[name] = upstream
            for prefix in settings.prefixes:
                self._by_prefix[prefix] = upstream
            if settings.default:
                self._default = upstream

    @property
    def upstreams(self) -> Sequence[U]:
        return self._upstreams

    @property
    def hosts(self) -> list[str]:
        return [u.settings.host for u in self._upstreams]

    def resolve(self, name: str, ns: str | None = None) -> Route[U]:
        """The upstream and repository for a client's ``<name>``; raises InvalidReference or NoRoute.

        Every request resolves its name, and the upstreams never change: the answers for the
        last few thousand names are kept (a failure is not)."""
        key = (name, None if ns is None else ns.strip().lower())
        route = self._resolved.get(key)
        if route is None:
            route = self._resolve(name, key[1])
            if len(self._resolved) >= MAX_REMEMBERED_ROUTES:
                self._resolved.clear()
            self._resolved[key] = route
        return route

    def _resolve(self, name: str, ns: str | None) -> Route[U]:
        full = parse_repository(name)
        first, _, rest = full.partition("/")
        if ns is not None:
            upstream = self._by_ns.get(ns.strip().lower())
            if upstream is None:
                raise NoRoute(f"no upstream for ns={ns!r}; configured: {', '.join(self.hosts)}")
            if rest and self._by_ns.get(first) is upstream:
                # containerd with override_path and a mirror URL of /v2/<host> sends the host
                # and the ns both. Only a host or alias, whose dot no repository's first
                # component has on these registries, is taken so: a short prefix may be one
                # (mcr.microsoft.com/mcr/hello-world).
                return self._route(upstream, RepositoryName(rest))
            return self._route(upstream, full)
        if rest and first in self._by_prefix:
            return self._route(self._by_prefix[first], RepositoryName(rest))
        if self._default is None:
            raise NoRoute(
                f"{full!r} names no upstream and there is no default one; "
                f"prefix it with one of: {', '.join(sorted(self._by_prefix))}"
            )
        return self._route(self._default, full)

    @staticmethod
    def _route(upstream: U, repository: RepositoryName) -> Route[U]:
        if upstream.settings.adds_library_prefix and "/" not in repository:
            repository = RepositoryName(f"library/{repository}")
        return Route(upstream, repository)
