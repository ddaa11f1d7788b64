"""Taking a document in: store the original, then announce it on Kafka.

Every ingestion endpoint goes through the same two steps: :func:`receive` checks the type
and stores the original, :func:`accept` validates the options and announces it. The
object is stored before any event is produced; when producing fails, the object is
deleted again and the caller answers 503, so there is never an event without an object,
nor an object without a status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline import metrics
from pipeline.errors import RequestError, StorageError
from pipeline.ids import new_document_id, object_key, sanitize_filename, valid_id
from pipeline.records import DocumentUploaded, status_event
from pipeline.storage import StoredObject
from pipeline.text.content_types import detect_content_type

if TYPE_CHECKING:
    from pipeline.app import DocflowApp
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

SNIFF_BYTES = 8192
MAX_TITLE_CHARS = 500
MAX_TAGS = 50
MAX_TAG_CHARS = 100


# Each unit's default sizes and bounds: 250 word pieces and the model's [CLS] and [SEP] fit
# the 256 that all-MiniLM-L6-v2 reads whole.
CHUNK_SIZES = {
    "tokens": {"default": (250, 30), "range": (16, 8192)},
    "chars": {"default": (1000, 200), "range": (50, 100_000)},
}


@dataclass
class IngestOptions:
    chunk_size: int
    chunk_overlap: int
    chunk_size_unit: str = "chars"
    title: str = ""
    tags: list[str] = field(default_factory=list)


def company_from(value: str | None) -> str:
    if not value:
        raise RequestError(400, "missing_company_id", "the X-Company-ID header is required")
    if not valid_id(value):
        raise RequestError(
            400,
            "invalid_company_id",
            "company id must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return value


def options_from(raw: dict, settings: Settings) -> IngestOptions:
    """Validated chunking options and metadata from form fields or JSON (422 when malformed).

    Sizes not given are the settings' for their unit, or that unit's defaults when the
    request asks for another unit than the settings' one.
    """
    unit = raw.get("chunk_size_unit") or settings.chunk_size_unit
    if unit not in CHUNK_SIZES:
        raise RequestError(422, "invalid_parameter", f"chunk_size_unit must be tokens or chars, got {unit!r}")
    if unit == settings.chunk_size_unit:
        defaults_size, defaults_overlap = settings.chunk_size, settings.chunk_overlap
    else:
        defaults_size, defaults_overlap = CHUNK_SIZES[unit]["default"]
    low, high = CHUNK_SIZES[unit]["range"]

    def integer(name: str, default: int) -> int:
        value = raw.get(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise RequestError(422, "invalid_parameter", f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or str(number) != str(value).strip():
            raise RequestError(422, "invalid_parameter", f"{name} must be an integer, got {value!r}")
        return number

    size = integer("chunk_size", defaults_size)
    overlap = integer("chunk_overlap", defaults_overlap)
    if not low <= size <= high:
        raise RequestError(422, "invalid_parameter", f"chunk_size must be between {low} and {high} {unit}")
    if not 0 <= overlap < size:
        raise RequestError(422, "invalid_parameter", "chunk_overlap must be at least 0 and less than chunk_size")
    title = raw.get("title") or ""
    if not isinstance(title, str) or len(title) > MAX_TITLE_CHARS:
        raise RequestError(422, "invalid_parameter", f"title must be a string of at most {MAX_TITLE_CHARS} characters")
    tags = raw.get("tags") or []
    if isinstance(tags, str):
        tags = [tag.strip() for tag in tags.split(",") if tag.strip()]
    if (
        not isinstance(tags, list)
        or len(tags) > MAX_TAGS
        or not all(isinstance(tag, str) and len(tag) <= MAX_TAG_CHARS for tag in tags)
    ):
        raise RequestError(
            422, "invalid_parameter", f"tags must be a list of at most {MAX_TAGS} strings of {MAX_TAG_CHARS} characters"
        )
    return IngestOptions(size, overlap, unit, title, tags)


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
            raise RequestError(413, "too_large", f"the file is larger than the {limit}-byte limit")
        yield piece


def check_type(company_id: str, filename: str, declared: str | None, head: bytes) -> str:
    if not head:
        metrics.ingest_uploads_total.labels(company_id, declared or "unknown", "rejected").inc()
        raise RequestError(422, "empty_file", "the file is empty")
    content_type = detect_content_type(filename, declared, head)
    if content_type is None:
        metrics.ingest_uploads_total.labels(company_id, declared or "unknown", "rejected").inc()
        raise RequestError(
            415,
            "unsupported_type",
            f"{filename!r} ({declared or 'no declared type'}) is not a supported type: "
            "PDF, plain text, Markdown or HTML",
        )
    return content_type


@dataclass(frozen=True)
class Received:
    """An original checked and stored, not yet announced."""

    document_id: str
    company_id: str
    filename: str
    content_type: str
    stored: StoredObject


async def receive(
    app: DocflowApp, company_id: str, filename: str, declared: str | None, pieces: AsyncIterator[bytes], fields: dict
) -> Received:
    """Check the type and the options known so far, then store the original under a new document id."""
    filename = sanitize_filename(filename)
    head, pieces = await sniff(pieces)
    content_type = check_type(company_id, filename, declared, head)
    options_from(fields, app.settings)  # refuse before storing
    document_id = new_document_id()
    stored = await _store(app, company_id, document_id, filename, content_type, pieces)
    return Received(document_id, company_id, filename, content_type, stored)


async def accept(app: DocflowApp, received: Received, fields: dict) -> None:
    """Validate the request's complete options and announce the document; its original goes when either fails."""
    try:
        options = options_from(fields, app.settings)
    except BaseException:
        await discard(app, received)
        raise
    await _announce(app, received, options)


