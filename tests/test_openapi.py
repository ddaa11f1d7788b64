"""The web API's OpenAPI description (web/static/openapi.json, GET /docs) against the routes the web role serves.

The routes come from the aiohttp router of a web app built in a subprocess (building one
in-process would register its Prometheus metrics a second time next to other tests' apps),
with a vector index configured so that search is among them. /docs itself, and seed 001's
/ingest aliases, are checked on a running web worker of the session broker.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp
import pytest

from pipeline.local.workers import WorkerStack, worker_env
from web import docs

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
UNDOCUMENTED = {"/"}  # the upload page

LIST_ROUTES = """
import json, sys, tempfile
from pipeline.app import create_app
from pipeline.settings import Settings
from pipeline.local.ports import free_port

settings = Settings(home=tempfile.mkdtemp(), web_port=free_port(), index="milvus", embedding_backend="hashing")
app = create_app(settings, "web")
routes = sorted(
    {(resource.canonical, route.method) for resource in app.web.web_app.router.resources() for route in resource}
)
print(json.dumps(routes))
"""


@pytest.fixture(scope="module")
def served() -> set[tuple[str, str]]:
    done = subprocess.run([sys.executable, "-c", LIST_ROUTES], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    routes = {tuple(route) for route in json.loads(done.stdout.strip().splitlines()[-1])}
    return {(path, method) for path, method in routes if method in METHODS and path not in UNDOCUMENTED}


@pytest.fixture(scope="module")
def spec() -> dict:
    return docs.load()


def documented(spec: dict) -> set[tuple[str, str]]:
    return {(path, method) for method, path, _ in docs.operations(spec)}


def test_the_description_is_valid_openapi_3_1(spec):
    from openapi_spec_validator import validate

    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_every_documented_operation_is_served(spec, served):
    assert documented(spec) - served == set()


def test_every_served_route_is_documented(spec, served):
    assert served - documented(spec) == set()


def test_errors_and_credentials_are_described(spec):
    error = spec["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["code", "message"]
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    assert (schemes["apiKeyHeader"]["in"], schemes["apiKeyHeader"]["name"]) == ("header", "X-API-Key")
    assert (schemes["wsToken"]["in"], schemes["wsToken"]["name"]) == ("query", "token")
    for method, path, op in docs.operations(spec):
        assert op.get("responses"), f"{method} {path} has no responses"
        if path.startswith("/api/") or path.startswith("/ingest/"):
            assert "401" in op["responses"] and "403" in op["responses"], f"{method} {path}"
            assert op["security"], f"{method} {path} names no credentials"
    listing = spec["paths"]["/api/v1/documents"]
    assert {p["name"] for p in listing["get"]["parameters"] if "name" in p} >= {"limit", "cursor", "document_key"}
    assert {p["name"] for p in listing["delete"]["parameters"] if "name" in p} >= {"all", "confirm"}


def test_aliases_are_marked_and_match_their_operations(spec):
    upload = spec["paths"]["/ingest/upload"]["post"]
    status = spec["paths"]["/ingest/status/{document_id}"]["get"]
    assert upload["x-alias-of"] == "POST /api/v1/upload"
    assert status["x-alias-of"] == "GET /api/v1/documents/{document_id}"
    assert upload["requestBody"] == spec["paths"]["/api/v1/upload"]["post"]["requestBody"]
    assert status["responses"] == spec["paths"]["/api/v1/documents/{document_id}"]["get"]["responses"]


def test_without_an_index_search_is_left_out(spec):
    assert "/api/v1/search" in spec["paths"]
    assert "/api/v1/search" not in docs.load("none")["paths"]


def test_the_page_lists_every_operation_without_scripts(spec):
    page = docs.render(spec)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    for method, path, _ in docs.operations(spec):
        assert f"{method} {path}" in page


@pytest.fixture(scope="module")
def web(kafka_settings, tmp_path_factory):
    stack = WorkerStack(kafka_settings, worker_env(kafka_settings), tmp_path_factory.mktemp("openapi-worker-logs"))
    try:
        [worker] = stack.launch({"web": 1})
        yield worker
    finally:
        stack.stop_all()


async def test_a_running_worker_serves_the_description_and_the_page(web):
    async with aiohttp.ClientSession(web.url) as session:
        async with session.get("/docs/openapi.json") as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            served_spec = await response.json()
        async with session.get("/docs") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            page = await response.text()
    assert served_spec["openapi"].startswith("3.1")
    assert "/api/v1/search" not in served_spec["paths"]  # the session broker's pipeline has no index
    assert "/ingest/upload" in served_spec["paths"]
    assert "POST /api/v1/upload" in page and "/docs/openapi.json" in page and "<script" not in page


async def test_seed_001_aliases_upload_and_report_status(web):
    headers = {"X-Company-ID": "openapi-co"}
    form = aiohttp.FormData()
    form.add_field("file", b"The aliases reach the same views as the API's own paths. " * 20, filename="alias.txt")
    form.add_field("title", "alias")
    async with aiohttp.ClientSession(web.url, headers=headers) as session:
        async with session.post("/ingest/upload", data=form) as response:
            body = await response.json()
            assert response.status == 202, body
        document_id = body["document_id"]
        status = None
        for _ in range(100):  # until the worker's status table has the upload's event
            async with session.get(f"/ingest/status/{document_id}") as response:
                status = await response.json()
                if response.status == 200:
                    break
                assert response.status in (404, 503), status
            await asyncio.sleep(0.2)
        assert status["document_id"] == document_id and status["company_id"] == "openapi-co"
        async with session.get(f"/api/v1/documents/{document_id}") as response:
            assert response.status == 200
            assert (await response.json())["document_id"] == document_id
        # The status alias reads only; another company's document is as unknown as a missing one.
        async with session.delete(f"/ingest/status/{document_id}") as response:
            assert response.status == 405
        async with session.get(f"/ingest/status/{document_id}", headers={"X-Company-ID": "other-co"}) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
