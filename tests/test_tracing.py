"""Tracing: one uploaded document is one trace through every role, its context carried in Kafka headers.

The end-to-end test runs real worker processes of every role (real broker, real Milvus) that export
to an OTLP/HTTP receiver in this process; the unit tests record spans in memory.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents import embedder
from pipeline import tracing
from pipeline.client import DocflowClient
from pipeline.embedding.openai import OpenAIBackend
from pipeline.local import documents
from pipeline.local.openai_server import EmbeddingServer
from pipeline.local.ports import free_port
from pipeline.local.workers import WorkerStack, worker_env
from pipeline.records import Chunk
from pipeline.settings import Settings
from tests.stack import wait_all
from tests.test_agents import FlakyBackend, RecordingApp

ROLES = ("web", "chunker", "embedder", "indexer")
SERVICES = {f"docflow-{role}" for role in ROLES}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    attributes: dict
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each link


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 (POST /v1/traces, protobuf), in a thread of its own."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = _attributes(resource_spans.resource.attributes).get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes=_attributes(span.attributes),
                            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        )
                    )
        with self.lock:
            self.spans += received

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def find(self, **match) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if all(getattr(span, k) == v for k, v in match.items())]


def _attributes(pairs) -> dict:
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in pairs}


@pytest.fixture(scope="module")
def receiver():
    server = OtlpReceiver()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def stack(milvus_settings, receiver, tmp_path_factory):
    env = worker_env(
        milvus_settings,
        DOCFLOW_OTEL_ENDPOINT=receiver.url,
        # Export within a tenth of a second of a span's end, not the default five.
        OTEL_BSP_SCHEDULE_DELAY="100",
        DOCFLOW_CONSUMER_SESSION_TIMEOUT_SECONDS="10",
    )
    workers = WorkerStack(milvus_settings, env, tmp_path_factory.mktemp("tracing-worker-logs"))
    try:
        workers.launch({role: 1 for role in ROLES})
        yield workers
    finally:
        workers.stop_all()


async def wait_for_spans(receiver: OtlpReceiver, done, timeout: float = 30.0):
    """The receiver's spans once ``done(spans)`` holds (spans arrive after the work they describe)."""
    deadline = time.monotonic() + timeout
    while True:
        result = done()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


async def test_one_uploaded_pdf_is_one_trace_through_web_chunker_embedder_and_indexer(stack, receiver, tmp_path):
    company = f"traced-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "traced.pdf"
    path.write_bytes(documents.make_pdf(documents.lorem_pages(n_pages=3, words_per_page=300, seed=16)))
    web = stack.of_role("web")[0].url
    async with DocflowClient(web, company) as client:
        document_id = (await client.upload(path))["document_id"]
    status = (await wait_all(web, company, [document_id]))[document_id]
    assert status["state"] == "completed", status

    def upload_span() -> ReceivedSpan | None:
        found = [
            span
            for span in receiver.find(service="docflow-web", name="POST /api/v1/upload")
            if span.attributes.get("docflow.document_id") == document_id
        ]
        return found[0] if found else None

    upload = await wait_for_spans(receiver, upload_span)
    assert upload is not None, "the web role exported no span for the upload request"
    assert upload.kind == ProtoSpan.SPAN_KIND_SERVER and upload.parent_id == "", "the upload starts the trace"

    def whole_trace() -> list[ReceivedSpan]:
        spans = receiver.of_trace(upload.trace_id)
        written = sum(span.attributes.get("docflow.index.rows", 0) for span in spans if span.name == "index write")
        return spans if written >= status["chunks_total"] else []

    spans = await wait_for_spans(receiver, whole_trace)
    assert spans, f"the trace never held the index writes of all chunks: {receiver.of_trace(upload.trace_id)}"
    assert {span.service for span in spans} == SERVICES

    by_id = {span.span_id: span for span in spans}
    dangling = [span for span in spans if span.parent_id and span.parent_id not in by_id]
    assert dangling == [], "every span but the upload's hangs under another span of the same trace"

    def named(service: str, name: str) -> list[ReceivedSpan]:
        return [span for span in spans if span.service == f"docflow-{service}" and span.name == name]

    def children(parents: list[ReceivedSpan], service: str, name: str) -> list[ReceivedSpan]:
        found = named(service, name)
        assert found, f"no {name!r} span of docflow-{service} in the trace"
        assert {span.parent_id for span in found} <= {parent.span_id for parent in parents}, name
        return found

    # web: the request stores the original, then sends the event whose headers carry the trace on
    [stored] = children([upload], "web", "store original")
    assert stored.attributes["docflow.document_id"] == document_id
    [announced] = children([upload], "web", "send documents.raw")
    assert announced.kind == ProtoSpan.SPAN_KIND_PRODUCER
    # chunker: its batch continues the event's span; download, extraction and sending are its children
    [chunker_batch] = children([announced], "chunker", "chunker batch")
    assert chunker_batch.kind == ProtoSpan.SPAN_KIND_CONSUMER
    children([chunker_batch], "chunker", "download original")
    [extracted] = children([chunker_batch], "chunker", "extract")
    assert extracted.attributes["docflow.document_id"] == document_id
    assert extracted.attributes["docflow.chunks"] == status["chunks_total"]
    [chunks_sent] = children([chunker_batch], "chunker", "send chunks.processed")
    assert chunks_sent.attributes["messaging.batch.message_count"] == status["chunks_total"]
    # embedder: every batch continues the chunks' send span and holds the embedding call
    embedder_batches = children([chunks_sent], "embedder", "embedder batch")
    embedded = children(embedder_batches, "embedder", "embed")
    assert sum(span.attributes["docflow.embedding.texts"] for span in embedded) == status["chunks_total"]
    embeddings_sent = children(embedder_batches, "embedder", "send embeddings.ready")
    # indexer: every batch continues an embeddings' send span and holds the index write
    indexer_batches = children(embeddings_sent, "indexer", "indexer batch")
    written = children(indexer_batches, "indexer", "index write")
    assert sum(span.attributes["docflow.index.rows"] for span in written) == status["chunks_total"]


