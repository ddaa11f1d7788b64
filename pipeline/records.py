"""The messages on docflow's topics (docs/architecture.md, "Topics and records"): Faust Records, plain JSON on the wire.

``include_metadata=False`` keeps Faust's ``__faust`` blob off the wire, so Flink, Spark
and kcat read these without knowing Faust. Timestamps are epoch milliseconds (``*_ms``).
The JSON Schemas of these records are in ``pipeline/schemas/``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal, Optional, get_args

import faust

# A document's states, the one vocabulary of the table, the API, the client, the CLI and the
# page. A StatusEvent's stage is the state its stage moves the document towards.
DocumentState = Literal[
    "uploaded", "extracting", "chunked", "embedding", "completed", "failed", "cancelled", "superseded", "deleted"
]
STATES: tuple[DocumentState, ...] = get_args(DocumentState)
# The happy path, in order: a document's state only ever moves forward along it.
PROGRESS_STATES: tuple[DocumentState, ...] = ("uploaded", "extracting", "chunked", "embedding", "completed")
# States in which nothing more is done for a document. Only a stronger one follows one of
# them (STOP_RANK): a completed document can still be superseded, cancelled or deleted.
FINAL_STATES: tuple[DocumentState, ...] = ("completed", "failed", "superseded", "cancelled", "deleted")
# Which final state wins when several apply, whatever order their events arrive in.
STOP_RANK: dict[str, int] = {state: rank for rank, state in enumerate(FINAL_STATES)}
# The final states a lifecycle command causes.
LifecycleCommandKind = Literal["cancel", "delete", "supersede"]
COMMAND_STATES: dict[str, DocumentState] = {"cancel": "cancelled", "delete": "deleted", "supersede": "superseded"}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class WireRecord(faust.Record, abstract=True, serializer="json", include_metadata=False):
    """Base of every docflow message."""


class DocumentUploaded(WireRecord):
    document_id: str
    company_id: str
    s3_path: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    uploaded_ms: int
    chunk_size: int
    chunk_overlap: int
    title: str
    tags: list[str]
    # What chunk_size and chunk_overlap count; messages from before it was carried were in characters.
    chunk_size_unit: str = "chars"
    # The client's own id of the document; versions of one key replace each other (docs/architecture.md).
    document_key: str = ""
    version: int = 1
    replaces: str = ""  # the version this one supersedes once it completes
    # Fetched by the chunker (behind the SSRF guard) and stored at s3_path, instead of uploaded.
    source_url: str = ""


class Chunk(WireRecord):
    """One piece of a document's text, with what the index shows of its document (filename, title, tags)."""

    chunk_id: str
    document_id: str
    company_id: str
    text: str
    page: int
    index: int
    total: int
    created_ms: int
    filename: str = ""
    title: str = ""
    tags: list[str] = []


class ChunkEmbedding(WireRecord):
    """A chunk's vector, carrying the chunk's text and document fields on to the indexer.

    The indexer needs them to make a chunk searchable; carried here, it reads one topic and
    keeps no state, instead of joining embeddings.ready with chunks.processed (docs/architecture.md).
    """

    chunk_id: str
    document_id: str
    company_id: str
    index: int
    vector: list[float]
    model: str
    dims: int
    created_ms: int
    text: str = ""
    page: int = 0
    filename: str = ""
    title: str = ""
    tags: list[str] = []


class StatusEvent(WireRecord):
    """A stage's word on a document.

    ``chunk_indexes`` names the chunks an embedder's event covers, ``indexed_indexes`` the
    chunks an indexer's event made searchable.
    """

    document_id: str
    company_id: str
    stage: DocumentState
    at_ms: int
    filename: str = ""
    chunks_total: Optional[int] = None
    chunks_embedded: Optional[int] = None
    chunk_indexes: Optional[list[int]] = None
    chunks_indexed: Optional[int] = None
    indexed_indexes: Optional[list[int]] = None
    pages: Optional[int] = None
    error: Optional[str] = None
    # Lifecycle: who cancelled or deleted it, which version superseded it.
    by: Optional[str] = None
    successor_id: Optional[str] = None
    # Versions: set on the first status of a document uploaded with a key.
    document_key: Optional[str] = None
    version: Optional[int] = None
    replaces: Optional[str] = None
    sha256: Optional[str] = None
    source_url: Optional[str] = None
    pages_ocred: Optional[int] = None
    pages_unreadable: Optional[int] = None
    # An operator re-injected the document's dead-lettered message: a failed document runs again.
    replayed: bool = False


def status_event(document_id: str, company_id: str, stage: DocumentState, **details: Any) -> StatusEvent:
    """A StatusEvent stamped now: every stage builds its events through here."""
    return StatusEvent(document_id=document_id, company_id=company_id, stage=stage, at_ms=now_ms(), **details)


class CompanyWindowCount(WireRecord):
    """Chunks embedded for one company in one minute, as the Flink job writes them to analytics.flink."""

    company_id: str
    window_start_ms: int
    window_end_ms: int
    count: int
    # The window's start in ISO 8601 UTC, the field seeds 000 and 001 name (older windows lack it).
    timestamp: str = ""

    @classmethod
    def from_wire(cls, value: bytes) -> Optional[CompanyWindowCount]:
        """The window a message holds, or None when it is not one (readers skip it, it is not fatal).

        The Flink job is not a Faust producer: its fields are checked and converted here.
        """
        try:
            data = json.loads(value)
            return cls(
                company_id=str(data["company_id"]),
                window_start_ms=int(data["window_start_ms"]),
                window_end_ms=int(data["window_end_ms"]),
                count=int(data["count"]),
                timestamp=str(data.get("timestamp", "")),
            )
        except (ValueError, TypeError, KeyError):
            return None


class DeadLetter(WireRecord):
    """A message a stage gave up on: the original as it was, and why."""

    document_id: str
    company_id: str
    topic: str
    stage: str
    error: str
    attempts: int
    failed_ms: int
    original: dict[str, Any]


class ApiKey(WireRecord):
    """A company's API key as auth.keys keeps it (keyed by key_id): its HMAC, never the key itself.

    A revocation is the same record again with ``revoked_ms`` set; the compacted topic keeps
    the newest, so a revoked key stays revoked.
    """

    key_id: str
    company_id: str
    name: str
    key_hash: str
    created_ms: int
    revoked_ms: Optional[int] = None


class LifecycleCommand(WireRecord):
    """A command about a whole document, from the web role (documents.lifecycle, keyed by document_id)."""

    document_id: str
    company_id: str
    command: LifecycleCommandKind
    at_ms: int
    by: str = ""
    reason: str = ""
    successor_id: str = ""
