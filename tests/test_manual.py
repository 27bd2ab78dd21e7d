"""The manual names what an operator reads: every log event the code writes and every metric
it exports. A line or a series the README does not explain is one no one can alert on."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from moorage.proxy._metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
#: The manual's section on logs, where each event is explained.
LOGS = README.split("\n## Logs\n", 1)[1].split("\n## ", 1)[0]


def _name(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def logged_events() -> set[str]:
    """The values of every ``"event": "..."`` written in the code's log calls, every
    ``event="..."`` keyword (``record.__dict__.update``), and the events of
    ``log_fields(logger, "event", ...)``."""
    events: set[str] = set()
    for room in ("proxy", "cache", "upstreams", "config"):
        for path in (ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and ast.unparse(node.func).endswith("log_fields")
                    and len(node.args) > 1
                    and (event := _name(node.args[1])) is not None
                ):
                    events.add(event)
                if isinstance(node, ast.Call):
                    events |= {
                        event
                        for keyword in node.keywords
                        if keyword.arg == "event" and (event := _name(keyword.value)) is not None
                    }
                if isinstance(node, ast.Dict):
                    for key, value in zip(node.keys, node.values, strict=True):
                        if key is not None and _name(key) == "event" and (event := _name(value)) is not None:
                            events.add(event)
    return events


def test_every_log_event_is_in_the_manual() -> None:
    events = logged_events()
    assert {"fill_failed", "fill_abandoned", "request", "evicted", "log_lines_dropped"} <= events, "all are found"
    assert sorted(event for event in events if f"`{event}`" not in LOGS and f"`event: {event}`" not in LOGS) == []


def test_every_metric_is_in_the_manual() -> None:
    names = {family.name for family in Metrics().registry.collect()}
    assert "moorage_requests" in names or "moorage_requests_total" in names
    # Whole names, as the manual's table writes them: a counter with its _total, an info
    # metric with its _info.
    written = set(re.findall(r"`(moorage_[a-z_]+)`", README))
    assert sorted(name for name in names if not {name, f"{name}_total", f"{name}_info"} & written) == []
