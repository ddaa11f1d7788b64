"""docker-compose.yml without Docker: the compose specification's own JSON Schema, the files it
mounts, its published ports and images, and the wiring between its services (Prometheus scrapes
every role where it serves /metrics, the workers send traces to Jaeger).

The schema is compose-go's (tests/fixtures/compose-spec/SOURCE.md), the one `docker compose
config` validates with before it interpolates variables, so this reads the file uninterpolated
as well.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from jsonschema import Draft7Validator

from pipeline.app import ROLES
from pipeline.settings import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SCHEMA = REPO_ROOT / "tests" / "fixtures" / "compose-spec" / "compose-spec.json"
PROMETHEUS_CONFIG = REPO_ROOT / "infra" / "prometheus" / "prometheus.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(source on the host, target in the container) of a service's bind mounts, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "~")):
                mounts.append((source, target))
        elif volume.get("type") == "bind":
            mounts.append((volume["source"], volume["target"]))
    return mounts


def named_volumes(service: dict) -> list[str]:
    names = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":")[0]
            if ":" in volume and not source.startswith((".", "/", "~")):
                names.append(source)
        elif volume.get("type") == "volume":
            names.append(volume["source"])
    return names


def test_the_compose_file_follows_the_compose_specification(compose):
    validator = Draft7Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_the_schema_check_refuses_a_misspelt_key(compose):
    broken = {**compose, "services": {**compose["services"], "grafana": {**compose["services"]["grafana"]}}}
    broken["services"]["grafana"]["volume"] = broken["services"]["grafana"].pop("volumes")
    assert list(Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(broken))


def test_every_file_the_compose_file_mounts_or_builds_from_exists(compose):
    missing = []
    for name, service in compose["services"].items():
        for source, _target in bind_mounts(service):
            if not (REPO_ROOT / source).exists():
                missing.append(f"{name}: {source}")
        build = service.get("build")
        if build:
            context = REPO_ROOT / build["context"]
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                missing.append(f"{name}: {context}/Dockerfile")
    assert not missing


def test_every_named_volume_is_declared(compose):
    used = {volume for service in compose["services"].values() for volume in named_volumes(service)}
    assert used <= set(compose["volumes"]), used - set(compose["volumes"])


def test_every_published_port_is_bound_to_loopback_only(compose):
    published = [
        (name, str(port)) for name, service in compose["services"].items() for port in service.get("ports", [])
    ]
    assert published
    assert [(name, port) for name, port in published if not port.startswith("127.0.0.1:")] == []


def test_every_image_is_pinned_to_a_release(compose):
    images = {name: service["image"] for name, service in compose["services"].items() if "image" in service}
    unpinned = {
        name: image
        for name, image in images.items()
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith((":latest", ":main", ":nightly"))
    }
    assert not unpinned


def metrics_port(service: dict) -> int:
    """Where a docflow role's container serves /metrics: its own metrics port, else its web port."""
    env = service["environment"]
    return int(env.get("DOCFLOW_METRICS_PORT") or env["DOCFLOW_WEB_PORT"])


def test_prometheus_scrapes_every_role_on_the_port_it_serves_metrics_on(compose):
    jobs = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    scraped = {
        name: discovery["port"]
        for job in jobs
        for discovery in job.get("dns_sd_configs", [])
        for name in discovery["names"]
    }
    expected = {role: metrics_port(compose["services"][role]) for role in ROLES}
    assert scraped == expected
    # Seed 000's layout: the document processor on :8001, the embedding service on :8002.
    assert (expected["chunker"], expected["embedder"]) == (8001, 8002)


def test_a_role_with_a_metrics_port_listens_on_the_compose_network(compose):
    for role in ROLES:
        env = compose["services"][role]["environment"]
        if env.get("DOCFLOW_METRICS_PORT"):
            assert env["DOCFLOW_METRICS_HOST"] == "0.0.0.0", role


def test_every_role_sends_its_traces_to_jaeger(compose):
    jaeger = compose["services"]["jaeger"]
    assert re.fullmatch(r"jaegertracing/all-in-one:\d+\.\d+\.\d+", jaeger["image"])
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    for role in ROLES:
        service = compose["services"][role]
        assert service["environment"]["DOCFLOW_OTEL_ENDPOINT"] == "http://jaeger:4318", role
        assert "jaeger" in service["depends_on"], role
