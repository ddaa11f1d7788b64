"""A document's status and the state machine that folds StatusEvents into it.

``uploaded → extracting → chunked → embedding → completed``, or ``failed``; and from the
lifecycle, ``cancelled``, ``deleted``, or ``superseded`` by a newer version. Events may
arrive twice or out of order: the state never moves backwards, counts come from the sets
of distinct embedded and indexed chunk indexes (bitmaps), and ``completed`` means every
index below ``chunks_total`` is embedded and, where the pipeline has a vector index,
indexed (searchable). Of the lifecycle's states the strongest wins whatever the order
(``STOP_RANK``: deleted over cancelled over superseded), so a late chunk never revives a
cancelled document. A failure stops a document that has not completed; an operator's
replay of its dead-lettered message (``replayed``) starts it again.
"""

from __future__ import annotations

from typing import Optional

import faust

from pipeline.records import PROGRESS_STATES, STOP_RANK, DocumentState, StatusEvent


class DocumentStatus(faust.Record, serializer="json", include_metadata=False):
    document_id: str
    company_id: str
    filename: str
    state: DocumentState
    pages: Optional[int]
    chunks_total: Optional[int]
    chunks_embedded: int
    error: Optional[str]
    created_ms: int
    updated_ms: int
    uploaded_ms: Optional[int] = None
    extracting_ms: Optional[int] = None
    chunked_ms: Optional[int] = None
    embedding_ms: Optional[int] = None
    completed_ms: Optional[int] = None
    failed_ms: Optional[int] = None
    chunks_indexed: int = 0
    cancelled_ms: Optional[int] = None
    superseded_ms: Optional[int] = None
    deleted_ms: Optional[int] = None
    stopped_by: Optional[str] = None  # who cancelled or deleted it
    superseded_by: Optional[str] = None  # the version that replaced it
    document_key: Optional[str] = None
    version: int = 1
    replaces: Optional[str] = None
    sha256: Optional[str] = None
    source_url: Optional[str] = None
    pages_ocred: int = 0  # pages read by OCR (they had no text layer)
    pages_unreadable: int = 0  # pages without text that OCR could not read either
    # Embedded and indexed chunk indexes as little-endian bitmaps in hex: small, and
    # idempotent under redelivery.
    embedded_bitmap: str = ""
    indexed_bitmap: str = ""

    def public(self) -> dict:
        """What the API shows: everything but the bitmaps."""
        data = self.asdict()
        del data["embedded_bitmap"], data["indexed_bitmap"]
        return data


def _with_indexes(bitmap_hex: str, indexes: Optional[list[int]], total: Optional[int]) -> tuple[str, int]:
    """A chunk bitmap with ``indexes`` added, and how many chunks it holds."""
    bitmap = int(bitmap_hex, 16) if bitmap_hex else 0
    for index in indexes or ():
        if index >= 0:
            bitmap |= 1 << index
    if total is not None:
        bitmap &= (1 << total) - 1  # an index past the total is not a chunk of this document
    return (format(bitmap, "x") if bitmap else ""), bitmap.bit_count()


def fold(status: Optional[DocumentStatus], event: StatusEvent, require_indexed: bool = False) -> DocumentStatus:
    """The status after ``event``; ``status`` is None for a document not seen before.

    ``require_indexed``: the pipeline has a vector index, and a document is completed only
    once every chunk is searchable in it.
    """
    if status is None:
        status = DocumentStatus(
            document_id=event.document_id,
            company_id=event.company_id,
            filename=event.filename,
            state="uploaded",
            pages=None,
            chunks_total=None,
            chunks_embedded=0,
            error=None,
            created_ms=event.at_ms,
            updated_ms=event.at_ms,
        )
    fields = status.asdict()
    if event.replayed and status.state == "failed":
        fields.update(state="uploaded", error=None, failed_ms=None)
    fields["filename"] = status.filename or event.filename
    if event.document_key:
        fields.update(document_key=event.document_key, version=event.version or 1, replaces=event.replaces or None)
    if event.sha256:
        fields["sha256"] = event.sha256
    if event.source_url:
        fields["source_url"] = event.source_url
    if event.pages_ocred is not None:
        fields["pages_ocred"] = event.pages_ocred
    if event.pages_unreadable is not None:
        fields["pages_unreadable"] = event.pages_unreadable
    if event.stage in ("cancelled", "deleted") and event.by:
        fields["stopped_by"] = fields["stopped_by"] or event.by
    if event.stage == "superseded" and event.successor_id:
        fields["superseded_by"] = fields["superseded_by"] or event.successor_id
    fields["created_ms"] = min(status.created_ms, event.at_ms)
    stamp = f"{event.stage}_ms"
    if stamp in fields and fields[stamp] is None:
        fields[stamp] = event.at_ms

    if event.pages is not None:
        fields["pages"] = event.pages
    if event.chunks_total is not None:
        fields["chunks_total"] = event.chunks_total
    total = fields["chunks_total"]
    fields["embedded_bitmap"], fields["chunks_embedded"] = _with_indexes(
        status.embedded_bitmap, event.chunk_indexes, total
    )
    fields["indexed_bitmap"], fields["chunks_indexed"] = _with_indexes(
        status.indexed_bitmap, event.indexed_indexes, total
    )

    fields["state"] = _next_state(fields["state"], event, fields, require_indexed)
    if event.stage == "failed" and fields["state"] == "failed":
        fields["error"] = fields["error"] or event.error or "failed without a reason"
    if fields == status.asdict():
        return status  # a redelivered or stale event: nothing new, so not even updated_ms moves
    fields["updated_ms"] = max(status.updated_ms, event.at_ms)
    if fields["state"] == "completed" and fields["completed_ms"] is None:
        fields["completed_ms"] = fields["updated_ms"]
    return DocumentStatus(**fields)


def _next_state(state: str, event: StatusEvent, fields: dict, require_indexed: bool) -> str:
    stopping = event.stage in STOP_RANK and event.stage != "completed"
    if state in STOP_RANK and state != "completed":
        # Stopped: only a stronger stop follows (a replayed failure was reset before this).
        return event.stage if stopping and STOP_RANK[event.stage] > STOP_RANK[state] else state
    if stopping:
        if event.stage == "failed" and state == "completed":
            return state  # a late failure of a redelivered message does not undo a searchable document
        return event.stage
    if state == "completed":
        return state
    total = fields["chunks_total"]
    done = fields["chunks_indexed"] if require_indexed else fields["chunks_embedded"]
    if total is not None and total > 0 and fields["chunks_embedded"] == total and done == total:
        return "completed"
    candidates = [state]
    if event.stage in PROGRESS_STATES[:-1]:
        candidates.append(event.stage)
    if fields["chunks_embedded"] or fields["chunks_indexed"]:
        candidates.append("embedding")
    if total is not None:
        candidates.append("chunked")
    return max(candidates, key=PROGRESS_STATES.index)
