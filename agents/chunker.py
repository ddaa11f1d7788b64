"""The chunker agent: original → text per page → chunks on chunks.processed.

Extraction and splitting are CPU work and run in a process pool, never on the event loop
(a blocked loop misses heartbeats, and the worker is evicted from its group). The agent takes documents in batches and
hands a whole batch to the pool at once, so the pool's processes work side by side.

An event is the chunker's only input, and anyone who can produce to documents.raw writes
it: the original it names is read only when its key lies under the event's own
``{company_id}/{document_id}/`` (:func:`own_object_key`); anything else fails the
document as tampered, unread. Hostile originals are bounded by the pool
(:class:`ExtractionPool`): pages, time and memory per document, and a process a document
kills or outlives is replaced while the worker goes on.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception, wait_exponential

from agents.dead_letters import give_up
from agents.lifecycle import live_messages, register_original_removal
from pipeline import metrics, tracing
from pipeline.errors import (
    ExtractionError,
    ExtractionLimitExceeded,
    ObjectNotFound,
    StorageError,
    TamperedEventError,
    UrlFetchError,
    UrlRefused,
)
from pipeline.fetch import fetch_url
from pipeline.ids import MAX_FILENAME_BYTES, chunk_id, valid_id
from pipeline.records import Chunk, DocumentUploaded, now_ms
from pipeline.text.chunking import ChunkedDocument, chunk_document, memory_reason, process_ready, start_process
from pipeline.text.content_types import SNIFF_BYTES, detect_content_type
from pipeline.text.ocr import OcrOptions, check_ocr

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from pipeline.app import DocflowApp
    from pipeline.storage import ObjectStorage

log = logging.getLogger(__name__)

BATCH_WITHIN_SECONDS = 0.2

# The characters pipeline.ids.sanitize_filename leaves in a filename: the last key segment.
_SAFE_FILENAME = re.compile(r"[\w.\- ()+,=@]+")
# How a pool process dies when an allocation past its memory limit fails in native code
# (pdfium and the Rust tokenizer abort), or when the kernel's OOM killer picks it.
_OUT_OF_MEMORY_SIGNALS = frozenset((signal.SIGABRT, signal.SIGKILL))


def own_object_key(storage: ObjectStorage, uploaded: DocumentUploaded) -> str:
    """The key of the original an event names, when it is the document's own; TamperedEventError otherwise.

    Own means ``{company_id}/{document_id}/{filename}`` with the event's own ids (both valid
    ids) and a filename as :func:`pipeline.ids.object_key` writes it: one segment, no ``/``,
    never ``.`` or ``..``. A URI of another scheme or outside the storage root is not own
    either. Nothing is read to decide.
    """
    company, document, uri = uploaded.company_id, uploaded.document_id, uploaded.s3_path
    reason = f"tampered event: the event names an object outside the document's own prefix {company}/{document}/"
    if not all(isinstance(value, str) for value in (company, document, uri)):
        raise TamperedEventError(f"{reason} (its ids and s3_path are not all strings)")
    if not (valid_id(company) and valid_id(document)):
        raise TamperedEventError(f"{reason} (its company or document id is not a valid id)")
    shown = uri if len(uri) <= 200 else uri[:199] + "…"
    # Climbing segments are refused as written, before storage resolves them into some other key.
    if any(part in (".", "..") for part in unquote(urlparse(uri).path).split("/")):
        raise TamperedEventError(f"{reason} ({shown!r} climbs out of its directory)")
    try:
        key = storage.key_of(uri)
    except (ValueError, OSError) as exc:
        # Why, in the log only: the storage's root or bucket is no business of whoever wrote the event.
        log.warning("event of document %s names %r: %s", document, shown, exc)
        raise TamperedEventError(f"{reason} ({shown!r} is not in this storage)") from None
    prefix = f"{company}/{document}/"
    name = key[len(prefix) :] if key.startswith(prefix) else ""
    if not _SAFE_FILENAME.fullmatch(name) or name in (".", "..") or len(name.encode()) > MAX_FILENAME_BYTES:
        raise TamperedEventError(f"{reason}: {shown!r}")
    return key


class ExtractionPool:
    """The process pool that extracts and splits documents, each within its pages, time and memory.

    - memory: every process runs under an address-space limit (``start_process``, the
      initializer), so a document needing more fails alone; a process that died of it is
      replaced with the whole pool.
    - time: at most ``processes`` documents are in the pool at once, so a document starts
      when it is submitted and its time is its own. One still running after
      ``timeout_seconds`` is stopped by killing the pool's processes (a ProcessPoolExecutor
      cannot stop one task); the documents beside it come back as BrokenProcessPool and
      :meth:`chunk_all` runs them again, one by one.
    - a crash (a segfault in a parser) breaks the pool the same way, and is found the same way.
    - OCR (``ocr``, pipeline/text/ocr.py) runs in the same processes, within its own
      ``ocr.timeout_seconds``, which the time limit of a document then adds to ``timeout_seconds``.
    """

    def __init__(
        self,
        processes: int,
        tokenizer_path: str = "",
        *,
        max_pages: int | None = None,
        timeout_seconds: float | None = None,
        memory_mb: int | None = None,
        ocr: OcrOptions | None = None,
    ) -> None:
        self.processes = processes or os.cpu_count() or 1
        self.ocr = ocr if ocr is not None and ocr.enabled else None
        if self.ocr is not None and timeout_seconds is not None:
            # OCR stops itself at its own limit (the pages left count as unreadable); this
            # one is the backstop for a page the engine never finishes.
            timeout_seconds += self.ocr.timeout_seconds
        self.tokenizer_path = tokenizer_path  # the tokenizer that counts chunk sizes given in tokens
        self.max_pages = max_pages
        self.timeout_seconds = timeout_seconds
        self.memory_mb = memory_mb
        self.last_exit_codes: list[int] = []  # of the processes of the pool that broke last
        self._pool: ProcessPoolExecutor | None = None
        self._slots = asyncio.Semaphore(self.processes)
        self._starting = asyncio.Lock()

    async def _ready(self) -> ProcessPoolExecutor:
        """The pool, every process of it started (spawned, initialized, the libraries imported)."""
        async with self._starting:
            if self._pool is None:
                # spawn: forking a process that runs an event loop and Kafka clients copies their state.
                pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=start_process,
                    initargs=(self.memory_mb,),
                )
                try:
                    await self._start_every_process(pool)
                except Exception as exc:
                    pool.shutdown(wait=False, cancel_futures=True)
                    # Not BrokenProcessPool: no document broke this pool, and none should be blamed for it.
                    raise RuntimeError(
                        f"the extraction processes could not start (memory limit {self.memory_mb} MB): {exc!r}"
                    ) from exc
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                self._pool = pool
            return self._pool

    async def _start_every_process(self, pool: ProcessPoolExecutor, within: float = 120.0) -> None:
        """Run no-ops until every process has answered: each submission that finds no idle process
        starts one, but a process up early may answer them all while the others still import."""
        answered: set[int] = set()
        deadline = time.monotonic() + within
        while len(answered) < self.processes:
            futures = [asyncio.wrap_future(pool.submit(process_ready, 0.05)) for _ in range(self.processes)]
            answered.update(await asyncio.gather(*futures))
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(answered)} of {self.processes} extraction processes started")

    def _discard(self, pool: ProcessPoolExecutor, kill: bool = False) -> None:
        """Stop using a pool; ``kill`` ends its processes now, whatever they run."""
        if kill:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        if self._pool is pool:
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    async def run(self, fn, *args):
        """``fn(*args)`` in a pool process within the time limit.

        ExtractionLimitExceeded past the limit (the pool is replaced), BrokenProcessPool when
        a process of the pool died meanwhile (``last_exit_codes`` then says how).
        """
        async with self._slots:
            pool = await self._ready()
            try:
                future = asyncio.wrap_future(pool.submit(fn, *args))
                # asyncio.wait, not wait_for: a TimeoutError the function itself raises is no timeout of ours.
                done, _ = await asyncio.wait({future}, timeout=self.timeout_seconds)
                if not done:
                    future.cancel()
                    self._discard(pool, kill=True)
                    raise ExtractionLimitExceeded(
                        f"document took longer than {self.timeout_seconds:g} s to extract and was stopped"
                    )
                return future.result()
            except BrokenProcessPool:
                self.last_exit_codes = await _exit_codes(pool)
                self._discard(pool)
                raise

    async def chunk(
        self, uploaded: DocumentUploaded, data: bytes, extractor: str, trace: Context | None = None
    ) -> ChunkedDocument:
        """One document's text and chunks; its ``extract`` span is a child of ``trace`` (its document's)."""
        attributes = {"docflow.document_id": uploaded.document_id, "docflow.content_type": uploaded.content_type}
        with tracing.span("extract", {**attributes, "docflow.size_bytes": len(data)}, context=trace) as extracting:
            chunked = await self.run(
                functools.partial(chunk_document, ocr=self.ocr),
                data,
                uploaded.content_type,
                uploaded.chunk_size,
                uploaded.chunk_overlap,
                extractor,
                uploaded.chunk_size_unit,
                self.tokenizer_path,
                self.max_pages,
            )
            extracting.set_attributes({"docflow.pages": chunked.pages, "docflow.chunks": len(chunked.chunks)})
            return chunked

    async def chunk_all(
        self, jobs: list[tuple[DocumentUploaded, bytes]], extractor: str, traces: Sequence[Context | None] = ()
    ) -> list:
        """Each document's ChunkedDocument, or the exception it failed with, in order; ``traces``
        are the jobs' trace contexts (the documents' own traces, whichever batch they share)."""
        traces = list(traces) or [None] * len(jobs)
        if len(jobs) == 1:
            return [await self._chunk_alone(*jobs[0], extractor, traces[0])]
        results = list(
            await asyncio.gather(
                *(self.chunk(uploaded, data, extractor, trace) for (uploaded, data), trace in zip(jobs, traces)),
                return_exceptions=True,
            )
        )
        for n, result in enumerate(results):
            if isinstance(result, BrokenProcessPool):
                # A process died with documents in it; run alone, the one that kills it again is the culprit.
                results[n] = await self._chunk_alone(*jobs[n], extractor, traces[n])
        return results

    async def _chunk_alone(self, uploaded: DocumentUploaded, data: bytes, extractor: str, trace: Context | None = None):
        try:
            return await self.chunk(uploaded, data, extractor, trace)
        except BrokenProcessPool:
            return self.death_error(self.last_exit_codes)
        except Exception as exc:
            return exc

    def death_error(self, exit_codes: list[int]) -> ExtractionError:
        """Why a document that killed its pool process failed, from how the process ended."""
        if self.memory_mb and any(-code in _OUT_OF_MEMORY_SIGNALS for code in exit_codes):
            return ExtractionLimitExceeded(memory_reason(self.memory_mb))
        return ExtractionError("the document crashed the text extractor")


async def _exit_codes(pool: ProcessPoolExecutor, wait: float = 2.0) -> list[int]:
    """Exit codes of a broken pool's processes, less the SIGTERM the pool sends the survivors.

    The pool breaks as soon as a process's pipe closes, a moment before its exit status
    exists, and then terminates the others: wait (briefly) until every one has ended.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    deadline = time.monotonic() + wait
    while any(process.exitcode is None for process in processes) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    codes = [process.exitcode for process in processes]
    return [code for code in codes if code is not None and code != -signal.SIGTERM]


