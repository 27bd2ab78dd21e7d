"""Failed sign-ins per client: token buckets per address and user name, and per address, for
``/token`` and Basic sign-ins on ``/v2/`` alike (guessing passwords costs from one budget
wherever it is tried).

Each password check is charged before it runs, so a burst of guesses sent at once cannot pass
before the first fails, and a check that succeeds is refunded: clients that sign in correctly,
and anonymous token requests (which check nothing), are never limited, however many share an
address behind a NAT or an ingress.

Addresses are keyed by client: an IPv4 address, or the /64 network of an IPv6 one (a single
host usually holds a whole /64, so keying by address would give it unlimited buckets).

:class:`CheckSlots` bounds the password checks each client has in flight: they run on two
threads in the order they come, and a client's whole budget sent at once would otherwise queue
ahead of every other client's sign-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

__all__ = ["RATE_LIMITER", "CheckSlots", "RateLimiter"]

MAX_CLIENTS_TRACKED: Final = 10_000
#: A client's budget across user names, in multiples of the per-user one.
CLIENT_BUDGET_FACTOR: Final = 3


def client_key(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{parsed}/64", strict=False))
    return str(parsed)


class RateLimiter:
    """``per_minute`` failed sign-ins per client and user name, refilled continuously, and three
    times as many per client whatever the names.

    Keyed by user too, so that one client guessing one user's password (or a daemon sending its
    Docker Hub login to its mirror) does not lock every other user behind the same NAT address
    or ingress out; the looser per-client budget still bounds the guesses one client makes
    across names."""

    def __init__(self, per_minute: int) -> None:
        self._per_user = _Buckets(per_minute)
        self._per_client = _Buckets(per_minute * CLIENT_BUDGET_FACTOR)

    def allow(self, address: str, user: str) -> float | None:
        """Spend one sign-in: None when allowed, else the seconds until the next one is."""
        client = client_key(address)
        keys = ((self._per_user, f"{client} {user[:64]}"), (self._per_client, client))
        waits = [buckets.level(key) for buckets, key in keys]
        if all(wait is None for wait in waits):
            for buckets, key in keys:
                buckets.spend(key)
            return None
        return max(wait for wait in waits if wait is not None)

    def refund(self, address: str, user: str) -> None:
        """Give back what a sign-in that succeeded spent."""
        client = client_key(address)
        self._per_user.refund(f"{client} {user[:64]}")
        self._per_client.refund(client)


class _Buckets:
    """Token buckets by key, the least recently used forgotten past ``MAX_CLIENTS_TRACKED``."""

    def __init__(self, per_minute: int) -> None:
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, key: str, now: float) -> float:
        tokens, since = self._buckets.get(key, (self._capacity, now))
        return min(self._capacity, tokens + (now - since) * self._rate)

    def level(self, key: str) -> float | None:
        """None when ``key`` may spend one, else the seconds until it may."""
        tokens = self._tokens(key, time.monotonic())
        return None if tokens >= 1 else (1 - tokens) / self._rate

    def spend(self, key: str) -> None:
        now = time.monotonic()
        tokens = self._tokens(key, now) - 1
        self._buckets.pop(key, None)
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > MAX_CLIENTS_TRACKED:
            self._buckets.popitem(last=False)

    def refund(self, key: str) -> None:
        now = time.monotonic()
        if key in self._buckets:
            self._buckets[key] = (min(self._capacity, self._tokens(key, now) + 1), now)


class CheckSlots:
    """At most ``per_client`` password checks in flight for each client; its others wait.

    bcrypt checks run on a few threads in the order they come. Without a bound, one client
    spending its whole budget of failures at once (hundreds of guesses, each allowed) queued
    them all ahead of every other client's sign-in, which waited for seconds behind them."""

    def __init__(self, per_client: int) -> None:
        self._per_client = per_client
        #: Each client with checks running or waiting: its slots, and how many hold or await them.
        self._clients: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def held(self, address: str) -> AsyncIterator[None]:
        client = client_key(address)
        slots, users = self._clients.get(client, (None, 0))
        if slots is None:
            slots = asyncio.Semaphore(self._per_client)
        self._clients[client] = (slots, users + 1)
        try:
            async with slots:
                yield
        finally:
            slots, users = self._clients[client]
            if users == 1:
                del self._clients[client]
            else:
                self._clients[client] = (slots, users - 1)


RATE_LIMITER: Final = web.AppKey("sign_in_rate_limiter", RateLimiter)
