"""The embedder agent: batches of chunks → vectors on embeddings.ready, progress on documents.status."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from agents.dead_letters import give_up_on_batch
from agents.lifecycle import live_messages
from pipeline import metrics, tracing
from pipeline.embedding import EmbeddingBackend, create_backend
from pipeline.embedding.cache import CachedBackend
from pipeline.errors import EmbeddingError
from pipeline.records import Chunk, ChunkEmbedding, now_ms

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

log = logging.getLogger(__name__)

BATCH_WITHIN_SECONDS = 0.2
EMBED_ATTEMPTS = 5


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, EmbeddingError) and not exc.permanent


def register(app: DocflowApp) -> None:
    settings = app.settings
    backend = CachedBackend.from_settings(settings) if settings.embedding_cache else create_backend(settings)

    @app.agent(app.chunks_topic, name="embedder")
    async def embed_chunks(stream):
        # Events, not values: their headers carry each document's trace (pipeline/tracing.py).
        async for events in stream.take_events(settings.embedding_batch_size, within=BATCH_WITHIN_SECONDS):
            await embed_batch(app, backend, [event.value for event in events], [event.headers for event in events])

    @app.task
    async def load_model() -> None:
        # A local model takes seconds to load: do it at start, not in the first batch.
        await backend.load()

    @app.on_before_shutdown.connect
    async def close_backend(app_, **kwargs) -> None:
        await backend.close()


async def embed_batch(
    app: DocflowApp, backend: EmbeddingBackend, batch: list[Chunk], headers: Sequence[Mapping] | None = None
) -> None:
    """Embed one batch; returns once every message it produced is acknowledged.

    ``headers`` are the messages' Kafka headers, in order: the batch continues its documents' traces.
    """
    with tracing.batch_span("embedder batch", batch, headers) as traced:
        await _embed_traced_batch(app, backend, batch, traced)


async def _embed_traced_batch(
    app: DocflowApp, backend: EmbeddingBackend, batch: list[Chunk], traced: tracing.BatchTrace
) -> None:
    started = time.perf_counter()
    metrics.embedding_messages_consumed_total.inc(len(batch))
    batch = await live_messages(app, batch, "embedder")
    if not batch:
        return
    texts = [chunk.text for chunk in batch]
    retrying = AsyncRetrying(
        retry=retry_if_exception(_transient),
        stop=stop_after_attempt(EMBED_ATTEMPTS),
        wait=wait_exponential(multiplier=0.5, max=8),
        reraise=True,
    )
    try:
        vectors = await retrying(_embed, backend, texts)
    except EmbeddingError as exc:
        await _give_up_on(app, batch, str(exc), retrying.statistics.get("attempt_number", 1))
        return
    except Exception as exc:
        # A backend bug must not crash the agent: Faust would acknowledge the batch anyway.
        log.exception("unexpected embedding failure")
        await _give_up_on(app, batch, f"unexpected {type(exc).__name__}: {exc}", 1)
        return
    created = now_ms()
    deliveries = []
    by_document: dict[str, list[Chunk]] = defaultdict(list)
    per_document = Counter(chunk.document_id for chunk in batch)
    # Each embedding carries its document's send span along: the indexer continues that trace.
    with traced.sending(app.embeddings_topic.get_topic_name(), per_document) as headers:
        for chunk, vector in zip(batch, vectors):
            by_document[chunk.document_id].append(chunk)
            deliveries.append(
                await app.embeddings_topic.send(
                    key=chunk.document_id,
                    value=ChunkEmbedding(
                        chunk_id=chunk.chunk_id,
                        document_id=chunk.document_id,
                        company_id=chunk.company_id,
                        index=chunk.index,
                        vector=vector,
                        model=backend.model,
                        dims=len(vector),
                        created_ms=created,
                        text=chunk.text,
                        page=chunk.page,
                        filename=chunk.filename,
                        title=chunk.title,
                        tags=chunk.tags,
                    ),
                    headers=headers[chunk.document_id],
                )
            )
            metrics.embedding_texts_processed_total.labels(chunk.company_id).inc()
    for document_id, chunks in by_document.items():
        deliveries.append(
            await app.send_status(
                document_id,
                chunks[0].company_id,
                "embedding",
                chunks_total=chunks[0].total,
                chunks_embedded=len(chunks),
                chunk_indexes=[c.index for c in chunks],
            )
        )
    await asyncio.gather(*deliveries)
    metrics.embedding_batch_processing_duration_seconds.observe(time.perf_counter() - started)
    log.info("embedded %s", ", ".join(f"{len(chunks)} chunks of {doc}" for doc, chunks in by_document.items()))


async def _embed(backend: EmbeddingBackend, texts: list[str]) -> list[list[float]]:
    """One attempt through the backend (and its cache), a span each: a retried batch shows every try."""
    attributes = {
        "docflow.embedding.backend": backend.name,
        "docflow.embedding.model": backend.model,
        "docflow.embedding.texts": len(texts),
    }
    with tracing.span("embed", attributes):
        return await backend.embed(texts)


async def _give_up_on(app: DocflowApp, batch: list[Chunk], reason: str, attempts: int) -> None:
    await give_up_on_batch(
        app, batch, topic=app.chunks_topic.get_topic_name(), stage="embed", error=f"embedding failed: {reason}",
        attempts=attempts,
    )  # fmt: skip
