"""Prometheus metrics, in a registry per application (so every test builds a fresh one).

Labels are bounded: upstream host, kind (manifest|blob|tags), result, method, status class.
Never a repository, digest, user or credential. Also the upstream observer: the registry
client reports responses, token fetches, retries and rate-limit budgets here.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from moorage.upstreams import RateLimitState, UpstreamError

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moorage_requests",
            "Client requests by route kind, method and status.",
            ["kind", "method", "status"],
            registry=r,
        )
        self.cache_results = Counter(
            "moorage_cache_results",
            "Answers by kind, upstream and how they were obtained "
            "(hit, miss, coalesced, revalidated, refreshed, stale).",
            ["kind", "upstream", "result"],
            registry=r,
        )
        self.served_bytes = Counter(
            "moorage_served_bytes", "Body bytes sent to clients, by kind and result.", ["kind", "result"], registry=r
        )
        self.upstream_requests = Counter(
            "moorage_upstream_requests",
            "Requests sent upstream, by upstream, method, kind and status.",
            ["upstream", "method", "kind", "status"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "moorage_upstream_request_duration_seconds",
            "Time to an upstream's response headers.",
            ["upstream", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_fetches = Counter(
            "moorage_upstream_token_fetches", "Tokens fetched from upstream token services.", ["upstream"], registry=r
        )
        self.retries = Counter("moorage_upstream_retries", "Upstream requests retried.", ["upstream"], registry=r)
        self.ratelimit_limit = Gauge(
            "moorage_upstream_ratelimit_limit", "Pull limit the upstream last reported.", ["upstream"], registry=r
        )
        self.ratelimit_remaining = Gauge(
            "moorage_upstream_ratelimit_remaining", "Pulls left the upstream last reported.", ["upstream"], registry=r
        )
        self.request_latency = Histogram(
            "moorage_request_duration_seconds",
            "Client request time until the answer is complete, by kind.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fills_in_flight = Gauge("moorage_fills_in_flight", "Blob fills running now.", registry=r)
        self.fill_resumes = Counter("moorage_fill_resumes", "Upstream blob bodies resumed after a cut.", registry=r)

    def track_fills(self, count: Callable[[], int], resumes: Callable[[], int]) -> None:
        self.fills_in_flight.set_function(lambda: float(count()))
        previous = [0]

        def collect_resumes() -> None:
            now = resumes()
            if now > previous[0]:
                self.fill_resumes.inc(now - previous[0])
                previous[0] = now

        self._collect_resumes = collect_resumes

    def render(self) -> bytes:
        collect = getattr(self, "_collect_resumes", None)
        if collect is not None:
            collect()
        return generate_latest(self.registry)

    # -- UpstreamObserver -----------------------------------------------------------------------

    def on_response(self, upstream: str, method: str, kind: str, status: int, seconds: float) -> None:
        self.upstream_requests.labels(upstream, method, kind, str(status)).inc()
        self.upstream_latency.labels(upstream, kind).observe(seconds)

    def on_token_fetch(self, upstream: str) -> None:
        self.token_fetches.labels(upstream).inc()

    def on_retry(self, upstream: str, error: UpstreamError) -> None:
        self.retries.labels(upstream).inc()

    def on_ratelimit(self, upstream: str, state: RateLimitState) -> None:
        if state.limit is not None:
            self.ratelimit_limit.labels(upstream).set(state.limit)
        if state.remaining is not None:
            self.ratelimit_remaining.labels(upstream).set(state.remaining)
