"""Metrics that count what a run did: the session broker and Milvus, one worker process per role
with API keys required (so `company_id` labels hold the key's company), the chunker and the
embedder also serving /metrics on a port of their own (DOCFLOW_METRICS_PORT, seed 000's layout).

Every role's /metrics is read with prometheus_client's text parser. Values labelled with the
test's own company are compared as they are; unlabelled ones as the change over the test,
between two readings taken once nothing moves any more (other modules' leftover messages
reach this stack's consumer groups too, and the indexer counts a batch after reporting it).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from pipeline import metrics
from pipeline.app import ROLES, sensor_prefix
from pipeline.client import DocflowClient
from pipeline.errors import ApiError
from pipeline.local.ports import free_port
from pipeline.local.workers import WorkerStack, tail, worker_command, worker_env
from pipeline.topics import CHUNKS_PROCESSED, DOCUMENTS_RAW, DOCUMENTS_STATUS
from tests.metric_names import dashboard_metrics, exposed_series, load_dashboard
from tests.stack import CONTENT_TYPES, corpus, create_key, expected_chunks, guarded, read_topic

SECRET = "metrics-test-secret"
SEARCHES = ("lorem ipsum dolor", "the second page")
# Every family pipeline/metrics.py defines: the ones whose values this module checks.
DOCFLOW_FAMILIES = {
    family.name
    for metric in vars(metrics).values()
    if isinstance(metric, MetricWrapperBase)
    for family in metric.describe()
}

# (series name, its labels) → value
Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def guarded_settings(milvus_settings):
    return guarded(milvus_settings, SECRET)[0]


@pytest.fixture(scope="module")
def metrics_ports() -> dict[str, int]:
    return {"chunker": free_port(), "embedder": free_port()}


@pytest.fixture(scope="module")
def stack(guarded_settings, metrics_ports, tmp_path_factory):
    env = worker_env(
        guarded_settings, **guarded(guarded_settings, SECRET)[1], DOCFLOW_CONSUMER_SESSION_TIMEOUT_SECONDS="10"
    )
    workers = WorkerStack(guarded_settings, env, tmp_path_factory.mktemp("metrics-worker-logs"))
    try:
        started = [
            workers.start(role, free_port(), **own_port)
            for role in ROLES
            for own_port in [{"DOCFLOW_METRICS_PORT": str(metrics_ports[role])} if role in metrics_ports else {}]
        ]
        workers.wait_healthy(started)
        workers.wait_balanced()
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture
def tenant(guarded_settings, stack) -> tuple[str, str]:
    """A company of this test alone and its API key, once the web worker knows the key."""
    company = f"metrics-{uuid.uuid4().hex[:8]}"
    key = create_key(guarded_settings, company).key
    request = urllib.request.Request(f"{stack.of_role('web')[0].url}/api/v1/documents", headers={"X-API-Key": key})
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5):
                return company, key
        except urllib.error.HTTPError as refusal:
            if refusal.code != 401 or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


async def scrape(url: str) -> list:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            return list(text_string_to_metric_families(await response.text()))


def docflow_samples(families) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families
        if family.name in DOCFLOW_FAMILIES
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


async def settled(urls: dict[str, str], timeout: float = 60.0) -> dict[str, Samples]:
    """Each role's docflow samples, once two readings a second apart agree."""
    previous = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = {role: docflow_samples(await scrape(url)) for role, url in urls.items()}
        if current == previous:
            return current
        previous = current
        await asyncio.sleep(1.0)
    raise AssertionError("the metrics never stopped moving")


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_sets(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for series, labels in samples if series == name]


