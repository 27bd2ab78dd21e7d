"""/metrics after a scripted sequence of pulls (cold, warm, concurrent, stale): exact deltas."""

from __future__ import annotations

import asyncio
import os
import platform

from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from moorage.proxy._metrics import Metrics
from moorage.proxy.cli import main
from moorage.upstreams.reference import ACCEPT_ALL_MANIFESTS
from tests.fakes import FakeRegistry

from .conftest import StartMoorage, advance_clock, until_settled

Client = TestClient[web.Request, web.Application]
ALL = {"Accept": ACCEPT_ALL_MANIFESTS}
#: Counters whose every change the test accounts for (histograms and timings are left out).
COUNTED = (
    "moorage_requests_total",
    "moorage_cache_results_total",
    "moorage_served_bytes_total",
    "moorage_upstream_fetched_bytes_total",
    "moorage_upstream_requests_total",
    "moorage_upstream_rate_limited_total",
    "moorage_upstream_retries_total",
    "moorage_fill_resumes_total",
    "moorage_fill_failures_total",
    "moorage_digest_mismatches_total",
    "moorage_upstream_token_fetches_total",
)


async def scrape(client: Client) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    changes = {}
    for key, value in after.items():
        if key.startswith(COUNTED) and value != before.get(key, 0.0):
            changes[key] = value - before.get(key, 0.0)
    return changes


def without_metrics_requests(changes: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in changes.items() if not k.startswith("moorage_requests_total{kind=other,method=GET")}


async def test_metric_deltas_for_cold_warm_concurrent_and_stale_pulls(
    start_moorage: StartMoorage, upstream: FakeRegistry
) -> None:
    moorage = await start_moorage(tag_ttl="1h", revalidate_timeout="5s")
    layer = os.urandom(100_000)
    image = upstream.add_image("library/app", "1", [layer], config=b'{"os":"linux"}')
    manifest_size, config_size = len(image.manifest), len(b'{"os":"linux"}')

    async def pull() -> None:
        assert (await moorage.get("/v2/app/manifests/1", headers=ALL)).status == 200
        for blob in (image.config_digest, *image.layer_digests):
            assert (await (await moorage.get(f"/v2/app/blobs/{blob}")).read()) is not None

    # Cold: everything is a miss and is fetched once.
    before = await scrape(moorage)
    await pull()
    assert without_metrics_requests(delta(before, await scrape(moorage))) == {
        "moorage_requests_total{kind=manifest,method=GET,status=200}": 1,
        "moorage_requests_total{kind=blob,method=GET,status=200}": 2,
        "moorage_cache_results_total{kind=manifest,result=miss,upstream=docker.io}": 1,
        "moorage_cache_results_total{kind=blob,result=miss,upstream=docker.io}": 2,
        "moorage_served_bytes_total{kind=manifest,result=miss,upstream=docker.io}": manifest_size,
        "moorage_served_bytes_total{kind=blob,result=miss,upstream=docker.io}": config_size + len(layer),
        "moorage_upstream_fetched_bytes_total{kind=manifest,upstream=docker.io}": manifest_size,
        "moorage_upstream_fetched_bytes_total{kind=blob,upstream=docker.io}": config_size + len(layer),
        "moorage_upstream_requests_total{kind=manifest,method=GET,status=200,upstream=docker.io}": 1,
        "moorage_upstream_requests_total{kind=blob,method=GET,status=200,upstream=docker.io}": 2,
    }
    # A client has its last byte once the digest is verified; the blob is stored just after.
    await until_settled(moorage)
    after = await scrape(moorage)
    assert after["moorage_store_entries{}"] == 3
    assert after["moorage_store_bytes{}"] == manifest_size + config_size + len(layer)

    # Warm (within the tag's freshness): all hits, nothing upstream.
    before = after
    await pull()
    assert without_metrics_requests(delta(before, await scrape(moorage))) == {
        "moorage_requests_total{kind=manifest,method=GET,status=200}": 1,
        "moorage_requests_total{kind=blob,method=GET,status=200}": 2,
        "moorage_cache_results_total{kind=manifest,result=hit,upstream=docker.io}": 1,
        "moorage_cache_results_total{kind=blob,result=hit,upstream=docker.io}": 2,
        "moorage_served_bytes_total{kind=manifest,result=hit,upstream=docker.io}": manifest_size,
        "moorage_served_bytes_total{kind=blob,result=hit,upstream=docker.io}": config_size + len(layer),
    }

    # Concurrent: four clients, one fill; three join it.
    big = os.urandom(1_000_000)
    digest = upstream.add_blob(big)
    upstream.slow_blob(digest, chunk=100_000, delay=0.02)
    before = await scrape(moorage)
    responses = await asyncio.gather(*(moorage.get(f"/v2/app/blobs/{digest}") for _ in range(4)))
    assert [len(await r.read()) for r in responses] == [len(big)] * 4
    assert without_metrics_requests(delta(before, await scrape(moorage))) == {
        "moorage_requests_total{kind=blob,method=GET,status=200}": 4,
        "moorage_cache_results_total{kind=blob,result=miss,upstream=docker.io}": 1,
        "moorage_cache_results_total{kind=blob,result=coalesced,upstream=docker.io}": 3,
        "moorage_served_bytes_total{kind=blob,result=miss,upstream=docker.io}": len(big),
        "moorage_served_bytes_total{kind=blob,result=coalesced,upstream=docker.io}": 3 * len(big),
        "moorage_upstream_fetched_bytes_total{kind=blob,upstream=docker.io}": len(big),
        "moorage_upstream_requests_total{kind=blob,method=GET,status=200,upstream=docker.io}": 1,
    }

    # Stale: the tag aged, the upstream rate-limits the HEAD; the last answer is served.
    advance_clock(moorage, 3601)
    upstream.fail_next(1, 429, retry_after=60)
    before = await scrape(moorage)
    stale = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert stale.headers["Warning"] == '110 - "stale"'
    assert without_metrics_requests(delta(before, await scrape(moorage))) == {
        "moorage_requests_total{kind=manifest,method=GET,status=200}": 1,
        "moorage_cache_results_total{kind=manifest,result=stale,upstream=docker.io}": 1,
        "moorage_served_bytes_total{kind=manifest,result=stale,upstream=docker.io}": manifest_size,
        "moorage_upstream_requests_total{kind=manifest,method=HEAD,status=429,upstream=docker.io}": 1,
        "moorage_upstream_rate_limited_total{upstream=docker.io}": 1,
    }


