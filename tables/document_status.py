"""A document's status and the state machine that folds StatusEvents into it.

``uploaded → extracting → chunked → embedding → completed``, or ``failed``. Events may
arrive twice or out of order: the state never moves backwards, counts come from the set
of distinct embedded chunk indexes (a bitmap), and ``completed`` means every index
below ``chunks_total`` is in it.
"""

from __future__ import annotations

from typing import Optional

import faust

from pipeline.records import FINAL_STATES, PROGRESS_STATES, DocumentState, StatusEvent


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
    # Embedded chunk indexes as a little-endian bitmap in hex: small, and idempotent under redelivery.
    embedded_bitmap: str = ""

    def public(self) -> dict:
        """What the API shows: everything but the bitmap."""
        data = self.asdict()
        del data["embedded_bitmap"]
        return data


def _bitmap(status: DocumentStatus) -> int:
    return int(status.embedded_bitmap, 16) if status.embedded_bitmap else 0


def fold(status: Optional[DocumentStatus], event: StatusEvent) -> DocumentStatus:
    """The status after ``event``; ``status`` is None for a document not seen before."""
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
    fields["filename"] = status.filename or event.filename
    fields["created_ms"] = min(status.created_ms, event.at_ms)
    stamp = f"{event.stage}_ms"
    if stamp in fields and fields[stamp] is None:
        fields[stamp] = event.at_ms

    if event.pages is not None:
        fields["pages"] = event.pages
    if event.chunks_total is not None:
        fields["chunks_total"] = event.chunks_total
    bitmap = _bitmap(status)
    for index in event.chunk_indexes or ():
        if index >= 0:
            bitmap |= 1 << index
    total = fields["chunks_total"]
    if total is not None:
        bitmap &= (1 << total) - 1  # an index past the total is not a chunk of this document
    fields["embedded_bitmap"] = format(bitmap, "x") if bitmap else ""
    fields["chunks_embedded"] = bitmap.bit_count()

    fields["state"] = _next_state(status, event, fields)
    if event.stage == "failed" and status.state != "completed":
        fields["error"] = status.error or event.error or "failed without a reason"
    if fields == status.asdict():
        return status  # a redelivered or stale event: nothing new, so not even updated_ms moves
    fields["updated_ms"] = max(status.updated_ms, event.at_ms)
    if fields["state"] == "completed" and fields["completed_ms"] is None:
        fields["completed_ms"] = fields["updated_ms"]
    return DocumentStatus(**fields)


def _next_state(status: DocumentStatus, event: StatusEvent, fields: dict) -> str:
    if status.state in FINAL_STATES:
        return status.state
    if event.stage in ("failed", "cancelled"):
        return event.stage
    total = fields["chunks_total"]
    if total is not None and total > 0 and fields["chunks_embedded"] == total:
        return "completed"
    candidates = [status.state]
    if event.stage in PROGRESS_STATES[:-1]:
        candidates.append(event.stage)
    if fields["chunks_embedded"]:
        candidates.append("embedding")
    if total is not None:
        candidates.append("chunked")
    return max(candidates, key=PROGRESS_STATES.index)
