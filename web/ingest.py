"""Taking a document in: store the original, then announce it on Kafka.

Every ingestion endpoint goes through the same two steps: :func:`receive` checks the type
and stores the original, :func:`accept` validates the options and announces it. The
object is stored before any event is produced, so there is never an event without an
object. DocumentUploaded goes first and the "uploaded" status second: a document whose
event is on the broker gets a status from the chunker even if the web worker dies right
after. When the event was refused before it left this worker, the object is deleted and
the caller gets 503; when its fate is unknown (the broker did not answer in time: it may
still write it), the object stays, and if no event ever names it the storage sweeper
removes it (docs/architecture.md, "Trust boundary").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pipeline import metrics, tracing
from pipeline.errors import RequestError, StorageError
from pipeline.ids import new_document_id, object_key, sanitize_filename
from pipeline.records import DocumentUploaded, now_ms, status_event
from pipeline.storage import StoredObject
from pipeline.text.content_types import SNIFF_BYTES, SUPPORTED_CONTENT_TYPES, detect_content_type
from web.lifecycle import LIVE_STATES, document_key_from, versions_of

if TYPE_CHECKING:
    from faust.web import Request

    from pipeline.app import DocflowApp
    from pipeline.settings import Settings
    from web.auth import Caller

log = logging.getLogger(__name__)

MAX_TITLE_CHARS = 500
MAX_TAGS = 50
MAX_TAG_CHARS = 100
MAX_URL_CHARS = 2048


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
    document_key: str = ""


@dataclass(frozen=True)
class Accepted:
    """What an upload became: a new document (or version), or the unchanged current version of its key."""

    document_id: str
    state: str
    version: int = 1
    document_key: str = ""
    unchanged: bool = False

    def body(self) -> dict:
        answer = {
            "document_id": self.document_id,
            "status": self.state,
            "status_url": f"/api/v1/documents/{self.document_id}",
            "version": self.version,
        }
        if self.document_key:
            answer.update(document_key=self.document_key, unchanged=self.unchanged)
        return answer


@dataclass(frozen=True)
class Version:
    """Where a new upload of a key stands: its number, and the version it will supersede once completed."""

    number: int = 1
    replaces: str = ""


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
    return IngestOptions(size, overlap, unit, title, tags, document_key_from(raw.get("document_key")))


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


def type_label(content_type: str | None) -> str:
    """A content type as a metric label: one of the supported few, or ``other``."""
    return content_type if content_type in SUPPORTED_CONTENT_TYPES else "other"


def count_upload(caller: Caller, content_type: str | None, outcome: str) -> None:
    metrics.ingest_uploads_total.labels(caller.metric_company, type_label(content_type), outcome).inc()


def check_type(caller: Caller, filename: str, declared: str | None, head: bytes) -> str:
    if not head:
        count_upload(caller, declared, "rejected")
        raise RequestError(422, "empty_file", "the file is empty")
    content_type = detect_content_type(filename, declared, head)
    if content_type is None:
        count_upload(caller, declared, "rejected")
        raise RequestError(
            415,
            "unsupported_type",
            f"{filename!r} ({declared or 'no declared type'}) is not a supported type: "
            "PDF, plain text, Markdown, HTML, Word (.docx) or PowerPoint (.pptx)",
        )
    return content_type


@dataclass(frozen=True)
class Received:
    """An original checked and stored, not yet announced; or a URL whose original the chunker
    will fetch and store under ``stored.key`` (``source_url`` set, nothing stored yet)."""

    document_id: str
    caller: Caller
    filename: str
    content_type: str
    stored: StoredObject
    source_url: str = ""

    @property
    def company_id(self) -> str:
        return self.caller.company_id


async def receive(
    app: DocflowApp, caller: Caller, filename: str, declared: str | None, pieces: AsyncIterator[bytes], fields: dict
) -> Received:
    """Check the type and the options known so far, then store the original under a new document id."""
    filename = sanitize_filename(filename)
    head, pieces = await sniff(pieces)
    content_type = check_type(caller, filename, declared, head)
    options_from(fields, app.settings)  # refuse before storing
    document_id = new_document_id()
    stored = await _store(app, caller, document_id, filename, content_type, pieces)
    return Received(document_id, caller, filename, content_type, stored)


def url_from(raw: object) -> str:
    """A URL to ingest, checked for form only (422): where it leads is the chunker's SSRF guard's to judge."""
    if not isinstance(raw, str) or not raw.strip():
        raise RequestError(422, "invalid_url", "url must be a non-empty string")
    url = raw.strip()
    parsed = urlsplit(url)
    if len(url) > MAX_URL_CHARS or not url.isprintable():
        raise RequestError(422, "invalid_url", f"url must be printable and at most {MAX_URL_CHARS} characters")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RequestError(422, "invalid_url", "only http and https URLs with a host are fetched")
    if parsed.username is not None or parsed.password is not None:
        raise RequestError(422, "invalid_url", "a URL must not carry credentials")
    return url


def receive_url(app: DocflowApp, caller: Caller, url: str, fields: dict) -> Received:
    """A URL document: its id, and the key its original will be stored under once the chunker fetched it."""
    options_from(fields, app.settings)  # refuse before announcing
    path = urlsplit(url).path.rstrip("/")
    filename = sanitize_filename(path.rsplit("/", 1)[-1] if path else urlsplit(url).hostname or "page")
    document_id = new_document_id()
    key = object_key(caller.company_id, document_id, filename)
    return Received(document_id, caller, filename, "", StoredObject(key, app.storage.uri(key), 0, ""), url)


async def accept(app: DocflowApp, received: Received, fields: dict, request: Request) -> Accepted:
    """Validate the request's complete options and announce the document; its original goes when either
    fails, or when it is the same content as the current version of its key (nothing to do then).
    """
    try:
        options = options_from(fields, app.settings)
        version = Version()
        if options.document_key:
            versions, _ = await versions_of(app, request, received.company_id, options.document_key)
            live = [doc for doc in versions if doc["state"] in LIVE_STATES]
            if live and received.stored.sha256 and live[0]["sha256"] == received.stored.sha256:
                await discard(app, received)
                count_upload(received.caller, received.content_type, "unchanged")
                return Accepted(
                    live[0]["document_id"], live[0]["state"], live[0]["version"], options.document_key, True
                )
            version = Version(
                number=max((doc["version"] for doc in versions), default=0) + 1,
                replaces=live[0]["document_id"] if live else "",
            )
    except BaseException:
        await discard(app, received)
        raise
    await _announce(app, received, options, version)
    return Accepted(received.document_id, "uploaded", version.number, options.document_key)


async def discard(app: DocflowApp, received: Received) -> None:
    """Remove an original no event names; a failure is logged with its key, and the sweeper retries it."""
    try:
        await app.storage.delete(received.stored.key)
    except Exception as exc:
        log.error("removing unannounced original %s failed (the storage sweeper will): %s", received.stored.key, exc)


async def _store(
    app: DocflowApp, caller: Caller, document_id: str, filename: str, content_type: str, pieces: AsyncIterator[bytes]
) -> StoredObject:
    key = object_key(caller.company_id, document_id, filename)
    try:
        with tracing.span("store original", {"docflow.document_id": document_id, "docflow.content_type": content_type}):
            return await app.storage.put(key, _limited(pieces, app.settings.max_upload_bytes), content_type)
    except RequestError as exc:
        if exc.status == 413:
            count_upload(caller, content_type, "too_large")
        raise
    except (StorageError, OSError) as exc:
        log.error("storing %s failed: %s", key, exc)
        count_upload(caller, content_type, "storage_error")
        raise RequestError(503, "storage_unavailable", "storage is unavailable; nothing was stored") from exc


async def _announce(app: DocflowApp, received: Received, options: IngestOptions, version: Version) -> None:
    """Produce DocumentUploaded, then the "uploaded" status (module docstring: why in this order)."""
    document_id, company_id, stored = received.document_id, received.company_id, received.stored
    tracing.annotate({"docflow.document_id": document_id})  # the request's span: find a document's trace by its id
    uploaded = DocumentUploaded(
        document_id=document_id,
        company_id=company_id,
        s3_path=stored.uri,
        source_url=received.source_url,
        filename=received.filename,
        content_type=received.content_type,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        uploaded_ms=now_ms(),
        chunk_size=options.chunk_size,
        chunk_overlap=options.chunk_overlap,
        chunk_size_unit=options.chunk_size_unit,
        title=options.title,
        tags=options.tags,
        document_key=options.document_key,
        version=version.number,
        replaces=version.replaces,
    )
    try:
        delivery = await _send(app.raw_topic, document_id, uploaded)
    except Exception as exc:
        # Refused before it left this worker (no metadata, a closed producer): nothing names the object.
        log.error("queueing %s failed, removing its original: %s", document_id, exc)
        await discard(app, received)
        count_upload(received.caller, received.content_type, "kafka_error")
        raise RequestError(503, "broker_unavailable", "the message broker is unavailable; nothing was stored") from exc
    try:
        await _delivered(app.raw_topic, delivery)
    except BaseException as exc:
        # The broker may still write it: the object stays for the event, or for the sweeper.
        log.error(
            "queueing %s timed out; its original %s stays until the sweeper finds no event: %s",
            document_id,
            stored.key,
            exc,
        )
        count_upload(received.caller, received.content_type, "kafka_error")
        if not isinstance(exc, Exception):
            raise
        raise RequestError(
            503,
            "broker_unavailable",
            f"the message broker did not confirm document {document_id} in time; it may still be processed "
            "(check its status), or upload it again",
        ) from exc
    try:
        await _delivered(
            app.status_topic,
            await _send(
                app.status_topic,
                document_id,
                status_event(
                    document_id,
                    company_id,
                    "uploaded",
                    filename=received.filename,
                    sha256=stored.sha256 or None,
                    source_url=received.source_url or None,
                    document_key=options.document_key or None,
                    version=version.number,
                    replaces=version.replaces or None,
                ),
            ),
        )
    except Exception as exc:  # the chunker's statuses follow anyway: the document is queued
        log.warning("the uploaded status of %s was not confirmed: %s", document_id, exc)
    count_upload(received.caller, received.content_type, "accepted")
    metrics.ingest_upload_file_size_bytes.observe(stored.size_bytes)


async def _send(topic, key: str, value) -> asyncio.Future:
    try:
        # The producer span's context goes with the message: the chunker continues this trace.
        with tracing.send_span(topic.get_topic_name()):
            return await topic.send(key=key, value=value, headers=tracing.kafka_headers())
    except Exception:
        metrics.ingest_kafka_messages_produced_total.labels(topic.get_topic_name(), "error").inc()
        raise


async def _delivered(topic, delivery: asyncio.Future) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(delivery), timeout=topic.app.settings.produce_timeout_seconds + 5)
    except BaseException:
        metrics.ingest_kafka_messages_produced_total.labels(topic.get_topic_name(), "error").inc()
        raise
    metrics.ingest_kafka_messages_produced_total.labels(topic.get_topic_name(), "success").inc()
