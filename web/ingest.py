"""Taking a document in: store the original, then announce it on Kafka.

Both upload endpoints go through these steps: check the type, :func:`store`, then
:func:`announce`. The object is stored before any event is produced; when producing fails, the object is deleted again and the caller answers
503, so there is never an event without an object, nor an object without a status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from pipeline import metrics
from pipeline.extract import detect_content_type
from pipeline.records import DocumentUploaded, StatusEvent, now_ms
from pipeline.storage import StorageError, StoredObject, object_key, valid_id

log = logging.getLogger(__name__)

SNIFF_BYTES = 8192
MAX_TITLE_CHARS = 500
MAX_TAGS = 50


class IngestError(Exception):
    """A request docflow refuses, with its HTTP status and error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class IngestOptions:
    chunk_size: int
    chunk_overlap: int
    title: str = ""
    tags: list[str] = field(default_factory=list)


def company_from(value: str | None) -> str:
    if not value:
        raise IngestError(400, "missing_company_id", "the X-Company-ID header is required")
    if not valid_id(value):
        raise IngestError(
            400, "invalid_company_id",
            "company id must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return value


def options_from(raw: dict, defaults_size: int, defaults_overlap: int) -> IngestOptions:
    """Validated chunking options and metadata from form fields or JSON (422 when malformed)."""

    def integer(name: str, default: int) -> int:
        value = raw.get(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise IngestError(422, "invalid_parameter", f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or str(number) != str(value).strip():
            raise IngestError(422, "invalid_parameter", f"{name} must be an integer, got {value!r}")
        return number

    size = integer("chunk_size", defaults_size)
    overlap = integer("chunk_overlap", defaults_overlap)
    if not 50 <= size <= 100_000:
        raise IngestError(422, "invalid_parameter", "chunk_size must be between 50 and 100000")
    if not 0 <= overlap < size:
        raise IngestError(422, "invalid_parameter", "chunk_overlap must be at least 0 and less than chunk_size")
    title = raw.get("title") or ""
    if not isinstance(title, str) or len(title) > MAX_TITLE_CHARS:
        raise IngestError(422, "invalid_parameter", f"title must be a string of at most {MAX_TITLE_CHARS} characters")
    tags = raw.get("tags") or []
    if isinstance(tags, str):
        tags = [tag.strip() for tag in tags.split(",") if tag.strip()]
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags) or len(tags) > MAX_TAGS:
        raise IngestError(422, "invalid_parameter", f"tags must be a list of at most {MAX_TAGS} strings")
    return IngestOptions(size, overlap, title, tags)


async def sniff(pieces: AsyncIterator[bytes]) -> tuple[bytes, AsyncIterator[bytes]]:
    """The first bytes of a stream, and the whole stream again."""
    head = b""
    async for piece in pieces:
        head += piece
        if len(head) >= SNIFF_BYTES:
            break

    async def whole() -> AsyncIterator[bytes]:
        yield head
        async for rest in pieces:
            yield rest

    return head, whole()


async def _limited(pieces: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for piece in pieces:
        size += len(piece)
        if size > limit:
            raise IngestError(413, "too_large", f"the file is larger than the {limit}-byte limit")
        yield piece


def check_type(company_id: str, filename: str, declared: str | None, head: bytes) -> str:
    if not head:
        metrics.ingest_uploads_total.labels(company_id, declared or "unknown", "rejected").inc()
        raise IngestError(422, "empty_file", "the file is empty")
    content_type = detect_content_type(filename, declared, head)
    if content_type is None:
        metrics.ingest_uploads_total.labels(company_id, declared or "unknown", "rejected").inc()
        raise IngestError(
            415, "unsupported_type",
            f"{filename!r} ({declared or 'no declared type'}) is not a supported type: PDF, plain text, Markdown or HTML",
        )
    return content_type


async def store(app, company_id: str, document_id: str, filename: str, content_type: str,
                pieces: AsyncIterator[bytes]) -> StoredObject:
    key = object_key(company_id, document_id, filename)
    try:
        return await app.storage.put(key, _limited(pieces, app.settings.max_upload_bytes), content_type)
    except IngestError as exc:
        if exc.status == 413:
            metrics.ingest_uploads_total.labels(company_id, content_type, "too_large").inc()
        raise
    except (StorageError, OSError) as exc:
        log.error("storing %s failed: %s", key, exc)
        metrics.ingest_uploads_total.labels(company_id, content_type, "storage_error").inc()
        raise IngestError(503, "storage_unavailable", "storage is unavailable; nothing was stored") from exc


async def announce(app, stored: StoredObject, company_id: str, document_id: str, filename: str,
                   content_type: str, options: IngestOptions) -> None:
    """Produce the document's first status and its DocumentUploaded event, or undo the upload."""
    uploaded_ms = now_ms()
    status = StatusEvent(
        document_id=document_id, company_id=company_id, stage="uploaded", at_ms=uploaded_ms, filename=filename,
    )
    uploaded = DocumentUploaded(
        document_id=document_id, company_id=company_id, s3_path=stored.uri, filename=filename,
        content_type=content_type, size_bytes=stored.size_bytes, sha256=stored.sha256, uploaded_ms=uploaded_ms,
        chunk_size=options.chunk_size, chunk_overlap=options.chunk_overlap, title=options.title, tags=options.tags,
    )
    sent_status = False
    try:
        await _produce(app.status_topic, document_id, status)
        sent_status = True
        await _produce(app.raw_topic, document_id, uploaded)
    except Exception as exc:
        log.error("producing events for %s failed: %s", document_id, exc)
        with contextlib.suppress(Exception):
            await app.storage.delete(stored.key)
        if sent_status:
            # The status says uploaded: correct it, or the document would wait forever.
            with contextlib.suppress(Exception):
                await _produce(app.status_topic, document_id, StatusEvent(
                    document_id=document_id, company_id=company_id, stage="failed", at_ms=now_ms(),
                    filename=filename, error="the document could not be queued for processing; upload it again",
                ))
        metrics.ingest_uploads_total.labels(company_id, content_type, "kafka_error").inc()
        raise IngestError(503, "broker_unavailable", "the message broker is unavailable; nothing was stored") from exc
    metrics.ingest_uploads_total.labels(company_id, content_type, "accepted").inc()
    metrics.ingest_upload_file_size_bytes.observe(stored.size_bytes)


async def _produce(topic, key: str, value) -> None:
    try:
        future = await topic.send(key=key, value=value)
        await asyncio.wait_for(asyncio.shield(future), timeout=topic.app.settings.produce_timeout_seconds + 5)
    except Exception:
        metrics.ingest_kafka_messages_produced_total.labels(topic.get_topic_name(), "error").inc()
        raise
    metrics.ingest_kafka_messages_produced_total.labels(topic.get_topic_name(), "success").inc()