async def discard(app: DocflowApp, received: Received) -> None:
    """Remove an original that will not be announced."""
    with contextlib.suppress(Exception):
        await app.storage.delete(received.stored.key)


async def _store(
    app: DocflowApp, company_id: str, document_id: str, filename: str, content_type: str, pieces: AsyncIterator[bytes]
) -> StoredObject:
    key = object_key(company_id, document_id, filename)
    try:
        return await app.storage.put(key, _limited(pieces, app.settings.max_upload_bytes), content_type)
    except RequestError as exc:
        if exc.status == 413:
            metrics.ingest_uploads_total.labels(company_id, content_type, "too_large").inc()
        raise
    except (StorageError, OSError) as exc:
        log.error("storing %s failed: %s", key, exc)
        metrics.ingest_uploads_total.labels(company_id, content_type, "storage_error").inc()
        raise RequestError(503, "storage_unavailable", "storage is unavailable; nothing was stored") from exc


async def _announce(app: DocflowApp, received: Received, options: IngestOptions) -> None:
    """Produce the document's first status and its DocumentUploaded event, or undo the upload."""
    document_id, company_id, stored = received.document_id, received.company_id, received.stored
    status = status_event(document_id, company_id, "uploaded", filename=received.filename)
    uploaded = DocumentUploaded(
        document_id=document_id,
        company_id=company_id,
        s3_path=stored.uri,
        filename=received.filename,
        content_type=received.content_type,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        uploaded_ms=status.at_ms,
        chunk_size=options.chunk_size,
        chunk_overlap=options.chunk_overlap,
        chunk_size_unit=options.chunk_size_unit,
        title=options.title,
        tags=options.tags,
    )
    sent_status = False
    try:
        await _produce(app.status_topic, document_id, status)
        sent_status = True
        await _produce(app.raw_topic, document_id, uploaded)
    except Exception as exc:
        log.error("producing events for %s failed: %s", document_id, exc)
        await discard(app, received)
        if sent_status:
            # The status says uploaded: correct it, or the document would wait forever.
            with contextlib.suppress(Exception):
                await _produce(
                    app.status_topic,
                    document_id,
                    status_event(
                        document_id,
                        company_id,
                        "failed",
                        filename=received.filename,
                        error="the document could not be queued for processing; upload it again",
                    ),
                )
        metrics.ingest_uploads_total.labels(company_id, received.content_type, "kafka_error").inc()
        raise RequestError(503, "broker_unavailable", "the message broker is unavailable; nothing was stored") from exc
    metrics.ingest_uploads_total.labels(company_id, received.content_type, "accepted").inc()
    metrics.ingest_upload_file_size_bytes.observe(stored.size_bytes)


async def _produce(topic, key: str, value) -> None:
    try:
        future = await topic.send(key=key, value=value)
        await asyncio.wait_for(asyncio.shield(future), timeout=topic.app.settings.produce_timeout_seconds + 5)
    except Exception:
        metrics.ingest_kafka_messages_produced_total.labels(topic.get_topic_name(), "error").inc()
        raise
    metrics.ingest_kafka_messages_produced_total.labels(topic.get_topic_name(), "success").inc()