async def test_a_search_is_traced_from_the_request_to_the_index(stack, receiver):
    web = stack.of_role("web")[0].url
    async with DocflowClient(web, f"searcher-{uuid.uuid4().hex[:8]}") as client:
        await client.search("quarterly revenue by region", top_k=3)

    def search_trace() -> list[ReceivedSpan]:
        requests = receiver.find(service="docflow-web", name="POST /api/v1/search")
        if not requests:
            return []
        spans = receiver.of_trace(requests[-1].trace_id)
        return spans if {"embed query", "search index"} <= {span.name for span in spans} else []

    spans = await wait_for_spans(receiver, search_trace)
    assert spans, "the search request's trace never held its embedding and index spans"
    [request] = [span for span in spans if span.name == "POST /api/v1/search"]
    for name in ("embed query", "search index"):
        [child] = [span for span in spans if span.name == name]
        assert child.parent_id == request.span_id
    assert [span.attributes["docflow.search.top_k"] for span in spans if span.name == "search index"] == [3]


# --- in this process: off by default, and how a batch joins its messages' traces ---------------


def test_without_an_endpoint_no_exporter_is_set_up_and_spans_record_nothing():
    provider = trace.get_tracer_provider()
    assert tracing.setup(Settings(otel_endpoint=""), "web") is None
    assert trace.get_tracer_provider() is provider, "a tracer provider was installed with tracing off"
    assert tracing.http_middlewares() == []
    with tracing.send_span("documents.raw") as sending:
        assert not sending.is_recording()
        assert tracing.kafka_headers() == {}, "a no-op span must put nothing in the headers"


def test_the_endpoint_may_be_given_as_its_base_or_as_the_traces_url():
    assert tracing.traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert tracing.traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("https://otel.example/v1/traces") == "https://otel.example/v1/traces"


