"""What the vector index is to docflow: chunks in by chunk id, one company's nearest chunks out."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.records import ChunkEmbedding


@dataclass(frozen=True)
class SearchHit:
    chunk_id: str
    document_id: str
    filename: str
    title: str
    page: int
    index: int
    text: str
    score: float  # cosine similarity, higher is nearer


class VectorIndex(abc.ABC):
    """Chunks with their vectors, one collection per embedding space (model and dimensions).

    Every call raises :class:`pipeline.errors.VectorIndexError` when it fails, ``permanent``
    when retrying cannot help.
    """

    @abc.abstractmethod
    async def upsert(self, embeddings: Sequence[ChunkEmbedding]) -> None:
        """Insert or replace chunks by chunk id: a redelivered batch changes nothing."""

    @abc.abstractmethod
    async def search(
        self,
        company_id: str,
        model: str,
        vector: Sequence[float],
        top_k: int,
        document_ids: Sequence[str] = (),
        tags: Sequence[str] = (),
        min_score: float | None = None,
    ) -> list[SearchHit]:
        """One company's ``top_k`` chunks nearest ``vector`` in ``model``'s space, best first."""

    @abc.abstractmethod
    async def count(self, model: str, dims: int, company_id: str | None = None, document_id: str | None = None) -> int:
        """How many chunks of the space (of one company, of one document) the index holds."""

    @abc.abstractmethod
    async def delete_documents(self, company_id: str, document_ids: Sequence[str]) -> None:
        """Remove every chunk of these documents of the company, in every space; nothing when none is left."""

    async def seal(self) -> None:
        """Make what was written since the last call fast to search (a no-op where writes are)."""

    async def close(self) -> None:
        """Release connections."""
