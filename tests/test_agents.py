"""The embedder's batch logic against recording stand-ins for its topics (no broker): retries, giving up."""

from __future__ import annotations

import asyncio

import pytest

from agents import embedder, indexer
from pipeline.app import DocflowApp
from pipeline.embedding import EmbeddingBackend
from pipeline.errors import EmbeddingError, VectorIndexError
from pipeline.records import Chunk, ChunkEmbedding


class FlakyBackend(EmbeddingBackend):
    """Fails the first ``failures`` calls with the given kind of error, then embeds."""

    name = "flaky"
    model = "flaky-v1"

    def __init__(self, failures: int, permanent: bool) -> None:
        self.failures = failures
        self.permanent = permanent
        self.calls = 0

    @property
    def dims(self) -> int:
        return 2

    async def embed(self, texts):
        self.calls += 1
        if self.calls <= self.failures:
            raise EmbeddingError("backend hiccup", permanent=self.permanent)
        return [[1.0, 0.0] for _ in texts]


class RecordingTopic:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sent = []

    def get_topic_name(self) -> str:
        return self.name

    async def send(self, key, value):
        self.sent.append(value)
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class RecordingApp:
    send_status = DocflowApp.send_status

    def __init__(self) -> None:
        for attr, name in [
            ("embeddings_topic", "embeddings.ready"),
            ("status_topic", "documents.status"),
            ("dlq_topic", "documents.dlq"),
            ("chunks_topic", "chunks.processed"),
        ]:
            setattr(self, attr, RecordingTopic(name))


def chunks(n: int) -> list[Chunk]:
    return [
        Chunk(
            chunk_id=f"c{i}",
            document_id="doc-1",
            company_id="acme",
            text=f"text {i}",
            page=1,
            index=i,
            total=n,
            created_ms=1,
        )
        for i in range(n)
    ]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(embedder, "wait_exponential", lambda **kwargs: lambda retry_state: 0)


async def test_transient_embedding_errors_are_retried_then_succeed():
    app, backend = RecordingApp(), FlakyBackend(failures=2, permanent=False)
    await embedder.embed_batch(app, backend, chunks(3))
    assert backend.calls == 3
    assert [e.chunk_id for e in app.embeddings_topic.sent] == ["c0", "c1", "c2"]
    [progress] = app.status_topic.sent
    assert (progress.stage, progress.chunk_indexes, progress.chunks_total) == ("embedding", [0, 1, 2], 3)
    assert app.dlq_topic.sent == []


async def test_permanent_embedding_error_dead_letters_every_chunk_and_fails_the_document():
    app, backend = RecordingApp(), FlakyBackend(failures=1, permanent=True)
    await embedder.embed_batch(app, backend, chunks(2))
    assert backend.calls == 1
    assert [letter.original["chunk_id"] for letter in app.dlq_topic.sent] == ["c0", "c1"]
    assert {status.stage for status in app.status_topic.sent} == {"failed"}
    assert "backend hiccup" in app.status_topic.sent[0].error
    assert app.embeddings_topic.sent == []


async def test_transient_errors_that_never_end_are_given_up_after_the_attempt_limit():
    app, backend = RecordingApp(), FlakyBackend(failures=100, permanent=False)
    await embedder.embed_batch(app, backend, chunks(1))
    assert backend.calls == embedder.EMBED_ATTEMPTS
    [letter] = app.dlq_topic.sent
    assert letter.attempts == embedder.EMBED_ATTEMPTS


async def test_unexpected_backend_error_fails_the_documents_instead_of_crashing_the_agent():
    class BrokenBackend(FlakyBackend):
        async def embed(self, texts):
            raise ZeroDivisionError("division by zero")

    app = RecordingApp()
    await embedder.embed_batch(app, BrokenBackend(failures=0, permanent=False), chunks(2))
    assert len(app.dlq_topic.sent) == 2
    assert "ZeroDivisionError" in app.status_topic.sent[0].error


class FlakyIndex:
    """An index that is unreachable ``failures`` times (or refuses, when ``permanent``), then takes writes."""

    def __init__(self, failures: int, permanent: bool) -> None:
        self.failures = failures
        self.permanent = permanent
        self.calls = 0
        self.written: list[str] = []

    async def upsert(self, embeddings) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise VectorIndexError("Milvus hiccup", permanent=self.permanent)
        self.written += [embedding.chunk_id for embedding in embeddings]


def embeddings(n: int) -> list[ChunkEmbedding]:
    return [
        ChunkEmbedding(
            chunk_id=f"c{i}",
            document_id="doc-1",
            company_id="acme",
            index=i,
            vector=[1.0, 0.0],
            model="m",
            dims=2,
            created_ms=1,
            text=f"text {i}",
            page=1,
        )  # fmt: skip
        for i in range(n)
    ]


async def test_an_unreachable_index_is_waited_for_and_nothing_is_given_up(monkeypatch):
    monkeypatch.setattr(indexer, "wait_exponential", lambda **kwargs: lambda retry_state: 0)
    app, index = RecordingApp(), FlakyIndex(failures=7, permanent=False)
    await indexer.index_batch(app, index, embeddings(3))
    assert index.calls == 8 and index.written == ["c0", "c1", "c2"]
    [progress] = app.status_topic.sent
    assert (progress.stage, progress.indexed_indexes, progress.chunks_indexed) == ("embedding", [0, 1, 2], 3)
    assert app.dlq_topic.sent == []


async def test_a_write_the_index_refuses_dead_letters_the_batch_and_fails_the_document():
    app, index = RecordingApp(), FlakyIndex(failures=1, permanent=True)
    await indexer.index_batch(app, index, embeddings(2))
    assert index.calls == 1 and index.written == []
    assert [letter.original["chunk_id"] for letter in app.dlq_topic.sent] == ["c0", "c1"]
    assert {letter.stage for letter in app.dlq_topic.sent} == {"index"}
    assert {status.stage for status in app.status_topic.sent} == {"failed"}
    assert "Milvus hiccup" in app.status_topic.sent[0].error
