"""Search end to end: real broker, real Milvus (milvus-lite's server), real worker processes
(1 web, 2 chunkers, 2 embedders, 2 indexers), the hashing backend."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from pymilvus import MilvusClient

from pipeline.client import DocflowClient
from pipeline.errors import ApiError
from pipeline.ids import chunk_id
from pipeline.index.milvus import collection_name, literal
from pipeline.local.workers import WorkerStack, worker_env
from tests.stack import corpus, expected_chunks, upload_all, wait_all

HASHING_SPACE = ("hashing-v1", 384)


@pytest.fixture(scope="module")
def stack(milvus_settings, tmp_path_factory):
    logs = tmp_path_factory.mktemp("search-worker-logs")
    workers = WorkerStack(
        milvus_settings, worker_env(milvus_settings, DOCFLOW_CONSUMER_SESSION_TIMEOUT_SECONDS="10"), logs
    )
    try:
        workers.launch({"web": 1, "chunker": 2, "embedder": 2, "indexer": 2})
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture
def collection(milvus_settings):
    """Reads the hashing space's collection straight from Milvus, as no docflow code does."""
    client = MilvusClient(uri=milvus_settings.milvus_address, timeout=10)
    name = collection_name(*HASHING_SPACE)

    def indexed_chunk_ids(company: str) -> list[str]:
        rows = client.query(
            name, filter=f"company_id == {literal(company)}", output_fields=["chunk_id"], limit=16384,
            consistency_level="Strong",
        )  # fmt: skip
        return [row["chunk_id"] for row in rows]

    yield indexed_chunk_ids
    client.close()


def middle_sentence(text: str) -> str:
    """A couple of sentences from the middle of a chunk: away from the 200-character overlaps,
    so only this chunk holds them. 32 words: with the hashing backend's 384 buckets, a run of
    16 common words ranked another chunk first for 1-3 of ~260 chunks (exact search)."""
    words = text[250:-250].split()[1:-1]
    return " ".join(words[:32])


async def search(url: str, company: str, query: str, **options) -> dict:
    async with DocflowClient(url, company) as client:
        return await client.search(query, **options)


async def test_every_chunk_is_indexed_once_and_its_own_sentence_finds_it_first(stack, collection, tmp_path):
    company = f"acme-{uuid.uuid4().hex[:8]}"
    files = corpus(20, seed=7)
    uploaded = await upload_all(stack, company, files, tmp_path)
    web = stack.of_role("web")[0].url
    statuses = await wait_all(web, company, list(uploaded))

    expected = {doc: expected_chunks(filename, data) for doc, (filename, data) in uploaded.items()}
    for doc, status in statuses.items():
        assert status["state"] == "completed", status
        assert status["chunks_indexed"] == status["chunks_embedded"] == status["chunks_total"] == len(expected[doc])
    indexed = collection(company)
    all_expected = {chunk_id(doc, piece.index) for doc, pieces in expected.items() for piece in pieces}
    assert len(indexed) == len(set(indexed)) == len(all_expected)
    assert set(indexed) == all_expected

    for doc, pieces in expected.items():
        target = max(pieces, key=lambda piece: len(piece.text))
        answer = await search(web, company, middle_sentence(target.text), top_k=3)
        best = answer["results"][0]
        assert best["chunk_id"] == chunk_id(doc, target.index), (doc, answer)
        assert (best["document_id"], best["page"], best["index"]) == (doc, target.page, target.index)
        assert best["text"] == target.text and best["filename"] == uploaded[doc][0]
        assert best["score"] > answer["results"][1]["score"]