def register(app: DocflowApp) -> None:
    settings = app.settings
    pool = ExtractionPool(
        settings.chunker_processes,
        settings.local_tokenizer_path,
        max_pages=settings.max_pages,
        timeout_seconds=settings.extraction_timeout_seconds,
        memory_mb=settings.extraction_memory_mb,
        ocr=OcrOptions.from_settings(settings),
    )
    if pool.ocr is not None:
        check_ocr(pool.ocr)  # a missing engine or API setting stops the worker here, not every document

    @app.agent(app.raw_topic, name="chunker")
    async def chunk_documents(stream):
        # Events, not values: their headers carry each document's trace (pipeline/tracing.py).
        async for events in stream.take_events(settings.chunker_batch_size, within=BATCH_WITHIN_SECONDS):
            await chunk_batch(app, pool, [event.value for event in events], [event.headers for event in events])

    register_original_removal(app)

    @app.on_before_shutdown.connect
    async def close_pool(app_, **kwargs) -> None:
        pool.close()


async def chunk_batch(
    app: DocflowApp, pool: ExtractionPool, batch: list[DocumentUploaded], headers: Sequence[Mapping] | None = None
) -> None:
    """Chunk every document of a batch; returns once every message it produced is acknowledged.

    ``headers`` are the messages' Kafka headers, in order: each document's work continues its trace.
    """
    with tracing.batch_span("chunker batch", batch, headers) as traced:
        await _chunk_traced_batch(app, pool, batch, traced)


