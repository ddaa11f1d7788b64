"""The messages on docflow's topics (DESIGN §2): Faust Records, plain JSON on the wire.

``include_metadata=False`` keeps Faust's ``__faust`` blob off the wire, so Flink, Spark
and kcat read these without knowing Faust. Timestamps are epoch milliseconds (``*_ms``).
The JSON Schemas of these records are in ``pipeline/schemas/``.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import faust

STAGES = ("uploaded", "extracting", "chunked", "embedding", "completed", "failed", "cancelled")


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


class Chunk(WireRecord):
    chunk_id: str
    document_id: str
    company_id: str
    text: str
    page: int
    index: int
    total: int
    created_ms: int


class ChunkEmbedding(WireRecord):
    chunk_id: str
    document_id: str
    company_id: str
    index: int
    vector: list[float]
    model: str
    dims: int
    created_ms: int


class StatusEvent(WireRecord):
    """A stage's word on a document. ``chunk_indexes`` names the chunks an embedding event covers."""

    document_id: str
    company_id: str
    stage: str
    at_ms: int
    filename: str = ""
    chunks_total: Optional[int] = None
    chunks_embedded: Optional[int] = None
    chunk_indexes: Optional[list[int]] = None
    pages: Optional[int] = None
    error: Optional[str] = None


class CompanyWindowCount(WireRecord):
    company_id: str
    window_start_ms: int
    window_end_ms: int
    count: int


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
