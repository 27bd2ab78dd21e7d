"""Prometheus metrics, in a registry per application (so every test builds a fresh one).

Labels are bounded: upstream host, kind (manifest|blob|tags|referrers|other), result, method, status.
Never a repository, digest, user or credential. This class is also the upstream observer
(responses, tokens, retries, rate-limit budgets) and the cache observer (bytes fetched,
resumes, digest mismatches, store failures, evictions, expired images, maintenance passes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from moorage.cache import ContentKind
from moorage.upstreams import RateLimitState, UpstreamError
from moorage.upstreams.reference import Digest

from ._build import package_version, python_version

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


_MAX_REQUEST_CHILDREN = 4096
#: The methods counted by name in ``moorage_requests_total``; any other is ``other``.
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Why content leaves the store (the ``reason`` label), each counted from zero at start.
EVICTION_REASONS = ("size", "disk_full", "corrupt", "lifecycle", "gc")

# A ``*_created`` gauge beside every counter and histogram series doubles what is scraped,
# and Prometheus does not use it with this text format.
disable_created_metrics()  # type: ignore[no-untyped-call]
_RequestChildren = tuple[Counter, Histogram, Counter | None, Counter | None]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._request_children: dict[tuple[str, str, int, str | None, str | None], _RequestChildren] = {}
        r = self.registry
        Info("moorage_build", "The build serving: its version and Python's.", registry=r).info(
            {"version": package_version(), "python": python_version()}
        )
        self.requests = Counter(
            "moorage_requests",
            "Client requests by route kind, method and status.",
            ["kind", "method", "status"],
            registry=r,
        )
        self.cache_results = Counter(
            "moorage_cache_results",
            "Answers by kind, upstream and how they were obtained "
            "(hit, miss, coalesced, prefetched, revalidated, refreshed, stale).",
            ["kind", "upstream", "result"],
            registry=r,
        )
        self.served_bytes = Counter(
            "moorage_served_bytes",
            "Body bytes sent to clients, by kind, upstream and result; result=hit is bandwidth saved.",
            ["kind", "upstream", "result"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "moorage_upstream_fetched_bytes",
            "Body bytes received from upstreams into the store.",
            ["upstream", "kind"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "moorage_upstream_requests",
            "Requests sent upstream, by upstream, method, kind and status (error: no answer).",
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
        self.policy_denials = Counter(
            "moorage_policy_denials",
            "Requests the access policy denied, by upstream, rule (1-based) and answer "
            "(refused: 403; challenged: 401 to an anonymous request, which may sign in and ask again).",
            ["upstream", "rule", "answer"],
            registry=r,
        )
        self.rate_limited = Counter(
            "moorage_upstream_rate_limited", "429 answers received from upstreams.", ["upstream"], registry=r
        )
        self.token_fetches = Counter(
            "moorage_upstream_token_fetches",
            "Requests to upstream token services, refused ones included.",
            ["upstream"],
            registry=r,
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
        self.first_byte = Histogram(
            "moorage_blob_first_byte_seconds",
            "Time from a blob request to its response headers, by result (hit: sendfile; miss: upstream answered).",
            ["result"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fills_in_flight = Gauge("moorage_fills_in_flight", "Blob fills running now.", registry=r)
        self.fill_readers = Gauge("moorage_fill_readers", "Clients following a blob fill now.", registry=r)
        self.fill_resumes = Counter(
            "moorage_fill_resumes", "Upstream blob bodies resumed after a cut.", ["upstream"], registry=r
        )
        self.fill_failures = Counter(
            "moorage_fill_failures",
            "Blob downloads that failed (upstream, digest mismatch, store); their readers were cut.",
            ["upstream"],
            registry=r,
        )
        self.digest_mismatches = Counter(
            "moorage_digest_mismatches",
            "Upstream content that did not hash to its digest (refused, not kept).",
            ["upstream", "kind"],
            registry=r,
        )
        self.store_bytes = Gauge("moorage_store_bytes", "Bytes in the blob store.", registry=r)
        self.store_max_bytes = Gauge("moorage_store_max_bytes", "The store's size cap (0: none).", registry=r)
        self.evictions = Counter(
            "moorage_evictions", "Blobs and manifests removed from the store, by reason.", ["reason"], registry=r
        )
        self.store_failures = Counter(
            "moorage_store_write_failures",
            "Writes to the store that failed (disk full, permissions); nothing kept.",
            registry=r,
        )
        self.evicted_bytes = Counter(
            "moorage_evicted_bytes", "Bytes freed by removing content, by reason.", ["reason"], registry=r
        )
        self.store_entries = Gauge("moorage_store_entries", "Blobs and manifests in the store.", registry=r)
        self.images_expired = Counter(
            "moorage_lifecycle_expired_images",
            "Images expired by lifecycle policies, by upstream and rule priority.",
            ["upstream", "rule"],
            registry=r,
        )
        self.maintenance_seconds = Gauge(
            "moorage_maintenance_last_duration_seconds",
            "How long the last maintenance pass took, by task (gc, lifecycle).",
            ["task"],
            registry=r,
        )
        self.maintenance_finished = Gauge(
            "moorage_maintenance_last_finished_timestamp_seconds",
            "When the last maintenance pass finished, by task (gc, lifecycle).",
            ["task"],
            registry=r,
        )

    def track(
        self,
        fills: Callable[[], int],
        readers: Callable[[], int],
        store_bytes: Callable[[], int],
        store_entries: Callable[[], int],
        store_max_bytes: int | None = None,
        upstreams: Sequence[str] = (),
    ) -> None:
        """Gauges read at scrape time from the cache, and a zero series for each upstream's and
        each eviction reason's counters: a counter's first increment after a start is seen by
        ``rate()`` and ``increase()`` only when the series was there before it, at 0."""
        for upstream in upstreams:
            for counter in (self.fill_resumes, self.fill_failures, self.rate_limited, self.token_fetches, self.retries):
                counter.labels(upstream)
            for kind in ("manifest", "blob"):
                self.digest_mismatches.labels(upstream, kind)
                self.upstream_bytes.labels(upstream, kind)
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason)
            self.evicted_bytes.labels(reason)
        self.fills_in_flight.set_function(lambda: float(fills()))
        self.fill_readers.set_function(lambda: float(readers()))
        self.store_bytes.set_function(lambda: float(store_bytes()))
        self.store_entries.set_function(lambda: float(store_entries()))
        self.store_max_bytes.set(store_max_bytes or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_request(
        self, kind: str, method: str, status: int, seconds: float, upstream: str | None, result: str | None, sent: int
    ) -> None:
        """One client request's counters. This runs for every request, so its labelled
        children are kept in a map of their own instead of looked up through ``labels()``
        (which converts and locks) each time; the map is bounded, as methods come from clients,
        and so is the ``method`` label: one the cache does not know is counted as ``other``."""
        if method not in _METHODS:  # aiohttp's own parser takes any token for a method
            method = "other"
        key = (kind, method, status, upstream, result)
        children = self._request_children.get(key)
        if children is None:
            answered = upstream is not None and result is not None
            # A sign-in refused (401, 429) is counted under its route, but its time, answered
            # before any work, would pull down the route's latency figures.
            timed = "other" if status in (401, 429) else kind
            children = (
                self.requests.labels(kind, method, str(status)),
                self.request_latency.labels(timed),
                self.cache_results.labels(kind, upstream, result) if answered else None,
                self.served_bytes.labels(kind, upstream, result) if answered else None,
            )
            if len(self._request_children) < _MAX_REQUEST_CHILDREN:
                self._request_children[key] = children
        count, latency, results, served = children
        count.inc()
        latency.observe(seconds)
        if results is not None and served is not None:
            results.inc()
            served.inc(sent)

    # -- UpstreamObserver -----------------------------------------------------------------------

    def on_response(self, upstream: str, method: str, kind: str, status: int, seconds: float) -> None:
        self.upstream_requests.labels(upstream, method, kind, str(status)).inc()
        self.upstream_latency.labels(upstream, kind).observe(seconds)
        if status == 429:
            self.rate_limited.labels(upstream).inc()

    def on_no_response(self, upstream: str, method: str, kind: str) -> None:
        self.upstream_requests.labels(upstream, method, kind, "error").inc()

    def on_policy_denial(self, upstream: str, rule: int | None, answer: str) -> None:
        self.policy_denials.labels(upstream, str(rule), answer).inc()

    def on_token_fetch(self, upstream: str) -> None:
        self.token_fetches.labels(upstream).inc()

    def on_token_rate_limited(self, upstream: str) -> None:
        self.rate_limited.labels(upstream).inc()

    def on_retry(self, upstream: str, error: UpstreamError) -> None:
        self.retries.labels(upstream).inc()

    def on_ratelimit(self, upstream: str, state: RateLimitState) -> None:
        if state.limit is not None:
            self.ratelimit_limit.labels(upstream).set(state.limit)
        if state.remaining is not None:
            self.ratelimit_remaining.labels(upstream).set(state.remaining)

    # -- CacheObserver --------------------------------------------------------------------------

    def on_fetched_bytes(self, upstream: str, kind: ContentKind, count: int) -> None:
        self.upstream_bytes.labels(upstream, kind).inc(count)

    def on_fill_resumed(self, upstream: str) -> None:
        self.fill_resumes.labels(upstream).inc()

    def on_fill_failed(self, upstream: str) -> None:
        self.fill_failures.labels(upstream).inc()

    def on_digest_mismatch(self, upstream: str, kind: ContentKind) -> None:
        self.digest_mismatches.labels(upstream, kind).inc()

    def on_stored(self, kind: ContentKind, size: int, digest: Digest) -> None:
        pass  # store_bytes and store_entries are read from the cache at scrape time

    def on_store_failure(self, disk_full: bool) -> None:
        self.store_failures.inc()

    def on_evicted(self, reason: str, count: int, size: int) -> None:
        self.evictions.labels(reason).inc(count)
        self.evicted_bytes.labels(reason).inc(size)

    def on_images_expired(self, upstream: str, rule: int, count: int) -> None:
        self.images_expired.labels(upstream, str(rule)).inc(count)

    def on_maintenance(self, task: str, seconds: float) -> None:
        self.maintenance_seconds.labels(task).set(seconds)
        self.maintenance_finished.labels(task).set_to_current_time()
