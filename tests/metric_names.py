"""Which metric names a Grafana dashboard's queries read, and which ones a Prometheus page exposes.

Shared by the dashboard's own test (against the registry) and the metrics test (against the
pages real workers serve).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import Metric

from pipeline.settings import REPO_ROOT

DASHBOARD = REPO_ROOT / "infra" / "grafana" / "dashboards" / "docflow.json"

# The names of the series a metric family puts on a page, by its type (prometheus_client's
# exposition: a counter `x` is `x_total`, a histogram `x_bucket`, `x_sum` and `x_count`...).
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}

# Words of PromQL that look like names but are none.
KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
    "by", "without", "on", "ignoring", "group_left", "group_right",
}  # fmt: skip
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
RANGES = re.compile(r"\[[^\]]*\]")
GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A name not followed by "(" (which would make it a function or an aggregation).
NAME = re.compile(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers,
    ranges, groupings, functions and keywords are taken out."""
    text = STRINGS.sub(" ", expr)
    text = LABEL_MATCHERS.sub(" ", text)
    text = RANGES.sub(" ", text)
    text = GROUPINGS.sub(" ", text)
    return {name for name in NAME.findall(text) if name.lower() not in KEYWORDS}


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(dashboard: dict) -> dict[str, list[str]]:
    """Each panel's PromQL expressions, by panel title."""
    return {
        panel["title"]: [target["expr"] for target in panel.get("targets", []) if target.get("expr")]
        for panel in panels(dashboard)
        if panel["type"] != "row"
    }


def dashboard_metrics(dashboard: dict) -> set[str]:
    return {name for exprs in queries(dashboard).values() for expr in exprs for name in metric_names(expr)}


def unknown_metrics(dashboard: dict, known: set[str]) -> dict[str, set[str]]:
    """Panel title → the names its queries read that ``known`` lacks; empty when every name is known."""
    unknown = {}
    for title, exprs in queries(dashboard).items():
        names = {name for expr in exprs for name in metric_names(expr)} - known
        if names:
            unknown[title] = names
    return unknown


def exposed_series(families: Iterable[Metric]) -> set[str]:
    """The series names metric families put on a Prometheus page (families from a registry's
    ``collect()`` or from prometheus_client's text parser alike)."""
    return {family.name + suffix for family in families for suffix in SERIES_SUFFIXES[family.type]}