async def test_each_company_finds_only_its_own_chunks(stack, tmp_path):
    text = "Quarterly revenue grew in the northern region while the southern warehouses were consolidated. " * 8
    web = stack.of_role("web")[0].url
    documents = {}
    for company in (f"north-{uuid.uuid4().hex[:6]}", f"south-{uuid.uuid4().hex[:6]}"):
        async with DocflowClient(web, company) as client:
            answer = await client.upload_text(text, title="same text", tags=["finance"])
        documents[company] = answer["document_id"]
        await wait_all(web, company, [answer["document_id"]])

    for company, document_id in documents.items():
        found = await search(web, company, "northern region revenue", top_k=100)
        assert found["results"], company
        assert {hit["document_id"] for hit in found["results"]} == {document_id}
        assert found["results"][0]["title"] == "same text"
        tagged = await search(web, company, "revenue", tags=["finance"], document_ids=[document_id])
        assert {hit["document_id"] for hit in tagged["results"]} == {document_id}
        assert (await search(web, company, "revenue", tags=["no-such-tag"]))["results"] == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"query": ""}, 422, "invalid_query"),
        ({"query": "   "}, 422, "invalid_query"),
        ({"query": "x" * 2001}, 422, "invalid_query"),
        ({"query": "ok", "top_k": 0}, 422, "invalid_parameter"),
        ({"query": "ok", "top_k": 101}, 422, "invalid_parameter"),
        ({"query": "ok", "top_k": "5"}, 422, "invalid_parameter"),
        ({"query": "ok", "document_ids": ["../etc"]}, 422, "invalid_parameter"),
        ({"query": "ok", "tags": "finance"}, 422, "invalid_parameter"),
        ({"query": "ok", "min_score": "high"}, 422, "invalid_parameter"),
    ],
)
async def test_malformed_searches_are_refused_with_the_reason(stack, body, status, code):
    async with DocflowClient(stack.of_role("web")[0].url, "acme") as client:
        with pytest.raises(ApiError) as refused:
            await client.search(**body)
    assert (refused.value.status, refused.value.code) == (status, code)


async def test_docflow_search_prints_the_companys_best_chunks(stack, tmp_path):
    company = f"cli-{uuid.uuid4().hex[:8]}"
    web = stack.of_role("web")[0]
    async with DocflowClient(web.url, company) as client:
        answer = await client.upload_text(
            "The lighthouse keeper logs every passing ship in a leather-bound book. " * 6, title="keeper"
        )
    await wait_all(web.url, company, [answer["document_id"]])
    env = dict(os.environ, DOCFLOW_WEB_HOST="127.0.0.1", DOCFLOW_WEB_PORT=str(web.port))

    def docflow(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pipeline.cli", "search", *args, "--company", company]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    as_json = docflow("ships logged by the keeper", "--json", "--top-k", "2")
    assert as_json.returncode == 0, as_json.stderr
    [hit] = json.loads(as_json.stdout)["results"]
    assert hit["document_id"] == answer["document_id"] and "lighthouse keeper" in hit["text"]
    printed = docflow("ships logged by the keeper")
    assert printed.returncode == 0 and printed.stdout.startswith("1. ") and "keeper, page 1" in printed.stdout
    refused = docflow("")
    assert refused.returncode == 1 and "invalid_query" in refused.stderr


async def test_killed_indexer_and_milvus_down_for_20_seconds_lose_and_double_nothing(
    stack, milvus, collection, tmp_path
):
    company = f"outage-{uuid.uuid4().hex[:8]}"
    web = stack.of_role("web")[0].url
    milvus.stop()
    stopped_at = time.monotonic()
    uploaded = await upload_all(stack, company, corpus(12, seed=31), tmp_path)
    async with DocflowClient(web, company) as client:
        # Everything up to the index goes on: wait until every chunk is embedded, then kill an
        # indexer that holds batches it could not write.
        while True:
            listed = {doc["document_id"]: doc for doc in (await client.list())["documents"]}
            if all(doc in listed and listed[doc]["chunks_embedded"] == listed[doc]["chunks_total"] for doc in uploaded):
                break
            await asyncio.sleep(0.5)
        stack.stop(stack.of_role("indexer")[0], signal.SIGKILL)
        with pytest.raises(ApiError) as down:
            await client.search("anything")
        assert down.value.status == 503 and down.value.code == "index_unavailable"
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - stopped_at)))
        listed = {doc["document_id"]: doc for doc in (await client.list())["documents"]}
    assert not any(listed[doc]["state"] == "completed" for doc in uploaded), "completed while nothing was searchable"
    milvus.start()

    statuses = await wait_all(web, company, list(uploaded), timeout=240)
    assert all(status["state"] == "completed" for status in statuses.values()), statuses
    indexed = collection(company)
    all_expected = {
        chunk_id(doc, piece.index) for doc, (name, data) in uploaded.items() for piece in expected_chunks(name, data)
    }
    assert len(indexed) == len(set(indexed)) == len(all_expected)
    assert set(indexed) == all_expected
