"""The agents' batch logic against recording stand-ins for their topics (no broker).

Retries and giving up (embedder, indexer), and the chunker's tamper check.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from agents import chunker, embedder, indexer
from agents.chunker import own_object_key
from pipeline.app import DocflowApp
from pipeline.embedding import EmbeddingBackend
from pipeline.errors import EmbeddingError, ExtractionLimitExceeded, TamperedEventError, VectorIndexError
from pipeline.lifecycle import LifecycleView
from pipeline.records import Chunk, ChunkEmbedding, DocumentUploaded, LifecycleCommand
from pipeline.settings import Settings
from pipeline.storage.file import FileStorage
from pipeline.storage.s3 import S3Storage
from pipeline.text.chunking import chunk_document
from tests.stack import document_uploaded


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
        self.headers = []  # of each message sent, in order

    def get_topic_name(self) -> str:
        return self.name

    async def send(self, key, value, headers=None):
        self.sent.append(value)
        self.headers.append(headers)
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
        self.lifecycle = LifecycleView()
        self.lifecycle.caught_up.set()  # no command ever came


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


# --- the chunker's tamper check -------------------------------------------------------------


def uploaded_event(company: str, document: str, s3_path: str, filename: str = "report.txt") -> DocumentUploaded:
    return document_uploaded(company, s3_path, document_id=document, filename=filename, chunk_size=200, chunk_overlap=0)


class ReadRecordingStorage(FileStorage):
    """File storage that records every key it is asked to read."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.read: list[str] = []

    async def stream(self, key):
        self.read.append(key)
        async for piece in super().stream(key):
            yield piece


class InlinePool:
    """The extraction pool's interface, run in this process (the tamper check never reaches it)."""

    async def chunk_all(self, jobs, extractor, traces=()):
        return [
            chunk_document(data, u.content_type, u.chunk_size, u.chunk_overlap, extractor, u.chunk_size_unit)
            for u, data in jobs
        ]


class ChunkerApp(RecordingApp):
    def __init__(self, storage) -> None:
        super().__init__()
        self.raw_topic = RecordingTopic("documents.raw")
        self.storage = storage
        self.settings = Settings(pdf_extractor="pdfium")


@pytest.fixture
async def objects(tmp_path):
    storage = ReadRecordingStorage(tmp_path / "objects")
    await storage.put("victim/doc-v/secret.txt", b"the victim's secret words " * 20)
    await storage.put("mallory/doc-m/notes.txt", b"mallory's own harmless words " * 20)
    yield storage
    await storage.close()


def test_own_object_key_accepts_the_documents_own_original(objects):
    own = uploaded_event("mallory", "doc-m", objects.uri("mallory/doc-m/notes.txt"), "notes.txt")
    assert own_object_key(objects, own) == "mallory/doc-m/notes.txt"
    # Names as the web role writes them: spaces, dots inside, parentheses, non-ASCII letters.
    for name in ("Q3 report (final)..v2.pdf", "naïve café.txt", "a+b,c=d@e.md"):
        assert own_object_key(objects, uploaded_event("c1", "d1", objects.uri(f"c1/d1/{name}"))) == f"c1/d1/{name}"


@pytest.mark.parametrize(
    "company, document, path",
    [
        ("mallory", "doc-m", "victim/doc-v/secret.txt"),  # another company's object
        ("mallory", "doc-m", "mallory/doc-other/notes.txt"),  # another document of the same company
        ("victim", "doc-m", "victim/doc-v/secret.txt"),  # the victim's company, another document id
        ("mallory", "doc-m", "mallory/doc-m/sub/notes.txt"),  # deeper than one filename
        ("mallory", "doc-m", "mallory/doc-m/"),  # the prefix itself, no filename
        ("mallory", "doc-m", "mallory/doc-mx/notes.txt"),  # a longer id that merely starts the same
        ("..", "doc-m", "victim/doc-v/secret.txt"),  # invalid company id
        ("mallory", "doc/../../victim/doc-v", "victim/doc-v/secret.txt"),  # invalid document id
        ("", "", "victim/doc-v/secret.txt"),
    ],
)
def test_an_event_naming_an_object_outside_its_own_prefix_is_tampered(objects, company, document, path):
    uri = (objects.root / path).as_uri()
    with pytest.raises(TamperedEventError, match="the event names an object outside the document's own prefix"):
        own_object_key(objects, uploaded_event(company, document, uri))


@pytest.mark.parametrize(
    "uri",
    [
        "{root}/mallory/doc-m/../../victim/doc-v/secret.txt",  # climbs into another company
        "{root}/mallory/doc-m/%2e%2e/%2e%2e/victim/doc-v/secret.txt",  # the same, percent-encoded
        "{root}/mallory/doc-m/../doc-m/notes.txt",  # climbs back to itself: still refused as written
        "{root}/mallory/doc-m/./notes.txt",
        "file:///etc/passwd",  # outside the storage root
        "{root}/../../etc/passwd",
        "s3://some-bucket/mallory/doc-m/notes.txt",  # another scheme
        "http://169.254.169.254/latest/meta-data/",
        "mallory/doc-m/notes.txt",  # a bare key is no URI of this storage
        "",
    ],
)
def test_forged_uris_of_another_scheme_or_outside_the_root_are_tampered(objects, uri):
    uri = uri.format(root=objects.root.as_uri())
    with pytest.raises(TamperedEventError, match="outside the document's own prefix"):
        own_object_key(objects, uploaded_event("mallory", "doc-m", uri, "notes.txt"))


