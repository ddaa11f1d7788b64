"""The openai backend through the real pipeline: worker processes, real broker, an OpenAI-compatible server."""

from __future__ import annotations

import uuid

import pytest

from pipeline.client import DocflowClient
from pipeline.local import documents
from pipeline.local.openai_server import ThreadedEmbeddingServer, vector_for
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.topics import CHUNKS_PROCESSED, DOCUMENTS_DLQ, EMBEDDINGS_READY
from tests.stack import read_topic, upload_all, wait_all


@pytest.fixture(scope="module")
def embedding_server():
    server = ThreadedEmbeddingServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openai_stack(kafka_settings, embedding_server, tmp_path_factory):
    env = worker_env(
        kafka_settings,
        DOCFLOW_EMBEDDING_BACKEND="openai",
        DOCFLOW_OPENAI_BASE_URL=embedding_server.url,
        DOCFLOW_OPENAI_API_KEY="test-key",
        DOCFLOW_EMBEDDING_BATCH_SIZE="16",
    )
    workers = WorkerStack(kafka_settings, env, tmp_path_factory.mktemp("openai-worker-logs"))
    try:
        workers.launch({"web": 1, "chunker": 1, "embedder": 1})
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture
def server(embedding_server):
    embedding_server.reset()
    yield embedding_server
    embedding_server.reset()


def unique_corpus(count: int, tag: str) -> list[tuple[str, bytes]]:
    """Documents whose texts no other test uploads, so the embedding cache never answers for them."""
    files = []
    for n in range(count):
        pages = [
            f"{tag} document {n} page {p}. " + page
            for p, page in enumerate(documents.lorem_pages(3, 250, seed=n), start=1)
        ]
        files.append((f"{tag}-{n}.pdf", documents.make_pdf(pages)))
    return files


async def test_every_document_completes_with_the_servers_vectors_while_it_fails_30_percent(
    openai_stack, server, kafka_settings, tmp_path
):
    server.configure(failure_rate=0.3, seed=7)
    company = f"flaky-{uuid.uuid4().hex[:8]}"
    uploaded = await upload_all(openai_stack, company, unique_corpus(6, company), tmp_path)
    statuses = await wait_all(openai_stack.of_role("web")[0].url, company, list(uploaded), timeout=240)
    assert {status["state"] for status in statuses.values()} == {"completed"}

    total = sum(status["chunks_total"] for status in statuses.values())
    chunks = await read_topic(kafka_settings, CHUNKS_PROCESSED.name, set(uploaded), total)
    texts = {chunk["chunk_id"]: chunk["text"] for chunk in chunks}
    embeddings = await read_topic(kafka_settings, EMBEDDINGS_READY.name, set(uploaded), total)
    assert {embedding["chunk_id"] for embedding in embeddings} == set(texts)
    for embedding in embeddings:
        assert embedding["vector"] == vector_for(texts[embedding["chunk_id"]])
        assert embedding["dims"] == len(embedding["vector"])
    statuses_seen = [request.status for request in server.requests]
    assert {429, 500} & set(statuses_seen), "the server never failed: the test proved nothing"


async def test_refused_key_fails_documents_with_a_reason_and_the_worker_serves_the_next_one(
    openai_stack, server, kafka_settings, tmp_path
):
    server.configure(unauthorized=True)
    company = f"refused-{uuid.uuid4().hex[:8]}"
    refused = await upload_all(openai_stack, company, unique_corpus(1, company), tmp_path)
    web = openai_stack.of_role("web")[0].url
    [status] = (await wait_all(web, company, list(refused), timeout=120)).values()
    assert status["state"] == "failed"
    assert "401" in status["error"] or "API key" in status["error"]
    dead = await read_topic(kafka_settings, DOCUMENTS_DLQ.name, set(refused), status["chunks_total"] or 1)
    assert dead and {letter["stage"] for letter in dead} == {"embed"}
    assert {letter["original"]["document_id"] for letter in dead} == set(refused)

    server.configure(unauthorized=False)
    assert all(worker.alive() for worker in openai_stack.of_role("embedder"))
    recovered = await upload_all(openai_stack, company, unique_corpus(1, company + "-again"), tmp_path)
    [status] = (await wait_all(web, company, list(recovered), timeout=120)).values()
    assert status["state"] == "completed"


async def test_reuploading_a_document_makes_no_backend_call_for_its_chunks(openai_stack, server, tmp_path):
    company = f"cache-{uuid.uuid4().hex[:8]}"
    files = unique_corpus(1, company)
    web = openai_stack.of_role("web")[0].url
    first = await upload_all(openai_stack, company, files, tmp_path)
    await wait_all(web, company, list(first))
    calls_after_first = len(server.requests)
    assert calls_after_first > 0

    second = await upload_all(openai_stack, company, files, tmp_path)
    [status] = (await wait_all(web, company, list(second))).values()
    assert status["state"] == "completed"
    assert len(server.requests) == calls_after_first
    async with DocflowClient(web, company) as client:
        assert len((await client.list())["documents"]) == 2
