"""The chunker agent: original → text per page → chunks on chunks.processed.

Extraction and splitting are CPU work and run in a process pool, never on the event loop
(a blocked loop misses heartbeats, and the worker is evicted from its group). The agent takes documents in batches and
hands a whole batch to the pool at once, so the pool's processes work side by side.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception, wait_exponential

from agents.dead_letters import give_up
from pipeline import metrics
from pipeline.errors import ExtractionError, ObjectNotFound, StorageError
from pipeline.ids import chunk_id
from pipeline.records import Chunk, DocumentUploaded, now_ms
from pipeline.text.chunking import ChunkedDocument, chunk_document

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

log = logging.getLogger(__name__)

BATCH_WITHIN_SECONDS = 0.2


class ExtractionPool:
    """A process pool that is rebuilt when a crashing document (a segfault in a parser) breaks it."""

    def __init__(self, processes: int, tokenizer_path: str = "") -> None:
        self.processes = processes or os.cpu_count() or 1
        self.tokenizer_path = tokenizer_path  # the tokenizer that counts chunk sizes given in tokens
        self._pool: ProcessPoolExecutor | None = None

    @property
    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: forking a process that runs an event loop and Kafka clients copies their state.
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def rebuild(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    async def chunk(self, uploaded: DocumentUploaded, data: bytes, extractor: str) -> ChunkedDocument:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.pool,
            chunk_document,
            data,
            uploaded.content_type,
            uploaded.chunk_size,
            uploaded.chunk_overlap,
            extractor,
            uploaded.chunk_size_unit,
            self.tokenizer_path,
        )


def register(app: DocflowApp) -> None:
    settings = app.settings
    pool = ExtractionPool(settings.chunker_processes, settings.local_tokenizer_path)

    @app.agent(app.raw_topic, name="chunker")
    async def chunk_documents(stream):
        async for batch in stream.take(settings.chunker_batch_size, within=BATCH_WITHIN_SECONDS):
            await chunk_batch(app, pool, batch)

    @app.on_before_shutdown.connect
    async def close_pool(app_, **kwargs) -> None:
        pool.close()


async def chunk_batch(app: DocflowApp, pool: ExtractionPool, batch: list[DocumentUploaded]) -> None:
    """Chunk every document of a batch; returns once every message it produced is acknowledged."""
    deliveries: list = []
    downloaded: list[tuple[DocumentUploaded, bytes]] = []
    for uploaded in batch:
        metrics.docproc_messages_consumed_total.labels(app.raw_topic.get_topic_name(), "received").inc()
        deliveries.append(
            await app.send_status(uploaded.document_id, uploaded.company_id, "extracting", filename=uploaded.filename)
        )
        data = await _download(app, uploaded, deliveries)
        if data is not None:
            downloaded.append((uploaded, data))

    started = time.perf_counter()
    results = await asyncio.gather(
        *(pool.chunk(uploaded, data, app.settings.pdf_extractor) for uploaded, data in downloaded),
        return_exceptions=True,
    )
    if any(isinstance(result, BrokenProcessPool) for result in results):
        # One document crashed a pool process; run the batch again one by one to find it.
        pool.rebuild()
        results = [
            await _chunk_alone(pool, uploaded, data, app.settings.pdf_extractor) for uploaded, data in downloaded
        ]
    elapsed = time.perf_counter() - started

    for (uploaded, _), result in zip(downloaded, results):
        if isinstance(result, BaseException):
            reason = _reason(result)
            metrics.docproc_processing_errors_total.labels("extract").inc()
            metrics.docproc_messages_consumed_total.labels(app.raw_topic.get_topic_name(), "failed").inc()
            deliveries += await give_up(
                app,
                document_id=uploaded.document_id,
                company_id=uploaded.company_id,
                topic=app.raw_topic.get_topic_name(),
                stage="extract",
                error=reason,
                original=uploaded.asdict(),
            )
            continue
        deliveries += await _emit_chunks(app, uploaded, result)
        metrics.docproc_processing_duration_seconds.labels(uploaded.company_id, uploaded.content_type).observe(
            elapsed / max(len(downloaded), 1)
        )
        metrics.docproc_messages_consumed_total.labels(app.raw_topic.get_topic_name(), "processed").inc()
    # at-least-once: the batch's offsets are committed after this returns, so nothing is
    # acknowledged to Kafka before everything it caused is on the broker.
    await asyncio.gather(*deliveries)


async def _download(app: DocflowApp, uploaded: DocumentUploaded, deliveries: list) -> bytes | None:
    started = time.perf_counter()
    # Storage being down is no fault of the document: wait for it (the partition pauses,
    # heartbeats go on), rather than fail the document or acknowledge it unprocessed.
    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, StorageError) and not isinstance(exc, ObjectNotFound)),
        wait=wait_exponential(multiplier=0.5, max=30),
        before_sleep=before_sleep_log(log, logging.WARNING),
    )
    try:
        data = await retrying(_read_original, app, uploaded)
    except (ObjectNotFound, ValueError) as exc:
        deliveries += await give_up(
            app,
            document_id=uploaded.document_id,
            company_id=uploaded.company_id,
            topic=app.raw_topic.get_topic_name(),
            stage="download",
            error=f"the original is not in storage ({exc})",
            original=uploaded.asdict(),
        )
        return None
    metrics.docproc_s3_download_duration_seconds.observe(time.perf_counter() - started)
    return data


async def _read_original(app: DocflowApp, uploaded: DocumentUploaded) -> bytes:
    """The original's bytes; every failed attempt counts as a download error."""
    try:
        return await app.storage.get(app.storage.key_of(uploaded.s3_path))
    except (StorageError, ValueError):
        metrics.docproc_processing_errors_total.labels("download").inc()
        raise


async def _chunk_alone(pool: ExtractionPool, uploaded: DocumentUploaded, data: bytes, extractor: str):
    try:
        return await pool.chunk(uploaded, data, extractor)
    except BrokenProcessPool:
        pool.rebuild()
        return ExtractionError("the document crashed the text extractor")
    except Exception as exc:
        return exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (ExtractionError, ValueError)):
        return str(exc)
    log.error("unexpected extraction error", exc_info=exc)
    return f"text extraction failed unexpectedly: {type(exc).__name__}: {exc}"


async def _emit_chunks(app: DocflowApp, uploaded: DocumentUploaded, chunked: ChunkedDocument) -> list:
    total = len(chunked.chunks)
    created = now_ms()
    deliveries = []
    for piece in chunked.chunks:
        deliveries.append(
            await app.chunks_topic.send(
                key=uploaded.document_id,
                value=Chunk(
                    chunk_id=chunk_id(uploaded.document_id, piece.index),
                    document_id=uploaded.document_id,
                    company_id=uploaded.company_id,
                    text=piece.text,
                    page=piece.page,
                    index=piece.index,
                    total=total,
                    created_ms=created,
                    filename=uploaded.filename,
                    title=uploaded.title,
                    tags=uploaded.tags,
                ),
            )
        )
    metrics.docproc_chunks_produced_total.labels(uploaded.company_id, uploaded.content_type).inc(total)
    deliveries.append(
        await app.send_status(
            uploaded.document_id,
            uploaded.company_id,
            "chunked",
            filename=uploaded.filename,
            chunks_total=total,
            pages=chunked.pages,
        )
    )
    return deliveries
