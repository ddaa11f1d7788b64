"""The Grafana dashboard (infra/grafana/dashboards/docflow.json): a valid dashboard, provisioned by
docker-compose.yml with Prometheus as its data source, whose every query reads only metrics that
docflow's processes expose.

What they expose is read from the sources, not listed here: prometheus_client's registry once
pipeline.metrics is imported (what every role's /metrics serves), and Faust's Prometheus sensor
as pipeline.app sets it up for each role, created on a registry of its own.
"""

from __future__ import annotations

import copy
import json

import faust
import pytest
import yaml
from faust.sensors.prometheus import setup_prometheus_sensors
from prometheus_client import REGISTRY, CollectorRegistry

import pipeline.metrics  # noqa: F401  (registers docflow's metrics in the default registry)
from pipeline.app import ROLES, sensor_prefix
from pipeline.settings import REPO_ROOT
from tests.metric_names import (
    DASHBOARD,
    dashboard_metrics,
    exposed_series,
    load_dashboard,
    metric_names,
    panels,
    queries,
    unknown_metrics,
)

GRAFANA = REPO_ROOT / "infra" / "grafana"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def known_series() -> set[str]:
    """Every series name a docflow role's /metrics page can carry."""
    known = exposed_series(REGISTRY.collect())
    for role in ROLES:
        registry = CollectorRegistry()
        setup_prometheus_sensors(faust.App(f"metric-names-{role}"), registry=registry, name_prefix=sensor_prefix(role))
        known |= exposed_series(registry.collect())
    return known


def test_the_dashboard_is_a_grafana_dashboard_on_the_provisioned_prometheus(dashboard):
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [prometheus] = datasource["datasources"]
    assert prometheus["type"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        position = panel["gridPos"]
        assert 0 <= position["x"] and position["x"] + position["w"] <= 24 and position["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": prometheus["uid"]}, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == prometheus["uid"], panel["title"]


def test_every_query_reads_only_metrics_docflow_exposes(dashboard, known_series):
    assert unknown_metrics(dashboard, known_series) == {}


def test_a_panel_reading_an_unknown_metric_is_named(dashboard, known_series):
    broken = copy.deepcopy(dashboard)
    panel = next(panel for panel in broken["panels"] if panel["title"] == "Chunks per second per stage")
    panel["targets"][0]["expr"] = "sum(rate(docproc_chunks_made_total[$__rate_interval]))"
    assert unknown_metrics(broken, known_series) == {"Chunks per second per stage": {"docproc_chunks_made_total"}}


def test_the_dashboard_shows_what_operators_asked_for(dashboard):
    read = dashboard_metrics(dashboard)
    wanted = {
        "ingest_uploads_total",  # uploads by status
        "documents_state_transitions_total",  # documents per state
        "docproc_chunks_produced_total",  # chunks per second: chunker, embedder, indexer
        "embedding_texts_processed_total",
        "index_chunks_upserted_total",
        "embedding_batch_processing_duration_seconds_bucket",  # embedding latency and errors
        "embedding_openai_api_duration_seconds_bucket",
        "embedding_openai_api_errors_total",
        "search_duration_seconds_bucket",  # search latency
        "search_requests_total",
    }
    # Consumer lag of every role, from Faust's sensor.
    for role in ROLES:
        wanted |= {
            f"{sensor_prefix(role)}_topic_partition_end_offset",
            f"{sensor_prefix(role)}_topic_partition_offset_commited",
        }
    assert wanted <= read, wanted - read


def test_metric_names_are_read_past_functions_labels_ranges_and_groupings():
    expr = (
        'histogram_quantile(0.95, sum by (le, topic) (rate(x_seconds_bucket{job="a", le!="b"}[$__rate_interval])))'
        " - on (instance, topic) group_left y_total offset 5m > bool 2e3 and z"
    )
    assert metric_names(expr) == {"x_seconds_bucket", "y_total", "z"}


def test_grafana_is_provisioned_with_this_dashboard_and_prometheus():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["image"].startswith("grafana/grafana:") and not grafana["image"].endswith(":latest")
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    # Bind mounts as target → source ("./source:/target:ro").
    mounts = dict(volume.split(":")[1::-1] for volume in grafana["volumes"] if volume.startswith("./"))
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "docflow.yml").read_text())
    [files] = provider["providers"]
    dashboards_dir = REPO_ROOT / mounts[files["options"]["path"]]
    assert (dashboards_dir / DASHBOARD.name).samefile(DASHBOARD)
    for kind, name in (("datasources", "prometheus.yml"), ("dashboards", "docflow.yml")):
        assert (REPO_ROOT / mounts[f"/etc/grafana/provisioning/{kind}/{name}"]).samefile(
            GRAFANA / "provisioning" / kind / name
        )
    [datasource] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    assert compose["services"]["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]


def test_every_panel_has_a_query(dashboard):
    assert all(exprs for exprs in queries(dashboard).values())
    json.dumps(dashboard)  # and it stays plain JSON after loading