async def test_an_upstream_that_does_not_answer_shows_in_the_request_counts(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """A refused connection has no HTTP status; counted as ``error``, an outage is on the
    dashboard's upstream requests panel, not only in the retry count."""
    upstream.add_image("library/app", "1")
    await upstream.stop_listening()
    before = await scrape(moorage)
    refused = await moorage.get("/v2/app/manifests/1", headers=ALL)
    assert refused.status == 503
    message = (await refused.json())["errors"][0]["message"]
    assert "docker.io" in message and "Connect call failed" in message
    assert "127.0.0.1" not in message, "the upstream's network address is not the client's business"
    changes = delta(before, await scrape(moorage))
    attempts = changes["moorage_upstream_requests_total{kind=manifest,method=GET,status=error,upstream=docker.io}"]
    assert attempts == 1 + changes["moorage_upstream_retries_total{upstream=docker.io}"] >= 2


async def test_metrics_can_move_to_their_own_listener(start_moorage: StartMoorage) -> None:
    moorage = await start_moorage(metrics_listen="127.0.0.1:0")
    assert (await moorage.get("/metrics")).status == 404


async def test_failure_counters_are_there_at_zero_from_the_start(start_moorage: StartMoorage) -> None:
    """``rate()`` and ``increase()`` see a counter's first step only from a sample before it: a
    series born at 1 hid the first fill failure after every restart from the alerts."""
    moorage = await start_moorage()
    samples = await scrape(moorage)
    for upstream in ("docker.io", "ghcr.io"):
        for name in ("moorage_fill_failures_total", "moorage_fill_resumes_total", "moorage_upstream_retries_total"):
            assert samples[f"{name}{{upstream={upstream}}}"] == 0
        assert samples[f"moorage_digest_mismatches_total{{kind=manifest,upstream={upstream}}}"] == 0
        assert samples[f"moorage_upstream_rate_limited_total{{upstream={upstream}}}"] == 0
    for reason in ("size", "disk_full", "corrupt", "lifecycle", "gc"):
        assert samples[f"moorage_evictions_total{{reason={reason}}}"] == 0
    assert not [name for name in samples if "_created" in name], "no *_created series doubling the scrape"


async def test_the_build_serving_is_a_metric_with_the_version_the_cli_prints(start_moorage: StartMoorage) -> None:
    """During a rolling upgrade or a rollback, which replicas run which build."""
    printed = CliRunner().invoke(main, ["--version"]).output.split()
    assert printed[0] == "moorage"
    moorage = await start_moorage()
    (build,) = [name for name in await scrape(moorage) if name.startswith("moorage_build_info")]
    assert f"version={printed[1]}" in build and f"python={platform.python_version()}" in build
    assert (await scrape(moorage))[build] == 1


def test_methods_a_client_makes_up_share_one_series() -> None:
    """aiohttp's pure-Python parser takes any token for a method: 20,000 made-up ones made
    20,000 series, and /metrics and the process grew with each."""
    metrics = Metrics()
    for number in range(100):
        metrics.on_request("other", f"M{number:05d}X", 405, 0.001, None, None, 0)
    metrics.on_request("manifest", "GET", 200, 0.001, None, None, 0)
    methods = {
        sample.labels["method"]
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name == "moorage_requests_total"
    }
    assert methods == {"other", "GET"}


async def test_upstream_requests_are_counted_by_what_they_ask_whatever_the_repository_is_called(
    moorage: Client, upstream: FakeRegistry
) -> None:
    """A repository with a component named ``manifests`` had its blob and tag list requests
    counted as manifest GETs: the dashboard's manifest GETs kept went below zero."""
    image = upstream.add_image("team/manifests/app", "1")
    before = await scrape(moorage)
    assert (await moorage.get(f"/v2/team/manifests/app/blobs/{image.layer_digests[0]}")).status == 200
    assert (await moorage.get("/v2/team/manifests/app/tags/list")).status == 200
    assert (await moorage.get("/v2/team/manifests/app/manifests/1", headers=ALL)).status == 200
    await until_settled(moorage)
    changes = delta(before, await scrape(moorage))
    for kind in ("blob", "tags", "manifest"):
        assert changes[f"moorage_upstream_requests_total{{kind={kind},method=GET,status=200,upstream=docker.io}}"] == 1
