"""The Grafana dashboard in docs/ only queries metrics Moorage exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


async def test_every_metric_the_dashboard_queries_is_exported(
    moorage: TestClient[web.Request, web.Application],
) -> None:
    text = await (await moorage.get("/metrics")).text()
    exported = {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in SUFFIXES.get(family.type, ("",))
    }
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bmoorage_[a-z_]+", target["expr"])
    }
    assert len(queried) >= 10
    assert queried <= exported, f"not exported: {sorted(queried - exported)}"
