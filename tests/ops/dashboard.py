"""Read the Grafana dashboard of ops/ and the metric names its queries use (shared by the ops tests)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

OPS = Path(__file__).resolve().parents[2] / "ops"
DASHBOARD = OPS / "grafana" / "dashboards" / "openhydra.json"
METRIC_NAME = re.compile(r"\bopenhydra_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",),
            "summary": ("_count", "_sum", ""), "untyped": ("",)}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of every panel, rows included."""
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                out.append((inner["title"], target["expr"]))
    return out


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def sample_names(families: Iterable[tuple[str, str]]) -> set[str]:
    """Sample names a scrape can carry for (family name, type) pairs, e.g. x (counter) -> x_total."""
    names = set()
    for name, kind in families:
        base = name.removesuffix("_total") if kind == "counter" else name
        names.update(base + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names