@pytest.fixture
def recorded(monkeypatch) -> InMemorySpanExporter:
    """docflow's spans recorded in memory, without touching this process's global tracer provider."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("docflow-test"))
    return exporter


def sent_from(topic: str) -> tuple[trace.SpanContext, dict[str, bytes]]:
    """A sending span (ended) and the headers its messages carried."""
    with tracing.send_span(topic) as sending:
        return sending.get_span_context(), tracing.kafka_headers()


def chunks_of(document_id: str, count: int) -> list[Chunk]:
    return [
        Chunk(
            chunk_id=f"{document_id}-{n}", document_id=document_id, company_id="acme", text=f"text {n}", page=1,
            index=n, total=count, created_ms=1,
        )
        for n in range(count)
    ]  # fmt: skip


def test_headers_carry_the_sending_span_and_a_message_without_them_carries_nothing(recorded):
    sender, headers = sent_from("chunks.processed")
    assert set(headers) >= {"traceparent"} and all(isinstance(value, bytes) for value in headers.values())
    received = trace.get_current_span(tracing.context_from_headers(headers)).get_span_context()
    assert (received.trace_id, received.span_id) == (sender.trace_id, sender.span_id)
    as_list = trace.get_current_span(tracing.context_from_headers(list(headers.items()))).get_span_context()
    assert as_list.span_id == sender.span_id
    for nothing in (None, {}, {"traceparent": b"not a traceparent"}):
        assert not trace.get_current_span(tracing.context_from_headers(nothing)).get_span_context().is_valid


async def test_a_batch_of_one_document_continues_its_trace_and_passes_it_on(recorded):
    sender, headers = sent_from("chunks.processed")
    app = RecordingApp()
    batch = chunks_of("doc-a", 3)
    await embedder.embed_batch(app, FlakyBackend(failures=0, permanent=False), batch, [headers] * len(batch))

    spans = {span.name: span for span in recorded.get_finished_spans()}
    batch_span, embedded, sent = spans["embedder batch"], spans["embed"], spans["send embeddings.ready"]
    assert batch_span.parent.span_id == sender.span_id and batch_span.context.trace_id == sender.trace_id
    assert embedded.parent.span_id == sent.parent.span_id == batch_span.context.span_id
    for message_headers in app.embeddings_topic.headers:
        carried = trace.get_current_span(tracing.context_from_headers(message_headers)).get_span_context()
        assert (carried.trace_id, carried.span_id) == (sender.trace_id, sent.context.span_id)


async def test_a_batch_of_two_documents_links_both_traces_and_continues_each(recorded):
    sender_a, headers_a = sent_from("chunks.processed")
    sender_b, headers_b = sent_from("chunks.processed")
    app = RecordingApp()
    batch = chunks_of("doc-a", 2) + chunks_of("doc-b", 2)
    headers = [headers_a, headers_a, headers_b, headers_b]
    await embedder.embed_batch(app, FlakyBackend(failures=0, permanent=False), batch, headers)

    finished = recorded.get_finished_spans()
    [shared] = [span for span in finished if span.name == "embedder batch" and span.parent is None]
    assert shared.context.trace_id not in (sender_a.trace_id, sender_b.trace_id)
    assert {link.context.span_id for link in shared.links} == {sender_a.span_id, sender_b.span_id}
    [embedded] = [span for span in finished if span.name == "embed"]
    assert embedded.parent.span_id == shared.context.span_id, "the one embedding call belongs to the shared batch"
    for sender in (sender_a, sender_b):
        [part] = [
            span
            for span in finished
            if span.name == "embedder batch" and span.parent and span.parent.span_id == sender.span_id
        ]
        assert [link.context.span_id for link in part.links] == [shared.context.span_id]
        [sent] = [
            span
            for span in finished
            if span.name == "send embeddings.ready" and span.parent.span_id == part.context.span_id
        ]
        assert sent.context.trace_id == sender.trace_id
        assert sent.attributes["messaging.batch.message_count"] == 2
    traces = [
        trace.get_current_span(tracing.context_from_headers(message_headers)).get_span_context().trace_id
        for message_headers in app.embeddings_topic.headers
    ]
    assert traces == [sender_a.trace_id] * 2 + [sender_b.trace_id] * 2


async def test_each_request_to_an_embedding_server_is_a_client_span_of_its_embed_attempt(recorded):
    async with EmbeddingServer() as server:
        backend = OpenAIBackend(base_url=server.url, api_key="test-key", model="test-embed", max_batch_inputs=4)
        try:
            await embedder._embed(backend, [f"text {n}" for n in range(10)])
        finally:
            await backend.close()

    finished = recorded.get_finished_spans()
    [attempt] = [span for span in finished if span.name == "embed"]
    assert attempt.attributes["docflow.embedding.texts"] == 10
    requests = [span for span in finished if span.name == "embedding request"]
    assert sorted(span.attributes["docflow.embedding.texts"] for span in requests) == [2, 4, 4]
    assert all(span.kind == trace.SpanKind.CLIENT for span in requests)
    assert {span.parent.span_id for span in requests} == {attempt.context.span_id}
