"""Failed sign-ins per client: a token bucket per address, for ``/token`` and Basic sign-ins on
``/v2/`` alike (guessing passwords costs from one budget wherever it is tried).

Each password check is charged before it runs, so a burst of guesses sent at once cannot pass
before the first fails, and a check that succeeds is refunded: clients that sign in correctly,
and anonymous token requests (which check nothing), are never limited, however many share an
address behind a NAT or an ingress.

Addresses are keyed by client: an IPv4 address, or the /64 network of an IPv6 one (a single
host usually holds a whole /64, so keying by address would give it unlimited buckets).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from typing import Final

from aiohttp import web

__all__ = ["RATE_LIMITER", "RateLimiter"]

MAX_CLIENTS_TRACKED: Final = 10_000


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
    """``per_minute`` sign-ins per client, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str, now: float) -> float:
        tokens, since = self._buckets.get(key, (self._capacity, now))
        return min(self._capacity, tokens + (now - since) * self._rate)

    def allow(self, address: str) -> float | None:
        """Spend one request: None when allowed, else the seconds until the next one is."""
        key, now = client_key(address), time.monotonic()
        tokens = self._level(key, now)
        wait = None
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self._rate
        self._buckets.pop(key, None)
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > MAX_CLIENTS_TRACKED:
            self._buckets.popitem(last=False)
        return wait

    def refund(self, address: str) -> None:
        """Give back the request spent on a sign-in that succeeded."""
        key, now = client_key(address), time.monotonic()
        if key in self._buckets:
            self._buckets[key] = (min(self._capacity, self._level(key, now) + 1), now)


RATE_LIMITER: Final = web.AppKey("sign_in_rate_limiter", RateLimiter)