async def _chunk_traced_batch(
    app: DocflowApp, pool: ExtractionPool, batch: list[DocumentUploaded], traced: tracing.BatchTrace
) -> None:
    deliveries: list = []
    downloaded: list[tuple[DocumentUploaded, bytes]] = []
    for uploaded in await live_messages(app, batch, "chunker"):
        metrics.docproc_messages_consumed_total.labels(app.raw_topic.get_topic_name(), "received").inc()
        try:
            key = own_object_key(app.storage, uploaded)
        except TamperedEventError as exc:
            deliveries += await _give_up_tampered(app, uploaded, str(exc))
            continue
        deliveries.append(
            await app.send_status(uploaded.document_id, uploaded.company_id, "extracting", filename=uploaded.filename)
        )
        original = {"docflow.document_id": uploaded.document_id}
        if uploaded.source_url:
            with tracing.span("fetch original", original, context=traced.context_of(uploaded.document_id)):
                fetched = await _fetch_original(app, uploaded, key, deliveries)
            if fetched is not None:
                downloaded.append(fetched)
            continue
        with tracing.span("download original", original, context=traced.context_of(uploaded.document_id)):
            data = await _download(app, uploaded, key, deliveries)
        if data is not None:
            downloaded.append((uploaded, data))

    started = time.perf_counter()
    traces = [traced.context_of(uploaded.document_id) for uploaded, _ in downloaded]
    results = await pool.chunk_all(downloaded, app.settings.pdf_extractor, traces) if downloaded else []
    elapsed = time.perf_counter() - started

    for (uploaded, _), result in zip(downloaded, results):
        if app.lifecycle.stopped(uploaded.document_id) is not None:
            log.info("chunker dropped the chunks of document %s: it ended while it was extracted", uploaded.document_id)
            continue
        if isinstance(result, BaseException):
            reason = _reason(result)
            metrics.docproc_processing_errors_total.labels("extract").inc()
            metrics.docproc_messages_consumed_total.labels(app.raw_topic.get_topic_name(), "failed").inc()
            deliveries += await _give_up_on(app, uploaded, "extract", reason)
            continue
        deliveries += await _emit_chunks(app, uploaded, result, traced.context_of(uploaded.document_id))
        metrics.docproc_processing_duration_seconds.labels(uploaded.company_id, uploaded.content_type).observe(
            elapsed / max(len(downloaded), 1)
        )
        metrics.docproc_messages_consumed_total.labels(app.raw_topic.get_topic_name(), "processed").inc()
    # at-least-once: the batch's offsets are committed after this returns, so nothing is
    # acknowledged to Kafka before everything it caused is on the broker.
    await asyncio.gather(*deliveries)


