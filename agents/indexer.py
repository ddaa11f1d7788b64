"""The indexer agent: embeddings.ready → the vector index, progress on documents.status.

The indexer is the only writer of the index. Upserts are keyed by chunk id, so a
redelivered batch replaces what it wrote before. While the index is unreachable the
batch is retried with backoff for as long as it takes: the partition waits (heartbeats go
on), and nothing is acknowledged before it is searchable. A request the index refuses
fails the documents of the batch and dead-letters their messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception, wait_exponential

from agents.dead_letters import give_up_on_batch
from agents.lifecycle import live_messages, register_vector_removal
from pipeline import metrics, tracing
from pipeline.errors import VectorIndexError
from pipeline.index import VectorIndex, open_index
from pipeline.records import ChunkEmbedding

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

log = logging.getLogger(__name__)

BATCH_WITHIN_SECONDS = 0.2


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, VectorIndexError) and not exc.permanent


def register(app: DocflowApp) -> None:
    settings = app.settings
    index = open_index(settings)
    if index is None:
        raise ValueError("the indexer role needs a vector index: DOCFLOW_INDEX=none leaves it nothing to do")

    last_write = 0.0

    @app.agent(app.embeddings_topic, name="indexer")
    async def index_embeddings(stream):
        nonlocal last_write
        # Events, not values: their headers carry each document's trace (pipeline/tracing.py).
        async for events in stream.take_events(settings.index_batch_size, within=BATCH_WITHIN_SECONDS):
            await index_batch(app, index, [event.value for event in events], [event.headers for event in events])
            last_write = time.monotonic()

    if settings.index_seal_idle_seconds > 0:

        @app.timer(settings.index_seal_idle_seconds)
        async def seal_when_idle() -> None:
            # Sealing costs a second or more: once writes pause, not after every batch.
            if last_write and time.monotonic() - last_write >= settings.index_seal_idle_seconds:
                try:
                    await index.seal()
                except VectorIndexError as exc:
                    log.warning("sealing the index failed, retried at the next pause: %s", exc)

    register_vector_removal(app, index)

    @app.on_before_shutdown.connect
    async def close_index(app_, **kwargs) -> None:
        await index.close()


async def index_batch(
    app: DocflowApp, index: VectorIndex, batch: list[ChunkEmbedding], headers: Sequence[Mapping] | None = None
) -> None:
    """Upsert one batch; returns once it is searchable and every message it produced is acknowledged.

    ``headers`` are the messages' Kafka headers, in order: the batch continues its documents' traces.
    """
    with tracing.batch_span("indexer batch", batch, headers):
        await _index_traced_batch(app, index, batch)


async def _index_traced_batch(app: DocflowApp, index: VectorIndex, batch: list[ChunkEmbedding]) -> None:
    started = time.perf_counter()
    batch = await live_messages(app, batch, "indexer")
    if not batch:
        return
    retrying = AsyncRetrying(
        retry=retry_if_exception(_unavailable),
        wait=wait_exponential(multiplier=0.5, max=15),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    try:
        await retrying(_upsert, index, batch)
    except VectorIndexError as exc:
        await give_up_on_batch(
            app, batch, topic=app.embeddings_topic.get_topic_name(), stage="index", error=f"indexing failed: {exc}"
        )
        return
    deliveries = []
    by_document: dict[str, list[ChunkEmbedding]] = defaultdict(list)
    for embedding in batch:
        by_document[embedding.document_id].append(embedding)
    # A command that came while this batch was written: its chunks must not stay behind.
    ended = [doc for doc in by_document if app.lifecycle.stopped(doc) is not None]
    for document_id in ended:
        await retrying(index.delete_documents, by_document.pop(document_id)[0].company_id, [document_id])
    for document_id, embeddings in by_document.items():
        deliveries.append(
            await app.send_status(
                document_id,
                embeddings[0].company_id,
                "embedding",
                chunks_indexed=len(embeddings),
                indexed_indexes=[embedding.index for embedding in embeddings],
            )
        )
    await asyncio.gather(*deliveries)
    metrics.index_chunks_upserted_total.inc(len(batch))
    metrics.index_batch_duration_seconds.observe(time.perf_counter() - started)


async def _upsert(index: VectorIndex, batch: list[ChunkEmbedding]) -> None:
    """One attempt, a span each; each failed one is counted by what went wrong."""
    try:
        with tracing.span("index write", {"docflow.index.rows": len(batch)}):
            await index.upsert(batch)
    except VectorIndexError as exc:
        metrics.index_errors_total.labels("refused" if exc.permanent else "unavailable").inc()
        raise
