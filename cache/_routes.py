"""Which routes each stored digest is known under, so that content is read only through them.

The store is shared by digest: a layer fetched for ``docker.io/library/alpine`` is the same
file as the one ``ghcr.io/org/private`` names. A client whose access policy allows only some
repositories could otherwise read any cached content by digest through a repository it may
pull. So every stored digest carries the routes, ``(upstream host, repository)``, it was
fetched or confirmed under. A read through another route is served from the store only when
the caller may read one of the known routes; otherwise the upstream is asked once, with a
HEAD, whether the route has that digest (its answer, 200 or 404, is the client's answer), and
the route is added. Without an access policy every caller may read every route and no check
is made.

:class:`RouteBook` is the in-memory side: a bounded least-recently-used map of what the index
said, plus the routes learnt since the last bookkeeping batch, which the cache writes to the
index with that batch. Forgetting an entry costs at most one more HEAD. Only the event loop
touches it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final, TypeAlias

from moorage.upstreams.reference import Digest

__all__ = ["MAX_ROUTES_PER_DIGEST", "ContentRoute", "MayRead", "RouteBook"]

#: (upstream host, repository on that upstream).
ContentRoute: TypeAlias = tuple[str, str]
#: Whether the caller may read content through a route; None when it may read every route.
MayRead: TypeAlias = Callable[[str, str], bool] | None

#: Routes kept per digest (the most recent); a route dropped past this costs one more HEAD.
MAX_ROUTES_PER_DIGEST: Final = 64
DEFAULT_CAPACITY: Final = 65_536


def bounded(routes: Iterable[ContentRoute]) -> tuple[ContentRoute, ...]:
    """The last ``MAX_ROUTES_PER_DIGEST`` distinct routes, oldest first."""
    kept = list(dict.fromkeys(routes))
    return tuple(kept[-MAX_ROUTES_PER_DIGEST:])


class RouteBook:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._known: OrderedDict[Digest, tuple[ContentRoute, ...]] = OrderedDict()
        self._capacity = capacity
        #: Routes learnt since the last batch, to be added to the index.
        self._learnt: dict[Digest, list[ContentRoute]] = {}

    def known(self, digest: Digest) -> tuple[ContentRoute, ...] | None:
        """The routes of ``digest`` if in memory; None when the index must be asked."""
        routes = self._known.get(digest)
        if routes is not None:
            self._known.move_to_end(digest)
        return routes

    def remember(self, digest: Digest, routes: tuple[ContentRoute, ...]) -> None:
        """What the index said of ``digest``, merged with what was learnt meanwhile."""
        learnt = self._learnt.get(digest, [])
        self._put(digest, bounded((*routes, *learnt)))

    def learn(self, digest: Digest, route: ContentRoute) -> None:
        """``digest`` was fetched or confirmed under ``route``."""
        self._learnt.setdefault(digest, []).append(route)
        current = self._known.get(digest)
        if current is not None:
            self._put(digest, bounded((*current, route)))

    def _put(self, digest: Digest, routes: tuple[ContentRoute, ...]) -> None:
        self._known[digest] = routes
        self._known.move_to_end(digest)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)

    def take_learnt(self) -> dict[Digest, list[ContentRoute]]:
        """The routes learnt since the last call, for the index."""
        learnt, self._learnt = self._learnt, {}
        return learnt

    def relearn(self, learnt: dict[Digest, list[ContentRoute]]) -> None:
        """Routes taken for a batch that could not be written: to be written with the next."""
        for digest, routes in learnt.items():
            self._learnt.setdefault(digest, []).extend(routes)

    def forget(self, digest: Digest) -> None:
        """The content left the store: its routes go with it."""
        self._known.pop(digest, None)
        self._learnt.pop(digest, None)