async def _give_up_tampered(app: DocflowApp, uploaded: DocumentUploaded, reason: str) -> list:
    log.warning("refused to read %r for document %s of %s", uploaded.s3_path, uploaded.document_id, uploaded.company_id)
    metrics.docproc_processing_errors_total.labels("validate").inc()
    metrics.docproc_messages_consumed_total.labels(app.raw_topic.get_topic_name(), "failed").inc()
    return await _give_up_on(app, uploaded, "validate", reason)


async def _download(app: DocflowApp, uploaded: DocumentUploaded, key: str, deliveries: list) -> bytes | None:
    started = time.perf_counter()
    # Storage being down is no fault of the document: wait for it (the partition pauses,
    # heartbeats go on), rather than fail the document or acknowledge it unprocessed.
    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, StorageError) and not isinstance(exc, ObjectNotFound)),
        wait=wait_exponential(multiplier=0.5, max=30),
        before_sleep=before_sleep_log(log, logging.WARNING),
    )
    try:
        data = await retrying(_read_original, app, key)
    except (ObjectNotFound, ValueError) as exc:
        deliveries += await _give_up_on(app, uploaded, "download", f"the original is not in storage ({exc})")
        return None
    metrics.docproc_s3_download_duration_seconds.observe(time.perf_counter() - started)
    return data