def test_the_tamper_check_holds_for_s3_storage_too():
    storage = S3Storage("bucket", "originals")
    own = uploaded_event("mallory", "doc-m", "s3://bucket/originals/mallory/doc-m/notes.txt")
    assert own_object_key(storage, own) == "mallory/doc-m/notes.txt"
    for uri in (
        "s3://bucket/originals/victim/doc-v/secret.txt",
        "s3://bucket/originals/mallory/doc-m/../../victim/doc-v/secret.txt",
        "s3://other-bucket/originals/mallory/doc-m/notes.txt",
        "s3://bucket/elsewhere/mallory/doc-m/notes.txt",
        "file:///originals/mallory/doc-m/notes.txt",
    ):
        with pytest.raises(TamperedEventError):
            own_object_key(storage, uploaded_event("mallory", "doc-m", uri))


async def test_a_forged_event_fails_as_tampered_unread_and_the_batch_goes_on(objects):
    app = ChunkerApp(objects)
    forged = uploaded_event("mallory", "doc-forged", objects.uri("victim/doc-v/secret.txt"), "secret.txt")
    outside = uploaded_event("mallory", "doc-outside", "file:///etc/passwd", "passwd")
    own = uploaded_event("mallory", "doc-m", objects.uri("mallory/doc-m/notes.txt"), "notes.txt")

    await chunker.chunk_batch(app, InlinePool(), [forged, outside, own])

    assert objects.read == ["mallory/doc-m/notes.txt"], "storage was read for a tampered event"
    assert {chunk.document_id for chunk in app.chunks_topic.sent} == {"doc-m"}
    assert not any("secret" in chunk.text for chunk in app.chunks_topic.sent)
    letters = {letter.document_id: letter for letter in app.dlq_topic.sent}
    assert set(letters) == {"doc-forged", "doc-outside"}
    for letter in letters.values():
        assert letter.stage == "validate" and letter.topic == "documents.raw"
        assert "outside the document's own prefix" in letter.error
    assert letters["doc-forged"].original["s3_path"] == forged.s3_path
    states = {(status.document_id, status.stage) for status in app.status_topic.sent}
    assert ("doc-forged", "failed") in states and ("doc-outside", "failed") in states
    assert ("doc-forged", "extracting") not in states
    assert ("doc-m", "chunked") in states
    failed = next(s for s in app.status_topic.sent if s.document_id == "doc-forged" and s.stage == "failed")
    assert "outside the document's own prefix mallory/doc-forged/" in failed.error


async def test_extraction_failures_from_the_pool_fail_their_documents_with_the_reason(objects):
    class LimitedPool:
        async def chunk_all(self, jobs, extractor, traces=()):
            return [ExtractionLimitExceeded("document needs more than 512 MB of memory to extract") for _ in jobs]

    app = ChunkerApp(objects)
    own = uploaded_event("mallory", "doc-m", objects.uri("mallory/doc-m/notes.txt"), "notes.txt")
    await chunker.chunk_batch(app, LimitedPool(), [own])
    [letter] = app.dlq_topic.sent
    assert (letter.stage, letter.error) == ("extract", "document needs more than 512 MB of memory to extract")
    assert app.chunks_topic.sent == []


def test_an_event_whose_fields_are_no_strings_is_tampered_not_a_crash(objects):
    for company, document, uri in [("mallory", "doc-m", 42), (7, "doc-m", "file:///x"), ("mallory", None, "")]:
        with pytest.raises(TamperedEventError, match="not all strings"):
            own_object_key(objects, uploaded_event(company, document, uri))


def test_the_reason_shown_for_a_foreign_uri_does_not_reveal_the_storage_root(objects):
    with pytest.raises(TamperedEventError) as refused:
        own_object_key(objects, uploaded_event("mallory", "doc-m", "file:///etc/passwd"))
    assert str(objects.root) not in str(refused.value)
    assert "'file:///etc/passwd' is not in this storage" in str(refused.value)


async def test_the_embedder_skips_the_chunks_of_a_cancelled_document_without_embedding_them():
    app, backend = RecordingApp(), FlakyBackend(failures=0, permanent=False)
    app.lifecycle.apply(LifecycleCommand(document_id="doc-1", company_id="acme", command="cancel", at_ms=1))
    await embedder.embed_batch(app, backend, chunks(3))
    assert backend.calls == 0
    assert app.embeddings_topic.sent == [] and app.status_topic.sent == []


def test_the_lifecycle_view_keeps_the_strongest_command_whatever_the_order():
    commands = [
        LifecycleCommand(document_id="d", company_id="c", command=kind, at_ms=n)
        for n, kind in enumerate(["supersede", "cancel", "delete"])
    ]
    for order in itertools.permutations(commands):
        view = LifecycleView()
        for command in [*order, *order]:
            view.apply(command)
        assert view.stopped("d").command == "delete"
    assert LifecycleView().stopped("d") is None