async def test_a_run_is_counted_by_every_role_as_it_happened(stack, tenant, guarded_settings, tmp_path):
    company, key = tenant
    urls = {role: stack.of_role(role)[0].url for role in ROLES}
    before = await settled(urls)

    def grew(role: str, name: str, **labels: str) -> float:
        return value(after[role], name, **labels) - value(before[role], name, **labels)

    files = corpus(3, seed=61)  # a PDF, a text file and a Markdown file
    async with DocflowClient(urls["web"], api_key=key) as client:
        documents = {}
        for filename, data in files:
            (tmp_path / filename).write_bytes(data)
            documents[(await client.upload(tmp_path / filename))["document_id"]] = filename
        (tmp_path / "tool.exe").write_bytes(b"MZ\x90\x00" + bytes(500))
        with pytest.raises(ApiError) as refused:
            await client.upload(tmp_path / "tool.exe")
        assert refused.value.status == 415
        statuses = await client.wait_all(list(documents), timeout=180)
        assert {status["state"] for status in statuses.values()} == {"completed"}
        for query in SEARCHES:
            await client.search(query)
        with pytest.raises(ApiError) as bad_query:
            await client.search("   ")
        assert bad_query.value.status == 422
    after = await settled(urls)
    sizes = {filename: len(data) for filename, data in files}
    expected_count = sum(len(expected_chunks(filename, data)) for filename, data in files)
    chunks = await read_topic(guarded_settings, CHUNKS_PROCESSED.name, set(documents), expected_count)
    assert len(chunks) == expected_count
    chunks_by_type = Counter(CONTENT_TYPES[Path(documents[chunk["document_id"]]).suffix] for chunk in chunks)
    assert len(chunks_by_type) == 3

    # web: uploads by company, type and outcome; what it produced; states; searches
    web = after["web"]
    mine = [labels for labels in label_sets(web, "ingest_uploads_total") if labels["company_id"] == company]
    assert sorted(mine, key=lambda labels: labels["content_type"]) == [
        {"company_id": company, "content_type": "application/pdf", "status": "accepted"},
        {"company_id": company, "content_type": "other", "status": "rejected"},
        {"company_id": company, "content_type": "text/markdown", "status": "accepted"},
        {"company_id": company, "content_type": "text/plain", "status": "accepted"},
    ]
    assert all(value(web, "ingest_uploads_total", **labels) == 1 for labels in mine)
    assert grew("web", "ingest_upload_file_size_bytes_count") == 3
    assert grew("web", "ingest_upload_file_size_bytes_sum") == sum(sizes.values())
    assert grew("web", "ingest_kafka_messages_produced_total", topic=DOCUMENTS_RAW.name, status="success") == 3
    assert grew("web", "ingest_kafka_messages_produced_total", topic=DOCUMENTS_STATUS.name, status="success") == 3
    assert grew("web", "documents_state_transitions_total", state="completed") == 3
    assert grew("web", "search_requests_total", status="ok") == len(SEARCHES)
    assert grew("web", "search_requests_total", status="rejected") == 1
    assert grew("web", "search_duration_seconds_count") == len(SEARCHES)

    # chunker: every document consumed and processed once, its chunks by company and type
    raw = DOCUMENTS_RAW.name
    assert grew("chunker", "docproc_messages_consumed_total", topic=raw, status="received") == 3
    assert grew("chunker", "docproc_messages_consumed_total", topic=raw, status="processed") == 3
    assert grew("chunker", "docproc_messages_consumed_total", topic=raw, status="failed") == 0
    assert grew("chunker", "docproc_s3_download_duration_seconds_count") == 3
    for content_type, count in chunks_by_type.items():
        labels = {"company_id": company, "content_type": content_type}
        assert value(after["chunker"], "docproc_chunks_produced_total", **labels) == count, content_type
        assert value(after["chunker"], "docproc_processing_duration_seconds_count", **labels) == 1, content_type

    # embedder: every chunk on chunks.processed embedded once, for this company
    assert value(after["embedder"], "embedding_texts_processed_total", company_id=company) == len(chunks)
    assert grew("embedder", "embedding_messages_consumed_total") == len(chunks)
    assert 1 <= grew("embedder", "embedding_batch_processing_duration_seconds_count") <= len(chunks)

    # indexer: every chunk upserted once, no failed write
    assert grew("indexer", "index_chunks_upserted_total") == len(chunks)
    assert grew("indexer", "index_batch_duration_seconds_count") >= 1
    assert sum(v for (name, _), v in after["indexer"].items() if name == "index_errors_total") == sum(
        v for (name, _), v in before["indexer"].items() if name == "index_errors_total"
    )


async def test_every_roles_consumer_lag_is_zero_once_its_work_is_committed(stack):
    """The dashboard's lag (Faust's end offset minus committed offset) is there and reads 0 at rest."""
    deadline = time.monotonic() + 30
    while True:
        lags = {}
        for role in ROLES:
            families = {family.name: family for family in await scrape(stack.of_role(role)[0].url)}
            ends = families[f"{sensor_prefix(role)}_topic_partition_end_offset"].samples
            committed = {
                (s.labels["topic"], s.labels["partition"]): s.value
                for s in families[f"{sensor_prefix(role)}_topic_partition_offset_commited"].samples
            }
            lags[role] = {
                (s.labels["topic"], s.labels["partition"]): s.value
                - committed[(s.labels["topic"], s.labels["partition"])]
                for s in ends
                if (s.labels["topic"], s.labels["partition"]) in committed
            }
        if all(lags.values()) and not any(lag for role_lags in lags.values() for lag in role_lags.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"lag per role, topic and partition: {lags}")
        await asyncio.sleep(1.0)


async def test_every_metric_the_dashboard_reads_is_served_by_some_role(stack):
    served = set()
    for role in ROLES:
        served |= exposed_series(await scrape(stack.of_role(role)[0].url))
    assert dashboard_metrics(load_dashboard()) - served == set()


async def test_the_chunker_and_the_embedder_serve_their_metrics_on_their_own_port_too(stack, metrics_ports):
    for role, port in metrics_ports.items():
        web_port, own_port = await asyncio.gather(
            scrape(stack.of_role(role)[0].url), scrape(f"http://127.0.0.1:{port}")
        )
        assert docflow_samples(own_port) and docflow_samples(own_port) == docflow_samples(web_port), role
        assert f"{sensor_prefix(role)}_messages_received" in {family.name for family in own_port}, role


def test_a_metrics_port_already_taken_stops_the_worker_at_start(tmp_path):
    """Before it reaches any broker: a role that cannot serve its metrics port does not run unscraped."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(
            {name: setting for name, setting in os.environ.items() if not name.startswith("DOCFLOW_")},
            DOCFLOW_HOME=str(tmp_path),
            DOCFLOW_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",  # nothing there: never reached
            DOCFLOW_WEB_PORT=str(free_port()),
            DOCFLOW_METRICS_PORT=str(port),
            DOCFLOW_INDEX="none",
            DOCFLOW_EMBEDDING_BACKEND="hashing",
        )
        log = tmp_path / "chunker.log"
        with open(log, "wb") as output:
            finished = subprocess.run(
                worker_command("chunker"), env=env, stdout=output, stderr=subprocess.STDOUT, timeout=60
            )
    assert finished.returncode != 0
    assert f"('127.0.0.1', {port}): address already in use" in log.read_text(), tail(log)
    assert "Unable to bootstrap" not in log.read_text(), "the broker was tried before the metrics port"