async def _fetch_original(
    app: DocflowApp, uploaded: DocumentUploaded, key: str, deliveries: list
) -> tuple[DocumentUploaded, bytes] | None:
    """A URL document's original: fetched behind the SSRF guard and stored under its own key,
    or read from there when it was fetched before (a redelivery, a replay). The event then
    carries the type sniffed from the bytes, their size and sha256.
    """
    declared = None
    if await app.storage.exists(key):
        data = await _download(app, uploaded, key, deliveries)
        if data is None:
            return None
    else:
        try:
            fetched = await fetch_url(uploaded.source_url, app.settings)
        except (UrlRefused, UrlFetchError) as exc:
            metrics.docproc_processing_errors_total.labels("fetch").inc()
            deliveries += await _give_up_on(app, uploaded, "fetch", f"fetching {uploaded.source_url} failed: {exc}")
            return None
        data, declared = fetched.data, fetched.content_type
    content_type = detect_content_type(uploaded.filename, declared, data[:SNIFF_BYTES])
    if content_type is None:
        reason = f"{uploaded.source_url} is {declared or 'of an unknown type'}, not a type docflow reads"
        deliveries += await _give_up_on(app, uploaded, "fetch", reason)
        return None
    if declared is not None:
        await app.storage.put(key, data, content_type)
    digest = hashlib.sha256(data).hexdigest()
    return uploaded.derive(content_type=content_type, size_bytes=len(data), sha256=digest), data


async def _give_up_on(app: DocflowApp, uploaded: DocumentUploaded, stage: str, reason: str) -> list:
    """Fail a document of documents.raw at a stage; the delivery futures for the caller to await."""
    return await give_up(
        app,
        document_id=uploaded.document_id,
        company_id=uploaded.company_id,
        topic=app.raw_topic.get_topic_name(),
        stage=stage,
        error=reason,
        original=uploaded.asdict(),
    )


async def _read_original(app: DocflowApp, key: str) -> bytes:
    """The original's bytes; every failed attempt counts as a download error."""
    try:
        return await app.storage.get(key)
    except (StorageError, ValueError):
        metrics.docproc_processing_errors_total.labels("download").inc()
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (ExtractionError, ValueError)):
        return str(exc)
    log.error("unexpected extraction error", exc_info=exc)
    return f"text extraction failed unexpectedly: {type(exc).__name__}: {exc}"


async def _emit_chunks(
    app: DocflowApp, uploaded: DocumentUploaded, chunked: ChunkedDocument, trace: Context | None = None
) -> list:
    total = len(chunked.chunks)
    created = now_ms()
    deliveries = []
    with tracing.send_span(app.chunks_topic.get_topic_name(), total, context=trace):
        headers = tracing.kafka_headers()  # every chunk carries this send's context: the embedder continues it
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
                    headers=headers,
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
            pages_ocred=chunked.pages_ocred,
            pages_unreadable=chunked.pages_unreadable,
        )
    )
    return deliveries
